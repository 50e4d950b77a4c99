"""What the model calls for its tensor-parallel pieces: factories that follow the `ParallelDims` they are given at
build time, and the mappings, which take the same context on every call.

With TP off (`SINGLE_RANK`, or tp = 1) every factory returns a plain torch module (nn.Linear, nn.Embedding) and
the functions are F.cross_entropy / the identity, so a single-process model never imports megatron-core. With TP
on they return the megatron-core backed modules of `tp_layers`, bound to the context's TP group. Either way every
sharded weight carries megatron's marks (`tensor_model_parallel`, `partition_dim`; at tp = 1 the shard is the whole
tensor), so a model's TP layout can be read off any build of it (`metadata.tensor_parallel_layout`).

Layout: batch-first everywhere. Activations are [B, T, features]. Under sequence parallel the "sequence-parallel
region" (residual stream, norms: everything between a row-parallel output / the embedding and the next
column-parallel input) holds each TP rank's contiguous slice of the time axis, [B, T/tp, features]; T must be
divisible by tp. Outputs of the TP modules under sequence parallel may be non-contiguous views.

Inputs that are not sequence shards: a column-parallel layer under sequence parallel all-gathers its input along
T, so a tensor that is the same on every TP rank and is no slice of the sequence (a learned prefix [Np, dim]) goes
through `apply_to_replicated` instead, which also serves a row-parallel layer whose output must stay whole on every
rank. `full_sequence=True` builds a layer that takes / returns the full sequence on every TP rank even under
sequence parallel, for a mixer that gathers the sequence itself.

Initialisation: weights are drawn in fp32 on the CPU with `init_method` (default N(0, 0.02)) over the full
(unsharded) shape, biases are zero; a TP rank keeps its slice. Both paths consume the default generator
identically, so a TP=2 model equals the TP=1 model built from the same seed, shard for shard. Under a
`torch.device("meta")` context (shapes only, e.g. counting parameters) nothing is drawn.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .grads import mark_tensor_parallel
from .groups import ParallelDims
from .init_methods import DEFAULT_INIT, InitMethod


def tensor_parallel_share(n: int, name: str, parallel: ParallelDims) -> int:
    """This rank's share n / tp of a dimension split over TP ranks (heads, vocabulary, FFN width); a ValueError
    naming `name` when tp does not divide n."""
    tp = parallel.tp_size
    if n % tp:
        raise ValueError(f"{name}={n} is not divisible by the tensor-parallel size {tp}")
    return n // tp


def _init_device() -> torch.device:
    """Where full weights are drawn: the CPU, or nowhere (meta) when the model is built on the meta device."""
    return torch.device("meta" if torch.get_default_device().type == "meta" else "cpu")


def _plain(
    cls: type[nn.Module], init_method: InitMethod, partition_dim: int, *args, bias_split: bool = False, **kwargs
) -> nn.Module:
    """TP off: the torch module, weight from `init_method`, bias zero. The weight (and the bias if `bias_split`)
    is marked with the `partition_dim` it has under TP, as megatron marks its layers at tp = 1, so the TP layout
    of a model can be read from any build of it (`parallel.metadata`)."""
    module = nn.utils.skip_init(cls, *args, **kwargs, device=_init_device())
    with torch.no_grad():
        init_method(module.weight)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    mark_tensor_parallel(module.weight, partition_dim)
    if bias_split and module.bias is not None:
        mark_tensor_parallel(module.bias, 0)
    return module


def _layer_dims(parallel: ParallelDims, full_sequence: bool) -> ParallelDims:
    return dataclasses.replace(parallel, sequence_parallel=False) if full_sequence else parallel


def column_parallel_linear(
    in_features: int,
    out_features: int,
    bias: bool = True,
    *,
    parallel: ParallelDims,
    gather_output: bool = False,
    init_method: InitMethod = DEFAULT_INIT,
    full_sequence: bool = False,
) -> nn.Module:
    """Linear whose output features are split over TP ranks: [B, T, in] -> [B, T, out/tp] ([B, T, out] with
    gather_output). Under sequence parallel it takes the sequence shard [B, T/tp, in] and all-gathers it, unless
    full_sequence (then it takes the full [B, T, in] on every rank). TP off: nn.Linear(in, out)."""
    if not parallel.tp_enabled:
        return _plain(nn.Linear, init_method, 0, in_features, out_features, bias=bias, bias_split=True)
    from .tp_layers import ColumnParallelLinear

    dims = _layer_dims(parallel, full_sequence)
    return ColumnParallelLinear(in_features, out_features, bias, gather_output, init_method, dims)


def row_parallel_linear(
    in_features: int,
    out_features: int,
    bias: bool = True,
    *,
    parallel: ParallelDims,
    input_is_parallel: bool = True,
    init_method: InitMethod = DEFAULT_INIT,
    full_sequence: bool = False,
) -> nn.Module:
    """Linear whose input features are split over TP ranks, summed over TP: [B, T, in/tp] -> [B, T, out], or the
    sequence shard [B, T/tp, out] under sequence parallel (which requires input_is_parallel) unless full_sequence
    (then the full [B, T, out] on every rank). With input_is_parallel=False it takes the full [B, T, in] and keeps
    its slice. TP off: nn.Linear(in, out)."""
    if not parallel.tp_enabled:
        return _plain(nn.Linear, init_method, 1, in_features, out_features, bias=bias)
    from .tp_layers import RowParallelLinear

    dims = _layer_dims(parallel, full_sequence)
    return RowParallelLinear(in_features, out_features, bias, input_is_parallel, init_method, dims)


def vocab_parallel_embedding(
    num_embeddings: int, embedding_dim: int, *, parallel: ParallelDims, init_method: InitMethod = DEFAULT_INIT
) -> nn.Module:
    """Embedding with vocabulary rows split over TP ranks (num_embeddings divisible by tp): ids [B, T] ->
    [B, T, dim], or the sequence shard [B, T/tp, dim] under sequence parallel. TP off: nn.Embedding."""
    if not parallel.tp_enabled:
        return _plain(nn.Embedding, init_method, 0, num_embeddings, embedding_dim)
    from .tp_layers import VocabParallelEmbedding

    return VocabParallelEmbedding(num_embeddings, embedding_dim, init_method, parallel)


def apply_to_replicated(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer` (from `column_parallel_linear` / `row_parallel_linear`) on x [..., Np, features] that is the same
    on every TP rank and no slice of the sequence (a learned prefix), never gathered or scattered along T: a
    column-parallel layer takes x whole and sums its gradient over TP; a row-parallel one sums its partial
    products over TP and returns them whole on every rank. A call of the module, so hooks on it (ZeRO-3's
    parameter gathering) run as for any other call. TP off: `layer(x)`."""
    if isinstance(layer, nn.Linear):  # TP off: the plain layer, for which a prefix is an input like any other
        return layer(x)
    return layer(x, replicated=True)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, parallel: ParallelDims) -> torch.Tensor:
    """Per-token cross-entropy, fp32, shaped like `labels` ([B, T]); no reduction, no ignore_index (labels must be
    in [0, vocab): mask the losses instead).

    logits: [B, T, vocab/tp], this rank's vocabulary slice (a column-parallel head without gather_output). With TP
    on, megatron's kernel overwrites `logits` in place to save memory: do not reuse them afterwards. (megatron-core
    0.16's kernel takes no group: it reduces over its `parallel_state` TP group, the one `init_parallel` put into
    `parallel`.)
    """
    if not parallel.tp_enabled:
        return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="none").view_as(labels)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

    if logits.dim() == 3 and not logits.is_contiguous() and logits.transpose(0, 1).is_contiguous():
        # A sequence-parallel head's output is a view of sequence-first memory: compute in that layout, no copy.
        return megatron_ce(logits.transpose(0, 1), labels.transpose(0, 1).contiguous()).transpose(0, 1)
    return megatron_ce(logits.contiguous(), labels.contiguous())


