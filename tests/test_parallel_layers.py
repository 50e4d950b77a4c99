"""Tensor / sequence parallel on 2 gloo ranks equals one process: init, outputs, gradients, gradient norm.

One spawn (`tp_results`) runs every TP=2 scenario against the single-process (TP off) reference built from the same
seed; the tests assert on its results. Errors are max|a - b| / max|b| over the gathered (full) tensors. The slow
tests run the same block under a real DeepSpeed engine (which JIT-builds its CPU comm op on first use).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from parallel_harness import RankError, run_ranks
from titans_parallel.parallel import (
    SINGLE_RANK,
    ParallelDims,
    column_parallel_linear,
    destroy_parallel,
    gather_from_sequence_parallel_region,
    init_parallel,
    mark_sequence_parallel,
    normal_init,
    register_sequence_parallel_grad_hooks,
    row_parallel_linear,
    scatter_to_sequence_parallel_region,
    tensor_parallel_parameter,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
)

SEED = 1234
TP = 2
B, T, D, HIDDEN, VOCAB = 2, 8, 8, 16, 32
TOL = 1e-6


class Block(nn.Module):
    """x + W_down(silu(W_up rmsnorm(x)) * scale): column -> per-feature TP parameter -> row; the norm (and the
    row bias) live in the sequence-parallel region."""

    def __init__(self, dims: ParallelDims) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D)
        mark_sequence_parallel(self.norm.weight, dims)
        self.up = column_parallel_linear(D, HIDDEN, parallel=dims, init_method=normal_init(0.5))
        self.scale = tensor_parallel_parameter((HIDDEN,), 0, parallel=dims, init_method=normal_init(1.0))
        self.down = row_parallel_linear(HIDDEN, D, parallel=dims, init_method=normal_init(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.up(self.norm(x))) * self.scale)


class TinyLM(nn.Module):
    """Vocab-parallel embedding -> column-parallel head -> vocab-parallel cross-entropy (per token)."""

    def __init__(self, dims: ParallelDims) -> None:
        super().__init__()
        self.dims = dims
        self.embed = vocab_parallel_embedding(VOCAB, D, parallel=dims)
        self.head = column_parallel_linear(D, VOCAB, bias=False, parallel=dims)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(self.head(self.embed(ids)), labels, self.dims)


def _data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    ids, labels = torch.randint(VOCAB, (B, T), generator=g), torch.randint(VOCAB, (B, T), generator=g)
    return x, w, ids, labels


def _run_block(x: torch.Tensor, w: torch.Tensor, dims: ParallelDims, hooks: bool = False) -> tuple[Block, torch.Tensor]:
    """Build from SEED, forward the full batch (scattered to the sequence shard under SP), backward sum(out * w)."""
    torch.manual_seed(SEED)
    block = Block(dims)
    if hooks:
        assert register_sequence_parallel_grad_hooks(block, dims) == ["norm.weight", "down.bias"]
        assert register_sequence_parallel_grad_hooks(block, dims) == []
    out = gather_from_sequence_parallel_region(
        block(scatter_to_sequence_parallel_region(x, dims)), dims, tensor_parallel_output_grad=False
    )
    (out * w).sum().backward()
    return block, out.detach()


def _run_lm(ids: torch.Tensor, labels: torch.Tensor, dims: ParallelDims) -> tuple[TinyLM, torch.Tensor]:
    torch.manual_seed(SEED)
    lm = TinyLM(dims)
    loss = lm(ids, labels)
    loss.mean().backward()
    return lm, loss.detach()


def _full(t: torch.Tensor, param: nn.Parameter, dims: ParallelDims) -> torch.Tensor:
    """The TP=1 tensor of a shard (value or gradient): all-gather over TP along the parameter's partition_dim."""
    if not getattr(param, "tensor_model_parallel", False):
        return t
    parts = [torch.empty_like(t) for _ in range(dims.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=dims.tp_group)
    return torch.cat(parts, dim=param.partition_dim)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _param_errors(model: nn.Module, ref: nn.Module, dims: ParallelDims) -> dict[str, tuple[float, float]]:
    """name -> (value error, gradient error) against the TP=1 reference."""
    refs = dict(ref.named_parameters())
    return {
        name: (_rel(_full(p.detach(), p, dims), refs[name].detach()), _rel(_full(p.grad, p, dims), refs[name].grad))
        for name, p in model.named_parameters()
    }


def _grad_norm(grads: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


def _deepspeed_rule_grad_norm(model: nn.Module) -> float:
    """The global gradient norm by DeepSpeed's rule (deepspeed.runtime.utils.clip_grad_norm_, ZeRO's
    get_grad_norm_direct): a squared gradient norm counts on every TP rank if the parameter is marked
    tensor_model_parallel, else on model-parallel rank 0 only; the sum is all-reduced over the model-parallel group.
    (Importing deepspeed would JIT-build its CPU comm op; the slow test checks the real engine.)"""
    from pretrain.engine import DeepSpeedMPU

    mpu = DeepSpeedMPU()
    counted = [
        p.grad
        for p in model.parameters()
        if getattr(p, "tensor_model_parallel", False) or mpu.get_model_parallel_rank() == 0
    ]
    squared = torch.tensor(_grad_norm(counted) ** 2)
    dist.all_reduce(squared, group=mpu.get_model_parallel_group())
    return squared.sqrt().item()


def _tracker_draws(dims: ParallelDims) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(draw inside megatron's model-parallel RNG fork, megatron's seed for it on this TP rank, whether the default
    generator came back unchanged)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    default = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        draw = torch.rand(4)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(SEED + 2718 + dims.tp_rank))
    return draw, expected, torch.equal(default, torch.get_rng_state())


def _tp_suite(rank: int, world_size: int) -> dict:
    x, w, ids, labels = _data()
    ref_block, ref_out = _run_block(x, w, SINGLE_RANK)
    ref_lm, ref_loss = _run_lm(ids, labels, SINGLE_RANK)
    ref_norm = _grad_norm([p.grad for p in ref_block.parameters()])

    results: dict = {}
    try:
        init_parallel(3)
    except ValueError as e:
        results["tp3_error"] = str(e)
    results["rng"] = _tracker_draws(init_parallel(TP, seed=SEED))
    destroy_parallel()
    for sp, hooks in [(False, False), (True, False), (True, True)]:
        dims = init_parallel(TP, sequence_parallel=sp, seed=SEED)
        block, out = _run_block(x, w, dims, hooks)
        results["block", sp, hooks] = {"output": _rel(out, ref_out), "params": _param_errors(block, ref_block, dims)}
        if hooks:
            marked = _deepspeed_rule_grad_norm(block)
            del block.scale.tensor_model_parallel
            results["grad_norm"] = {"single": ref_norm, "marked": marked, "unmarked": _deepspeed_rule_grad_norm(block)}
        lm, loss = _run_lm(ids, labels, dims)
        results["lm", sp] = {"loss": _rel(loss, ref_loss), "params": _param_errors(lm, ref_lm, dims)}
        results["dims", sp] = (dims.tp_size, dims.tp_rank, dims.dp_size, dims.dp_rank, dims.sequence_parallel)
        results["keys", sp] = [list(m.state_dict()) for m in (block, lm, ref_block, ref_lm)]
        destroy_parallel()
    return results


@pytest.fixture(scope="module")
def tp_results() -> list[dict]:
    return run_ranks(TP, _tp_suite)


def test_dims(tp_results):
    for rank, res in enumerate(tp_results):
        assert res["dims", False] == (2, rank, 1, 0, False)
        assert res["dims", True] == (2, rank, 1, 0, True)


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_state_dict_keys_match_single_rank(tp_results, sp):
    for res in tp_results:
        block, lm, ref_block, ref_lm = res["keys", sp]
        assert (block, lm) == (ref_block, ref_lm)


def test_model_parallel_rng_runs_on_cpu(tp_results):
    """megatron's tracker fork: a per-TP-rank stream seeded as on GPU; the default generator is untouched."""
    draws = [res["rng"][0] for res in tp_results]
    assert not torch.equal(draws[0], draws[1])
    for draw, expected, default_untouched in (res["rng"] for res in tp_results):
        assert torch.equal(draw, expected) and default_untouched


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_tp_shards_are_slices_of_single_rank_init(tp_results, sp):
    for res in tp_results:
        assert {name: errs[0] for name, errs in res["block", sp, sp]["params"].items()} == dict.fromkeys(
            ["norm.weight", "scale", "up.weight", "up.bias", "down.weight", "down.bias"], 0.0
        )
        assert all(errs[0] == 0.0 for errs in res["lm", sp]["params"].values())


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_mlp_outputs_and_grads_match_single_rank(tp_results, sp):
    """Column -> row parallel MLP, with the sequence-parallel grad hooks when SP is on."""
    for res in tp_results:
        block = res["block", sp, sp]
        assert block["output"] <= TOL
        assert {name: errs[1] <= TOL for name, errs in block["params"].items()} == dict.fromkeys(block["params"], True)


def test_sequence_parallel_replicated_grads_are_partial_without_hooks(tp_results):
    """The trap: under SP each rank's norm weight (and row bias) gradient covers only its tokens."""
    for res in tp_results:
        block = res["block", True, False]
        assert block["output"] <= TOL
        wrong = {name for name, errs in block["params"].items() if errs[1] > 1e-3}
        assert wrong == {"norm.weight", "down.bias"}


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_vocab_parallel_embedding_and_cross_entropy_match_single_rank(tp_results, sp):
    for res in tp_results:
        lm = res["lm", sp]
        assert lm["loss"] <= TOL
        assert all(errs[1] <= TOL for errs in lm["params"].values()), lm["params"]


def test_grad_norm_needs_tensor_parallel_marking(tp_results):
    """An unmarked shard is counted from TP rank 0 only: the norm (and so clipping) is silently wrong."""
    for res in tp_results:
        norms = res["grad_norm"]
        assert norms["marked"] == pytest.approx(norms["single"], rel=TOL)
        assert norms["unmarked"] != pytest.approx(norms["single"], rel=1e-2)


def test_world_size_not_divisible_by_tp(tp_results, monkeypatch):
    assert tp_results[0]["tp3_error"] == "world size 2 is not divisible by tensor-parallel size 3"
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="world size 4 is not divisible by tensor-parallel size 3"):
        init_parallel(3)
    from megatron.core import parallel_state

    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()


