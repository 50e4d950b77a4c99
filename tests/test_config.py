"""Configs: deep-merged nested overrides, YAML-ish override values, value validation with one-line errors naming
the key, the CLI wrapper that prints them, and the optimizer's weight-decay groups by parameter role."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pretrain.config import ConfigError, JobConfig, load_job_config, run_cli
from pretrain.optim import param_groups, parameter_role
from titans_parallel import ModelConfig, TitansLM
from titans_parallel.typed_config import from_mapping

MAC_170M = "configs/train/mac_170m.yaml"
TINY = "configs/train/tiny_cpu.yaml"


# Nested overrides deep-merge into the recipe and its model file.


def test_nested_model_override_keeps_the_model_files_section():
    config = load_job_config(MAC_170M, ["model.memory.compile_scan=true"])
    assert config.model.memory.compile_scan is True
    assert config.model.memory.chunk_size == 64 and config.model.memory.expansion == 4  # from configs/model/170m.yaml
    assert config.model.dim == 768 and config.model.window == 512


@pytest.mark.parametrize(
    "override,check",
    [
        ("train.steps=7", lambda c: c.train.steps == 7 and c.train.micro_batch_size == 8 and c.train.zero_stage == 1),
        ("model.n_layers=6", lambda c: c.model.n_layers == 6 and c.model.dim == 768 and c.model.window == 512),
        ("model.memory.depth=3", lambda c: c.model.memory.depth == 3 and c.model.memory.chunk_size == 64),
    ],
)
def test_override_at_every_nesting_level_keeps_its_siblings(override, check):
    assert check(load_job_config(MAC_170M, [override]))


def test_recipe_model_section_deep_merges_over_the_model_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model_file: configs/model/170m.yaml\nmodel:\n  window: 256\n  memory:\n    expansion: 2\n"
        "optimizer:\n  lr: 1e-3\n"
    )
    config = load_job_config(recipe, ["model.memory.depth=3"])
    memory = config.model.memory
    assert (memory.expansion, memory.depth, memory.chunk_size) == (2, 3, 64)
    assert config.model.window == 256 and config.model.dim == 768
    assert config.optimizer.lr == 1e-3  # exponent-form floats in files too


def test_model_config_nested_override():
    config = ModelConfig.from_yaml("configs/model/170m.yaml", ["memory.compile_scan=true"])
    assert config.memory.compile_scan and config.memory.chunk_size == 64


# Override values: YAML-ish numbers, bools, lists.


@pytest.mark.parametrize(
    "override,get,expected",
    [
        ("optimizer.lr=1e-3", lambda c: c.optimizer.lr, 1e-3),
        ("optimizer.lr=3E-4", lambda c: c.optimizer.lr, 3e-4),
        ("optimizer.eps=-1e-8", lambda c: c.optimizer.eps, None),  # parsed as a float, then refused (below)
        ("optimizer.weight_decay=.05", lambda c: c.optimizer.weight_decay, 0.05),
        ("optimizer.weight_decay=0", lambda c: c.optimizer.weight_decay, 0.0),
        ("train.steps=1e3", lambda c: c.train.steps, 1000),
        ("train.steps=+12", lambda c: c.train.steps, 12),
        ("logging.progress=false", lambda c: c.logging.progress, False),
        ("model.memory.compile_scan=True", lambda c: c.model.memory.compile_scan, True),
        ("optimizer.betas=[0.8, 0.99]", lambda c: c.optimizer.betas, (0.8, 0.99)),
        ("model.layer_pattern=[mac,swa,mac,mac]", lambda c: c.model.layer_pattern, ["mac", "swa", "mac", "mac"]),
        ("logging.tensorboard_dir=null", lambda c: c.logging.tensorboard_dir, None),
        ("checkpoint.dir=runs/1e3", lambda c: c.checkpoint.dir, "runs/1e3"),
    ],
)
def test_override_values_are_parsed_like_yaml(override, get, expected):
    if expected is None and "eps" in override:
        with pytest.raises(ConfigError, match=r"optimizer\.eps"):
            load_job_config(TINY, [override])
        return
    value = get(load_job_config(TINY, [override]))
    assert value == expected and type(value) is type(expected)


# Values are validated when loaded: one line, naming the key.


@pytest.mark.parametrize(
    "override,key",
    [
        ("optimizer.betas=[0.9]", "optimizer.betas"),
        ("optimizer.betas=[0.9, 1.0]", "optimizer.betas"),
        ("optimizer.betas=[0.9, 0.95, 0.99]", "optimizer.betas"),
        ("optimizer.betas=[-0.1, 0.9]", "optimizer.betas"),
        ("optimizer.lr=-1.0", "optimizer.lr"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.lr=.inf", "optimizer.lr"),
        ("optimizer.eps=0", "optimizer.eps"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
        ("optimizer.grad_clip=-1", "optimizer.grad_clip"),
        ("schedule.warmup_steps=-1", "schedule.warmup_steps"),
        ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio"),
        ("model.n_heads=0", "model.n_heads"),
        ("model.dim=0", "model.dim"),
        ("model.head_dim=0", "model.head_dim"),
        ("model.norm_eps=0", "model.norm_eps"),
        ("model.memory.chunk_size=0", "model.memory.chunk_size"),
        ("model.memory.theta_max=-0.01", "model.memory.theta_max"),
        ("model.memory.power_steps=-1", "model.memory.power_steps"),
        ("data.seq_len=0", "data.seq_len"),
        ("data.num_workers=-1", "data.num_workers"),
        ("parallel.tp=0", "parallel.tp"),
        ("train.steps=0", "train.steps"),
        ("train.steps=2.5", "train.steps"),
        ("train.eval_every=-1", "train.eval_every"),
        ("train.eval_batches=0", "train.eval_batches"),
        ("checkpoint.every=-1", "checkpoint.every"),
        ("checkpoint.keep=-1", "checkpoint.keep"),
        ("logging.every=0", "logging.every"),
        ("logging.peak_tflops=0", "logging.peak_tflops"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_job_config(TINY, [override])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{TINY}: {key}"), message


@pytest.mark.parametrize("depth,polyak_step,expected", [(1, True, 0), (2, True, 0), (3, True, 4), (4, True, 4),
                                                       (4, False, 0)])
def test_power_steps_default_follows_the_memory_depth(depth, polyak_step, expected):
    """Unset, the bounded step's power steps are 0 up to depth 2 and 4 deeper (with the Polyak step only)."""
    config = load_job_config(TINY, [f"model.memory.depth={depth}", f"model.memory.polyak_step={polyak_step}"])
    assert config.model.memory.power_steps == expected
    if polyak_step:  # set, it is kept at any depth
        assert load_job_config(TINY, [f"model.memory.depth={depth}", "model.memory.power_steps=1"]
                               ).model.memory.power_steps == 1


