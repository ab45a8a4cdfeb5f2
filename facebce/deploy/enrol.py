"""Folder-level deployment steps behind `facebce gallery ...`: embed aligned crops, enrol, search.

Images are aligned 112x112 crops (e.g. from `facebce align`), read with OpenCV (BGR) and embedded
by the same runner evaluation uses (`facebce.eval.model_loading.ModelSpec`), so a gallery's scores
are the scores evaluation calibrated its global threshold on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from facebce.data.image_folder import scan_image_folder
from facebce.deploy.gallery import Gallery, SearchResult
from facebce.errors import DataFormatError, FacebceError

_CHUNK = 256  # images decoded per embedding call: bounded memory for large folders


def read_bgr(path: str | os.PathLike) -> np.ndarray:
    img = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataFormatError(f"{path}: not a readable image")
    return img


def embed_files(embedder, paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """L2-normalised embeddings of image files, in order, a chunk at a time."""
    chunks = [embedder.embed([read_bgr(p) for p in paths[i:i + _CHUNK]]) for i in range(0, len(paths), _CHUNK)]
    if not chunks:
        raise DataFormatError("no images to embed")
    return np.concatenate(chunks)


@dataclass(frozen=True)
class EnrolSummary:
    path: Path
    added: int
    identities: int
    total: int

    def __str__(self) -> str:
        return (f"{self.path}: enrolled {self.added} images of {self.identities} identities; "
                f"the gallery now holds {self.total} entries")


def enrol_folder(gallery_path: str | os.PathLike, embedder, images_root: str | os.PathLike, *,
                 create: dict | None = None) -> EnrolSummary:
    """Embed `images_root/<identity>/*` and add it to the gallery at `gallery_path`.

    `create` = Gallery(...) keyword arguments to start a new gallery (refused if one exists there);
    None adds to the existing one. The gallery is saved atomically at the end.
    """
    gallery_path = Path(gallery_path)
    names, paths, labels = scan_image_folder(images_root)
    emb = embed_files(embedder, paths)
    if create is not None:
        if gallery_path.exists():
            raise FacebceError(f"{gallery_path}: a gallery already exists here; use 'gallery add' or another path")
        gallery = Gallery(emb.shape[1], **create)
    else:
        gallery = Gallery.load(gallery_path, dim=emb.shape[1])
    ids = gallery.add(emb, [names[k] for k in labels], sources=[str(p) for p in paths])
    gallery.save(gallery_path)
    return EnrolSummary(gallery_path, len(ids), len(names), len(gallery))


def search_files(gallery_path: str | os.PathLike, embedder, image_paths: Sequence[str | os.PathLike], *,
                 k: int = 5, threshold: float | None = None) -> list[tuple[str, SearchResult]]:
    """Search every probe image; threshold: the argument, else the gallery's, else the model's metadata."""
    gallery = Gallery.load(gallery_path)
    if threshold is None and gallery.threshold is None:
        threshold = getattr(embedder, "threshold", None)
    results = gallery.search(embed_files(embedder, image_paths), k=k, threshold=threshold)
    return list(zip(map(str, image_paths), results))


def format_results(results: list[tuple[str, SearchResult]]) -> str:
    lines = []
    for path, r in results:
        decision = "UNKNOWN" if r.is_unknown else r.identity
        top = ", ".join(f"{m.identity} {m.score:.3f}" for m in r.matches)
        lines.append(f"{path}: {decision} (best {r.score:.3f} vs threshold {r.threshold:.3f}); top: {top}")
    return "\n".join(lines)
