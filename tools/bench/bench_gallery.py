"""Gallery search speed: FAISS flat inner product vs numpy brute force, against a memory-bandwidth roofline.

One query at a time, an exact search must stream the whole N x d float32 gallery from memory,
so its ceiling is memory bandwidth: "scan GB/s" (gallery bytes read per second) is compared with
the read+write bandwidth of a large numpy copy. Batched queries turn the scan into a matrix
product (BLAS) and reuse each gallery row for every query in the batch. FAISS >= 1.15 only takes
its BLAS path when nq * d >= `distance_compute_blas_threshold` (128000, tuned for many threads:
faiss PR #5109), so at d=512 a batch under 250 probes is scanned query by query; the "BLAS" row
lowers that global threshold for the one call, to show what a few-core machine gives up.

Usage: python tools/bench/bench_gallery.py [--n 100000] [--dim 512] [--queries 64] [--k 5]
       [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from facebce.deploy import Gallery  # noqa: E402
from timing import median_seconds  # noqa: E402  (tools/bench/timing.py)


def numpy_topk(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute force: all scores by one matrix product, then an O(N) partial sort per query."""
    scores = queries @ gallery.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def with_blas(fn):
    """Run `fn` with FAISS's exhaustive search forced onto its BLAS path, restoring the global after."""
    def run():
        saved = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 0
        try:
            return fn()
        finally:
            faiss.cvar.distance_compute_blas_threshold = saved
    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=64, help="probes per batched search")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = Gallery(args.dim, threshold=0.3)
    gallery.add(data, ["x"] * args.n)
    nbytes = data.nbytes

    dst = np.empty(max(nbytes, 1 << 28), np.uint8)
    src = np.ones_like(dst)
    t_copy = median_seconds(lambda: np.copyto(dst, src), args.repeats)
    copy_gbs = 2 * dst.nbytes / t_copy / 1e9
    print(f"gallery {args.n} x {args.dim} float32 = {nbytes / 1e6:.0f} MB, k={args.k}, faiss {faiss.__version__}, "
          f"threads={faiss.omp_get_max_threads()}, median of {args.repeats}")
    print(f"roofline: numpy copy of {dst.nbytes / 1e6:.0f} MB moves {copy_gbs:.1f} GB/s (read + write)")
    print(f"{'search':30s} {'queries/s':>10s} {'scan GB/s':>10s} {'of copy bw':>10s}")
    one = queries[:1]
    runs = [
        ("Gallery (flat), 1 query", 1, lambda: gallery.search(one, args.k)),
        ("numpy brute, 1 query", 1, lambda: numpy_topk(data, one, args.k)),
        (f"Gallery (flat), {args.queries} q", args.queries, lambda: gallery.search(queries, args.k)),
        (f"Gallery (flat, BLAS), {args.queries} q", args.queries, with_blas(lambda: gallery.search(queries, args.k))),
        (f"numpy brute, {args.queries} q", args.queries, lambda: numpy_topk(data, queries, args.k)),
    ]
    for label, n_queries, fn in runs:
        seconds = median_seconds(fn, args.repeats)
        scan = nbytes / seconds / 1e9  # the gallery is read once per call
        print(f"{label:30s} {n_queries / seconds:10.1f} {scan:10.1f} {scan / copy_gbs:10.0%}", flush=True)
    faiss_ids = np.array([[m.id for m in r.matches] for r in gallery.search(queries, args.k)])
    agree = np.mean(faiss_ids == numpy_topk(data, queries, args.k))
    print(f"Gallery and numpy agree on {agree:.1%} of the top-{args.k} ids")


if __name__ == "__main__":
    main()
