"""The training job: config errors, derived DeepSpeed config, schedule, decay groups, and multi-rank equivalences
(ZeRO stages, DP vs gradient accumulation, TP x DP) on gloo ranks with the real DeepSpeed engine."""

import json
import math
import re
import socket

import pytest
import torch

from parallel_harness import run_ranks
from pretrain.config import JobConfig, deepspeed_config, load_job_config
from pretrain.optim import lr_lambda, param_groups
from titans_parallel import TitansLM
from titans_parallel.typed_config import ConfigError

TINY_MODEL = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, window=8, n_persistent=2, variant="mac",
                  memory=dict(chunk_size=4, depth=2, expansion=2))


def job(**sections) -> JobConfig:
    from titans_parallel.typed_config import from_mapping

    data = {"model": dict(TINY_MODEL), "data": {"seq_len": 16}, "logging": {"tensorboard_dir": None, "progress": False, "metrics_file": None},
            "train": {"steps": 10, "micro_batch_size": 2, "eval_every": 0}, "checkpoint": {"every": 0, "keep": 0},
            "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 2}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_mapping(JobConfig, data)


def test_recipe_loads_with_model_file_and_overrides():
    config = load_job_config("configs/train/tiny_cpu.yaml", ["train.steps=20", "model.dim=64", "parallel.tp=2"])
    assert config.train.steps == 20 and config.model.dim == 64 and config.parallel.tp == 2
    assert config.model.layer_pattern == ["swa", "mac", "swa", "mac"]  # from configs/model/tiny.yaml


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.stepz=3", "unknown key 'train.stepz'"),
        ("train.steps=many", "train.steps: expected int"),
        ("parallel.tp=3", "does not divide model.n_heads"),
        ("train.zero_stage=4", "zero_stage"),
        ("optimizer.lr", "key.sub=value"),
    ],
)
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_job_config("configs/train/tiny_cpu.yaml", [override])


def test_world_size_not_divisible_by_tp_fails_before_any_process_group(monkeypatch):
    from pretrain import train

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="world size 3 is not divisible by parallel.tp=2"):
        train.main(["--config", "configs/train/tiny_cpu.yaml", "parallel.tp=2"])
    assert not torch.distributed.is_initialized()


def test_a_finished_job_tears_down_the_process_group_it_started(monkeypatch, tmp_path, small_dataset):
    """main() on one rank (no launcher) trains, then destroys its gloo group before returning, rather than leaving
    it to interpreter exit, where gloo's threads can abort a run that finished."""
    import torch.distributed as dist
    from pretrain import train

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    assert not dist.is_initialized()
    train.main(["--config", "configs/train/tiny_cpu.yaml", f"data.path={small_dataset}", "data.seq_len=64",
                "model.vocab_size=512", "train.steps=1", "train.micro_batch_size=2", "train.eval_every=0",
                f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every=0", "logging.progress=false",
                "logging.tensorboard_dir=null", f"logging.metrics_file={tmp_path / 'metrics.jsonl'}"])
    assert (tmp_path / "metrics.jsonl").read_text().strip()  # it did train
    assert not dist.is_initialized()


def test_deepspeed_config_is_derived():
    config = job(train={"grad_accum": 3, "zero_stage": 2, "precision": "bf16"}, optimizer={"grad_clip": 0.5})
    ds = deepspeed_config(config)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5


def test_schedule_warms_up_then_decays_to_the_floor():
    config = job(train={"steps": 100}, schedule={"warmup_steps": 10, "min_lr_ratio": 0.1})
    f = lr_lambda(config)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1) and all(f(s) >= f(s + 1) for s in range(10, 100))


def test_no_weight_decay_on_norms_biases_memory_state_and_persistent_tokens():
    model = TitansLM(job().model)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert any("gate_proj.bias" in n for n in no_decay_names)
    assert any("initial_weights" in n for n in no_decay_names) and any("persistent" in n for n in no_decay_names)
    assert any(n.endswith("norm.weight") for n in no_decay_names)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _global_batch(step: int, rows: int, config: JobConfig) -> torch.Tensor:
    """Learnable rows: counting sequences (next token = previous + 1 mod vocab) from random starts."""
    g = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, config.model.vocab_size, (rows, 1), generator=g)
    return (starts + torch.arange(config.data.seq_len + 1)) % config.model.vocab_size


