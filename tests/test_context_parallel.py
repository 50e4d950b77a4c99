"""Context parallel (Ulysses all-to-all over CP ranks) against one process.

`primitives`: the all-to-alls and gathers of `titans_parallel.parallel.context` on 2 gloo ranks, in float64,
against slices of the full tensors and the analytic gradient of the same function on one rank.
`cp_results`: TitansLM at CP=2 (2 ranks) against the single-process model built from the same seed, in float64:
logits, loss and every parameter gradient (summed over CP) per variant, and the errors. `cp_tp_results`: CP=2 x
TP=2 (4 ranks, with and without sequence parallel) against the same reference. Errors are max|a - b| / max|b|
over full tensors (TP shards gathered). Labels include ignored positions (-100).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from parallel_harness import run_ranks
from test_model import tiny_config
from test_model_parallel import _error_message
from test_parallel_layers import _full as _full_over_tp
from test_parallel_layers import _rel
from titans_parallel import TitansLM
from titans_parallel.parallel import (
    SINGLE_RANK,
    ParallelDims,
    destroy_parallel,
    init_parallel,
    register_sequence_parallel_grad_hooks,
    sum_context_parallel_grads,
)
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


SEED = 1234
B, T, VOCAB = 2, 20, 64  # 10-token CP shards; under CP x SP 5-token shards; memory chunks of 4 straddle them
TOL = 1e-10  # float64 model: logits and gradients
FP32_TOL = 1e-6  # the loss value is fp32 by design; under TP megatron's vocab-parallel cross-entropy's gradient too
EOS = 2
CASES = ("swa", "transformer", "lmm", "mag", "mal", "mac", "lmm+resets", "mal+resets", "mac+resets")  # + document_reset


def _config(case: str, **overrides):
    variant, resets = case.removesuffix("+resets"), case.endswith("+resets")
    return tiny_config(variant, **{"vocab_size": VOCAB, "n_heads": 4, "document_reset": resets, "eos_id": EOS,
                                   **overrides})


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with EOS inside a memory chunk, inside a CP shard and at the second shard's first token."""
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(EOS + 1, VOCAB, (B, T), generator=g), torch.randint(VOCAB, (B, T), generator=g)
    ids[0, 7], ids[1, [3, 10, 13]] = EOS, EOS
    labels[0, :3] = labels[1, -2:] = -100
    return ids, labels


def _full(t: torch.Tensor, param: torch.nn.Parameter, dims: ParallelDims) -> torch.Tensor:
    return _full_over_tp(t, param, dims) if dims.tp_enabled else t


def _run(case: str, dims: ParallelDims) -> dict:
    """Build from SEED with `dims` (float64), full logits, then the loss, its backward, the SP hooks and the CP sum
    as the training job has them. Returns logits, loss, and name -> (full value, full gradient, this rank's own
    gradient before the CP sum)."""
    ids, labels = _data()
    torch.manual_seed(SEED)
    model = TitansLM(_config(case), dims).double()
    register_sequence_parallel_grad_hooks(model, dims)
    with torch.no_grad():
        logits = model(ids)
    loss = model(ids, labels)
    loss.backward()
    own = {name: p.grad.clone() for name, p in model.named_parameters()}
    sum_context_parallel_grads(model, dims)
    params = {name: (_full(p.detach(), p, dims), _full(p.grad, p, dims), _full(own[name], p, dims))
              for name, p in model.named_parameters()}
    return {"logits": logits, "loss": loss.detach(), "params": params}


def _compare(ours: dict, ref: dict) -> dict:
    params = ours["params"]
    return {
        "logits": _rel(ours["logits"], ref["logits"]),
        "loss": _rel(ours["loss"], ref["loss"]),
        "values": {name: _rel(v, ref["params"][name][0]) for name, (v, _, _) in params.items()},
        "grads": {name: _rel(g, ref["params"][name][1]) for name, (_, g, _) in params.items()},
        "own grads": {name: _rel(o, ref["params"][name][1]) for name, (_, _, o) in params.items()},
    }


