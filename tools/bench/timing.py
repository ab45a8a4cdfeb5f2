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


def interleaved_medians(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """{name: median seconds} of each `fn()` over `rounds` rounds that run every candidate once, in
    a rotated order, after `warmup` runs of each: on a shared machine a slow moment then hits all
    candidates alike instead of one of them."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