def _run_job(rank: int, world_size: int, sections: dict) -> dict:
    """Train on exact global batches: step s's global batch is split by (dp_rank, micro) in row blocks.
    sections must name checkpoint.dir (a run resumes from a `latest` there, and writes one at its end)."""
    from megatron.core import parallel_state

    from pretrain.train import train

    if "dir" not in sections.get("checkpoint", {}):
        raise ValueError("give checkpoint.dir: a fresh folder per run")
    config = job(**sections)
    mb, ga = config.train.micro_batch_size, config.train.grad_accum

    def batches(step: int, micro: int) -> torch.Tensor:  # called inside train(), once its groups exist
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        rows = _global_batch(step, mb * ga * dp_size, config)
        start = (dp_rank * ga + micro) * mb
        return rows[start : start + mb]

    result = train(config, batches)
    return {"losses": result.losses, "grad_norms": result.grad_norms}


@pytest.mark.slow
def test_zero_stages_follow_zero_0(tmp_path):
    """DP=2: ZeRO 1, 2, 3 losses and grad norms over 10 steps equal ZeRO-0's (fp32, <= 1e-5 relative)."""
    runs = {
        stage: run_ranks(2, _run_job, {"train": {"zero_stage": stage}, "checkpoint": {"dir": str(tmp_path / str(stage))}},
                         timeout=600)[0]
        for stage in (0, 1, 2, 3)
    }
    ref = runs[0]
    assert ref["losses"][-1] < ref["losses"][0]
    for stage in (1, 2, 3):
        for key in ("losses", "grad_norms"):
            for a, b in zip(runs[stage][key], ref[key]):
                assert abs(a - b) <= 1e-5 * abs(b), (stage, key, runs[stage][key], ref[key])


@pytest.mark.slow
def test_data_parallel_equals_gradient_accumulation(tmp_path):
    """DP=2 x micro 2 sees the same global batches as DP=1 x (grad_accum 2): same losses and grad norms."""
    dp2 = run_ranks(2, _run_job, {"train": {"zero_stage": 1}, "checkpoint": {"dir": str(tmp_path / "dp2")}},
                    timeout=600)[0]
    dp1 = run_ranks(1, _run_job, {"train": {"zero_stage": 1, "grad_accum": 2}, "checkpoint": {"dir": str(tmp_path / "dp1")}},
                    timeout=600)[0]
    for key in ("losses", "grad_norms"):
        for a, b in zip(dp2[key], dp1[key]):
            assert abs(a - b) <= 1e-5 * abs(b), (key, dp2[key], dp1[key])


@pytest.mark.slow
def test_tensor_parallel_times_data_parallel_trains_like_data_parallel(tmp_path):
    """TP=2 x DP=2 on 4 ranks follows the TP=1 x DP=2 trajectory (same global batches, same init)."""
    tp2 = run_ranks(4, _run_job, {"parallel": {"tp": 2, "sequence_parallel": True}, "train": {"zero_stage": 1},
                                  "checkpoint": {"dir": str(tmp_path / "tp2")}}, timeout=900)
    tp1 = run_ranks(2, _run_job, {"train": {"zero_stage": 1}, "checkpoint": {"dir": str(tmp_path / "tp1")}},
                    timeout=600)[0]
    assert all(r["losses"] == tp2[0]["losses"] for r in tp2)
    for a, b in zip(tp2[0]["losses"], tp1["losses"]):
        assert abs(a - b) <= 1e-4 * abs(b), (tp2[0]["losses"], tp1["losses"])
    assert tp2[0]["losses"][-1] < tp2[0]["losses"][0]


