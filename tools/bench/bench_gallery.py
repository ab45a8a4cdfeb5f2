"""Gallery search speed: FAISS flat inner product vs numpy brute force, against a memory-bandwidth roofline.

One query at a time, an exact search must stream the whole N x d float32 gallery from memory,
so its ceiling is memory bandwidth: "scan GB/s" (gallery bytes read per second) is compared with
the read+write bandwidth of a large numpy copy. Batched queries turn the scan into a matrix
product (BLAS) and reuse each gallery row for every query in the batch. FAISS >= 1.15 only takes
its BLAS path when nq * d >= `distance_compute_blas_threshold` (128000, tuned for many threads:
faiss PR #5109), so at d=512 a batch under 250 probes is scanned query by query; the "BLAS" row
lowers that global threshold for the one call, to show what a few-core machine gives up.

`ann_vs_flat` (suite.py's gallery area, `--ann N`) compares the approximate index facebce picks
for a size and memory budget (IVF-PQ: fast-scan codes re-ranked on an fp16 copy, or plain 8-bit
codes on a tight budget) with exact flat search on one face-like gallery. Recall@1/@10 count the
probes of enrolled people, whose exact top-1 is one of their own images: the answer a deployer
needs to be right. A stranger's exact top-1 is a near tie among unrelated vectors (top-1 minus
top-2 ~ 0.006 in cosine at 200k); it is reported too ("stranger recall@1") but what matters for
strangers is the open-set decision, which is in "decision agreement" over all probes.

Usage: python tools/bench/bench_gallery.py [--n 100000] [--dim 512] [--queries 64] [--k 5]
       [--repeats 3] [--threads N] [--ann N [--memory-gb G]]
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


def face_like_chunk(n_ids_total: int, start: int, rows: int, dim: int, seed: int) -> np.ndarray:
    """Rows [start, start + rows) of a synthetic face gallery: identities of 5-20 images each (about
    12.5 on average), each image at cosine ~0.7 to its identity's centre. Deterministic per chunk, so
    a 1M x 512 gallery can be streamed into two indexes without holding a second copy."""
    ids = (np.arange(start, start + rows) / 12.5).astype(np.int64) % n_ids_total
    uniq, inverse = np.unique(ids, return_inverse=True)
    centres = identity_centres(uniq, dim, seed)[inverse]
    noise = np.random.default_rng([seed, start]).standard_normal((rows, dim), dtype=np.float32) / np.sqrt(dim)
    x = centres + noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def identity_centres(ids: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Unit centre of each identity id, computed from (seed, id) alone."""
    out = np.empty((len(ids), dim), np.float32)
    for k, i in enumerate(ids):
        out[k] = np.random.default_rng([seed, 1_000_003, int(i)]).standard_normal(dim, dtype=np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def ann_vs_flat(n: int, dim: int = 512, *, memory_gb: float | None = None, probes: int = 400, nprobes=None,
                seed: int = 0, say=print, chunk: int = 100_000) -> list[dict]:
    """Flat (exact) and the index `choose_index` picks for n x dim (OPQ + IVF-PQ) on the same face-like
    gallery, queried with the same probes (half of enrolled identities, half strangers): single-query
    QPS (interleaved, so both see the same machine load), index memory, recall@1 / @10 against flat,
    top-1 identity agreement and open-set decision agreement at a threshold between the two groups.
    `nprobes`: the lists visited per search, one row each (default: nlist / 8, nlist / 4 and the
    chosen default)."""
    from facebce.deploy.gallery import Gallery, choose_index
    n_ids = int(n / 12.5)
    options = choose_index(max(n, 200_001), dim, memory_gb)
    index_type = options.pop("index_type")
    nprobes = nprobes or sorted({max(1, options["nlist"] // 8), max(1, options["nlist"] // 4), options["nprobe"]})
    t0 = time.perf_counter()
    first = face_like_chunk(n_ids, 0, min(chunk, n), dim, seed)
    approx = Gallery(dim, index_type=index_type, **options)
    approx.add(first, ["x"] * len(first))  # trains on (a sample of) the first chunk
    flat = Gallery(dim)
    flat.add(first, ["x"] * len(first))
    del first
    for s in range(chunk, n, chunk):
        x = face_like_chunk(n_ids, s, min(chunk, n - s), dim, seed)
        approx.add(x, ["x"] * len(x))
        flat.add(x, ["x"] * len(x))
    build = time.perf_counter() - t0
    say(f"[gallery] built flat and {index_type} {options} over {n:,} x {dim} in {build:.0f} s")
    rng = np.random.default_rng(seed + 1)
    known = identity_centres(rng.integers(0, n_ids, probes // 2), dim, seed)
    known = known + rng.standard_normal(known.shape, dtype=np.float32) / np.sqrt(dim)
    strangers = rng.standard_normal((probes - probes // 2, dim), dtype=np.float32)
    q = np.concatenate([known, strangers]).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact_s, exact_i = flat.knn(q, 10)
    threshold = float((exact_s[: probes // 2, 0].mean() + exact_s[probes // 2:, 0].mean()) / 2)
    flat_bytes = n * (4 * dim + 8)
    pq_bytes = len(approx.serialized()[0])
    rows = []
    for nprobe in nprobes:
        s_, i_ = approx.knn(q, 10, nprobe=nprobe)
        m = probes // 2  # the first m probes are of enrolled people
        recall1 = float(np.mean(i_[:m, 0] == exact_i[:m, 0]))
        recall10 = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_[:m], exact_i[:m])]))
        stranger_recall1 = float(np.mean(i_[m:, 0] == exact_i[m:, 0]))
        who = float(np.mean((i_[:m, 0] / 12.5).astype(np.int64) % n_ids
                            == (exact_i[:m, 0] / 12.5).astype(np.int64) % n_ids))  # the same identity
        agree = float(np.mean((s_[:, 0] > threshold) == (exact_s[:, 0] > threshold)))
        t_flat, t_ann = [], []
        for k in range(min(probes, 60)):  # interleaved single queries
            a = time.perf_counter()
            flat.knn(q[k:k + 1], 5)
            b = time.perf_counter()
            approx.knn(q[k:k + 1], 5, nprobe=nprobe)
            t_ann.append(time.perf_counter() - b)
            t_flat.append(b - a)
        qps_flat, qps_ann = 1 / float(np.median(t_flat)), 1 / float(np.median(t_ann))
        rows.append({"n": n, "dim": dim, "index": index_type, **options, "nprobe": nprobe, "recall@1": recall1,
                     "recall@10": recall10, "stranger_recall@1": stranger_recall1, "top1_identity": who,
                     "decision_agreement": agree,
                     "threshold": threshold, "qps_flat": qps_flat, "qps_ann": qps_ann,
                     "flat_bytes": flat_bytes, "ann_bytes": pq_bytes, "build_s": build})
        say(f"[gallery] {n:,} x {dim} {index_type} {options} nprobe {nprobe}: recall@1 {recall1:.3f} "
            f"@10 {recall10:.3f} (enrolled people's probes), strangers' recall@1 {stranger_recall1:.3f}, "
            f"top-1 identity {who:.3f}, "
            f"decision agreement {agree:.4f} at t={threshold:.3f}; 1-query QPS "
            f"{qps_ann:.0f} vs flat {qps_flat:.1f} ({qps_ann / qps_flat:.1f}x); memory {pq_bytes / 1e6:.0f} MB "
            f"vs {flat_bytes / 1e6:.0f} MB")
    return rows


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
    ap.add_argument("--ann", type=int, help="instead: OPQ/IVF-PQ vs flat on an N x dim face-like gallery")
    ap.add_argument("--memory-gb", type=float)
    args = ap.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args.ann:
        ann_vs_flat(args.ann, args.dim, memory_gb=args.memory_gb)
        return
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
