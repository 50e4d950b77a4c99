"""Evaluation during training: validation loss over fixed batches, and the exact accuracy of `train.eval_tasks`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.batches import build_job_loader
from pretrain.config import JobConfig
from pretrain.eval.tasks import TaskBatch, score
from titans_parallel.parallel import ParallelDims


@torch.no_grad()
def validation_loss(engine, config: JobConfig, dims: ParallelDims, root: Path) -> float:
    """Mean validation loss over `train.eval_batches` fixed batches (every DP rank its own share)."""
    val = build_job_loader(config, dims, root, split="val")
    total, count = torch.zeros((), device=engine.device), torch.zeros((), device=engine.device)
    engine.eval()
    for _, tokens in zip(range(config.train.eval_batches), val):
        tokens = tokens.to(engine.device)
        total += engine(tokens[:, :-1], tokens[:, 1:]).float() * tokens.shape[0]
        count += tokens.shape[0]
    engine.train()
    dist.all_reduce(total, group=dims.dp_group)
    dist.all_reduce(count, group=dims.dp_group)
    return (total / count.clamp_min(1)).item()


@torch.no_grad()
def task_accuracies(engine, tasks: dict[str, list[TaskBatch]]) -> dict[str, float]:
    """Exact accuracy of each `train.eval_tasks` entry on its fixed rows. Every rank runs the same rows through
    the engine (one-shot forward: TP gathers the logits, ZeRO-3 its parameters, in the same order everywhere), so
    every rank gets the same figures without a further collective."""
    engine.eval()
    accuracies = {}
    for name, batches in tasks.items():
        exact = [score(engine(b.inputs.to(engine.device)), b.targets.to(engine.device), b.mask.to(engine.device)).exact
                 for b in batches]
        accuracies[name] = torch.cat(exact).float().mean().item()
    engine.train()
    return accuracies
