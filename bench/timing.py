"""The timing loop shared by the bench scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(step: Callable[[], None], warmup: int, reps: int, cuda: bool) -> float:
    """Median wall time of `step()` over `reps` runs after `warmup` runs (synchronising CUDA around each)."""
    times = []
    for i in range(warmup + reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)
