"""AdamW with weight-decay groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from pretrain.config import JobConfig

# A parameter's role, from its dotted name (first match wins); only "weight" is decayed. By name, not by dim():
# NeuralMemory's output-norm gain `out_norm_weight` is [H, d], 2-D but a norm.
ROLES = (
    ("norm", re.compile(r"(^|[._])norm([._]weight)?$|_norm_weight$")),  # RMSNorm gains: *norm.weight, out_norm_weight
    ("bias", re.compile(r"(^|[._])bias$")),  # linear biases, memory gate biases
    ("memory_state", re.compile(r"(^|\.)initial_weights(\.\d+)?$")),  # the memory's W_0: a state it starts from
    ("persistent", re.compile(r"(^|\.)persistent\.tokens$")),  # persistent memory tokens: learned inputs
)
NO_DECAY_ROLES = frozenset(role for role, _ in ROLES)


def parameter_role(name: str) -> str:
    """"norm", "bias", "memory_state", "persistent" (no weight decay) or "weight" (decayed: projection and embedding
    matrices, the memory's conv kernel)."""
    return next((role for role, pattern in ROLES if pattern.search(name)), "weight")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed weights, the rest at weight decay 0] by `parameter_role`, each in `named_parameters` order.

    A tensor of fewer than 2 dims that no role names is an error: decide its role here rather than let its shape
    decide.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = parameter_role(name)
        if role == "weight" and p.dim() < 2:
            raise ValueError(f"parameter {name} {list(p.shape)}: no weight-decay role (norm, bias, ...) matches its "
                             "name; add it to pretrain.optim.ROLES")
        (no_decay if role in NO_DECAY_ROLES else decay).append(p)
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
