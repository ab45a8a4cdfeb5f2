"""Open-set 1:N search over enrolled faces, and the gallery stores that keep it.

Embeddings are L2-normalised on the way in (enrolment and probes), so inner product is cosine and
one global threshold decides "known vs unknown", as facebce trains and evaluates. Every entry has a
stable external int64 id mapped to its identity name (any string, kept exactly) and source file.

Two layers:
- `Gallery`: the in-memory gallery (one FAISS index plus the id -> identity table). Index types:
  'flat' (exact, default), 'ivf' (inverted lists of full vectors), 'ivfpq' and 'opq' (inverted
  lists of product-quantised codes, OPQ with a learned rotation first: a few dozen bytes a vector;
  `pq_bits=4` scans them with FAISS's SIMD fast-scan kernels, and `refine` keeps a second copy of
  every vector, fp16 or 8-bit, to re-rank the codes' shortlist exactly), 'hnsw' (graph). IVF types
  are trained on (a sample of) the first batch added.
- the durable stores that keep it (`facebce.deploy.stores.open_gallery(spec)`, which this module
  does not import: the stores build on `Gallery`, not the other way round).

This module is over 450 lines because the in-memory gallery is one object: five FAISS index types,
two enrolment modes and the BLAS fast path share its private id/identity tables.
"""
from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from facebce.errors import DataFormatError, FacebceError
from facebce.fileio import unit_rows

__all__ = ["GALLERY_VERSION", "INDEX_TYPES", "MODES", "Gallery", "Match", "SearchResult", "choose_index",
           "escape_name", "recall_against_exact", "resolve_threshold"]

GALLERY_FORMAT = "facebce-gallery"
GALLERY_VERSION = 2  # 1: index + sidecar saved whole; 2: + journal, sequence numbers and a sidecar checksum
INDEX_TYPES = ("flat", "ivf", "ivfpq", "opq", "hnsw")
TRAINED_TYPES = ("ivf", "ivfpq", "opq")
EXACT_TYPES = ("flat", "ivf", "hnsw")  # store the vectors themselves (PQ types keep lossy codes)
PQ_TYPES = ("ivfpq", "opq")
REFINES = ("none", "sq8", "fp16", "flat")  # PQ types' re-ranking copy of the vectors
_REFINE_BYTES = {"none": 0, "sq8": 1, "fp16": 2, "flat": 4}  # per dimension
MODES = ("all", "mean")  # every image is an entry / one mean template per identity
_METRIC = "inner_product"
_PQ_TRAIN_MIN = 256  # an 8-bit product quantiser has 256 centroids per sub-space
_TRAIN_SAMPLE = 100_000  # IVF types train on at most this many rows of the first batch (seeded sample)
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
    source: str | None = None


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


