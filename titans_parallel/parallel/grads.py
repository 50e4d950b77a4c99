"""Gradient fix-ups for tensor / sequence parallel under DeepSpeed (which bypasses Megatron's optimizer path).

Two markings on parameters, megatron's attribute conventions, which DeepSpeed and this module read:

- `tensor_model_parallel` (`mark_tensor_parallel`): the parameter is this rank's shard. DeepSpeed's gradient norm
  (clipping, `get_global_grad_norm`) sums a parameter's squared gradient over the TP group only if it carries this
  mark; an unmarked parameter is counted from TP rank 0 alone, so a per-head shard left unmarked silently makes the
  norm — and clipping — wrong. megatron's own TP layers mark their weights; the project's own sharded parameters
  (`layers.tensor_parallel_parameter`) must be marked too.
- `sequence_parallel` (`mark_sequence_parallel`): the parameter is replicated over TP but each rank only sees its
  sequence shard (norm weights in the sequence-parallel region; megatron marks RowParallelLinear's bias), so each
  rank's gradient is a partial sum that must be summed over TP before anything reads it.

Why a gradient hook and not an all-reduce after `engine.backward()`: under ZeRO, DeepSpeed processes each gradient
from its own post-accumulate-grad hook during backward (ZeRO-2/3 reduce-scatter it over data parallel there and
free `param.grad`), so after backward there is no full gradient left to fix. A tensor hook
(`param.register_hook`) runs when the parameter's gradient for this backward is complete but before it is
accumulated into `.grad`, and autograd runs it before any post-accumulate hook. So every DeepSpeed path that reads
a gradient (stage 0's all-reduce after backward, the hooks of ZeRO 1-3) sees the TP-summed gradient; with gradient
accumulation each micro-batch's contribution is summed before it is accumulated (summing is linear, so the
accumulated gradient is exact). All TP ranks run the same graph, so the per-parameter all-reduces are issued in the
same order on every rank. Cost: one small all-reduce over TP per marked parameter per backward.

Context parallel: every parameter is replicated over CP and each CP rank's gradient is its part of the full one
(`context.py`). Under DeepSpeed the engine sums it over CP in its data-parallel reduction (pretrain/engine.py);
without an engine, `sum_context_parallel_grads` after backward.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .groups import ParallelDims

_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int) -> nn.Parameter:
    """Mark `param` as this rank's contiguous shard along `partition_dim` (tensor_model_parallel=True,
    partition_dim, partition_stride=1). Returns `param`."""
    if getattr(param, "tensor_model_parallel", False):
        raise ValueError("parameter is already marked tensor-parallel")
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1
    return param


def mark_sequence_parallel(param: nn.Parameter, parallel: ParallelDims) -> nn.Parameter:
    """Mark a TP-replicated parameter that acts on the sequence-parallel shard. Sets `sequence_parallel` to whether
    sequence parallel is on in `parallel` (as megatron does for RowParallelLinear's bias). Returns `param`."""
    param.sequence_parallel = parallel.sequence_parallel
    return param


def _sum_over_tp(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    grad = grad.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(grad, group=group)
    return grad


def register_sequence_parallel_grad_hooks(model: nn.Module, parallel: ParallelDims) -> list[str]:
    """Make the gradient of every parameter with `sequence_parallel=True` the sum over the TP ranks of `parallel`,
    the context the model was built with (see module doc).

    Call once the model is built, before or after wrapping it in a training engine (hooks live on the parameters).
    Idempotent: parameters already hooked are skipped. Returns the names of the parameters hooked by this call.
    """
    hooked = []
    for name, param in model.named_parameters():
        if param.requires_grad and getattr(param, "sequence_parallel", False) and param not in _HOOKED:
            _HOOKED[param] = param.register_hook(partial(_sum_over_tp, group=parallel.tp_group))
            hooked.append(name)
    return hooked


def sum_context_parallel_grads(model: nn.Module, parallel: ParallelDims) -> None:
    """After backward, without a training engine: sum every parameter's `.grad` over the CP group of `parallel`
    (module doc), in place. Nothing when cp == 1."""
    if not parallel.cp_enabled:
        return
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=parallel.cp_group)
