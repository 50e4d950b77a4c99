"""Context parallel (Ulysses all-to-all over CP ranks) against one process.

`primitives`: the all-to-alls and gathers of `titans_parallel.parallel.context` on 2 gloo ranks, in float64,
against slices of the full tensors and the analytic gradient of the same function on one rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel_harness import run_ranks
from titans_parallel.parallel import ParallelDims, destroy_parallel, init_parallel
from titans_parallel.parallel.context import (
    context_parallel_mean,
    gather_heads,
    gather_sequence,
    heads_to_sequence,
    local_heads,
    sequence_shard,
    sequence_to_heads,
)

CP = 2


def _primitives(rank: int, world_size: int) -> dict:
    dims = ParallelDims(cp_size=world_size, cp_rank=rank, cp_group=dist.group.WORLD)
    g = torch.Generator().manual_seed(0)
    B, T, H, d = 2, 6, 4, 3
    full = torch.randn(B, T, H, d, generator=g, dtype=torch.float64)  # the same on every rank
    weight = torch.randn(B, T, H, d, generator=g, dtype=torch.float64)
    ref_grad = full.cos() * weight  # d/dX of sum(sin(X) * weight), the one-rank loss
    seq, heads = slice(rank * T // CP, (rank + 1) * T // CP), slice(rank * H // CP, (rank + 1) * H // CP)
    out: dict = {}

    x = full[:, seq].clone().requires_grad_()
    y = sequence_to_heads(x, dims)
    out["s2h forward"] = torch.equal(y, full[:, :, heads])
    (y.sin() * weight[:, :, heads]).sum().backward()
    out["s2h grad"] = (x.grad - ref_grad[:, seq]).abs().max().item()
    out["round trip"] = torch.equal(heads_to_sequence(y, dims), x)
    flat = full[:, seq].flatten(2)  # head-major flat features [B, T/cp, H * d]
    out["flat"] = torch.equal(sequence_to_heads(flat, dims), full[:, :, heads].flatten(2))

    h = full[:, :, heads].clone().requires_grad_()
    z = heads_to_sequence(h, dims)
    out["h2s forward"] = torch.equal(z, full[:, seq])
    (z.sin() * weight[:, seq]).sum().backward()
    out["h2s grad"] = (h.grad - ref_grad[:, :, heads]).abs().max().item()

    # gather_heads: every rank uses the whole result for its own part of the loss (here: its sequence shard)
    p = local_heads(full, dims, dim=2).clone().requires_grad_()
    gathered = gather_heads(p, dims, dim=2)
    out["gather heads forward"] = torch.equal(gathered, full)
    (gathered[:, seq].sin() * weight[:, seq]).sum().backward()
    out["gather heads grad"] = (p.grad - ref_grad[:, :, heads]).abs().max().item()

    s = sequence_shard(full, dims).clone().requires_grad_()
    whole = gather_sequence(s, dims)
    out["gather sequence forward"] = torch.equal(whole, full)
    (whole.sin() * weight).sum().backward()  # the same full loss on every rank
    out["gather sequence grad"] = (s.grad - ref_grad[:, seq]).abs().max().item()

    losses = full[..., 0, 0]  # [B, T] token losses; rank 0 counts 2 of its tokens, rank 1 all of its
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, :1] = False
    mine = losses[:, seq].clone().requires_grad_()
    mean = context_parallel_mean((mine * keep[:, seq]).sum(), keep[:, seq].sum(), dims)
    mean.backward()
    out["mean"] = (mean - (losses * keep).sum() / keep.sum()).abs().item()
    out["mean grad"] = (mine.grad - keep[:, seq].double() / keep.sum()).abs().max().item()

    layout = init_parallel(1, cp=world_size)
    out["init_parallel"] = (layout.cp_size, layout.cp_rank, layout.dp_size, layout.dp_rank)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def primitives() -> list[dict]:
    return run_ranks(CP, _primitives)


def test_all_to_all_forward_is_slicing(primitives):
    for rank, r in enumerate(primitives):
        assert r["s2h forward"] and r["h2s forward"] and r["flat"], rank
        assert r["round trip"], rank
        assert r["gather heads forward"] and r["gather sequence forward"], rank


def test_gradients_equal_single_rank(primitives):
    for r in primitives:
        for key in ("s2h grad", "h2s grad", "gather heads grad", "gather sequence grad", "mean", "mean grad"):
            assert r[key] <= 1e-14, (key, r[key])


def test_init_parallel_context_groups(primitives):
    assert [r["init_parallel"] for r in primitives] == [(2, 0, 1, 0), (2, 1, 1, 0)]