def _model_suite(rank: int, world_size: int, tp: int, modes: tuple[bool, ...]) -> dict:
    refs = {case: _run(case, SINGLE_RANK) for case in CASES}
    results: dict = {}
    for sp in modes:
        dims = init_parallel(tp, cp=world_size // tp, sequence_parallel=sp, seed=SEED)
        for case in CASES:
            results[case, sp] = _compare(_run(case, dims), refs[case])
        ids, labels = _data()
        torch.manual_seed(SEED)
        model = TitansLM(_config("mag"), dims)
        results["errors", sp] = {
            "heads": _error_message(TitansLM, _config("mag", n_heads=3 * tp, head_dim=8), dims),
            "odd T": _error_message(model.loss, ids[:, :18], labels[:, :18]) if tp == 1 else None,
            "decode": _error_message(model.decode, ids[:, :4], [None] * len(model.layers)),
        }
        destroy_parallel()
    return results


@pytest.fixture(scope="module")
def cp_results() -> list[dict]:
    return run_ranks(CP, _model_suite, 1, (False,), timeout=300)


def _assert_matches(r: dict, grad_tol: float = TOL) -> None:
    assert set(r["values"].values()) == {0.0}, "CP ranks must hold the CP=1 initial weights"
    assert r["logits"] <= TOL and r["loss"] <= FP32_TOL, (r["logits"], r["loss"])
    bad = {name: err for name, err in r["grads"].items() if not err <= grad_tol}
    assert not bad, bad


@pytest.mark.parametrize("case", CASES)
def test_cp_matches_single_rank(cp_results, case):
    """CP=2: the same logits, loss and (CP-summed) parameter gradients as one rank, on every CP rank; each rank's
    own gradient alone is only a part of it (for the per-token projections)."""
    for res in cp_results:
        r = res[case, False]
        _assert_matches(r)
        partial = [name for name, err in r["own grads"].items() if err > 1e-3]
        assert "output.weight" in partial and any(n.endswith(("wq.weight", "in_proj.weight")) for n in partial)


def test_cp_errors(cp_results):
    for res in cp_results:
        errors = res["errors", False]
        assert errors["heads"] == ("ValueError: n_heads=3 is not divisible by tp * cp = 1 * 2 "
                                   "(heads split over tensor and context parallel)")
        assert errors["odd T"] == "no error"  # 18 = 2 x 9
        assert errors["decode"] == ("NotImplementedError: decoding from a cache under context parallel; "
                                    "build the model with cp=1")


def test_cp_sequence_length_error():
    dims = ParallelDims(cp_size=3)
    with pytest.raises(ValueError, match="context parallel needs T=20 divisible by the context-parallel size 3"):
        TitansLM(_config("swa", n_heads=3, head_dim=8), dims).loss(*_data())


@pytest.fixture(scope="module")
def cp_tp_results() -> list[dict]:
    return run_ranks(4, _model_suite, 2, (False, True), timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["cp2xtp2", "cp2xtp2+sp"])
@pytest.mark.parametrize("case", CASES)
def test_cp_times_tp_matches_single_rank(cp_tp_results, case, sp):
    for res in cp_tp_results:
        _assert_matches(res[case, sp], FP32_TOL)
        assert res["errors", sp]["heads"].startswith("ValueError: n_heads=6 is not divisible by tp * cp = 2 * 2")


def _job(**sections):
    """The tiny training job of test_train with MAG layers (MAC refuses CP)."""
    from test_train import job

    return job(**{**sections, "model": {"variant": "mag", **sections.get("model", {})}})


@pytest.mark.parametrize("sections,key,message", [
    ({"parallel": {"cp": 2, "tp": 2}, "model": {"n_heads": 6, "head_dim": 8}}, "model.n_heads",
     "must be divisible by parallel.tp * parallel.cp = 2 * 2, got 6"),
    ({"parallel": {"cp": 3}, "model": {"n_heads": 3, "head_dim": 8}}, "data.seq_len",
     "must be divisible by parallel.cp=3, got 16"),
    ({"parallel": {"cp": 2, "tp": 2, "sequence_parallel": True}, "data": {"seq_len": 18}}, "data.seq_len",
     "must be divisible by parallel.cp=2 * tp=2 (sequence parallel), got 18"),
    ({"parallel": {"cp": 0}}, "parallel.cp", "must be >= 1"),
    ({"parallel": {"cp": 2}, "train": {"zero_stage": 3}}, "train.zero_stage", "ZeRO-3 with parallel.cp=2 is not supported"),
])
def test_job_config_checks_context_parallel(sections, key, message):
    from titans_parallel.typed_config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(key) + ".*" + re.escape(message)):
        _job(**sections)