def test_single_process_factories_are_plain_torch():
    assert type(column_parallel_linear(4, 6, parallel=SINGLE_RANK)) is nn.Linear
    assert type(row_parallel_linear(6, 4, parallel=SINGLE_RANK)) is nn.Linear
    assert type(vocab_parallel_embedding(10, 4, parallel=SINGLE_RANK)) is nn.Embedding
    x = torch.randn(2, 3, 4)
    assert scatter_to_sequence_parallel_region(x, SINGLE_RANK) is x
    assert gather_from_sequence_parallel_region(x, SINGLE_RANK) is x


def _sum_ranks(rank: int, world_size: int) -> int:
    t = torch.tensor(rank)
    dist.all_reduce(t)
    return t.item()


def _raise_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()
    return rank


def _hang_on_rank_0(rank: int, world_size: int) -> None:
    if rank == 0:
        time.sleep(600)


def test_harness_returns_results_by_rank():
    assert run_ranks(2, _sum_ranks) == [1, 1]


def test_harness_reports_the_failing_rank_traceback():
    with pytest.raises(RankError, match=r"(?s)rank 1 failed.*ValueError: boom on purpose"):
        run_ranks(2, _raise_on_rank_1)
    assert not mp.active_children()


def test_harness_timeout_kills_every_rank():
    start = time.monotonic()
    with pytest.raises(RankError, match="timed out"):
        run_ranks(2, _hang_on_rank_0, timeout=3)
    assert time.monotonic() - start < 20
    assert not mp.active_children()


