"""Process groups: megatron-core `parallel_state` (TP x CP x DP), the model-parallel RNG, and `ParallelDims`, the
parallel context a model is built with.

Ranks are laid out as megatron does (order tp-cp-dp, TP innermost: with tp=2, cp=2, ranks {0, 1} share a
tensor-parallel group, ranks {0, 2} a context-parallel group, and data-parallel peers are tp * cp apart). Pipeline
parallel is 1. The data-parallel group in `ParallelDims` is megatron's default, which excludes CP: CP peers read
the same samples (`context.py`). megatron-core is imported only by `init_parallel`, so a single-process model
never loads it. `init_parallel` returns this rank's `ParallelDims`; the job hands it to the model
(`TitansLM(config, parallel=dims)`), which passes it to every layer it builds. Nothing reads a global: a model
built without one (`SINGLE_RANK`) is plain torch, whatever groups exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist


def _parallel_state() -> ModuleType:
    from megatron.core import parallel_state

    return parallel_state


@dataclass(frozen=True)
class ParallelDims:
    """Where this rank sits, fixed when a model is built: tensor-parallel rank/size and group, data-parallel
    rank/size and group (excluding CP), context-parallel rank/size and group, and whether Megatron sequence
    parallel is on (only ever with tp_size > 1). The groups are None on a single rank (`SINGLE_RANK`, the default
    everywhere), which needs no process group."""

    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    sequence_parallel: bool = False
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: dist.ProcessGroup | None = None

    @property
    def tp_enabled(self) -> bool:
        return self.tp_size > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp_size > 1


SINGLE_RANK = ParallelDims()
_initialised = False
_owns_world = False


def init_parallel(
    tp: int = 1, cp: int = 1, *, sequence_parallel: bool = False, seed: int = 0, backend: str | None = None
) -> ParallelDims:
    """Set up TP x CP x DP process groups and the RNG; returns this rank's `ParallelDims` (megatron's TP, CP and DP
    groups in it; DP without CP), for the job to hand to the model it builds.

    Initialises torch.distributed from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK; backend nccl with CUDA, else gloo, unless `backend` says) if nobody has yet; checks that the world
    size is a multiple of `tp * cp` before creating any group; creates megatron's groups; makes megatron run on CPU when
    CUDA is absent (`cpu_megatron`). `sequence_parallel` is ignored when tp == 1.

    Seeding: `torch.manual_seed(seed)` on every rank, so the model built next consumes the same random numbers as
    a single-process run seeded alike (the TP layers initialise full master weights and keep their slice), then
    megatron's `model_parallel_cuda_manual_seed(seed)` for the tracker that `get_cuda_rng_tracker().fork()` uses
    (a per-TP-rank stream, e.g. for dropout inside tensor-parallel regions).
    """
    global _initialised, _owns_world
    if _initialised:
        raise RuntimeError("init_parallel was already called; call destroy_parallel() first")
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or world_size % tp:
        raise ValueError(f"world size {world_size} is not divisible by tensor-parallel size {tp}")
    if cp < 1 or world_size % (tp * cp):
        raise ValueError(f"world size {world_size} is not divisible by tp * cp = {tp} * {cp}")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        _owns_world = True

    from megatron.core import tensor_parallel

    from .cpu_megatron import enable_cpu_megatron

    enable_cpu_megatron()
    state = _parallel_state()
    state.initialize_model_parallel(
        tensor_model_parallel_size=tp, context_parallel_size=cp, create_gloo_process_groups=False
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    _initialised = True
    return ParallelDims(
        tp_size=tp,
        tp_rank=state.get_tensor_model_parallel_rank(),
        dp_size=state.get_data_parallel_world_size(),
        dp_rank=state.get_data_parallel_rank(),
        sequence_parallel=sequence_parallel and tp > 1,
        tp_group=state.get_tensor_model_parallel_group(),
        dp_group=state.get_data_parallel_group(),
        cp_size=cp,
        cp_rank=state.get_context_parallel_rank(),
        cp_group=state.get_context_parallel_group(),
    )


def destroy_parallel() -> None:
    """Undo `init_parallel`: drop megatron's groups, and the default process group if `init_parallel` made it."""
    global _initialised, _owns_world
    if not _initialised:
        return
    _parallel_state().destroy_model_parallel()
    if _owns_world:
        dist.destroy_process_group()
        _owns_world = False
    _initialised = False
