"""The one place that makes megatron-core's tensor-parallel layers run on a host without CUDA (tests, laptops).

megatron-core assumes a GPU in two ways, and `enable_cpu_megatron` patches exactly those two, only when
`torch.cuda.is_available()` is False:

1. Device of internal buffers. ColumnParallelLinear / RowParallelLinear (sequence-parallel all-gather buffer and
   reduce-scatter output), the tensor/sequence-parallel mappings (`tensor_parallel.mappings`) and the
   `GlobalMemoryBuffer` allocate with `device=torch.cuda.current_device()`, which raises on a CPU-only build. The
   patch makes `torch.cuda.current_device()` return `torch.device("cpu")`; the collectives then run on CPU tensors
   under gloo. This is process-global (torch is shared), which is harmless on a host where the call could only
   raise.
2. The model-parallel RNG tracker (`get_cuda_rng_tracker`, seeded by `model_parallel_cuda_manual_seed`) keeps
   CUDA generator states, which cannot be read on a CPU-only build. The patch installs `CpuRNGStatesTracker`, the
   same tracker keyed on the CPU default generator, so megatron's own seeding and `fork()` (dropout inside
   tensor-parallel regions) work unchanged.

Not patched because not needed: weight initialisation (the project always uses megatron's
`use_cpu_initialization=True` path, see `tp_layers.model_parallel_config`), CUDA streams/events (only in code paths
the project does not use: TE, CPU offloading, overlapped communication), and megatron's own activation
checkpointing (`tensor_parallel.checkpoint` still reads CUDA RNG state; use torch's checkpointing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.tensor_parallel import random as megatron_random

_ENABLED = False


class CpuRNGStatesTracker(megatron_random.CudaRNGStatesTracker):
    """megatron's named RNG-state tracker with the CPU default generator standing in for the CUDA one."""

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def enable_cpu_megatron() -> bool:
    """Apply the two patches above if CUDA is absent; idempotent. Returns whether megatron now runs on the CPU."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if not _ENABLED:
        torch.cuda.current_device = _cpu_current_device
        megatron_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        _ENABLED = True
    return True
