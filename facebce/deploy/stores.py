"""The gallery stores: open one by path (FAISS on local disk) or by Milvus URI, and the
whole-gallery save/load of the FAISS store's files.

`open_gallery(spec)`: a durable store named by a path (`store.FaissStore`: write-ahead journal,
checkpoints, a file lock for writers) or by a URI, `milvus://HOST:PORT/COLL` or
`milvus+lite://PATH.db/COLL` (`milvus_store.MilvusStore`). Both offer the same calls: add, remove,
rename, search, set_threshold, identities, entry, info, len, refresh, close.
"""
from __future__ import annotations

import os

from facebce.deploy.gallery import Gallery
from facebce.deploy.store import FaissStore


def open_gallery(spec: str | os.PathLike, *, dim: int | None = None, create: bool | dict = False,
                 threshold: float | None = None, lock_timeout: float = 30.0, **options):
    """Open (or with `create`, make) the gallery store named by `spec`.

    `spec`: a path (FAISS on local disk, the default) or `milvus://HOST:PORT/COLLECTION` or
    `milvus+lite://PATH.db/COLLECTION`. `dim`: checked against the gallery (required to create).
    `create=True` (or a dict of Gallery options: index_type, mode, nlist, nprobe, pq_m, ...) makes a
    new gallery and refuses when one exists. `threshold`: stored when creating; for an existing
    gallery it is an error to pass one that differs (use `set_threshold`). `lock_timeout`: seconds a
    writer waits for another writer's lock. Every mutation is durable when its call returns; searches
    see the latest committed state (a FAISS store checks its journal before each search).
    """
    opts = dict(create) if isinstance(create, dict) else {}
    opts.update(options)
    if is_uri(spec):
        from facebce.deploy.milvus_store import MilvusStore
        return MilvusStore(str(spec), dim=dim, create=bool(create), threshold=threshold, **opts)
    return FaissStore(spec, dim=dim, create=bool(create), threshold=threshold, lock_timeout=lock_timeout, **opts)


def is_uri(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(("milvus://", "milvus+lite://"))




def save_gallery(gallery: Gallery, path: str | os.PathLike) -> None:
    """Write `gallery` to `path` as a FAISS store (index, sidecar, empty journal), replacing what is
    there, under the store's writers' lock."""
    FaissStore.write_gallery(path, gallery)


def load_gallery(path: str | os.PathLike, *, dim: int | None = None, use_gpu: bool | None = None) -> Gallery:
    """The gallery a FAISS store at `path` holds now (checkpoint + journal replayed), checking `dim`."""
    with FaissStore(path, dim=dim, use_gpu=use_gpu) as store:
        return store.gallery
