"""Timing helpers shared by eval.py, predict scripts and benchmarks: warm-up, then the median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], warmup: int = 3, repeats: int = 10, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of `fn()` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def latency_and_throughput(forward: Callable, batch1, batch_n, warmup: int = 3, repeats: int = 10,
                           sync: Callable[[], None] | None = None) -> dict:
    """Batch-1 latency (ms) and throughput (images/s) at the batch size of `batch_n`."""
    latency = median_seconds(lambda: forward(batch1), warmup, repeats, sync)
    batch_time = median_seconds(lambda: forward(batch_n), max(1, warmup // 2), max(3, repeats // 2), sync)
    return {"latency_ms": latency * 1000.0, "throughput_img_s": len(batch_n) / batch_time, "speed_batch_size": len(batch_n)}