def _deepspeed_suite(rank: int, world_size: int, hooks: bool) -> dict:
    """The Block under a real DeepSpeed engine: tp=2 with sequence parallel x dp=world_size/2, ZeRO 0-3, 2
    accumulated micro-batches per DP rank, SGD. Returns the global gradient norm and the updated parameters'
    errors against one process that sees every DP rank's micro-batches."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from pretrain.engine import DeepSpeedMPU

    deepspeed.init_distributed(dist_backend="gloo")
    x, w, _, _ = _data()
    dp_size, lr, accumulation = world_size // TP, 0.1, 2
    batches = [[(x * (1 + d + m), w.roll(d + m, dims=1)) for m in range(accumulation)] for d in range(dp_size)]
    torch.manual_seed(SEED)
    ref = Block(SINGLE_RANK)
    for xm, wm in sum(batches, []):
        ((ref(xm) * wm).sum() / (accumulation * dp_size)).backward()
    ref_norm = _grad_norm([p.grad for p in ref.parameters()])
    ref_after = {name: p.detach() - lr * p.grad for name, p in ref.named_parameters()}

    dims = init_parallel(TP, sequence_parallel=True, seed=SEED)
    results = {"single": ref_norm}
    for stage in (0, 1, 2, 3):
        torch.manual_seed(SEED)
        block = Block(dims)
        if hooks:
            register_sequence_parallel_grad_hooks(block, dims)
        engine, *_ = deepspeed.initialize(
            model=block,
            optimizer=torch.optim.SGD(block.parameters(), lr=lr),
            mpu=DeepSpeedMPU(),
            config={
                "train_micro_batch_size_per_gpu": B,
                "gradient_accumulation_steps": accumulation,
                "gradient_clipping": 1e6,
                "zero_optimization": {"stage": stage},
                "zero_allow_untested_optimizer": True,
            },
        )
        for xm, wm in batches[dims.dp_rank]:
            out = gather_from_sequence_parallel_region(
                engine(scatter_to_sequence_parallel_region(xm, dims)), dims, tensor_parallel_output_grad=False
            )
            engine.backward((out * wm).sum())
            engine.step()
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            after = {name: _rel(_full(p.detach(), p, dims), ref_after[name]) for name, p in params}
        results[stage] = {"norm": engine.get_global_grad_norm(), "params": after}
    destroy_parallel()
    return results


@pytest.mark.slow
def test_deepspeed_engine_matches_single_rank():
    """tp=2 x dp=2 (4 ranks), ZeRO 0-3 with gradient accumulation: updated parameters and global norm exact."""
    for res in run_ranks(2 * TP, _deepspeed_suite, True, timeout=600):
        for stage in (0, 1, 2, 3):
            assert all(err <= TOL for err in res[stage]["params"].values()), (stage, res[stage]["params"])
        for stage in (1, 2, 3):  # stage 0 with a torch optimizer does not record the norm
            assert res[stage]["norm"] == pytest.approx(res["single"], rel=TOL), stage


@pytest.mark.slow
def test_deepspeed_does_not_reduce_sequence_parallel_grads():
    """The trap under a real engine: without the hooks the replicated norm weight and row bias train wrongly."""
    for res in run_ranks(TP, _deepspeed_suite, False, timeout=600):
        for stage in (0, 1, 2, 3):
            wrong = {name for name, err in res[stage]["params"].items() if err > 1e-3}
            assert wrong == {"norm.weight", "down.bias"}, stage
