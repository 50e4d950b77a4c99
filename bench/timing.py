"""The timing loop shared by the bench scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved_medians(steps: dict[str, Callable[[], None]], warmup: int, reps: int, cuda: bool) -> dict[str, float]:
    """Median wall seconds of each step over `reps` rounds after `warmup` rounds. Every round runs each step once,
    in turn, so a machine that speeds up or slows down during the run biases no step against another (shared CPUs
    drift by tens of percent over minutes). CUDA is synchronised around each run."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + reps):
        for name, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
