"""The timing loop shared by the bench scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved_medians(
    steps: dict[str, Callable[[], None]], warmup: int, reps: int, cuda: bool, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median seconds of each step over `reps` rounds after `warmup` rounds. Every round runs each step once,
    in turn, so a machine that speeds up or slows down during the run biases no step against another (shared CPUs
    drift by tens of percent over minutes). CUDA is synchronised around each run. `clock`: wall time by default;
    `time.process_time` (this process's CPU time) does not count the time other processes hold the cores."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + reps):
        for name, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}
