"""What a run tells its user: parameter counts (also under ZeRO-3), the start-up summary and resolved config, strict
JSON metrics with validation entries, checkpoint and closing lines, plain progress lines off a TTY, and library
noise filtered in one place."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_harness import run_ranks
from test_train import job

ROOT = Path(__file__).resolve().parents[1]


def _counts_before_and_after_zero3(rank: int, world_size: int) -> tuple:
    import deepspeed

    from pretrain.config import deepspeed_config
    from pretrain.flops import dense_parameter_count, parameter_counts
    from pretrain.optim import build_optimizer
    from titans_parallel import TitansLM
    from titans_parallel.parallel import destroy_parallel, init_parallel

    config = job(train={"zero_stage": 3})
    dims = init_parallel(1)
    try:
        model = TitansLM(config.model)
        before = (parameter_counts(model), dense_parameter_count(model))
        optimizer, scheduler = build_optimizer(model, config)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                          config=deepspeed_config(config), mpu=dims.mpu)
        assert sum(p.numel() for p in engine.module.parameters()) < before[0].total  # partitioned: empty tensors
        return before, (parameter_counts(engine.module), dense_parameter_count(engine.module))
    finally:
        destroy_parallel()


def test_parameter_counts_under_zero3_equal_the_plain_model():
    before, after = run_ranks(1, _counts_before_and_after_zero3, timeout=300)[0]
    assert before[0].dense == before[1] > 0 and before[0].total > before[0].dense
    assert after == before
