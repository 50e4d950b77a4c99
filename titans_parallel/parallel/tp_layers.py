"""megatron-core TP/SP modules behind the factories in `layers`; imported only when tensor parallel is on.

Thin subclasses of megatron's layers that take and return batch-first tensors and return the output alone (bias
already added), so a module is a drop-in for nn.Linear / nn.Embedding with the same parameter names. megatron works
sequence-first ([T, B, ...], sequence parallel shards dim 0); under sequence parallel these transpose at their
boundary (free when B == 1, one activation copy otherwise) and return a transposed view. Every module is bound to
the TP group of the `ParallelDims` it is built with (megatron's `tp_group` argument). The linears also take a
replicated input or give a replicated output (`replicated=True`, called through `layers.apply_to_replicated`).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel as mtp
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from .groups import ParallelDims
from .init_methods import InitMethod


@cache
def _config(tp_size: int, sequence_parallel: bool) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        sequence_parallel=sequence_parallel,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
    )


def model_parallel_config(dims: ParallelDims) -> ModelParallelConfig:
    """The megatron config for TP modules built with `dims` (a layer built with full_sequence passes them with
    sequence_parallel off).

    `use_cpu_initialization=True` on every host: each rank initialises the full (master) weight on the CPU from the
    default generator and keeps its slice, so TP shards are exactly slices of the TP=1 weight for the same seed
    (megatron's GPU path draws each shard from a per-rank stream instead). Parameters are fp32 and on the CPU; the
    engine moves and casts the model.
    """
    return _config(dims.tp_size, dims.sequence_parallel)


def _seq_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).contiguous()


class ColumnParallelLinear(mtp.ColumnParallelLinear):
    """y = x Wᵀ + b with W's output rows split over TP ranks.

    [B, T, in] -> [B, T, out/tp], or [B, T, out] with gather_output. Under sequence parallel (`dims`) the input is
    this rank's sequence shard [B, T/tp, in], all-gathered along T first. `replicated=True`: x [..., in] is the same
    on every TP rank and no sequence shard, used whole (never gathered), its gradient summed over TP;
    [..., out/tp] out, whatever gather_output.
    """

    get_extra_state = nn.Module.get_extra_state  # no always-None `_extra_state` key: nn.Linear's state_dict keys

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        gather_output: bool,
        init_method: InitMethod,
        dims: ParallelDims,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            config=model_parallel_config(dims),
            init_method=init_method,
            bias=bias,
            gather_output=gather_output,
            tp_group=dims.tp_group,
        )

    def forward(self, x: torch.Tensor, replicated: bool = False) -> torch.Tensor:
        if replicated:
            return F.linear(copy_to_tensor_parallel_region(x, self.tp_group), self.weight, self.bias)
        if self.sequence_parallel:
            return super().forward(_seq_first(x))[0].transpose(0, 1)
        return super().forward(x)[0]


class RowParallelLinear(mtp.RowParallelLinear):
    """y = x Wᵀ + b with W's input columns split over TP ranks; the partial products are summed over TP.

    [B, T, in/tp] (this rank's features) -> [B, T, out], or this rank's sequence shard [B, T/tp, out] under
    sequence parallel (`dims`; reduce-scatter along T). The bias is replicated and added after the reduction.
    `replicated=True`: x [..., in/tp] is no sequence shard (e.g. a prefix's features); the sum over TP is returned
    whole on every rank, [..., out], never reduce-scattered.
    """

    get_extra_state = nn.Module.get_extra_state  # no always-None `_extra_state` key: nn.Linear's state_dict keys

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        input_is_parallel: bool,
        init_method: InitMethod,
        dims: ParallelDims,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            config=model_parallel_config(dims),
            init_method=init_method,
            bias=bias,
            input_is_parallel=input_is_parallel,
            skip_bias_add=False,
            tp_group=dims.tp_group,
        )

    def forward(self, x: torch.Tensor, replicated: bool = False) -> torch.Tensor:
        if replicated:
            out = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.tp_group)
            return out if self.bias is None else out + self.bias
        if self.sequence_parallel:
            return super().forward(x.transpose(0, 1))[0].transpose(0, 1)
        return super().forward(x)[0]


class VocabParallelEmbedding(mtp.VocabParallelEmbedding):
    """Embedding whose vocabulary rows are split over TP ranks (vocabulary size divisible by tp).

    ids [B, T] -> [B, T, dim], or this rank's sequence shard [B, T/tp, dim] under sequence parallel.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method: InitMethod, dims: ParallelDims) -> None:
        config = model_parallel_config(dims)
        super().__init__(
            num_embeddings,
            embedding_dim,
            init_method=init_method,
            reduce_scatter_embeddings=config.sequence_parallel,
            config=config,
            tp_group=dims.tp_group,
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        return out.transpose(0, 1) if self.reduce_scatter_embeddings else out


def _sum_over_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-reduce over `group` into a fresh contiguous tensor. (megatron's mappings all-reduce `x.contiguous()` in
    place and return `x`: a non-contiguous `x` would come back unreduced, and a gradient tensor autograd also hands
    to another branch would be changed under it.)"""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _sum_over_tp(grad, ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return _sum_over_tp(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Identity; backward sums the gradient over `group`."""
    return _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over `group`; backward identity."""
    return _ReduceFromTensorParallelRegion.apply(x, group)
