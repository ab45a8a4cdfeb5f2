"""Subprocess side of tests/deploy/test_gallery_store.py: a writer that adds batches and says which
returned, or a reader that searches in a loop. Run as a script (not collected by pytest).

  writer GALLERY PREFIX FIRST LAST SEED CHECKPOINT_BYTES  -> prints "done I" after add I returned
  reader GALLERY SECONDS SEED                              -> until GALLERY.stop exists: "searches N errors E torn T"
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

DIM = 16


def batch(prefix: str, i: int, seed: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Batch i: 1-6 rows, all named PREFIXi, reproducible from (prefix, i, seed)."""
    rng = np.random.default_rng([seed, i, sum(map(ord, prefix))])
    n = int(rng.integers(1, 7))
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x, [f"{prefix}{i}"] * n, [f"{prefix}{i}/{j}.jpg" for j in range(n)]


def writer(path: str, prefix: str, first: int, last: int, seed: int, checkpoint_bytes: int) -> None:
    from facebce.deploy.store import FaissStore
    store = FaissStore(path, checkpoint_bytes=checkpoint_bytes or None, lock_timeout=60)
    print("ready", flush=True)
    for i in range(first, last):
        x, names, sources = batch(prefix, i, seed)
        store.add(x, names, sources)
        print(f"done {i}", flush=True)
    store.close()


def reader(path: str, seconds: float, seed: int) -> None:
    from facebce.deploy.stores import open_gallery
    store = open_gallery(path)
    print("ready", flush=True)
    probe = np.ones((1, DIM), np.float32)
    searches = errors = torn = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and not os.path.exists(path + ".stop"):
        try:
            if len(store):
                store.search(probe, k=3, threshold=0.5)
            g = store.gallery
            counts: dict[str, int] = {}
            for e in g._entries.values():
                counts[e.identity] = counts.get(e.identity, 0) + 1
            for name, n in counts.items():  # a batch is all there or not at all
                prefix, i = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")):])
                if n != len(batch(prefix, i, seed)[1]):
                    torn += 1
            searches += 1
        except Exception as e:  # noqa: BLE001 - the test counts every kind of failure
            errors += 1
            print(f"error {type(e).__name__}: {e}", flush=True)
    print(f"searches {searches} errors {errors} torn {torn}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
    else:
        reader(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
