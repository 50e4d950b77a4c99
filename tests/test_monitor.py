"""What a run tells its user: parameter counts (also under ZeRO-3), the start-up summary and resolved config, strict
JSON metrics with validation entries, checkpoint and closing lines, plain progress lines off a TTY, and library
noise filtered in one place."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_harness import run_ranks
from test_train import job

ROOT = Path(__file__).resolve().parents[1]


def _counts_before_and_after_zero3(rank: int, world_size: int) -> tuple:
    import deepspeed

    from pretrain.config import deepspeed_config
    from pretrain.engine import DeepSpeedMPU
    from pretrain.flops import dense_parameter_count, parameter_counts
    from pretrain.optim import build_optimizer
    from titans_parallel import TitansLM
    from titans_parallel.parallel import destroy_parallel, init_parallel

    config = job(train={"zero_stage": 3})
    dims = init_parallel(1)
    try:
        model = TitansLM(config.model, dims)
        before = (parameter_counts(model), dense_parameter_count(model))
        optimizer, scheduler = build_optimizer(model, config)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                          config=deepspeed_config(config), mpu=DeepSpeedMPU())
        assert sum(p.numel() for p in engine.module.parameters()) < before[0].total  # partitioned: empty tensors
        return before, (parameter_counts(engine.module), dense_parameter_count(engine.module))
    finally:
        destroy_parallel()


def test_parameter_counts_under_zero3_equal_the_plain_model():
    before, after = run_ranks(1, _counts_before_and_after_zero3, timeout=300)[0]
    assert before[0].dense == before[1] > 0 and before[0].total > before[0].dense
    assert after == before


def _strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"bare {name} in the metrics file")

    return json.loads(line, parse_constant=refuse)


class _Dims:
    dp_size, tp_size = 2, 1


def test_startup_summary_and_resolved_config_beside_the_checkpoints(tmp_path, capsys):
    from pretrain.config import load_job_config
    from pretrain.flops import parameter_counts
    from pretrain.monitor import RESOLVED_CONFIG, Monitor, dataset_line, startup_lines
    from titans_parallel import TitansLM

    config = job(checkpoint={"dir": str(tmp_path / "ckpt")}, logging={"tensorboard_dir": str(tmp_path / "tb")})
    counts = parameter_counts(TitansLM(config.model))
    log = Monitor(config, True, 0)
    log.start(startup_lines(config, _Dims, counts, 64, dataset_line(None, 64, 10), "gloo on cpu"))
    log.close(type("R", (), {"losses": [], "first_step": 0})())
    out = capsys.readouterr().out
    assert f"config (resolved; in full in {tmp_path / 'ckpt' / RESOLVED_CONFIG})" in out
    assert "  optimizer: {lr: 0.003," in out and "  model: {vocab_size: 64," in out
    assert f"parameters: {counts.total:,} ({counts.embedding:,} embedding, {counts.dense:,} in matmuls" in out
    assert "layout: 2 ranks = dp 2 x tp 1, ZeRO-1, fp32, gloo on cpu" in out
    assert "tokens/step: 64 = micro_batch 2 x grad_accum 1 x dp 2 x seq_len 16; 10 steps = 640 tokens" in out
    assert "dataset: batches supplied by the caller" in out
    assert load_job_config(tmp_path / "ckpt" / RESOLVED_CONFIG) == config  # an identical run's --config
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    assert "config/text_summary" in events.Tags()["tensors"]


def test_dataset_line_counts_sequences_and_epochs(small_dataset):
    from pretrain.data import read_manifest
    from pretrain.monitor import dataset_line

    train = read_manifest(small_dataset)["splits"]["train"]
    line = dataset_line(small_dataset, train["tokens"] // 4, 2)
    assert line.startswith(f"dataset: {small_dataset}: train {train['samples']:,} sequences")
    assert "seq_len 64, vocab 512; 2 steps read 0.50 epochs" in line


def test_metrics_are_strict_json_with_validation_and_the_closing_line(tmp_path, capsys):
    from pretrain.monitor import Monitor

    config = job(logging={"metrics_file": str(tmp_path / "m.jsonl"), "tensorboard_dir": str(tmp_path / "tb"),
                          "every": 1}, checkpoint={"dir": str(tmp_path / "ckpt")})
    log = Monitor(config, True, 0)
    log.step(0, 5.0, 1e-3, 1.0, 100.0, None)
    log.step(1, float("nan"), 1e-3, float("inf"), 100.0, None)
    log.validation(2, 2.0)
    log.checkpoint(tmp_path / "ckpt" / "step00000002", 0.25)
    log.close(type("R", (), {"losses": [5.0, float("nan")], "first_step": 0, "tokens_per_second": 100.0})())
    records = [_strict_json(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    assert records[2] == {"step": 2, "val_loss": 2.0, "val_ppl": pytest.approx(math.exp(2.0))}
    out = capsys.readouterr().out
    assert f"checkpoint written: {tmp_path / 'ckpt' / 'step00000002'} (0.2 s)" in out
    closing = out.strip().splitlines()[-1]
    assert closing.startswith("done: 2 steps (to step 2) in ") and " wall, " in closing
    assert "steps/s after start-up" in closing and "val_loss 2.0000 (step 2)" in closing
    assert closing.endswith(f"last checkpoint {tmp_path / 'ckpt' / 'step00000002'}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"val/loss", "val/ppl"} <= set(events.Tags()["scalars"])


def test_a_finished_job_rerun_says_so_and_how_to_continue(tmp_path, capsys):
    from pretrain.monitor import Monitor

    config = job(checkpoint={"dir": str(tmp_path)})
    log = Monitor(config, True, 10)
    log.start([])
    log.close(type("R", (), {"losses": [], "first_step": 10})())
    out = capsys.readouterr().out
    assert "nothing to train: the checkpoint is at step 10 and train.steps=10" in out
    assert "raise train.steps (e.g. train.steps=20)" in out


def test_progress_is_plain_lines_off_a_terminal(tmp_path, capsys):
    """Under pytest stderr is not a TTY (as in a SLURM .out file): no bar frames, progress in the step lines."""
    from pretrain.monitor import Monitor

    config = job(logging={"progress": True, "every": 5})
    log = Monitor(config, True, 0)
    for step in range(10):
        log.step(step, 1.0, 1e-3, 1.0, 100.0, None)
    log.close(type("R", (), {"losses": [1.0] * 10, "first_step": 0, "tokens_per_second": 100.0})())
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1", "5", "10"] and "[5/10 50%, eta " in lines[1], lines


NOISY = """
import warnings
from pretrain import quiet
import megatron.core.optimizer  # warns about Transformer Engine and Apex
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
warnings.warn("something the user should see", UserWarning)
with quiet.filtered_stdout():
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    print("a line that stays")
"""


def test_known_library_noise_is_filtered_and_the_rest_shown():
    out = subprocess.run([sys.executable, "-c", NOISY], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Transformer Engine" not in out.stderr and "all_gather_into_tensor" not in out.stderr
    assert "something the user should see" in out.stderr
    assert out.stdout == "a line that stays\n"
