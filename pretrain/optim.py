"""AdamW with weight-decay groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import JobConfig

NO_DECAY_NAMES = ("initial_weights", "persistent")  # memory W_0 and persistent tokens are states, not weights


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; not norms, biases (memory gate biases included), W_0 or persistent tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or any(n in name for n in NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: JobConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
        param_groups(model, opt.weight_decay), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))


def lr_lambda(config: JobConfig):
    """step -> multiplier of optimizer.lr: linear warmup over warmup_steps, cosine to min_lr_ratio at train.steps."""
    warmup, total, floor = config.schedule.warmup_steps, config.train.steps, config.schedule.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