def test_world_size_not_divisible_by_tp_times_cp_fails_before_any_process_group(monkeypatch):
    from pretrain import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=re.escape("world size 2 is not divisible by parallel.tp * parallel.cp = 1 * 4")):
        train.main(["--config", "configs/train/tiny_cpu.yaml", "parallel.cp=4", "model.layer_pattern=[swa,mag,swa,mag]"])
    assert not dist.is_initialized()


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_cp_training_follows_one_rank(tmp_path, zero_stage):
    """The real job under DeepSpeed: CP=2 on 2 ranks (the engine sums gradients over CP, ZeRO partitions over
    DP x CP) follows the one-rank trajectory on the same batches: losses and gradient norms over 10 steps, and its
    checkpoint (recording parallel.cp) converts (pretrain.convert, safetensors) to the one-rank run's weights and
    logits."""
    from test_train import _run_job

    sections = {"train": {"zero_stage": zero_stage}, "model": {"variant": "mag"}}
    cp2 = run_ranks(2, _run_job, {**sections, "parallel": {"cp": 2}, "checkpoint": {"dir": str(tmp_path / "cp2")}},
                    timeout=600)
    one = run_ranks(1, _run_job, {**sections, "checkpoint": {"dir": str(tmp_path / "one")}}, timeout=600)[0]
    assert cp2[0]["losses"] == cp2[1]["losses"]
    for key in ("losses", "grad_norms"):
        for a, b in zip(cp2[0][key], one[key]):
            assert abs(a - b) <= 1e-5 * abs(b), (key, cp2[0][key], one[key])
    assert one["losses"][-1] < one["losses"][0]
    from pretrain.checkpoint_io import load_consolidated  # the checkpoints written at the end: the same weights

    cp_state, cp_config, cp_step = load_consolidated(tmp_path / "cp2", progress=False)
    one_state, _, one_step = load_consolidated(tmp_path / "one", progress=False)
    assert cp_config["parallel"]["cp"] == 2 and cp_step == one_step == 10 and cp_state.keys() == one_state.keys()
    bad = {k: _rel(v, one_state[k]) for k, v in cp_state.items() if not _rel(v, one_state[k]) <= 1e-4}
    assert not bad, bad
    from pretrain.convert import convert, load_model

    cp_model, one_model = (load_model(convert(tmp_path / n, tmp_path / f"{n}-st", "safetensors")) for n in ("cp2", "one"))
    ids = torch.randint(0, cp_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel(cp_model(ids), one_model(ids)) <= 1e-4


@pytest.mark.slow
def test_deepspeed_launcher_trains_with_context_parallel(tmp_path, small_dataset):
    """The real `deepspeed` launcher, 2 ranks, parallel.cp=2 (MAG layers): it trains, evaluates, reports the layout,
    and writes a checkpoint that records cp and converts to one full model."""
    from test_launch import finish, launch_single_node, losses

    from pretrain.checkpoint_io import load_consolidated

    log = finish(launch_single_node(tmp_path, small_dataset, "parallel.cp=2", "model.layer_pattern=[swa,mag,swa,mag]",
                                    port=29537))
    assert len(losses(log)) == 6 and "val_loss" in log
    assert "layout: 2 ranks = dp 1 x tp 1 x cp 2, ZeRO-1, fp32" in log
    state, config, step = load_consolidated(tmp_path / "ckpt", progress=False)
    assert config["parallel"]["cp"] == 2 and step == 6 and all(torch.isfinite(v).all() for v in state.values())
