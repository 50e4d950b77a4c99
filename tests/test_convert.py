"""Checkpoint conversion: DeepSpeed checkpoints (ZeRO 0-3, TP 1/2) -> one fp32 state dict -> safetensors, a
transformers export, TP shards; the TP layout read off the layers; DeepSpeed universal checkpoints from it.

References come from the training run itself: when a checkpoint is written, each rank also computes full-vocabulary
logits of `engine.module` on a fixed input (and, for bf16, gathers its weights)."""

import json
import os
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from parallel_harness import run_ranks
from pretrain.checkpoint import CheckpointError
from pretrain.checkpoint_io import (
    ModelSpec,
    build_model,
    load_consolidated,
    load_tp_shard,
    load_tp_shards,
    shard_state_dict,
)
from pretrain.convert import convert, load_model, main
from test_train import TINY_MODEL, _global_batch, _run_job, job
from titans_parallel import ModelConfig, TitansLM
from pretrain.universal import universal_checkpoint_info
from titans_parallel.parallel.metadata import tensor_parallel_layout, tied_parameters
from titans_parallel.typed_config import from_mapping

IDS = torch.randint(0, TINY_MODEL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(7))
MIXED = from_mapping(ModelConfig, {**TINY_MODEL, "n_layers": 4, "layer_pattern": ["mac", "mag", "mal", "swa"]})


def _reference(engine, bf16: bool) -> dict:
    """What the training model says at a checkpoint: logits on IDS (full vocabulary, every rank), the TP layout of
    the live (TP-sharded) module, and for bf16 its weights gathered over TP (ZeRO 0-2: each rank holds its shard)."""
    import torch.distributed as dist

    with torch.no_grad():
        ref = {"logits": engine.module(IDS).float(), "layout": tensor_parallel_layout(engine.module)}
    if bf16:
        dims, weights = engine.module.parallel, {}
        for name, p in engine.module.named_parameters(remove_duplicate=False):
            if dims.tp_enabled and getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(p) for _ in range(dims.tp_size)]
                dist.all_gather(parts, p.detach().contiguous(), group=dims.tp_group)
                weights[name] = torch.cat(parts, p.partition_dim)
            else:
                weights[name] = p.detach().clone()
        ref["weights"] = weights
    return ref


def _train_job(rank: int, world_size: int, sections: dict) -> dict:
    """test_train's job on exact global batches, every checkpoint also recording `_reference` and carrying
    `universal_checkpoint_info` in its client state."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    save, captured = DeepSpeedEngine.save_checkpoint, {}

    def save_and_capture(engine, save_dir, tag=None, client_state=None, **kwargs):
        client_state = {"universal_checkpoint_info": universal_checkpoint_info(engine.module), **(client_state or {})}
        out = save(engine, save_dir, tag=tag, client_state=client_state, **kwargs)
        captured[tag] = _reference(engine, engine.bfloat16_enabled())
        return out

    DeepSpeedEngine.save_checkpoint = save_and_capture
    return {**_run_job(rank, world_size, sections), "references": captured}


def _train(tmp: Path, zero: int, tp: int, steps: int = 2, world: int = 2, precision: str = "fp32",
           every: int | None = None) -> tuple[Path, dict]:
    sections = {"parallel": {"tp": tp, "sequence_parallel": tp > 1}, "train": {"zero_stage": zero, "steps": steps,
                "precision": precision}, "checkpoint": {"dir": str(tmp / "ckpt"), "every": every or steps}}
    return tmp / "ckpt", run_ranks(world, _train_job, sections, timeout=600)[0]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """A real ZeRO-1, TP=2 (sequence parallel) checkpoint of 2 steps on 2 ranks, and its references."""
    return _train(tmp_path_factory.mktemp("run"), zero=1, tp=2)


# --- the layout, from the layers' own marks ----------------------------------------------------------------------


def test_layout_is_read_from_the_layers():
    """Built with TP off (on the meta device), every parameter still says how TP splits it: the model docstring's
    table."""
    with torch.device("meta"):
        model = TitansLM(MIXED)
    layout = tensor_parallel_layout(model)
    assert layout.keys() == model.state_dict().keys()
    expect = {r"tok_embeddings|output|\.w[qkv]\.|w[13]\.|in_proj|gate_proj|conv_weight|initial_weights|out_norm": 0,
              r"\.wo\.|\.w2\.|out_proj": 1, r"norm\.weight$|persistent": None}
    for name, dim in layout.items():
        matches = [d for pattern, d in expect.items() if re.search(pattern, name)]
        assert matches == [dim], (name, dim, matches)


def _ds_classify(info: dict, name: str) -> int | None:
    """How deepspeed's ds_to_universal.merge_tp_slices treats `name`: None replicated, else the cat dim."""
    from deepspeed.checkpoint import constants as ds

    replicated = [p for p in info[ds.TP_REPLICATED_PARAMETER_PATTERNS] if re.match(p, name)]
    row = [p for p in info[ds.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] if re.match(p, name)]
    assert len(replicated) <= 1 and len(row) <= 1 and not (replicated and row), name
    return None if replicated else 1 if row else 0