def scatter_to_sequence_parallel_region(x: torch.Tensor, parallel: ParallelDims) -> torch.Tensor:
    """[B, T, ...] (the same on every TP rank) -> this rank's [B, T/tp, ...]; backward all-gathers.
    Identity unless sequence parallel is on."""
    if not parallel.sequence_parallel:
        return x
    from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region as scatter

    return scatter(x.transpose(0, 1), group=parallel.tp_group).transpose(0, 1)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, parallel: ParallelDims, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """This rank's [B, T/tp, ...] -> [B, T, ...] (all-gather over TP). Identity unless sequence parallel is on.

    Backward: reduce-scatter when the result feeds tensor-parallel work whose gradient is a per-rank partial sum
    (tensor_parallel_output_grad=True, megatron's default), else split (the result is used identically on every
    rank, e.g. a replicated loss).
    """
    if not parallel.sequence_parallel:
        return x
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region as gather

    x = gather(x.transpose(0, 1), tensor_parallel_output_grad=tensor_parallel_output_grad, group=parallel.tp_group)
    return x.transpose(0, 1)


def gather_from_tensor_parallel_region(x: torch.Tensor, parallel: ParallelDims) -> torch.Tensor:
    """[..., n/tp] (this rank's slice of the last dimension, e.g. a column-parallel head's vocabulary shard) ->
    [..., n], all-gathered over TP; backward keeps this rank's slice. Identity when TP is off."""
    if not parallel.tp_enabled:
        return x
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(x, group=parallel.tp_group)


def tensor_parallel_parameter(
    shape: tuple[int, ...], partition_dim: int, *, parallel: ParallelDims, init_method: InitMethod = DEFAULT_INIT
) -> nn.Parameter:
    """A parameter split over TP ranks along `partition_dim`, e.g. a per-head [H, ...] tensor split by heads.

    The full `shape` is initialised (fp32, CPU) on every rank and the rank keeps its contiguous slice, so the shard is
    exactly the TP=1 parameter's slice for the same seed. Marked with `mark_tensor_parallel`.
    """
    if shape[partition_dim] % parallel.tp_size:
        raise ValueError(
            f"dimension {partition_dim} of {tuple(shape)} is not divisible by tensor-parallel size {parallel.tp_size}"
        )
    full = torch.empty(shape, device=_init_device())
    with torch.no_grad():
        init_method(full)
    local = full.chunk(parallel.tp_size, dim=partition_dim)[parallel.tp_rank].clone()
    return mark_tensor_parallel(nn.Parameter(local), partition_dim)
