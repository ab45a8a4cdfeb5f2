"""Throughput of RecDataset (read + decode + flip + normalise) through a DataLoader vs bare cv2.imdecode.

The bare decode loop over the same records' bytes (already in memory) is the ceiling for one core;
the ratio shows what record reading, the transform, collation and worker IPC cost on top of it.

Usage: python tools/bench/bench_data.py [--rec DIR] [--repeats 3] [--batch-size 128] [--workers 0 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from facebce.data.rec_dataset import RecDataset  # noqa: E402


def loader_rate(dataset: RecDataset, workers: int, batch_size: int) -> float:
    """Images per second for one full pass, worker start-up included (as every epoch pays it)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    start = time.perf_counter()
    n = sum(len(labels) for _, labels in loader)
    return n / (time.perf_counter() - start)


def decode_rate(blobs: list[bytes]) -> float:
    """Images per second of cv2.imdecode alone on in-memory bytes."""
    start = time.perf_counter()
    for blob in blobs:
        cv2.imdecode(np.frombuffer(blob, dtype=np.uint8), cv2.IMREAD_COLOR)
    return len(blobs) / (time.perf_counter() - start)


def median_of(repeats: int, measure) -> float:
    return statistics.median(measure() for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rec", type=Path, default=REPO / "../shared/data/celeba299/rec",
                        help="MS1M-style pack directory (default: ../shared/data/celeba299/rec from the repo root)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args(argv)

    # One core per pipeline, as the decode limit: DataLoader workers already run one thread each.
    torch.set_num_threads(1)
    dataset = RecDataset(args.rec, train=True)
    blobs = [dataset.raw(i)[0] for i in range(len(dataset))]
    limit = median_of(args.repeats, lambda: decode_rate(blobs))
    print(f"{args.rec.resolve()}: {len(dataset)} images {dataset.image_size[0]}x{dataset.image_size[1]}, "
          f"batch {args.batch_size}, median of {args.repeats}")
    print(f"{'pipeline':<34}{'img/s':>10}{'vs decode':>11}")
    print(f"{'cv2.imdecode loop (limit, 1 core)':<34}{limit:>10.0f}{1.0:>10.2f}x")
    for workers in args.workers:
        rate = median_of(args.repeats, lambda: loader_rate(dataset, workers, args.batch_size))
        print(f"{f'RecDataset + DataLoader, {workers} workers':<34}{rate:>10.0f}{rate / limit:>10.2f}x")


if __name__ == "__main__":
    main()