@pytest.mark.parametrize(
    "tasks,message",
    [
        ("[{task: kv, length: 64}]", "train.eval_tasks[0].task: 'kv' is not one of"),
        ("[{task: passkey, depths: [0, 120]}]", "train.eval_tasks[0].depths: must be percentages in [0, 100]"),
        ("[{task: uuid, length: 0}]", "train.eval_tasks[0].length: must be >= 1"),
        ("[{task: uuid, lenght: 64}]", "unknown key 'train.eval_tasks[0].lenght'"),
    ],
)
def test_bad_eval_tasks_name_the_key(tasks, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_job_config("configs/train/tiny_cpu.yaml", [f"train.eval_tasks={tasks}"])


def test_eval_tasks_under_sequence_parallel_need_a_divisible_length():
    overrides = ["parallel.tp=2", "parallel.sequence_parallel=true", "train.eval_tasks=[{length: 255}]"]
    with pytest.raises(ConfigError, match=re.escape("train.eval_tasks[0].length: sequence parallel needs it "
                                                    "divisible by tp=2, got 255")):
        load_job_config("configs/train/tiny_cpu.yaml", overrides)


def test_an_eval_task_too_short_for_its_needle_names_the_key(small_dataset):
    from pretrain.config import EvalTaskConfig
    from pretrain.eval.niah import fixed_task_batches

    ok = fixed_task_batches([EvalTaskConfig("passkey", 96, [0.0, 100.0], 3)], small_dataset, 512, 0, 2)
    assert [b.inputs.shape for b in ok["passkey@96"]] == [(2, 96), (1, 96), (2, 96), (1, 96)]  # per depth, by 2
    with pytest.raises(ConfigError, match=re.escape("train.eval_tasks[1].length: length 30 is too short")):
        fixed_task_batches([EvalTaskConfig("passkey", 96), EvalTaskConfig("uuid", 30)], small_dataset, 512, 0, 2)


def _tiny_run_on_data(rank: int, world_size: int, sections: dict) -> dict:
    from pretrain.train import train

    result = train(job(**sections))
    return {"val_losses": result.val_losses, "tasks": result.task_accuracies}


def test_metrics_are_strict_json_with_validation_and_task_accuracies(tmp_path, small_dataset):
    """A tiny run on real data: every metrics line parses as strict JSON; validation lines carry val_loss,
    val_ppl and the eval_tasks' accuracies; TensorBoard gets the val perplexity; pretrain.evaluate reads the
    checkpoint it wrote."""
    sections = {"model": {"vocab_size": 512}, "data": {"path": str(small_dataset), "seq_len": 64},
                "train": {"steps": 2, "eval_every": 1, "eval_batches": 1,
                          "eval_tasks": [{"task": "passkey", "length": 96, "depths": [0.0, 100.0], "samples": 2}]},
                "checkpoint": {"dir": str(tmp_path / "ckpt")},
                "logging": {"metrics_file": str(tmp_path / "metrics.jsonl"), "tensorboard_dir": str(tmp_path / "tb")}}
    result = run_ranks(1, _tiny_run_on_data, sections, timeout=300)[0]

    def refuse(name):
        raise ValueError(f"bare {name}")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 2] and [r["step"] for r in records if "loss" in r] == [1, 2]
    for r in val:
        assert r["val_loss"] == pytest.approx(result["val_losses"][r["step"]])
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["tasks"] == result["tasks"][r["step"]] and 0 <= r["tasks"]["passkey@96"] <= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"val/ppl", "val/passkey@96"} <= set(events.Tags()["scalars"])
    from pretrain.evaluate import main  # and the evaluation reads the DeepSpeed checkpoint (seq_len from it)

    main(["--model", str(tmp_path / "ckpt"), "--data", str(small_dataset), "--lengths", "64", "--samples", "2",
          "--niah-tasks", "passkey", "--niah-lengths", "96", "--depths", "0,100", "--niah-samples", "2",
          "--out", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["seq_len"] == 64 and report["perplexity"][0]["sequences"] == 2
    assert [(c["length"], c["depth"]) for c in report["niah"]] == [(96, 0.0), (96, 100.0)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"parallel": {"tp": 2, "sequence_parallel": True}},
                                    {"train": {"zero_stage": 3}}], ids=["tp2-sp", "zero3-dp2"])
def test_eval_tasks_under_model_parallel_and_zero3_match_one_rank(tmp_path, small_dataset, layout):
    """2 ranks (TP=2 with sequence parallel, or ZeRO-3 over DP=2) run the eval tasks in lockstep without a
    deadlock, every rank gets the same accuracies, and validation matches the one-rank run of the same steps."""
    def sections(name, extra):
        base = {"model": {"vocab_size": 512}, "data": {"path": str(small_dataset), "seq_len": 64},
                "train": {"steps": 2, "eval_every": 2, "eval_batches": 1, "micro_batch_size": 2,
                          "eval_tasks": [{"task": "passkey", "length": 96, "depths": [50.0], "samples": 2}]},
                "checkpoint": {"dir": str(tmp_path / name)}}
        for key, values in extra.items():
            base.setdefault(key, {}).update(values)
        return base

    ranks = run_ranks(2, _tiny_run_on_data, sections("two", layout), timeout=600)
    assert ranks[0]["tasks"] == ranks[1]["tasks"] and set(ranks[0]["tasks"][2]) == {"passkey@96"}
    if "parallel" in layout:  # the same data as one rank: TP splits the model, not the batch
        one = run_ranks(1, _tiny_run_on_data, sections("one", {}), timeout=600)[0]
        assert ranks[0]["val_losses"][2] == pytest.approx(one["val_losses"][2], rel=1e-4)
        assert ranks[0]["tasks"] == one["tasks"]