def test_universal_patterns_classify_every_parameter():
    with torch.device("meta"):
        model = TitansLM(replace(MIXED, tie_embeddings=True))
    info = universal_checkpoint_info(model)
    names = [n for n, _ in model.named_parameters()]  # what the optimizer (and so ds_to_universal) sees
    layout = tensor_parallel_layout(model)
    assert {n: _ds_classify(info, n) for n in names} == {n: layout[n] for n in names}
    patterns = [p for key, value in info.items() if isinstance(value, list) for p in value]
    assert all(any(re.match(p, n) for n in names) for p in patterns)  # ds_to_universal's strict check


# --- conversion of a real checkpoint --------------------------------------------------------------------------------


def test_every_format_gives_the_training_models_logits(trained, tmp_path):
    ckpt, result = trained
    ref = result["references"]["step00000002"]
    state, job_config, step = load_consolidated(ckpt)
    assert step == 2 and job_config["parallel"]["tp"] == 2
    assert ref["layout"] == ModelSpec.of(from_mapping(ModelConfig, job_config["model"])).layout  # TP=2 == meta TP=1

    model = load_model(convert(ckpt, tmp_path / "st", "safetensors"))
    with torch.no_grad():
        assert _close(model(IDS), ref["logits"])
    hf = _hf_model(convert(ckpt / "step00000002", tmp_path / "hf", "hf"))
    with torch.no_grad():
        assert _close(hf(IDS).logits, ref["logits"])
    prompt = IDS[:, :5]
    assert torch.equal(hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None),
                       model.generate(prompt, 12, temperature=0))

    convert(ckpt, tmp_path / "tp", "tp", tp=2)
    reassembled, config = load_tp_shards(tmp_path / "tp")
    assert reassembled.keys() == state.keys() and all(torch.equal(reassembled[k], state[k]) for k in state)
    spec = ModelSpec.of(config)
    for tp, rank in [(2, 0), (2, 1), (4, 0), (4, 3)]:  # written for tp=2; read at tp=4 it is re-sliced
        shard, _ = load_tp_shard(tmp_path / "tp", rank, tp)
        want = shard_state_dict(state, spec, tp, rank)
        assert shard.keys() == want.keys() and all(torch.equal(shard[k], want[k]) for k in want)


def test_hf_export_ties_weights_and_tokenizes_like_sentencepiece(small_dataset, tmp_path):
    from transformers import AutoTokenizer

    from pretrain.data.tokenizer import load_tokenizer
    from titans_parallel.hf.export import save_hf_export

    config = from_mapping(ModelConfig, {**TINY_MODEL, "vocab_size": 512, "tie_embeddings": True})
    torch.manual_seed(0)
    model = TitansLM(config).eval()
    save_hf_export(model.state_dict(), config, tmp_path, tokenizer=small_dataset / "tokenizer.model")
    hf = _hf_model(tmp_path)
    assert hf.model.output.weight is hf.model.tok_embeddings.weight
    tok = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    sp = load_tokenizer(small_dataset / "tokenizer.model")
    text = "It was the best of times,\n  it was the worst ☃ of times. <s>"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == sp.encode(text) and tok.decode(ids[0]) == text
    with torch.no_grad():
        assert _close(hf(ids).logits, model(ids))
    out = hf.generate(ids, max_new_tokens=8, do_sample=False)  # generation_config: eos from the tokenizer
    assert torch.equal(out, model.generate(ids, 8, temperature=0, eos_id=sp.eos_id())[:, : out.shape[1]])


