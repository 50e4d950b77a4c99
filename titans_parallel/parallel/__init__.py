"""Tensor, sequence and context parallelism: process groups (megatron-core `parallel_state`) and the parallel
context `ParallelDims` a model is built with, TP/SP layer factories and their initialisers, the context-parallel
all-to-alls (`context`), gradient fix-ups for a data-parallel engine. Importing this package does not import
megatron-core; `init_parallel` does.

`cpu_megatron.enable_cpu_megatron` (called by `init_parallel`) is the one place that makes megatron-core run on a
host without CUDA.
"""

from .grads import (
    mark_sequence_parallel,
    mark_tensor_parallel,
    register_sequence_parallel_grad_hooks,
    sum_context_parallel_grads,
)
from .groups import SINGLE_RANK, ParallelDims, destroy_parallel, init_parallel
from .init_methods import normal_init
from .layers import (
    apply_to_replicated,
    column_parallel_linear,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    row_parallel_linear,
    scatter_to_sequence_parallel_region,
    tensor_parallel_parameter,
    tensor_parallel_share,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
)

__all__ = [
    "SINGLE_RANK",
    "ParallelDims",
    "apply_to_replicated",
    "column_parallel_linear",
    "destroy_parallel",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "init_parallel",
    "mark_sequence_parallel",
    "mark_tensor_parallel",
    "normal_init",
    "register_sequence_parallel_grad_hooks",
    "row_parallel_linear",
    "scatter_to_sequence_parallel_region",
    "sum_context_parallel_grads",
    "tensor_parallel_parameter",
    "tensor_parallel_share",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_embedding",
]