def test_power_steps_need_the_polyak_step():
    with pytest.raises(ConfigError, match=r"model\.memory\.power_steps: = 2 sizes the Polyak step"):
        load_job_config(TINY, ["model.memory.power_steps=2", "model.memory.polyak_step=false"])


def test_values_are_validated_when_built_in_code_too():
    with pytest.raises(ConfigError, match=r"^optimizer\.betas: "):
        from_mapping(JobConfig, {"optimizer": {"betas": [0.9]}})
    with pytest.raises(ConfigError, match=r"^n_heads: must be >= 1"):
        ModelConfig(n_heads=0)
    from pretrain.config import OptimizerConfig

    with pytest.raises(ConfigError, match=r"^betas: must be two numbers in \[0, 1\)"):
        OptimizerConfig(betas=(0.9,))


def test_run_cli_prints_config_errors_as_one_line(capsys):
    def main():
        load_job_config(TINY, ["optimizer.lr=-1"])

    with pytest.raises(SystemExit) as info:
        run_cli(main)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optimizer.lr: must be > 0" in err and "Traceback" not in err

    with pytest.raises(SystemExit) as info:
        run_cli(lambda: 0)
    assert info.value.code == 0


def test_summary_cli_help_and_errors():
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "titans_parallel.summary", *args], capture_output=True, text=True, timeout=120
    )
    out = run("--help")
    assert out.returncode == 0 and "usage:" in out.stdout and "parameter counts" in out.stdout
    out = run("configs/model/tiny.yaml", "n_heads=0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "n_heads: must be >= 1" in out.stderr
    out = run("configs/model/tiny.yaml", "dim=64")
    assert out.returncode == 0 and "dim=64" in out.stdout


# Weight decay by parameter role (decided by name, never by the tensor's dimension).

TINY_MODEL = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, window=8, n_persistent=2,
                  memory=dict(chunk_size=4, depth=2, expansion=2))


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm", "transformer", "swa"])
def test_weight_decay_groups_by_role_on_the_real_model(variant):
    model = TitansLM(from_mapping(ModelConfig, {**TINY_MODEL, "variant": variant}))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed | kept == set(names.values()) and not decayed & kept
    for name in kept:  # every no-decay parameter is a norm gain, a bias, the memory's W_0 or a persistent token
        assert (name.endswith(("norm.weight", ".out_norm_weight", ".bias")) or ".initial_weights." in name
                or name.endswith("persistent.tokens")), name
    for name in decayed:  # every decayed one is a projection/embedding matrix or the memory's conv kernel
        assert name.endswith((".weight", ".conv_weight")) and "norm" not in name, name
    if variant in ("mac", "mag", "mal", "lmm"):
        assert "layers.0.mixer.memory.out_norm_weight" in kept  # [H, d]: 2-D, but a norm gain
        assert "layers.0.mixer.memory.conv_weight" in decayed
        assert "layers.0.mixer.memory.gate_proj.bias" in kept and "layers.0.mixer.memory.initial_weights.0" in kept
    assert "norm.weight" in kept and "tok_embeddings.weight" in decayed and "output.weight" in decayed


def test_parameter_role_names_every_rule():
    roles = {
        "layers.3.mixer_norm.weight": "norm",
        "layers.3.mixer.memory.out_norm_weight": "norm",
        "norm.weight": "norm",
        "layers.0.mixer.memory.gate_proj.bias": "bias",
        "layers.0.mixer.memory.initial_weights.1": "memory_state",
        "layers.0.mixer.persistent.tokens": "persistent",
        "layers.0.mixer.memory.in_proj.weight": "weight",
        "layers.0.mixer.memory.conv_weight": "weight",
        "tok_embeddings.weight": "weight",
    }
    assert {name: parameter_role(name) for name in roles} == roles


def test_a_one_dimensional_weight_of_no_known_role_is_refused():
    model = torch.nn.Module()
    model.scale = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="scale"):
        param_groups(model, 0.1)


def test_train_script_prints_a_config_error_as_one_line():
    """pretrain/train.py reports a bad value as one line naming the key, exit status 2, no traceback."""
    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "pretrain/train.py", "--config", "configs/train/tiny_cpu.yaml",
                           "optimizer.lr=-1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "train.py: error: configs/train/tiny_cpu.yaml: optimizer.lr: must be > 0 (and finite), got -1.0"
    ]