BLOCKED = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("titans_parallel", "pretrain"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
print(model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False, eos_token_id=None)[0].tolist())
"""


def test_hf_export_works_without_this_repository(trained, tmp_path):
    ckpt, _ = trained
    convert(ckpt, tmp_path / "hf", "hf")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", BLOCKED, str(tmp_path / "hf")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    model = load_model(convert(ckpt, tmp_path / "st", "safetensors"))
    expected = model.generate(torch.tensor([[1, 2, 3]]), 6, temperature=0)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected[0].tolist()


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.fixture
def broken(trained, tmp_path) -> Path:
    """A copy of the trained checkpoint to damage."""
    ckpt, _ = trained
    shutil.copytree(ckpt, tmp_path / "ckpt")
    return tmp_path / "ckpt" / "step00000002"


def test_truncated_rank_file_is_named(broken):
    path = broken / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is truncated or corrupt: .* bytes, .* written"):
        load_consolidated(broken)
    (broken / "manifest.json").unlink()  # a checkpoint from before manifests: the archive check still names it
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is truncated or corrupt"):
        load_consolidated(broken)


def test_crafted_optimizer_file_is_refused_and_does_not_run(broken, tmp_path):
    """A pickle that runs a command in place of an optimizer shard (the manifest rewritten to match): refused by
    DeepSpeed's own zero_to_fp32 read, forced weights-only, naming the file; the command never runs."""
    import hashlib

    path, marker = broken / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"optimizer_state_dict": Evil()}, path)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["files"][path.name] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is refused: .*would run code"):
        load_consolidated(broken)
    assert not marker.exists()


def test_missing_rank_file_is_named(broken, capsys):
    (broken / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(SystemExit, match="mp_rank_01_model_states.pt is missing"):
        main(["--checkpoint", str(broken), "--out", str(broken.parent / "out"), "--format", "safetensors"])
    assert not (broken.parent / "out").exists()


def test_checkpoint_of_another_model_size_lists_the_shapes(broken, tmp_path):
    job_file = broken / "job.json"
    job_data = json.loads(job_file.read_text())
    job_data["config"]["model"]["dim"] = 64
    job_file.write_text(json.dumps(job_data))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt.*another model size.*"
                                              r"tok_embeddings.weight: \[32, 32\] in the file, \[32, 64\] expected"):
        load_consolidated(broken)


def test_export_of_another_model_size_names_the_weights(trained, tmp_path):
    ckpt, _ = trained
    out = convert(ckpt, tmp_path / "st", "safetensors")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "dim": 64}))
    with pytest.raises(CheckpointError, match=r"(?s)model.safetensors does not fit .*config.json.*size mismatch"):
        load_model(out)


def test_existing_out_is_never_overwritten_without_force(trained, tmp_path):
    ckpt, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="exists; pass --force"):
        main(["--checkpoint", str(ckpt), "--out", str(out), "--format", "tp", "--tp", "2"])
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    main(["--checkpoint", str(ckpt), "--out", str(out), "--format", "tp", "--tp", "2", "--force"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model_tp00.safetensors", "model_tp01.safetensors"]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_tp_shards_hold_what_each_rank_holds(tmp_path):
    """Shard r of the "tp" format is the slice TP rank r's model keeps (row-parallel on dim 1, replicated whole),
    stored without the tied alias."""
    from safetensors.torch import load_file

    from pretrain.checkpoint_io import save_tp_shards

    config = replace(MIXED, tie_embeddings=True)
    torch.manual_seed(0)
    state = TitansLM(config).state_dict()
    save_tp_shards(state, config, 2, tmp_path)
    shard = load_file(tmp_path / "model_tp01.safetensors")
    assert "output.weight" not in shard
    assert torch.equal(shard["tok_embeddings.weight"], state["tok_embeddings.weight"][32:])
    assert torch.equal(shard["layers.0.ffn.w2.weight"], state["layers.0.ffn.w2.weight"][:, 64:])
    assert torch.equal(shard["norm.weight"], state["norm.weight"])
    model = build_model(config, load_tp_shards(tmp_path)[0])
    assert tied_parameters(model) == {"output.weight": "tok_embeddings.weight"}


# --- every ZeRO stage and TP degree (slow) --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("zero,tp", [(0, 2), (1, 1), (2, 2), (3, 1), (3, 2)])
def test_conversion_equals_training_model(zero, tp, tmp_path):
    ckpt, result = _train(tmp_path, zero=zero, tp=tp)
    ref = result["references"]["step00000002"]
    with torch.no_grad():
        assert _close(load_model(convert(ckpt, tmp_path / "st", "safetensors"))(IDS), ref["logits"])
        assert _close(_hf_model(convert(ckpt, tmp_path / "hf", "hf"))(IDS).logits, ref["logits"])


@pytest.mark.slow
@pytest.mark.parametrize("zero,tp", [(0, 2), (1, 2), (2, 1)])
def test_bf16_training_converts_from_the_fp32_master_weights(zero, tp, tmp_path):
    """The converted fp32 weights are the masters, not the bf16 copies: they round to exactly the module's bf16
    weights, and differ from them."""
    ckpt, result = _train(tmp_path, zero=zero, tp=tp, precision="bf16")
    weights = result["references"]["step00000002"]["weights"]
    state, _, _ = load_consolidated(ckpt)
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k].bfloat16(), w) for k, w in weights.items())
    assert any(not torch.equal(state[k], w.float()) for k, w in weights.items())


