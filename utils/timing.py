"""Wall-clock timing for benchmarks: medians, and two functions timed alternately (paired).

A shared 2-core machine drifts by 10-20% between separate measurements; alternating the two sides of
a comparison and taking the median of the per-pair ratios cancels most of it.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["synchronized", "timed", "timed_pairs"]


def synchronized(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a CUDA synchronisation when a GPU is in use, so wall-clock times are complete."""
    if not torch.cuda.is_available():
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def timed(fn: Callable[[], object], iters: int) -> float:
    """Median seconds of ``iters`` calls after one warm-up call."""
    fn = synchronized(fn)
    fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def timed_pairs(first: Callable[[], object], second: Callable[[], object], iters: int) -> tuple[float, float, float]:
    """Median seconds of two functions run alternately (after a warm-up call each), and the median of
    the per-pair ratio ``second / first``."""
    first, second = synchronized(first), synchronized(second)
    first(), second()
    a, b = [], []
    for _ in range(iters):
        for fn, out in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b))
