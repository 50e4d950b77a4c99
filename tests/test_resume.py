"""Exact resume: kill -9 every rank at a random step, SIGTERM (a checkpoint on the way out), a crash while a
checkpoint is being written, and refusing a checkpoint of another model. The reference is an uninterrupted run."""

import json
import os
import random
import shutil
import signal
from pathlib import Path

import psutil
import pytest
import torch

from pretrain import checkpoint
from test_launch import finish, launch_single_node, wait_for_step

STEPS = 8


def metrics(path: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before a kill and after the resume) keeps its last value. Validation
    records ({"step", "val_loss", "val_ppl"}) are skipped."""
    losses = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


CONFIGS = {
    "zero2": ["train.zero_stage=2"],
    "zero3": ["train.zero_stage=3"],
    "tp2": ["parallel.tp=2", "train.zero_stage=1"],
    "cp2": ["parallel.cp=2", "model.variant=mag", "model.layer_pattern=[swa,mag,swa,mag]", "train.zero_stage=2"],
}


@pytest.fixture(scope="module")
def references(tmp_path_factory, small_dataset):
    """Uninterrupted runs, one per config, computed on first use."""
    cache = {}

    def get(name: str) -> dict[int, float]:
        if name not in cache:
            tmp = tmp_path_factory.mktemp(f"ref-{name}")
            finish(launch_single_node(tmp, small_dataset, *CONFIGS[name], "checkpoint.every=2", steps=STEPS, port=29541))
            cache[name] = metrics(tmp / "metrics.jsonl")
            assert sorted(cache[name]) == list(range(1, STEPS + 1))
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kill_9_every_rank_then_resume_is_exact(name, tmp_path, small_dataset, references):
    kill_after = random.Random(name).randint(3, STEPS - 2)
    proc = launch_single_node(tmp_path, small_dataset, *CONFIGS[name], "checkpoint.every=2", steps=STEPS, port=29542)
    wait_for_step(tmp_path / "metrics.jsonl", kill_after, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, mid-step
    proc.wait()
    resumed_from = checkpoint.find_resume_point(tmp_path / "ckpt")
    assert resumed_from is not None and checkpoint.read_job(resumed_from)["step"] <= kill_after
    log = finish(launch_single_node(tmp_path, small_dataset, *CONFIGS[name], "checkpoint.every=2", steps=STEPS,
                                    port=29543))
    assert f"resumed from {resumed_from}" in log
    assert metrics(tmp_path / "metrics.jsonl") == references(name)  # every step, bit for bit


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_on_the_way_out(tmp_path, small_dataset, references):
    proc = launch_single_node(tmp_path, small_dataset, *CONFIGS["zero2"], "checkpoint.every=0", steps=STEPS, port=29544)
    wait_for_step(tmp_path / "metrics.jsonl", 3, proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if any(arg.startswith("--local_rank=") for arg in p.cmdline())]
    assert len(ranks) == 2
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    log = finish(proc)
    assert "preempted: checkpoint written at step" in log
    stopped_at = checkpoint.read_job(checkpoint.find_resume_point(tmp_path / "ckpt"))["step"]
    assert 3 <= stopped_at < STEPS
    finish(launch_single_node(tmp_path, small_dataset, *CONFIGS["zero2"], "checkpoint.every=0", steps=STEPS, port=29545))
    assert metrics(tmp_path / "metrics.jsonl") == references("zero2")


def _crash_while_saving(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """Train 4 steps with checkpoints every 2; rank 0 dies while committing step 4 (after every rank wrote its
    shards, before job.json): step 4's folder stays incomplete and `latest` must still name step 2."""
    from test_train import _run_job

    real_write = checkpoint._atomic_write

    def crash(path, text):
        if path.name == checkpoint.JOB_FILE and "step00000004" in str(path):
            os._exit(3)
        real_write(path, text)

    checkpoint._atomic_write = crash
    return _run_job(rank, world_size, {"train": {"steps": 4}, "checkpoint": {"dir": ckpt_dir, "every": 2, "keep": 2}})


