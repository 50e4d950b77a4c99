"""Context parallel (DeepSpeed-Ulysses): the sequence is sharded over the CP ranks of `ParallelDims` everywhere
except inside a mixer's per-head core, which sees the whole sequence for a slice of the heads.

Layout. Outside the mixers (embeddings, norms, FFN, head, loss) a CP rank holds its contiguous slice of the time
axis, [B, T/cp, ...] (`sequence_shard`; T divisible by cp). A mixer projects its tokens with the full (CP-replicated)
weights, then `sequence_to_heads` (one all-to-all over CP) turns [B, T/cp, H, ...] into [B, T, H/cp, ...]: the full
sequence for this rank's contiguous slice of the (TP-local) heads, so RoPE, the causal conv, the gates, the memory
scan and attention run over the whole sequence for those heads, exactly as on one rank. `heads_to_sequence` (the
inverse all-to-all) turns the result back before the output projection. Heads split over TP x CP
(`context_parallel_heads`). The all-to-alls take any trailing layout whose dimension 2 is head-major — [B, T, H, d]
or a flat projection [B, T, H * f] — and split dimension 2 into cp contiguous chunks; each one's backward is the
other all-to-all (an all-to-all is a permutation of the data over the ranks; its adjoint is the inverse).

Things that are not sequence shards (persistent tokens, their projections; per-head parameters) are the same on
every CP rank: the core takes its head slice (`local_heads`); an output at such positions that needs every head
(the memory's output at the persistent tokens) is gathered over CP (`gather_heads`).

Gradients. Weights are replicated over CP and each rank uses them on its own tokens (projections) or its own heads
(per-head parameters, the head slices of replicated inputs), so each rank's parameter gradient is a partial sum:
the full gradient is their sum over CP. The loss is made the same on every CP rank (`context_parallel_mean`: the
sum of the ranks' token-loss sums over the total token count) with an identity backward, so each rank's backward
yields exactly its part of the CP=1 gradient, and summing over CP gives the CP=1 gradient. Under DeepSpeed the sum
happens in its data-parallel reduction (pretrain/engine.py); without it, `grads.sum_context_parallel_grads`.

MAC runs its segments in order over the whole sequence, so it cannot take the all-to-all: every CP rank holds the
whole sequence (`replicate_sequence`) and runs every segment for its own heads, with each projection's heads sliced
(`local_heads`) and gathered back (`gather_heads`) before the head-mixing output projections; the projections
compute every head on every rank (cp times their work) and the rest of the mixer is replicated. Every collective's
backward is its adjoint over the ranks (a gather's a reduce-scatter), so the parameter gradients stay partial per
rank and sum over CP to the CP=1 gradient like everything else.

Every function is the identity (or a plain slice) when cp == 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import ParallelDims
from .layers import tensor_parallel_share


def context_parallel_heads(n_heads: int, parallel: ParallelDims) -> int:
    """Heads of a mixer's core on this rank, n_heads / (tp * cp); a ValueError naming the numbers when tp * cp does
    not divide n_heads."""
    if parallel.cp_enabled and n_heads % (parallel.tp_size * parallel.cp_size):
        raise ValueError(
            f"n_heads={n_heads} is not divisible by tp * cp = {parallel.tp_size} * {parallel.cp_size} "
            "(heads split over tensor and context parallel)"
        )
    return tensor_parallel_share(n_heads, "n_heads", parallel) // parallel.cp_size


def check_sequence_length(seq_len: int, parallel: ParallelDims) -> None:
    """A ValueError when cp does not divide the sequence length T."""
    if seq_len % parallel.cp_size:
        raise ValueError(
            f"context parallel needs T={seq_len} divisible by the context-parallel size {parallel.cp_size}"
        )


def sequence_shard(x: torch.Tensor, parallel: ParallelDims) -> torch.Tensor:
    """x [B, T, ...] (the same on every CP rank) -> this rank's contiguous [B, T/cp, ...] (a view); backward
    zero-fills the other positions. Identity when cp == 1."""
    if not parallel.cp_enabled:
        return x
    check_sequence_length(x.shape[1], parallel)
    return x.chunk(parallel.cp_size, dim=1)[parallel.cp_rank]


def local_heads(x: torch.Tensor, parallel: ParallelDims, dim: int = -1) -> torch.Tensor:
    """This rank's contiguous 1/cp slice of the head-major dimension `dim` of x, which is the same on every CP rank
    (a per-head parameter [H, ...] with dim=0, a projection of persistent tokens [..., H * f]). Backward
    zero-fills the other heads: their gradient comes from the other CP ranks. Identity when cp == 1."""
    if not parallel.cp_enabled:
        return x
    return x.chunk(parallel.cp_size, dim=dim)[parallel.cp_rank]


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """all_to_all_single on x [cp, ...] contiguous: chunk j goes to rank j; returns [cp, ...], chunk s from rank s."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _sequence_to_heads(x: torch.Tensor, cp: int, group: dist.ProcessGroup) -> torch.Tensor:
    B, t, n, *rest = x.shape
    send = x.reshape(B, t, cp, n // cp, *rest).movedim(2, 0).contiguous()  # [cp (head chunk), B, t, n/cp, ...]
    received = _all_to_all(send, group)  # [cp (time chunk), B, t, n/cp, ...]
    return received.movedim(0, 1).reshape(B, cp * t, n // cp, *rest)


def _heads_to_sequence(x: torch.Tensor, cp: int, group: dist.ProcessGroup) -> torch.Tensor:
    B, T, n, *rest = x.shape
    send = x.reshape(B, cp, T // cp, n, *rest).movedim(1, 0).contiguous()  # [cp (time chunk), B, T/cp, n, ...]
    received = _all_to_all(send, group)  # [cp (head chunk), B, T/cp, n, ...]
    return received.movedim(0, 2).reshape(B, T // cp, cp * n, *rest)


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cp: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.cp, ctx.group = cp, group
        return _sequence_to_heads(x, cp, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _heads_to_sequence(grad, ctx.cp, ctx.group), None, None


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cp: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.cp, ctx.group = cp, group
        return _heads_to_sequence(x, cp, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sequence_to_heads(grad, ctx.cp, ctx.group), None, None


def sequence_to_heads(x: torch.Tensor, parallel: ParallelDims) -> torch.Tensor:
    """x [B, T/cp, n, ...] (this rank's tokens, all n head-major features) -> [B, T, n/cp, ...] (every token, this
    rank's contiguous slice of dimension 2): one all-to-all over CP; backward `heads_to_sequence`. n divisible by
    cp. Identity when cp == 1."""
    if not parallel.cp_enabled:
        return x
    return _SequenceToHeads.apply(x, parallel.cp_size, parallel.cp_group)


def heads_to_sequence(x: torch.Tensor, parallel: ParallelDims) -> torch.Tensor:
    """The inverse of `sequence_to_heads`: x [B, T, n/cp, ...] -> [B, T/cp, n, ...]; backward `sequence_to_heads`.
    Identity when cp == 1."""
    if not parallel.cp_enabled:
        return x
    return _HeadsToSequence.apply(x, parallel.cp_size, parallel.cp_group)


def core_heads(x: torch.Tensor, parallel: ParallelDims, full_sequence: bool) -> torch.Tensor:
    """A projection [B, t, n, ...] (head-major dimension 2) -> its full-sequence core input [B, T, n/cp, ...]:
    `sequence_to_heads` of this rank's tokens, or (`full_sequence`: every rank holds the whole sequence, MAC)
    `local_heads`."""
    return local_heads(x, parallel, dim=2) if full_sequence else sequence_to_heads(x, parallel)


def core_output(y: torch.Tensor, parallel: ParallelDims, full_sequence: bool) -> torch.Tensor:
    """The inverse of `core_heads` for the input of an output projection: `heads_to_sequence`, or
    (`full_sequence`) `gather_heads`: every head of the whole sequence on every rank."""
    return gather_heads(y, parallel, dim=2) if full_sequence else heads_to_sequence(y, parallel)


def _all_gather(x: torch.Tensor, dim: int, parallel: ParallelDims) -> torch.Tensor:
    """The CP ranks' x concatenated along `dim`, in rank order."""
    parts = [torch.empty_like(x) for _ in range(parallel.cp_size)]
    dist.all_gather(parts, x.contiguous(), group=parallel.cp_group)
    return torch.cat(parts, dim=dim)


class _GatherHeads(torch.autograd.Function):
    """All-gather along `dim`; backward: sum over CP (every rank's copy of the result feeds its own part of the
    loss), then this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, parallel: ParallelDims) -> torch.Tensor:
        ctx.dim, ctx.parallel = dim, parallel
        return _all_gather(x, dim, parallel)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.parallel.cp_group)
        return local_heads(grad, ctx.parallel, ctx.dim), None, None


def gather_heads(x: torch.Tensor, parallel: ParallelDims, dim: int = -1) -> torch.Tensor:
    """The inverse of `local_heads` for a result needed whole on every CP rank: x [..., n/cp, ...] (this rank's
    head slice along `dim`) -> [..., n, ...], the same on every CP rank. Backward sums the gradient over CP and
    keeps this rank's slice. Identity when cp == 1."""
    if not parallel.cp_enabled:
        return x
    return _GatherHeads.apply(x, dim % x.dim(), parallel)


class _GatherSequence(torch.autograd.Function):
    """All-gather along T; backward: this rank's slice of the gradient, first summed over CP with `sum_grads`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, parallel: ParallelDims, sum_grads: bool) -> torch.Tensor:
        ctx.parallel, ctx.sum_grads = parallel, sum_grads
        return _all_gather(x, 1, parallel)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.sum_grads:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.parallel.cp_group)
        return sequence_shard(grad, ctx.parallel), None, None


def gather_sequence(x: torch.Tensor, parallel: ParallelDims) -> torch.Tensor:
    """This rank's [B, T/cp, ...] -> [B, T, ...] (all-gather over CP), the same on every CP rank; backward keeps
    this rank's slice (each rank backpropagates the same function of the result, so that is its part of the
    gradient). Identity when cp == 1."""
    if not parallel.cp_enabled:
        return x
    return _GatherSequence.apply(x, parallel, False)


def replicate_sequence(x: torch.Tensor, parallel: ParallelDims) -> torch.Tensor:
    """This rank's [B, T/cp, ...] -> the whole [B, T, ...] on every CP rank, for a mixer that runs the whole
    sequence for its own heads on every rank (MAC; `full_sequence` layers take `local_heads` of their projections
    and `gather_heads` before their output projection). Unlike `gather_sequence`, every rank uses the result
    differently, so backward sums the ranks' gradients (a reduce-scatter). Identity when cp == 1."""
    if not parallel.cp_enabled:
        return x
    return _GatherSequence.apply(x, parallel, True)


class _SumForward(torch.autograd.Function):
    """Sum over CP in forward; identity backward (each rank's part of the summed loss is its own term)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def context_parallel_mean(total: torch.Tensor, count: torch.Tensor, parallel: ParallelDims) -> torch.Tensor:
    """The mean over all CP ranks' tokens: sum over CP of `total` (this rank's scalar sum of token losses) over the
    sum over CP of `count` (its number of counted tokens), the same on every CP rank and equal to the CP=1 mean.
    Backward reaches this rank's `total` only (1 / global count), so each rank's parameter gradients are its part of
    the CP=1 gradient (sum them over CP). `total / count` when cp == 1."""
    if not parallel.cp_enabled:
        return total / count
    with torch.no_grad():
        count = count.to(total.dtype).clone()
        dist.all_reduce(count, group=parallel.cp_group)
    return _SumForward.apply(total, parallel.cp_group) / count