def choose_index(n: int, dim: int, memory_gb: float | None = None) -> dict:
    """Index type and parameters for `n` vectors of `dim` under a memory budget (GB; None: no budget).

    Flat while its vectors (4 * dim bytes each) fit in half the budget and n <= 200k (an exact scan
    of 200k x 512 is ~2 ms a probe). Otherwise IVF-PQ, nlist ~ sqrt(n) (a power of 2):
    - when half the budget holds a re-ranking copy of every vector (fp16, else 8-bit): 4-bit
      fast-scan codes of dim / 4 sub-quantisers (dim / 8 bytes) visiting half of the lists, and
      the shortlist re-ranked on that copy. On face-like vectors (tools/bench, 1M x 512) the exact
      top-1 of a probe of an enrolled person is then found 98 % of the time at ~18x flat's
      single-query speed (a quarter of the lists: 94 %, ~26-32x): one person's images are near ties
      that the codes alone reorder, and they spread over many lists;
    - else the largest 8-bit code (pq_m bytes, pq_m dividing dim, at most dim / 2) whose codes, ids
      and lists fit, no re-ranking, nprobe nlist / 16.
    Returns Gallery keyword arguments.
    """
    n, dim = _positive_int(n, "n"), _positive_int(dim, "dim")
    budget = None if memory_gb is None else float(memory_gb) * 1e9 / 2
    if budget is not None and (not math.isfinite(budget) or budget <= 0):
        raise FacebceError(f"memory_gb={memory_gb!r}: expected a positive number of gigabytes")
    if n <= 200_000 and (budget is None or n * 4 * dim <= budget):
        return {"index_type": "flat"}
    candidates = [m for m in (dim // 2, dim // 4, dim // 8, dim // 16, dim // 32, 8, 4)
                  if m >= 1 and dim % m == 0 and m <= 256]
    per_vector = 8 + 16  # id + inverted-list / direct-map overhead
    fitting = [m for m in candidates if budget is None or n * (m + per_vector) <= budget]
    if not fitting:
        need = n * (min(candidates) + per_vector) * 2 / 1e9
        raise FacebceError(f"memory_gb={memory_gb}: {n:,} x {dim}-d vectors need at least {need:.2f} GB "
                           f"even as {min(candidates)}-byte codes")
    nlist = max(1, min(_pow2_near(math.sqrt(n)), n // 39))
    fast_m = max(2, dim // 4) if dim % 4 == 0 else None
    for refine in ("fp16", "sq8"):
        if fast_m and (budget is None or n * (fast_m // 2 + per_vector + _REFINE_BYTES[refine] * dim) <= budget):
            return {"index_type": "ivfpq", "nlist": nlist, "pq_m": fast_m, "pq_bits": 4, "refine": refine,
                    "nprobe": max(8, nlist // 2)}
    return {"index_type": "ivfpq", "nlist": nlist, "pq_m": fitting[0], "nprobe": max(8, nlist // 16)}


def _pow2_near(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


class Gallery:
    """Enrolled embeddings behind one FAISS index with stable external ids (in memory).

    `mode='all'` keeps every image; `mode='mean'` keeps one L2-normalised mean template per
    identity, updated as more images of that identity are added. `threshold` is the global cosine
    pair threshold (see `resolve_threshold`); `search` can override it.
    IVF options: `nlist` (default about 4 sqrt(N) of the first batch, at most N / 39), `nprobe`
    (default for searches; `search(nprobe=)` overrides it per call). IVF-PQ/OPQ: `pq_m`
    sub-quantisers (divides dim) of `pq_bits` bits (8: pq_m bytes a vector; 4: pq_m / 2 bytes,
    scanned by FAISS's fast-scan kernels); `refine` ('none', 'sq8', 'fp16', 'flat') keeps a copy of
    every vector at that precision and re-ranks the codes' best `refine_k` (at least k) on it.
    HNSW: `hnsw_m`, `ef_construction`, `ef_search`; HNSW cannot delete:
    `remove` rebuilds it from the stored vectors. `use_gpu=None` searches on GPU when FAISS sees one.
    `save`/`load` write and read the FAISS store's files (a checkpoint and an empty journal) under
    the store's lock; for a gallery several processes change, use `stores.open_gallery`.
    """

    def __init__(self, dim: int, *, index_type: str = "flat", mode: str = "all", threshold: float | None = None,
                 nlist: int | None = None, nprobe: int = 16, pq_m: int | None = None, hnsw_m: int = 32,
                 ef_construction: int = 40, ef_search: int = 128, use_gpu: bool | None = None,
                 pq_bits: int = 8, refine: str = "none", refine_k: int = 64):
        self.dim = _positive_int(dim, "dim")
        if index_type not in INDEX_TYPES:
            raise FacebceError(f"index_type={index_type!r}: expected one of {', '.join(INDEX_TYPES)}")
        if mode not in MODES:
            raise FacebceError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        if mode == "mean" and index_type not in EXACT_TYPES:
            raise FacebceError(f"mode='mean' updates templates from their stored vectors: use index_type "
                               f"{', '.join(EXACT_TYPES)}, not {index_type!r} (lossy codes)")
        self.index_type, self.mode = index_type, mode
        self.threshold = None if threshold is None else _threshold(threshold, "threshold")
        if pq_m is not None and (_positive_int(pq_m, "pq_m") > self.dim or self.dim % pq_m):
            raise FacebceError(f"pq_m={pq_m}: must divide dim={self.dim}")
        if isinstance(pq_bits, bool) or pq_bits not in (4, 8):
            raise FacebceError(f"pq_bits={pq_bits!r}: expected 8 (pq_m bytes a vector) or 4 (fast-scan)")
        if refine not in REFINES:
            raise FacebceError(f"refine={refine!r}: expected one of {', '.join(REFINES)}")
        if index_type not in PQ_TYPES and (pq_bits != 8 or refine != "none"):
            raise FacebceError(f"pq_bits/refine: only for {', '.join(PQ_TYPES)} (lossy codes), not {index_type!r}")
        self.options = {"nlist": None if nlist is None else _positive_int(nlist, "nlist"),
                        "nprobe": _positive_int(nprobe, "nprobe"), "pq_m": pq_m,
                        "hnsw_m": _positive_int(hnsw_m, "hnsw_m"),
                        "ef_construction": _positive_int(ef_construction, "ef_construction"),
                        "ef_search": _positive_int(ef_search, "ef_search"), "pq_bits": int(pq_bits),
                        "refine": refine, "refine_k": _positive_int(refine_k, "refine_k")}
        self.use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else bool(use_gpu)
        if self.use_gpu and faiss.get_num_gpus() == 0:
            raise FacebceError("use_gpu=True: this FAISS build sees no GPU (install faiss-gpu, or pass use_gpu=None)")
        self._entries: dict[int, _Entry] = {}
        self._next_id = 0
        self._index: faiss.Index | None = None if index_type in TRAINED_TYPES else self._new_index(None)
        self._gpu_index: faiss.Index | None = None
        self._refine: faiss.Index | None = None  # PQ types with `refine`: id -> vector copy
        self._search_lock = threading.Lock()  # per-call nprobe

    # ---- contents -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release for an in-memory gallery (the stores' close releases files)."""

    def refresh(self) -> bool:
        """An in-memory gallery is always current; returns False (nothing changed)."""
        return False

    @property
    def ids(self) -> np.ndarray:
        """The entries' external ids, ascending."""
        return np.array(sorted(self._entries), dtype=np.int64)

    @property
    def next_id(self) -> int:
        return self._next_id

    @property
    def identities(self) -> list[str]:
        return sorted({e.identity for e in self._entries.values()})

    @property
    def trained(self) -> bool:
        return self._index is not None

    def entry(self, id: int) -> dict:
        """The sidecar record of one id: identity, source (and count for a mean template)."""
        if isinstance(id, bool) or not isinstance(id, numbers.Integral) or int(id) not in self._entries:
            raise FacebceError(f"id={id!r}: not in the gallery")
        return self._record(int(id), self._entries[int(id)])

    def entries(self) -> list[dict]:
        return [self._record(i, e) for i, e in sorted(self._entries.items())]

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored (normalised) vectors of `ids`, float32 len(ids) x dim (approximate for PQ types:
        their re-ranking copy when they keep one, else the codes' reconstructions)."""
        ids = self._existing(ids)
        if not ids.size:
            return np.empty((0, self.dim), np.float32)
        if self._refine is not None:
            return self._refine.reconstruct_batch(ids)
        ivf = faiss.extract_index_ivf(self._index) if self.index_type in PQ_TYPES else None
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:  # fast-scan lists: map on demand
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            try:
                return self._index.reconstruct_batch(ids)
            finally:
                ivf.set_direct_map_type(faiss.DirectMap.NoMap)
        return self._index.reconstruct_batch(ids)

    def info(self) -> dict:
        return {"format": GALLERY_FORMAT, "version": GALLERY_VERSION, "backend": "memory", "dim": self.dim,
                "metric": _METRIC, "index_type": self.index_type, "mode": self.mode, "threshold": self.threshold,
                "entries": len(self), "identities": len(self.identities), "options": dict(self.options),
                "gpu": self.use_gpu and self.index_type != "hnsw"}

    # ---- changes --------------------------------------------------------------------------------
    def set_threshold(self, threshold: float | None) -> None:
        self.threshold = None if threshold is None else _threshold(threshold, "threshold")

    def add(self, embeddings, identities: Sequence[str], sources: Sequence[str | None] | None = None,
            ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Enrol embeddings (N x dim, any positive norm) of `identities`; returns the ids they got.

        In 'all' mode each row becomes an entry, with `ids` given or the next free ones. In 'mean'
        mode rows are averaged per identity into its template (ids are assigned per identity, and
        sources are not kept: a template has many). Everything is checked before anything changes.
        """
        x = unit_rows(embeddings, "embeddings", dim=self.dim)
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
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        self._entries.update((int(i), _Entry(n, s)) for i, n, s in zip(new_ids, names, sources))
        return new_ids

    def remove(self, ids: Sequence[int] | np.ndarray | None = None, identity: str | Sequence[str] | None = None) -> int:
        """Delete entries by id, or every entry of one or more identities; returns how many."""
        drop = self.ids_to_remove(ids=ids, identity=identity)
        self._delete(drop)
        for i in drop:
            del self._entries[int(i)]
        return int(drop.size)

    def ids_to_remove(self, ids=None, identity=None) -> np.ndarray:
        """The ids `remove(ids=, identity=)` would delete (checked: unknown ids or names are errors)."""
        if (ids is None) == (identity is None):
            raise FacebceError("remove: pass exactly one of ids= or identity=")
        if identity is not None:
            wanted = {identity} if isinstance(identity, str) else set(identity)
            if not wanted or not all(isinstance(w, str) for w in wanted):
                raise FacebceError("identity: expected a name or a list of names")
            unknown = sorted(wanted - {e.identity for e in self._entries.values()})
            if unknown:
                raise FacebceError(f"identity: not in the gallery: {', '.join(map(escape_name, unknown[:5]))}")
            return np.array([i for i, e in self._entries.items() if e.identity in wanted], dtype=np.int64)
        return np.unique(self._existing(ids))

    def rename(self, old: str, new: str) -> int:
        """Give every entry of identity `old` the name `new` (ids and vectors unchanged); returns how many.
        In 'mean' mode `new` must not already have a template."""
        new = _names([new], 1)[0]
        hits = [i for i, e in self._entries.items() if e.identity == old]
        if not hits:
            raise FacebceError(f"identity: not in the gallery: {escape_name(old) if isinstance(old, str) else old!r}")
        if self.mode == "mean" and new != old and any(e.identity == new for e in self._entries.values()):
            raise FacebceError(f"rename: {escape_name(new)} already has a mean template; remove one first")
        for i in hits:
            self._entries[i].identity = new
        return len(hits)

    def _add_means(self, x: np.ndarray, names: list[str]) -> np.ndarray:
        """Fold each identity's rows into its template: sum of unit vectors, renormalised."""
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            rows.setdefault(name, []).append(row)
        by_name = {e.identity: i for i, e in self._entries.items()}
        replaced = np.array([by_name[n] for n in rows if n in by_name], dtype=np.int64)
        old = dict(zip(replaced.tolist(), self.vectors(replaced)))
        ids, templates, entries, next_id = [], [], [], self._next_id
        for name, r in rows.items():
            total, count = x[r].sum(axis=0, dtype=np.float64), len(r)
            if name in by_name:
                i = by_name[name]
                prev = self._entries[i]
                total += old[i] * prev.mean_norm * prev.count
                count += prev.count
            else:
                i, next_id = next_id, next_id + 1
            norm = float(np.linalg.norm(total))
            if norm == 0:
                raise FacebceError(f"identities: the embeddings of {escape_name(name)} sum to zero; no mean template")
            ids.append(i)
            templates.append(total / norm)
            entries.append(_Entry(name, None, count, norm / count))
        self._delete(replaced)
        ids = np.array(ids, dtype=np.int64)
        self._insert(np.asarray(templates, np.float32), ids)
        self._next_id = next_id
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
            return np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        new = _id_array(ids)
        if new.size != n:
            raise FacebceError(f"ids: {new.size} ids for {n} embeddings")
        if new.min() < 0:
            raise FacebceError(f"ids: negative id {int(new.min())} (FAISS reserves -1)")
        dup = np.unique(new)[np.unique(new, return_counts=True)[1] > 1]
        clash = [int(i) for i in new if int(i) in self._entries]
        if dup.size or clash:
            raise FacebceError(f"ids: duplicate ids {(dup.tolist() or clash)[:5]}")
        return new

    # ---- FAISS ----------------------------------------------------------------------------------
    def _new_index(self, train: np.ndarray | None) -> faiss.Index:
        o, d = self.options, self.dim
        if self.index_type == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if self.index_type == "hnsw":
            hnsw = faiss.IndexHNSWFlat(d, o["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = o["ef_construction"]
            index = faiss.IndexIDMap2(hnsw)
            self._configure(index)
            return index
        n_train = len(train)
        if o["nlist"] is None:
            o["nlist"] = max(1, min(int(4 * math.sqrt(n_train)), n_train // 39))
        if n_train < o["nlist"]:
            raise FacebceError(f"nlist={o['nlist']}: {self.index_type} needs at least nlist vectors in the first "
                               f"add to train on, got {n_train}")
        if self.index_type == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, o["nlist"], faiss.METRIC_INNER_PRODUCT)
        else:
            if o["pq_m"] is None:
                o["pq_m"] = choose_index(max(n_train, 200_001), d).get("pq_m", d // 4)
            if n_train < _PQ_TRAIN_MIN:
                raise FacebceError(f"{self.index_type}: needs at least {_PQ_TRAIN_MIN} vectors in the first add to "
                                   f"train its product quantiser on, got {n_train}")
            pre = f"OPQ{o['pq_m']}," if self.index_type == "opq" else ""
            code = "x4fs" if o["pq_bits"] == 4 else "x8"
            index = faiss.index_factory(d, f"{pre}IVF{o['nlist']},PQ{o['pq_m']}{code}", faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            if o["pq_bits"] == 8:
                ivf.do_polysemous_training = False  # index_factory turns it on: minutes of annealing, unused here
            ivf.pq.cp.min_points_per_centroid = 1  # no FAISS warnings for small first batches
            ivf.pq.cp.max_points_per_centroid, ivf.pq.cp.niter = 64, 15  # 16k rows per 256-centroid codebook
            if self.index_type == "opq":
                opq = faiss.downcast_VectorTransform(index.chain.at(0))
                opq.max_train_points, opq.niter = 16_384, 10
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.min_points_per_centroid, ivf.cp.max_points_per_centroid, ivf.cp.niter = 1, 32, 10
        if o["pq_bits"] == 8:  # fast-scan (4-bit) lists remove ids only without a direct map
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct/remove by external id
        if n_train > _TRAIN_SAMPLE:
            train = train[np.sort(np.random.default_rng(0).choice(n_train, _TRAIN_SAMPLE, replace=False))]
        index.train(train)
        self._configure(index)
        return index

    def _new_refine(self, train: np.ndarray) -> faiss.Index | None:
        """The re-ranking copy of the vectors (PQ types with `refine`), by external id."""
        kind = self.options["refine"]
        if kind == "none":
            return None
        if kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        else:
            qt = faiss.ScalarQuantizer.QT_fp16 if kind == "fp16" else faiss.ScalarQuantizer.QT_8bit
            inner = faiss.IndexScalarQuantizer(self.dim, qt, faiss.METRIC_INNER_PRODUCT)
            if not inner.is_trained:  # 8-bit: per-dimension ranges from the first batch
                inner.train(train[:_TRAIN_SAMPLE])
        return faiss.IndexIDMap2(inner)

    def _configure(self, index: faiss.Index) -> None:
        """Search-time knobs, which FAISS does not all keep in the file."""
        if self.index_type in TRAINED_TYPES:
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = min(self.options["nprobe"], ivf.nlist)
        elif self.index_type == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self.options["ef_search"]

    def _insert(self, x: np.ndarray, ids: np.ndarray) -> None:
        if self._index is None:  # IVF types: train on the first data
            self._index = self._new_index(x)
            self._refine = self._new_refine(x)
        self._index.add_with_ids(x, ids)
        if self._refine is not None:
            self._refine.add_with_ids(x, ids)
        self._gpu_index = None

    def _delete(self, ids: np.ndarray) -> None:
        if not ids.size:
            return
        if self.index_type == "hnsw":  # HNSW graphs cannot drop nodes: rebuild without them
            keep = np.setdiff1d(self.ids, ids)
            vectors = self.vectors(keep)
            self._index = self._new_index(None)
            self._index.add_with_ids(vectors, keep)
        else:
            self._index.remove_ids(ids)
            if self._refine is not None:
                self._refine.remove_ids(ids)
        self._gpu_index = None

    def index_ids(self) -> np.ndarray:
        """The ids the FAISS index holds (for consistency checks against the id table)."""
        if self._index is None:
            return np.empty(0, np.int64)
        if isinstance(self._index, faiss.IndexIDMap2) or hasattr(self._index, "id_map"):
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        invlists = faiss.extract_index_ivf(self._index).invlists
        parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                 for i in range(invlists.nlist) if invlists.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def _searcher(self) -> faiss.Index:
        if self.use_gpu and self.index_type != "hnsw" and self.options["pq_bits"] == 8:  # no GPU fast-scan
            if self._gpu_index is None:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
            return self._gpu_index
        return self._index

    # ---- search ---------------------------------------------------------------------------------
    def search(self, queries, k: int = 5, threshold: float | None = None, *,
               nprobe: int | None = None) -> list[SearchResult]:
        """Top-k matches of each probe (N x dim) and the open-set decision: a probe is known iff its
        best cosine > threshold (the gallery's unless given), as facebce's metrics count accepts.
        `nprobe`: inverted lists visited by IVF types for this call (default: the gallery's)."""
        t = self.threshold if threshold is None else _threshold(threshold, "threshold")
        if t is None:
            raise FacebceError("threshold: the gallery has none; pass threshold= or set one "
                               "(facebce gallery set-threshold)")
        scores, ids = self.knn(unit_rows(queries, "queries", dim=self.dim), _positive_int(k, "k"), nprobe=nprobe)
        return [self._result(s, i, t) for s, i in zip(scores, ids)]

    def _result(self, row_scores, row_ids, t: float) -> SearchResult:
        matches = [Match(int(i), self._entries[int(i)].identity, float(s), self._entries[int(i)].source)
                   for s, i in zip(row_scores, row_ids) if i >= 0]
        best = matches[0] if matches else None
        known = best is not None and best.score > t
        return SearchResult(matches, best.identity if known else None, best.score if best else float("-inf"), t)

    def knn(self, queries: np.ndarray, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top-k of unit-row `queries`; ids -1 where fewer than k were found."""
        if not self._entries:
            raise FacebceError("search: the gallery is empty; add embeddings first")
        searcher, k = self._searcher(), min(k, len(self))
        if self._refine is not None:  # the codes' shortlist, re-ranked on the stored copy
            _, shortlist = self._search_ivf(searcher, queries, min(max(k, self.options["refine_k"]), len(self)),
                                            nprobe)
            return self._rerank(queries, shortlist, k)
        if nprobe is not None and self.index_type in TRAINED_TYPES:
            return self._search_ivf(searcher, queries, k, nprobe)
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

    _knn = knn  # the name tools and older code used

    def _search_ivf(self, searcher: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None):
        if nprobe is None:
            return searcher.search(queries, k)
        ivf = faiss.extract_index_ivf(self._index)
        nprobe = min(_positive_int(nprobe, "nprobe"), ivf.nlist)
        with self._search_lock:
            saved, ivf.nprobe = ivf.nprobe, nprobe
            try:
                return self._index.search(queries, k)
            finally:
                ivf.nprobe = saved

    def _rerank(self, queries: np.ndarray, shortlist: np.ndarray, k: int, block: int = 64):
        """Top-k of each query's shortlisted ids by cosine to the stored copy (ids -1 stay last)."""
        scores = np.full(shortlist.shape, -np.finfo(np.float32).max, np.float32)
        for s in range(0, len(queries), block):
            ids = shortlist[s:s + block]
            found = ids >= 0
            vec = self._refine.reconstruct_batch(ids[found])
            rows = np.nonzero(found)[0]
            scores[s:s + block][found] = np.einsum("nd,nd->n", vec, queries[s:s + block][rows])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(shortlist, order, axis=1)

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

    # ---- records (the store's sidecar) ----------------------------------------------------------
    def _record(self, id: int, e: _Entry) -> dict:
        record = {"id": id, "identity": e.identity, "source": e.source}
        if self.mode == "mean":
            record.update(count=e.count, mean_norm=e.mean_norm)
        return record

    def serialized(self) -> tuple[np.ndarray, int]:
        """The FAISS bytes a store keeps: the index, then the re-ranking copy when there is one, and
        the length of that copy (0 without one)."""
        index = self._index if self._index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        data = faiss.serialize_index(index)
        if self._refine is None or self._index is None:
            return data, 0
        extra = faiss.serialize_index(self._refine)
        return np.concatenate([data, extra]), len(extra)

    def settings(self) -> dict:
        """What `Gallery(**settings)` needs to make an empty gallery like this one."""
        return {"dim": self.dim, "index_type": self.index_type, "mode": self.mode, "threshold": self.threshold,
                **{k: v for k, v in self.options.items()}}


def resolve_threshold(value, model=None) -> tuple[float, str]:
    """The pair threshold a gallery uses, and one line saying where it came from.

    `value`: a number or a numeric string (the user's), "calibrated:CALIB.json" or a resolved
    facebce.eval.calibrate.ThresholdSpec (a calibration, refused if made with another model when the
    model has a `model_digest`), or None: then the model's metadata pair
    threshold when it has one (OnnxEmbedder metadata `threshold`, with `threshold_source` "user" or
    "calibrated"). A model that carries only its head's learned class-centre threshold (b/gamma,
    `learned_threshold`) is refused: that threshold scores embeddings against class centres, not
    against each other, and accepts far too many impostors on pairs. Every way of giving a
    threshold to `gallery build` / `set-threshold` goes through here.
    """
    if value is not None and (type(value).__name__ == "ThresholdSpec" or str(value).startswith("calibrated:")):
        from facebce.eval.calibrate import resolve_threshold_spec  # verified: checksum, and the model if known
        spec = resolve_threshold_spec(value, model_digest=getattr(model, "model_digest", None))
        ci = f", CI [{spec.ci[0]:.4f}, {spec.ci[1]:.4f}]" if spec.ci else ""
        return (_threshold(spec.value, "threshold"),
                f"threshold {spec.value:.4f} ({spec.source} at FAR {spec.target_far:g}{ci}, {spec.path})")
    if value is not None:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise FacebceError(f"--threshold {value!r}: expected a cosine threshold in [-1, 1]") from None
        return _threshold(value, "threshold"), f"threshold {float(value):.4f} (given)"
    meta = dict(getattr(model, "metadata", None) or {})
    name = getattr(model, "name", "the model")
    if meta.get("threshold") is not None:
        t = _threshold(model.threshold, "threshold")
        source = meta.get("threshold_source")
        if source is None and (meta.get("head") or meta.get("bias")):
            raise FacebceError(f"{name}: its metadata threshold has no threshold_source and the model was exported "
                               f"from a training run, so it may be the head's class-centre threshold b/gamma; "
                               f"pass --threshold or calibrate one on pairs")
        extra = f", target FAR {meta['threshold_target_far']}" if meta.get("threshold_target_far") else ""
        return t, f"threshold {t:.4f} from {name}'s metadata (source: {source or 'not recorded'}{extra})"
    if meta.get("learned_threshold") is not None:
        raise FacebceError(f"{name}: no pair threshold in its metadata, only the head's learned class-centre "
                           f"threshold b/gamma={meta['learned_threshold']} (not for galleries); pass --threshold "
                           f"or calibrate one on pairs")
    raise FacebceError(f"{name}: no pair threshold in its metadata; pass --threshold or calibrate one on pairs")


def escape_name(name: str) -> str:
    """An identity name as one printable line: backslash and every non-printable character escaped
    (newline -> \\n, control -> \\xNN, lone surrogates from undecodable file names -> \\udcNN)."""
    out = []
    for ch in name:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch) or
                       (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else
                        f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}"))
    return "".join(out)


def recall_against_exact(gallery: Gallery, queries, k: int = 10, *, nprobe: int | None = None) -> float:
    """Mean fraction of the exact top-k (brute-force cosine over the stored vectors) that the
    gallery's index returns: how much an IVF/HNSW index loses to its approximations. (For PQ types
    the stored vectors are the codes' reconstructions; compare against the original vectors instead.)"""
    k = _positive_int(k, "k")
    if k > len(gallery):
        raise FacebceError(f"k={k}: the gallery has only {len(gallery)} entries")
    q = unit_rows(queries, "queries", dim=gallery.dim)
    ids = gallery.ids
    exact = faiss.IndexFlatIP(gallery.dim)
    exact.add(gallery.vectors(ids))
    _, rows = exact.search(q, k)
    _, approx = gallery.knn(q, k, nprobe=nprobe)
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
