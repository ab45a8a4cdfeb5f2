"""Shared timer for the benchmarks in tools/bench (each script runs with this folder on sys.path)."""
from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs, after `warmup` warm-up runs (first-run
    allocations, kernel selection; torch.compile wants more)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