def _resume_from_universal(rank: int, world_size: int, sections: dict, universal: str, tag: str, steps: range) -> list:
    """Build the training engine at this run's TP x DP, load a universal checkpoint, train `steps` on test_train's
    global batches; the mean loss per step."""
    import deepspeed
    import torch.distributed as dist

    from pretrain.config import deepspeed_config
    from pretrain.engine import DeepSpeedMPU
    from pretrain.optim import build_optimizer
    from titans_parallel.parallel import destroy_parallel, init_parallel, register_sequence_parallel_grad_hooks

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    config = job(**sections)
    dims = init_parallel(config.parallel.tp, seed=config.train.seed)
    try:
        model = TitansLM(config.model, dims)
        register_sequence_parallel_grad_hooks(model, dims)
        optimizer, scheduler = build_optimizer(model, config)
        ds_config = {**deepspeed_config(config), "checkpoint": {"load_universal": True}}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=DeepSpeedMPU(),
                                               config=ds_config)
        engine.load_checkpoint(universal, tag=tag)
        losses, mb = [], config.train.micro_batch_size
        for step in steps:
            rows = _global_batch(step, mb * dims.dp_size, config)[dims.dp_rank * mb : (dims.dp_rank + 1) * mb]
            loss = engine(rows[:, :-1], rows[:, 1:])
            engine.backward(loss)
            engine.step()
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=dims.dp_group)
            losses.append(loss.item() / dims.dp_size)
        return losses
    finally:
        destroy_parallel()


@pytest.mark.slow
def test_universal_checkpoint_resumes_at_another_tensor_parallel_degree(tmp_path):
    """TP=2 x DP=2 (ZeRO-1) -> deepspeed's ds_to_universal (with this model's universal_checkpoint_info) -> TP=1 x
    DP=2 continues with the losses of the uninterrupted run. DeepSpeed's merged fp32 tensors equal
    load_consolidated's."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ckpt, result = _train(tmp_path, zero=1, tp=2, steps=4, world=4, every=2)
    tag = "step00000002"
    state, _, _ = load_consolidated(ckpt / tag)  # TP x DP > 1 on both axes
    model = build_model(from_mapping(ModelConfig, TINY_MODEL), state)
    with torch.no_grad():
        assert _close(model(IDS), result["references"][tag]["logits"])

    universal = tmp_path / "universal"
    ds_to_universal(Namespace(input_folder=str(ckpt / tag), output_folder=str(universal / tag), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
    for name, tensor in state.items():
        if name in tied_parameters(model):
            continue
        merged = torch.load(universal / tag / "zero" / name / "fp32.pt", weights_only=False)["param"]
        assert torch.equal(merged, tensor), name

    sections = {"train": {"zero_stage": 1, "steps": 4}}
    resumed = run_ranks(2, _resume_from_universal, sections, str(universal), tag, range(2, 4), timeout=600)[0]
    for a, b in zip(resumed, result["losses"][2:]):
        assert abs(a - b) <= 1e-4 * abs(b), (resumed, result["losses"])


def test_export_saved_before_the_stabilisers_loads_with_them_off(tmp_path):
    """A config.json without the memory stabiliser keys was written before they existed, by a model trained with the
    paper's rule: it loads with them off (the same logits), not with today's defaults (other logits)."""
    from pretrain.convert import CONFIG, save_safetensors
    from titans_parallel.config import OPTIONS_ABSENT_FROM_OLDER_SAVES

    paper_rule = replace(MIXED, memory=replace(MIXED.memory, **OPTIONS_ABSENT_FROM_OLDER_SAVES))
    model = TitansLM(paper_rule).eval()
    save_safetensors(model.state_dict(), paper_rule, tmp_path, {})
    saved = json.loads((tmp_path / CONFIG).read_text())
    for key in OPTIONS_ABSENT_FROM_OLDER_SAVES:
        del saved["memory"][key]
    (tmp_path / CONFIG).write_text(json.dumps(saved))
    loaded = load_model(tmp_path)
    assert loaded.config.memory == paper_rule.memory
    with torch.no_grad():
        expected = model(IDS)
        torch.testing.assert_close(loaded(IDS), expected, rtol=0, atol=0)
        defaults = TitansLM(from_mapping(ModelConfig, saved)).eval()
        defaults.load_state_dict(model.state_dict())
        assert not torch.allclose(defaults(IDS), expected)
