"""Open-set 1:N search over enrolled faces: a FAISS inner-product index plus a JSON sidecar.

Embeddings are L2-normalised on the way in (enrolment and probes), so inner product is cosine
and one global threshold decides "known vs unknown", as facebce trains and evaluates. Index
types: 'flat' (exact, default), 'ivf' (inverted lists, trained on the first batch added) and
'hnsw' (graph). Every entry has a stable external int64 id; the sidecar maps it to the identity
name and the source file.

Saving writes `<path>` (the index) and `<path>.json` (the sidecar, which holds the index file's
SHA-256). Both are first written in full to `<name>.tmp`, then the index and then the sidecar
are renamed into place. A crash before the renames leaves the previous gallery; a crash
between them leaves the new index beside a complete `<path>.json.tmp`, which `load` recognises
by the checksum and renames to finish the save. Any other mismatch is a DataFormatError.
Single writer: two processes saving the same path at once is not supported.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from facebce.errors import DataFormatError, FacebceError

__all__ = ["GALLERY_VERSION", "INDEX_TYPES", "MODES", "Gallery", "Match", "SearchResult", "recall_against_exact"]

GALLERY_FORMAT = "facebce-gallery"
GALLERY_VERSION = 1
INDEX_TYPES = ("flat", "ivf", "hnsw")
MODES = ("all", "mean")  # every image is an entry / one mean template per identity
_METRIC = "inner_product"
# FAISS scans a flat index query by query (SIMD) until nq * d reaches its process-wide
# distance_compute_blas_threshold (128000 in faiss >= 1.15, tuned for many-core servers: at d=512 a
# batch under 250 probes never reaches BLAS). On a few cores one BLAS product over the gallery wins
# from about 8 probes on (tools/bench: 64 probes x 100k gallery, ~3x numpy), so flat searches of
# `_BLAS_MIN_QUERIES` or more probes lower it for the call (a lock guards the global); fewer
# probes are scanned by `_scan_few`.
_BLAS_MIN_QUERIES = 8
_BLAS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Match:
    id: int
    identity: str
    score: float  # cosine


@dataclass(frozen=True)
class SearchResult:
    """One probe: its top-k matches (best first) and the open-set decision at `threshold`."""

    matches: list[Match]
    identity: str | None  # the best match's identity if its score > threshold, else None ("unknown")
    score: float  # the best score (-inf when the index returned no match)
    threshold: float

    @property
    def is_unknown(self) -> bool:
        return self.identity is None


@dataclass
class _Entry:
    identity: str
    source: str | None
    count: int = 1  # images averaged into a mean template
    mean_norm: float = 1.0  # |mean of the normalised images|; with count, turns a template back into a sum


class Gallery:
    """Enrolled embeddings behind one FAISS index with stable external ids.

    `mode='all'` keeps every image; `mode='mean'` keeps one L2-normalised mean template per
    identity, updated as more images of that identity are added. `threshold` is the global
    cosine threshold of the model (e.g. `OnnxEmbedder(...).threshold`); `search` can override it.
    IVF options: `nlist` (default about 4 sqrt(N) of the first batch, at most N / 39), `nprobe`.
    HNSW options: `hnsw_m`, `ef_construction`, `ef_search`. HNSW cannot delete: `remove` rebuilds
    it from the stored vectors (O(N log N)). `use_gpu=None` searches on GPU when FAISS sees one
    (flat and IVF only; the CPU index stays the one that is saved).
    """

    def __init__(self, dim: int, *, index_type: str = "flat", mode: str = "all", threshold: float | None = None,
                 nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32, ef_construction: int = 40,
                 ef_search: int = 128, use_gpu: bool | None = None):
        self.dim = _positive_int(dim, "dim")
        if index_type not in INDEX_TYPES:
            raise FacebceError(f"index_type={index_type!r}: expected one of {', '.join(INDEX_TYPES)}")
        if mode not in MODES:
            raise FacebceError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        self.index_type, self.mode = index_type, mode
        self.threshold = None if threshold is None else _threshold(threshold, "threshold")
        self.options = {"nlist": None if nlist is None else _positive_int(nlist, "nlist"),
                        "nprobe": _positive_int(nprobe, "nprobe"), "hnsw_m": _positive_int(hnsw_m, "hnsw_m"),
                        "ef_construction": _positive_int(ef_construction, "ef_construction"),
                        "ef_search": _positive_int(ef_search, "ef_search")}
        self.use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else bool(use_gpu)
        if self.use_gpu and faiss.get_num_gpus() == 0:
            raise FacebceError("use_gpu=True: this FAISS build sees no GPU (install faiss-gpu, or pass use_gpu=None)")
        self._entries: dict[int, _Entry] = {}
        self._next_id = 0
        self._index: faiss.Index | None = None if index_type == "ivf" else self._new_index(0)
        self._gpu_index: faiss.Index | None = None

    # ---- contents -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def ids(self) -> np.ndarray:
        """The entries' external ids, ascending."""
        return np.array(sorted(self._entries), dtype=np.int64)

    @property
    def identities(self) -> list[str]:
        return sorted({e.identity for e in self._entries.values()})

    def entry(self, id: int) -> dict:
        """The sidecar record of one id: identity, source (and count for a mean template)."""
        if id not in self._entries:
            raise FacebceError(f"id={id!r}: not in the gallery")
        return self._record(id, self._entries[id])

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored (normalised) vectors of `ids`, float32 len(ids) x dim."""
        ids = self._existing(ids)
        if not ids.size:
            return np.empty((0, self.dim), np.float32)
        return self._index.reconstruct_batch(ids)

    def info(self) -> dict:
        return {"format": GALLERY_FORMAT, "version": GALLERY_VERSION, "dim": self.dim, "metric": _METRIC,
                "index_type": self.index_type, "mode": self.mode, "threshold": self.threshold,
                "entries": len(self), "identities": len(self.identities), "options": dict(self.options),
                "gpu": self.use_gpu and self.index_type != "hnsw"}

    # ---- changes --------------------------------------------------------------------------------
    def add(self, embeddings, identities: Sequence[str], sources: Sequence[str | None] | None = None,
            ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Enrol embeddings (N x dim, any positive norm) of `identities`; returns the ids they got.

        In 'all' mode each row becomes an entry, with `ids` given or the next free ones. In 'mean'
        mode rows are averaged per identity into its template (ids are assigned per identity, and
        sources are not kept: a template has many).
        """
        x = _unit_rows(embeddings, self.dim, "embeddings")
        if not len(x):
            raise DataFormatError("embeddings: no rows to add")
        names = _names(identities, len(x))
        sources = _sources(sources, len(x))
        if self.mode == "mean":
            if ids is not None:
                raise FacebceError("ids: mode='mean' assigns one id per identity; do not pass ids")
            return self._add_means(x, names)
        new_ids = self._checked_new_ids(ids, len(x))
        self._insert(x, new_ids)
        self._entries.update((int(i), _Entry(n, s)) for i, n, s in zip(new_ids, names, sources))
        return new_ids

    def remove(self, ids: Sequence[int] | np.ndarray | None = None, identity: str | Sequence[str] | None = None) -> int:
        """Delete entries by id, or every entry of one or more identities; returns how many."""
        if (ids is None) == (identity is None):
            raise FacebceError("remove: pass exactly one of ids= or identity=")
        if identity is not None:
            wanted = {identity} if isinstance(identity, str) else set(identity)
            unknown = sorted(wanted - set(self.identities))
            if unknown:
                raise FacebceError(f"identity: not in the gallery: {unknown[:5]}")
            drop = np.array([i for i, e in self._entries.items() if e.identity in wanted], dtype=np.int64)
        else:
            drop = np.unique(self._existing(ids))
        self._delete(drop)
        for i in drop:
            del self._entries[int(i)]
        return int(drop.size)

    def _add_means(self, x: np.ndarray, names: list[str]) -> np.ndarray:
        """Fold each identity's rows into its template: sum of unit vectors, renormalised."""
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            rows.setdefault(name, []).append(row)
        by_name = {e.identity: i for i, e in self._entries.items()}
        replaced = np.array([by_name[n] for n in rows if n in by_name], dtype=np.int64)
        old = dict(zip(replaced.tolist(), self.vectors(replaced)))
        ids, templates, entries = [], [], []
        for name, r in rows.items():
            total, count = x[r].sum(axis=0, dtype=np.float64), len(r)
            if name in by_name:
                i = by_name[name]
                prev = self._entries[i]
                total += old[i] * prev.mean_norm * prev.count
                count += prev.count
            else:
                i, self._next_id = self._next_id, self._next_id + 1
            norm = float(np.linalg.norm(total))
            if norm == 0:
                raise FacebceError(f"identities: the embeddings of {name!r} sum to zero; no mean template")
            ids.append(i)
            templates.append(total / norm)
            entries.append(_Entry(name, None, count, norm / count))
        self._delete(replaced)
        ids = np.array(ids, dtype=np.int64)
        self._insert(np.asarray(templates, np.float32), ids)
        self._entries.update(zip(ids.tolist(), entries))
        return ids

    def _existing(self, ids) -> np.ndarray:
        ids = _id_array(ids)
        missing = [int(i) for i in ids if int(i) not in self._entries]
        if missing:
            raise FacebceError(f"ids: not in the gallery: {missing[:5]}")
        return ids

    def _checked_new_ids(self, ids, n: int) -> np.ndarray:
        if ids is None:
            new = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        else:
            new = _id_array(ids)
            if new.size != n:
                raise FacebceError(f"ids: {new.size} ids for {n} embeddings")
            if new.min() < 0:
                raise FacebceError(f"ids: negative id {int(new.min())} (FAISS reserves -1)")
            dup = np.unique(new)[np.unique(new, return_counts=True)[1] > 1]
            clash = [int(i) for i in new if int(i) in self._entries]
            if dup.size or clash:
                raise FacebceError(f"ids: duplicate ids {(dup.tolist() or clash)[:5]}")
        self._next_id = max(self._next_id, int(new.max()) + 1)
        return new

    # ---- FAISS ----------------------------------------------------------------------------------
    def _new_index(self, n_train: int) -> faiss.Index:
        o = self.options
        if self.index_type == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self.index_type == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self.dim, o["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = o["ef_construction"]
            index = faiss.IndexIDMap2(hnsw)
        else:
            if o["nlist"] is None:
                o["nlist"] = max(1, min(int(4 * math.sqrt(n_train)), n_train // 39))
            if n_train < o["nlist"]:
                raise FacebceError(f"nlist={o['nlist']}: IVF needs at least nlist vectors in the first add "
                                   f"to train on, got {n_train}")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, o["nlist"], faiss.METRIC_INNER_PRODUCT)
            index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct/remove by external id
        self._configure(index)
        return index

    def _configure(self, index: faiss.Index) -> None:
        """Search-time knobs, which FAISS does not all keep in the file."""
        if self.index_type == "ivf":
            index.nprobe = min(self.options["nprobe"], index.nlist)
        elif self.index_type == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self.options["ef_search"]

    def _insert(self, x: np.ndarray, ids: np.ndarray) -> None:
        if self._index is None:  # IVF: train its coarse quantiser on the first data
            index = self._new_index(len(x))
            index.train(x)
            self._index = index
        self._index.add_with_ids(x, ids)
        self._gpu_index = None

    def _delete(self, ids: np.ndarray) -> None:
        if not ids.size:
            return
        if self.index_type == "hnsw":  # HNSW graphs cannot drop nodes: rebuild without them
            keep = np.setdiff1d(self.ids, ids)
            vectors = self.vectors(keep)
            self._index = self._new_index(0)
            self._index.add_with_ids(vectors, keep)
        else:
            self._index.remove_ids(ids)
        self._gpu_index = None

    def _searcher(self) -> faiss.Index:
        if self.use_gpu and self.index_type != "hnsw":
            if self._gpu_index is None:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
            return self._gpu_index
        return self._index

    # ---- search ---------------------------------------------------------------------------------
    def search(self, queries, k: int = 5, threshold: float | None = None) -> list[SearchResult]:
        """Top-k matches of each probe (N x dim) and the open-set decision: a probe is known iff its
        best cosine > threshold (the gallery's unless given), as facebce's metrics count accepts."""
        t = self.threshold if threshold is None else _threshold(threshold, "threshold")
        if t is None:
            raise FacebceError("threshold: the gallery has none; pass threshold= (e.g. the model's metadata threshold)")
        scores, ids = self._knn(_unit_rows(queries, self.dim, "queries"), _positive_int(k, "k"))
        results = []
        for row_scores, row_ids in zip(scores, ids):
            matches = [Match(int(i), self._entries[int(i)].identity, float(s))
                       for s, i in zip(row_scores, row_ids) if i >= 0]
            best = matches[0] if matches else None
            known = best is not None and best.score > t
            results.append(SearchResult(matches, best.identity if known else None,
                                        best.score if best else float("-inf"), t))
        return results

    def _knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._entries:
            raise FacebceError("search: the gallery is empty; add embeddings first")
        searcher, k = self._searcher(), min(k, len(self))
        if self.index_type != "flat" or self._gpu_index is not None:
            return searcher.search(queries, k)
        if len(queries) < _BLAS_MIN_QUERIES:
            return self._scan_few(queries, k)
        with _BLAS_LOCK:
            saved = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = min(saved, _BLAS_MIN_QUERIES * self.dim)
            try:
                return searcher.search(queries, k)
            finally:
                faiss.cvar.distance_compute_blas_threshold = saved

    def _scan_few(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of a few probes over the flat index's own storage (a view, no copy) with one
        BLAS product: FAISS scans a single probe on one thread, OpenBLAS's gemv streams the gallery
        on every core, which is what a memory-bound scan needs. Same (scores, ids) as FAISS."""
        flat = faiss.downcast_index(self._index.index)
        n = flat.ntotal
        xb = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)
        ids = faiss.rev_swig_ptr(self._index.id_map.data(), n)
        scores = queries @ xb.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(queries), 1))
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top_scores, order, axis=1), ids[np.take_along_axis(top, order, axis=1)]

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write `path` (FAISS index) and `path.json` (sidecar) atomically as a pair (module docstring)."""
        index_path = Path(path)
        sidecar_path = _sidecar_path(index_path)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        # An IVF gallery that never had data has no index yet: an empty flat one stands in (load sees ntotal 0).
        index = self._index if self._index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        data = faiss.serialize_index(index)
        sidecar = self._sidecar(hashlib.sha256(data).hexdigest())
        _write_synced(_tmp(index_path), data.tobytes())
        _write_synced(_tmp(sidecar_path), json.dumps(sidecar, indent=1).encode())
        os.replace(_tmp(index_path), index_path)
        os.replace(_tmp(sidecar_path), sidecar_path)
        _sync_dir(index_path.parent)

    def _sidecar(self, index_sha256: str) -> dict:
        return {"format": GALLERY_FORMAT, "version": GALLERY_VERSION, "dim": self.dim, "metric": _METRIC,
                "index_type": self.index_type, "mode": self.mode, "threshold": self.threshold,
                "options": self.options, "next_id": self._next_id, "count": len(self),
                "index_sha256": index_sha256,
                "entries": [self._record(i, e) for i, e in sorted(self._entries.items())]}

    def _record(self, id: int, e: _Entry) -> dict:
        record = {"id": id, "identity": e.identity, "source": e.source}
        if self.mode == "mean":
            record.update(count=e.count, mean_norm=e.mean_norm)
        return record

    @classmethod
    def load(cls, path: str | os.PathLike, *, dim: int | None = None, use_gpu: bool | None = None) -> Gallery:
        """Read a saved gallery, checking format version, index/sidecar consistency and (if given) `dim`."""
        index_path = Path(path)
        sidecar_path = _sidecar_path(index_path)
        data = _read(index_path)
        digest = hashlib.sha256(data).hexdigest()
        meta = _read_sidecar(sidecar_path)
        if meta.get("index_sha256") != digest:
            meta = _finish_interrupted_save(sidecar_path, digest)
            if meta is None:
                raise DataFormatError(f"{index_path}: index file does not match {sidecar_path.name} (SHA-256 "
                                      f"differs): corrupted, or replaced without its sidecar")
        gallery = _gallery_from_sidecar(meta, sidecar_path, use_gpu)
        if dim is not None and gallery.dim != dim:
            raise DataFormatError(f"{index_path}: gallery embeddings are {gallery.dim}-d, the model gives {dim}-d")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            detail = " ".join(str(e).split())[-120:]  # FAISS prefixes the C++ location; keep the reason
            raise DataFormatError(f"{index_path}: not a readable FAISS index ({detail})") from None
        if index.d != gallery.dim or index.ntotal != len(gallery):
            raise DataFormatError(f"{index_path}: index holds {index.ntotal} x {index.d}-d vectors but "
                                  f"{sidecar_path.name} lists {len(gallery)} x {gallery.dim}-d")
        if index.ntotal or gallery.index_type != "ivf":
            gallery._configure(index)
            gallery._index = index
        return gallery


def recall_against_exact(gallery: Gallery, queries, k: int = 10) -> float:
    """Mean fraction of the exact top-k (brute-force cosine over the stored vectors) that the
    gallery's index returns: how much an IVF/HNSW index loses to its approximations."""
    k = _positive_int(k, "k")
    if k > len(gallery):
        raise FacebceError(f"k={k}: the gallery has only {len(gallery)} entries")
    q = _unit_rows(queries, gallery.dim, "queries")
    ids = gallery.ids
    exact = faiss.IndexFlatIP(gallery.dim)
    exact.add(gallery.vectors(ids))
    _, rows = exact.search(q, k)
    _, approx = gallery._knn(q, k)
    hits = [len(set(ids[r].tolist()) & set(a.tolist())) for r, a in zip(rows, approx)]
    return float(np.mean(hits) / k)


# ---- validation ---------------------------------------------------------------------------------
def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise FacebceError(f"{name}={value!r}: expected a positive int")
    return int(value)


def _threshold(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -1.0 <= value <= 1.0:
        raise FacebceError(f"{name}={value!r}: expected a cosine threshold in [-1, 1]")
    return float(value)


def _unit_rows(x, dim: int, name: str) -> np.ndarray:
    """float32 N x dim with unit rows; NaN/Inf, zero rows and wrong widths are errors naming `name`."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim or x.dtype.kind not in "fiu":
        raise DataFormatError(f"{name}: shape {x.shape} {x.dtype}, expected N x {dim} floats")
    x = x.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise DataFormatError(f"{name}: {bad.size} rows contain NaN/Inf (first: row {bad[0]})")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise DataFormatError(f"{name}: row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros")
    return np.ascontiguousarray(x / norms)


def _id_array(ids) -> np.ndarray:
    raw = np.asarray(ids)
    if raw.ndim != 1 or (raw.size and raw.dtype.kind not in "iu"):
        raise FacebceError(f"ids: expected a 1-D sequence of integers, got shape {raw.shape} {raw.dtype}")
    return raw.astype(np.int64)


def _names(identities, n: int) -> list[str]:
    names = [identities] if isinstance(identities, str) else list(identities)
    if len(names) != n or not all(isinstance(s, str) and s for s in names):
        raise DataFormatError(f"identities: expected {n} non-empty strings, got {len(names)} items")
    return names


def _sources(sources, n: int) -> list[str | None]:
    if sources is None:
        return [None] * n
    sources = list(sources)
    if len(sources) != n or not all(s is None or isinstance(s, str) for s in sources):
        raise DataFormatError(f"sources: expected {n} file names (or None), got {len(sources)} items")
    return sources


# ---- files --------------------------------------------------------------------------------------
def _sidecar_path(index_path: Path) -> Path:
    return index_path.with_name(index_path.name + ".json")


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    """Make the renames durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read the gallery index ({e.strerror})") from None


def _read_sidecar(path: Path) -> dict:
    try:
        meta = json.loads(_read(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: gallery sidecar is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != GALLERY_FORMAT:
        raise DataFormatError(f"{path}: not a facebce gallery sidecar (format != {GALLERY_FORMAT!r})")
    if meta.get("version") != GALLERY_VERSION:
        raise DataFormatError(f"{path}: gallery version {meta.get('version')!r}; this facebce reads {GALLERY_VERSION}")
    return meta


def _finish_interrupted_save(sidecar_path: Path, digest: str) -> dict | None:
    """The index was renamed but the sidecar not: the complete new sidecar is still `<sidecar>.tmp`."""
    pending = _tmp(sidecar_path)
    if not pending.exists():
        return None
    meta = _read_sidecar(pending)
    if meta.get("index_sha256") != digest:
        return None
    os.replace(pending, sidecar_path)
    return meta


def _gallery_from_sidecar(meta: dict, where: Path, use_gpu: bool | None) -> Gallery:
    """Rebuild the Gallery object (without its index) from a validated sidecar."""
    try:
        o = meta["options"]
        gallery = Gallery(meta["dim"], index_type=meta["index_type"], mode=meta["mode"], threshold=meta["threshold"],
                          nlist=o["nlist"], nprobe=o["nprobe"], hnsw_m=o["hnsw_m"],
                          ef_construction=o["ef_construction"], ef_search=o["ef_search"], use_gpu=use_gpu)
        for r in meta["entries"]:
            gallery._entries[int(r["id"])] = _Entry(str(r["identity"]), r["source"], int(r.get("count", 1)),
                                                     float(r.get("mean_norm", 1.0)))
        gallery._next_id = int(meta["next_id"])
        count = int(meta["count"])
    except (KeyError, TypeError, ValueError, FacebceError) as e:
        raise DataFormatError(f"{where}: malformed gallery sidecar ({type(e).__name__}: {e})") from None
    if count != len(gallery) or len(meta["entries"]) != count:
        raise DataFormatError(f"{where}: sidecar count {count} but {len(meta['entries'])} entries (duplicate ids?)")
    return gallery
