"""Non-finite training: the agreed stop-or-skip decision (`DivergenceGuard`), the update a skipped ZeRO-0 step
leaves out (`without_update`), and the NaN injection the fault tests use (`injected_nan_step`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from math import isfinite
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import checkpoint
from pretrain.config import JobConfig


class DivergenceError(RuntimeError):
    """A non-finite loss, gradient norm or weights stopped the job; every rank raises it in the same step."""

    agreed = True


class DivergenceGuard:
    """A non-finite loss or gradient norm on any rank, agreed by every rank in the same step (one small all-reduce).
    train.on_nonfinite=stop raises DivergenceError; =skip lets the step pass without its update (DeepSpeed's ZeRO 1-3
    and bf16 optimizers skip a step whose gradient norm is not finite, ZeRO-0 fp32 drops its gradients) while the
    schedule moves on, up to train.max_skipped_steps times; a bad step whose update was applied always stops."""

    def __init__(self, config: JobConfig):
        self.policy, self.limit = config.train.on_nonfinite, config.train.max_skipped_steps
        self.latest = Path(config.checkpoint.dir) / checkpoint.LATEST
        self.skipped = 0

    def check(self, step: int, loss: float, grad_norm: float, engine, scheduler, dropped: bool) -> bool:
        """True when step's update was skipped; DivergenceError when the job stops."""
        bad = torch.tensor(float(not (isfinite(loss) and isfinite(grad_norm))), device=engine.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            return False
        applied = engine.was_step_applied() and not dropped
        if self.policy == "skip" and not applied and self.skipped < self.limit:
            self.skipped += 1
            if not engine.was_step_applied():  # DeepSpeed held the scheduler back with the update
                scheduler.step()
            return True
        why = ("train.on_nonfinite=stop" if self.policy == "stop" else "its update was applied" if applied
               else f"{self.skipped} updates skipped already, train.max_skipped_steps={self.limit}")
        newest = self.latest.read_text().strip() if self.latest.is_file() else "none"
        raise DivergenceError(
            f"step {step}: non-finite loss ({loss:.4g}) or gradient norm ({grad_norm:.4g}); stopping ({why}). No "
            f"checkpoint of it was written; the newest is {newest} in {self.latest.parent}: resume from it with a "
            "lower optimizer.lr, or set train.on_nonfinite=skip")


def injected_nan_step() -> int | None:
    """TITANS_INJECT_NAN_AT_STEP=K[:RANK] (a testing aid): the step (1-based) at which this rank's loss becomes NaN,
    on rank RANK (default: the last); None elsewhere or when unset."""
    value = os.environ.get("TITANS_INJECT_NAN_AT_STEP")
    if not value:
        return None
    step, _, rank = value.partition(":")
    return int(step) if int(rank or dist.get_world_size() - 1) == dist.get_rank() else None


@contextmanager
def without_update(engine, skip: bool) -> Iterator[None]:
    """ZeRO-0 in fp32 has no overflow check of its own (ZeRO 1-3 and bf16 skip a step whose gradient norm is not
    finite): when `skip`, engine.step runs (gradients cleared, schedule stepped) without the optimizer's step, so
    every parameter and its moments stay as they were."""
    if skip:
        engine.optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if skip:
            del engine.optimizer.step
