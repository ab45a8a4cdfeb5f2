"""Folder-level deployment steps behind `facebce gallery ...`: embed aligned crops, enrol, search, migrate.

Images are aligned 112x112 crops (e.g. from `facebce align`), read with facebce.fileio (BGR,
header-checked) and embedded by the same runner evaluation uses, so a gallery's scores are the
scores evaluation calibrated its global threshold on. A gallery is named by a path (FAISS) or a
Milvus URI everywhere here (`open_gallery`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from facebce.data.image_folder import scan_image_folder
from facebce.deploy.gallery import SearchResult, choose_index, escape_name, resolve_threshold
from facebce.deploy.stores import open_gallery
from facebce.errors import DataFormatError, FacebceError
from facebce.fileio import read_bgr

_CHUNK = 256  # images decoded per embedding call: bounded memory for large folders
_MIGRATE_CHUNK = 10_000


def embed_files(embedder, paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """L2-normalised embeddings of image files, in order, a chunk at a time."""
    chunks = [embedder.embed([read_bgr(p) for p in paths[i:i + _CHUNK]]) for i in range(0, len(paths), _CHUNK)]
    if not chunks:
        raise DataFormatError("no images to embed")
    return np.concatenate(chunks)


@dataclass(frozen=True)
class EnrolSummary:
    path: str
    added: int
    identities: int
    total: int

    def __str__(self) -> str:
        return (f"{self.path}: enrolled {self.added} images of {self.identities} identities; "
                f"the gallery now holds {self.total} entries")


def _embed_folder(embedder, images_root) -> tuple[np.ndarray, list[str], list[str]]:
    names, paths, labels = scan_image_folder(images_root)
    return embed_files(embedder, paths), [names[k] for k in labels], [str(p) for p in paths]


def enrol_folder(gallery, embedder, images_root: str | os.PathLike, *, create: dict | None = None,
                 lock_timeout: float = 30.0) -> EnrolSummary:
    """Embed `images_root/<identity>/*` and add it to the gallery `gallery` (path or URI).

    `create` = open_gallery/Gallery options (index_type, mode, threshold, ...) to start a new gallery
    (refused if one exists there); None adds to the existing one in one durable step.
    """
    emb, names, sources = _embed_folder(embedder, images_root)
    if create is not None:
        options = dict(create)
        threshold = options.pop("threshold", None)
        store = open_gallery(gallery, dim=emb.shape[1], create=options, threshold=threshold,
                             lock_timeout=lock_timeout)
    else:
        store = open_gallery(gallery, dim=emb.shape[1], lock_timeout=lock_timeout)
    with store:
        ids = store.add(emb, names, sources=sources)
        return EnrolSummary(str(gallery), len(ids), len(set(names)), len(store))


def build_gallery(gallery, embedder, folders: Sequence[str | os.PathLike], *, threshold=None,
                  index_type: str = "flat", mode: str = "all", memory_gb: float | None = None,
                  lock_timeout: float = 30.0, say=print, **options) -> list[EnrolSummary]:
    """`facebce gallery build`: embed every folder first (nothing is created if one fails), resolve the
    threshold (`resolve_threshold`: the given one, else the model's pair threshold, said in one line;
    a model with only b/gamma is refused), choose the index for `index_type='auto'` from the number of
    images and `memory_gb`, create the gallery and enrol each folder as one durable step."""
    if not folders:
        raise FacebceError("gallery build: give at least one image folder")
    t, why = resolve_threshold(threshold, embedder)
    embedded = [(folder, *_embed_folder(embedder, folder)) for folder in folders]
    n, dim = sum(len(e) for _, e, _, _ in embedded), embedded[0][1].shape[1]
    if index_type == "auto":
        chosen = choose_index(n, dim, memory_gb)
        options = {**chosen, **options}
        index_type = options.pop("index_type")
        say(f"index: {index_type} for {n:,} x {dim}-d" + (f" within {memory_gb:g} GB" if memory_gb else "")
            + "".join(f", {k} {v}" for k, v in options.items()))
    elif memory_gb is not None and index_type in ("ivfpq", "opq") and options.get("pq_m") is None:
        options = {**{k: v for k, v in choose_index(max(n, 200_001), dim, memory_gb).items()
                      if k != "index_type"}, **options}
    say(f"using {why}")
    summaries = []
    with open_gallery(gallery, dim=dim, create={"index_type": index_type, "mode": mode, **options},
                      threshold=t, lock_timeout=lock_timeout) as store:
        for folder, emb, names, sources in embedded:
            ids = store.add(emb, names, sources=sources)
            summaries.append(EnrolSummary(str(gallery), len(ids), len(set(names)), len(store)))
    return summaries


def set_gallery_threshold(gallery, threshold, embedder=None, *, lock_timeout: float = 30.0) -> str:
    """`facebce gallery set-threshold`: store a new pair threshold (through `resolve_threshold`)."""
    t, why = resolve_threshold(threshold, embedder)
    with open_gallery(gallery, lock_timeout=lock_timeout) as store:
        old = store.threshold
        store.set_threshold(t)
    return f"{gallery}: threshold {old} -> {t} ({why})"


def search_files(gallery, embedder, image_paths: Sequence[str | os.PathLike], *, k: int = 5, threshold=None,
                 nprobe: int | None = None) -> list[tuple[str, SearchResult]]:
    """Search every probe image; threshold: the argument, else the gallery's, else the model's pair
    threshold (never its b/gamma: `resolve_threshold`)."""
    with open_gallery(gallery) as store:
        emb = embed_files(embedder, image_paths)
        if emb.shape[1] != store.dim:
            raise DataFormatError(f"{gallery}: gallery embeddings are {store.dim}-d, the model gives {emb.shape[1]}-d")
        if threshold is not None or store.threshold is None:
            threshold = resolve_threshold(threshold, embedder)[0]
        results = store.search(emb, k=k, threshold=threshold, nprobe=nprobe)
    return list(zip(map(str, image_paths), results))


def format_results(results: list[tuple[str, SearchResult]]) -> str:
    """One line per probe; names and paths escaped so that no name can forge a line."""
    lines = []
    for path, r in results:
        decision = "UNKNOWN" if r.is_unknown else escape_name(r.identity)
        top = ", ".join(f"{escape_name(m.identity)} {m.score:.3f}" for m in r.matches)
        lines.append(f"{escape_name(path)}: {decision} (best {r.score:.3f} vs threshold {r.threshold:.3f}); top: {top}")
    return "\n".join(lines)


def remove_entries(gallery, *, ids: str | Sequence[int] | None = None, identity: str | None = None,
                   lock_timeout: float = 30.0) -> str:
    """`facebce gallery remove`: by comma-separated ids (text from the command line) or identity."""
    if (ids is None) == (identity is None):
        raise FacebceError("gallery remove: pass exactly one of --ids or --identity")
    if isinstance(ids, str):
        try:
            ids = [int(i) for i in ids.split(",") if i.strip()]
        except ValueError:
            raise FacebceError(f"--ids {ids!r}: expected comma-separated integer ids, e.g. --ids 3,17") from None
        if not ids:
            raise FacebceError("--ids: no ids given")
    with open_gallery(gallery, lock_timeout=lock_timeout) as store:
        n = store.remove(ids=ids, identity=identity)
        return f"{gallery}: removed {n} entries; {len(store)} remain"


def migrate(src, dst, *, lock_timeout: float = 30.0, say=print) -> str:
    """`facebce gallery migrate SRC DST`: copy a gallery (entries with their ids, identities, sources,
    mean-template counts, threshold and mode) to a new gallery on any backend. DST must not exist."""
    with open_gallery(src, lock_timeout=lock_timeout) as source:
        info = source.info()
        if not info.get("exact_vectors", True):
            kept = info.get("stored_vectors", "pq codes")
            say(f"note: {src} keeps its vectors as {kept}; the copy holds "
                + ("the codes' reconstructions" if kept == "pq codes" else f"the {kept} values"))
        options = {"mode": info["mode"]}
        if not str(dst).startswith("milvus"):
            options["index_type"] = info["index_type"] if info.get("backend") == "faiss" else "flat"
            if options["index_type"] != "flat" and info.get("backend") == "faiss":
                options.update({k: v for k, v in info["options"].items() if v is not None})
        records = source.entries()
        with open_gallery(dst, dim=info["dim"], create=options, threshold=info["threshold"],
                          lock_timeout=lock_timeout) as target:
            for start in range(0, len(records), _MIGRATE_CHUNK):
                chunk = records[start:start + _MIGRATE_CHUNK]
                target.import_entries(chunk, source.vectors([r["id"] for r in chunk]))
            return (f"{src} -> {dst}: copied {len(target)} entries of {len(target.identities)} identities "
                    f"(mode {info['mode']}, threshold {info['threshold']})")