@pytest.mark.slow
def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    from parallel_harness import RankError, run_ranks
    from test_train import _run_job

    with pytest.raises(RankError):
        run_ranks(2, _crash_while_saving, str(tmp_path), timeout=300)
    assert (tmp_path / "latest").read_text() == "step00000002"
    assert (tmp_path / "step00000004").is_dir() and not checkpoint.is_complete(tmp_path / "step00000004")
    resumed = run_ranks(2, _run_job, {"train": {"steps": 4}, "checkpoint": {"dir": str(tmp_path), "every": 2}},
                        timeout=300)[0]
    uninterrupted = run_ranks(2, _run_job, {"train": {"steps": 4}, "checkpoint": {"dir": str(tmp_path / "ref")}},
                              timeout=300)[0]
    assert resumed["losses"] == uninterrupted["losses"][2:]


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(tmp_path):
    from parallel_harness import RankError, run_ranks
    from test_train import _run_job

    run_ranks(1, _run_job, {"train": {"steps": 2}, "checkpoint": {"dir": str(tmp_path), "every": 2}}, timeout=300)
    with pytest.raises(RankError, match=r"different model config: model\.dim: 32 -> 64"):
        run_ranks(1, _run_job, {"model": {"dim": 64}, "train": {"steps": 4}, "checkpoint": {"dir": str(tmp_path)}},
                  timeout=300)


def test_compile_scan_may_change_on_resume_but_the_model_may_not():
    """compile_scan computes the same function: switching it (or a checkpoint from before the key existed) is a
    logged change; any real model difference is still refused, named."""
    from pretrain.config import JobConfig
    from titans_parallel.typed_config import to_mapping

    config = JobConfig()
    saved = to_mapping(config)
    del saved["model"]["memory"]["compile_scan"]
    saved["optimizer"]["lr"] = 2 * config.optimizer.lr
    changes = checkpoint.check_compatible(saved, config)
    assert any(c.startswith("model.memory.compile_scan: None -> False") for c in changes)
    assert any(c.startswith("optimizer.lr:") for c in changes)
    saved["model"]["memory"]["compile_scan"] = True
    assert any(c.startswith("model.memory.compile_scan: True -> False") for c in checkpoint.check_compatible(saved, config))
    saved["model"]["memory"]["depth"] = config.model.memory.depth + 1
    with pytest.raises(checkpoint.CheckpointError, match=r"different model config: model\.memory\.depth"):
        checkpoint.check_compatible(saved, config)


def test_missing_or_truncated_rank_state_names_the_file(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="rank1.pt is missing"):
        checkpoint.load_rank_state(tmp_path, 1)
    torch.save({"data": list(range(1000))}, tmp_path / "rank0.pt")
    data = (tmp_path / "rank0.pt").read_bytes()
    (tmp_path / "rank0.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="rank0.pt cannot be read, the file is truncated or corrupt"):
        checkpoint.load_rank_state(tmp_path, 0)


def test_latest_naming_an_incomplete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "step00000002").mkdir()
    (tmp_path / "latest").write_text("step00000002")
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.find_resume_point(tmp_path)
    assert checkpoint.find_resume_point(tmp_path / "nothing-here") is None


@pytest.mark.slow
def test_resume_at_another_layout_continues_the_trajectory(tmp_path):
    """Saved by DP=4 (ZeRO-1, 4 ranks), resumed by DP=2 under ZeRO-2 and by TP=2 x DP=1 under ZeRO-1 (2 ranks),
    each through a universal checkpoint and on the same global batches: the next losses equal the uninterrupted
    run's within fp32 tolerance (reductions run in another order)."""
    from parallel_harness import RankError, run_ranks
    from test_train import _run_job

    saved = {"train": {"steps": 4, "micro_batch_size": 2, "zero_stage": 1}, "checkpoint": {"dir": str(tmp_path / "a")}}
    uninterrupted = run_ranks(4, _run_job, saved, timeout=600)[0]["losses"]
    partial = {**saved, "train": {**saved["train"], "steps": 2}, "checkpoint": {"dir": str(tmp_path / "b")}}
    run_ranks(4, _run_job, partial, timeout=600)
    layouts = {
        "dp2-zero2": {"train": {"steps": 4, "micro_batch_size": 4, "zero_stage": 2}},
        "tp2-dp1-zero1": {"parallel": {"tp": 2}, "train": {"steps": 4, "micro_batch_size": 8, "zero_stage": 1}},
    }
    for name, layout in layouts.items():
        ckpt = tmp_path / name
        shutil.copytree(tmp_path / "b", ckpt)
        resumed = run_ranks(2, _run_job, {**layout, "checkpoint": {"dir": str(ckpt)}}, timeout=600)[0]["losses"]
        assert len(resumed) == 2, name
        for a, b in zip(resumed, uninterrupted[2:]):
            assert abs(a - b) <= 1e-4 * abs(b), (name, resumed, uninterrupted)
    with pytest.raises(RankError, match="cannot load into ZeRO-3"):
        run_ranks(2, _run_job, {"train": {"steps": 4, "micro_batch_size": 4, "zero_stage": 3},
                                "checkpoint": {"dir": str(tmp_path / "b")}}, timeout=600)
