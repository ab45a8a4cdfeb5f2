"""Forward + backward time of every head (and a few variants) at B × N × d, CPU by default.

Each timed step: zero grads, `head(z, y)`, `loss.backward()` (embeddings require grad, as behind a
backbone).  Prints the median (and min) over the repeats after warm-up, in milliseconds.

Usage: python tools/bench/bench_heads.py [--batch 128] [--classes 10000] [--dim 512] [--repeats 7]
       [--threads N] [--device cpu] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

from facebce.heads import PartialFC, build_head, list_heads  # noqa: E402

VARIANTS = [
    ("softmax_norm+arcface", "softmax_norm", {"margin": "arcface"}, None),
    ("softmax_norm+arcface(st)", "softmax_norm", {"margin": "arcface", "straight_through": True}, None),
    ("softmax_norm+cosface", "softmax_norm", {"margin": "cosface"}, None),
    ("bce_u_norm+cosface", "bce_u_norm", {"margin": "cosface"}, None),
    ("dismax(matmul)", "dismax", {"distance": "matmul"}, None),
    ("dismax+fpr", "dismax", {"fpr": True}, None),
    ("pfc softmax_norm+arcface r=1", "softmax_norm", {"margin": "arcface"}, 1.0),
    ("pfc softmax_norm+arcface r=0.1", "softmax_norm", {"margin": "arcface"}, 0.1),
    ("pfc uce r=1", "uce", {}, 1.0),
    ("pfc uce r=0.1", "uce", {}, 0.1),
]


def time_head(head: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, repeats: int, warmup: int = 2) -> list[float]:
    times = []
    for i in range(warmup + repeats):
        head.zero_grad(set_to_none=True)
        z.grad = None
        if z.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        head(z, y).loss.backward()
        if z.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="row labels to run (default: all)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    z = torch.randn(args.batch, args.dim, device=dev, requires_grad=True)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)
    rows = [(name, name, {}, None) for name in list_heads()] + VARIANTS
    print(f"B={args.batch} N={args.classes} d={args.dim} device={dev} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} (forward+backward, ms)")
    print(f"{'head':34s} {'median':>9s} {'min':>9s}")
    for label, name, cfg, rate in rows:
        if args.only and label not in args.only:
            continue
        if rate is None:
            head = build_head(name, args.dim, args.classes, **cfg)
        else:
            head = PartialFC(name, args.dim, args.classes, rate, **cfg)
        head = head.to(dev).train()
        times = time_head(head, z, y, args.repeats)
        print(f"{label:34s} {statistics.median(times):9.1f} {min(times):9.1f}", flush=True)


if __name__ == "__main__":
    main()
