"""DeepSpeed glue: the process-group adapter DeepSpeed calls as `mpu`, the distributed start-up, and the engine
built from a recipe. The model library never imports DeepSpeed; everything DeepSpeed needs to know about the
model's parallel layout passes through here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pretrain import quiet
from pretrain.config import JobConfig, deepspeed_config
from pretrain.optim import build_optimizer


def _parallel_state():
    from megatron.core import parallel_state

    return parallel_state


class DeepSpeedMPU:
    """megatron's process groups under the method names DeepSpeed 0.19 calls on `mpu`.

    megatron's `parallel_state` module cannot be passed itself: ZeRO 1-3, gradient clipping and checkpoint naming
    call `get_model_parallel_rank/world_size` and `get_data_parallel_group_ranks`, which it lacks. "Model
    parallel" is megatron's model-parallel group (TP x PP, PP = 1). The data-parallel group is megatron's without
    CP (the one the data loader splits over; DeepSpeed sizes its batch by it). Deliberately absent:
    `get_sequence_parallel_*`, `get_sequence_data_parallel_*`, `initialize_sequence_parallel`,
    `get_slice_parallel_*` — DeepSpeed reads those as Ulysses sequence parallelism and then changes its
    data-parallel group (see `ContextParallelMPU`, used when cp > 1); Megatron sequence parallel lives inside the TP
    group and is invisible to DeepSpeed. Needs `titans_parallel.parallel.init_parallel` first.
    """

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return _parallel_state().get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_model_parallel_group())

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return _parallel_state().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return _parallel_state().get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return _parallel_state().get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return _parallel_state().get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return _parallel_state().get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return _parallel_state().get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return _parallel_state().get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return _parallel_state().get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return _parallel_state().get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return _parallel_state().get_pipeline_model_parallel_world_size()


class ContextParallelMPU(DeepSpeedMPU):
    """`DeepSpeedMPU` plus megatron's context-parallel group as DeepSpeed's Ulysses "sequence parallel" group.

    With these methods DeepSpeed 0.19 (engine, ZeRO 1-3) reduces gradients over the sequence-data-parallel group
    DP x CP, dividing by its size / sp = dp: a sum over CP and a mean over DP, which is what context parallel needs
    (every weight is replicated over CP and each CP rank's gradient is its part of the full one, `parallel.context`).
    It also partitions ZeRO states over DP x CP (valid: the weights are the same on every CP rank; cp times less
    optimizer memory), broadcasts the initial weights over DP x CP, writes the model states from DP x CP rank 0
    only, and names ZeRO files by DP x CP rank: `zero_pp_rank_{0..world/tp-1}`, the layout of the same world size
    and tp at cp = 1. The batch is still sized by `get_data_parallel_world_size` (DP without CP).
    """

    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return _parallel_state().get_context_parallel_group()

    def get_sequence_parallel_rank(self) -> int:
        return _parallel_state().get_context_parallel_rank()

    def get_sequence_parallel_world_size(self) -> int:
        return _parallel_state().get_context_parallel_world_size()

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return _parallel_state().get_data_parallel_group(with_context_parallel=True)

    def get_sequence_data_parallel_rank(self) -> int:
        return _parallel_state().get_data_parallel_rank(with_context_parallel=True)

    def get_sequence_data_parallel_world_size(self) -> int:
        return _parallel_state().get_data_parallel_world_size(with_context_parallel=True)


def init_distributed() -> None:
    """Start torch.distributed through DeepSpeed (nccl with CUDA, else gloo on DeepSpeed's CPU accelerator) unless
    it is running already. DS_ACCELERATOR is set before DeepSpeed is imported, the only time it is read."""
    if dist.is_initialized():
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    with quiet.filtered_stdout():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


@dataclass
class Engine:
    """A DeepSpeed engine with the schedule it steps and the recipe's optimizer hyperparameters as built (before
    any checkpoint load replaces them)."""

    engine: "deepspeed.DeepSpeedEngine"  # noqa: F821
    scheduler: torch.optim.lr_scheduler.LambdaLR
    recipe_groups: list[dict]  # the optimizer's param_groups without their params


def build_engine(config: JobConfig, model: nn.Module, *, load_universal: bool = False) -> Engine:
    """The recipe's optimizer and schedule around `model` in a DeepSpeed engine over megatron's TP x CP x DP
    groups (`init_parallel` first; `ContextParallelMPU` when parallel.cp > 1). `load_universal`: the engine will
    load a universal checkpoint (another layout)."""
    import deepspeed

    optimizer, scheduler = build_optimizer(model, config)
    recipe_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    ds_config = deepspeed_config(config)
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                                           mpu=ContextParallelMPU() if config.parallel.cp > 1 else DeepSpeedMPU())
    return Engine(engine, scheduler, recipe_groups)


def global_grad_norm(engine) -> float | None:
    """The pre-clipping global gradient norm when the engine will not record it (ZeRO-0 in fp32 clips without
    keeping the norm); DeepSpeed's own rule, so TP-sharded parameters count once per shard. None otherwise."""
    if engine.zero_optimization_stage() or engine.bfloat16_enabled():
        return None
    from deepspeed.runtime.utils import clip_grad_norm_

    return float(clip_grad_norm_(engine.module.parameters(), max_norm=float("inf"), mpu=engine.mpu))
