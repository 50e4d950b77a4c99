"""Faults and recovery (issue 13): the divergence guard, the checkpoint.dir lock, recipe changes that take effect on
resume, checkpoint verification with fallback, a full disk during a save, weights-only loading, and resuming on
other data. Fast tests use synthetic folders and one in-process gloo rank; slow ones train on spawned gloo ranks
and, once, through the real `deepspeed` launcher with a NaN injected."""

import errno
import hashlib
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pretrain import checkpoint

MARKER = "pwned"


# --- helpers --------------------------------------------------------------------------------------------------------


@pytest.fixture
def one_rank():
    """torch.distributed on this process alone (gloo), for the collective helpers."""
    from parallel_harness import _free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _tag(root: Path, step: int, loss: float | None = 1.0, files: dict[str, bytes] | None = None) -> Path:
    """A complete synthetic tag folder with a manifest of `files` (default: one model-states file, rank0.pt)."""
    tag = root / checkpoint.tag_name(step)
    tag.mkdir(parents=True)
    files = files if files is not None else {"mp_rank_00_model_states.pt": os.urandom(256), "rank0.pt": os.urandom(64)}
    for name, data in files.items():
        (tag / name).write_bytes(data)
    manifest = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    (tag / checkpoint.MANIFEST).write_text(json.dumps({"files": manifest}))
    (tag / checkpoint.JOB_FILE).write_text(json.dumps({"step": step, "loss": loss, "world_size": 1}))
    return tag


class _Evil:
    """Unpickling this runs a shell command (what a crafted checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- 1. divergence: pruning, refusing to save, the guard's policies (fast) ------------------------------------------


def test_pruning_never_removes_the_newest_finite_checkpoint(tmp_path):
    _tag(tmp_path, 2, loss=3.0)
    _tag(tmp_path, 4, loss=float("nan"))
    _tag(tmp_path, 6, loss=float("inf"))
    checkpoint._prune(tmp_path, keep=2, keep_tag="step00000006")
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000002", "step00000004", "step00000006"]
    _tag(tmp_path, 8, loss=2.0)
    checkpoint._prune(tmp_path, keep=2, keep_tag="step00000008")
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000006", "step00000008"]


def test_a_checkpoint_of_a_nonfinite_loss_is_refused(tmp_path):
    from pretrain.config import JobConfig

    config = JobConfig()
    config.checkpoint.dir = str(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to write a checkpoint of step 4: its loss is nan"):
        checkpoint.save(None, config, 4, 0, {}, loss=float("nan"))
    assert not list(tmp_path.iterdir())


class _FakeEngine:
    device = torch.device("cpu")

    def __init__(self, applied: bool):
        self.applied = applied

    def was_step_applied(self) -> bool:
        return self.applied


class _FakeScheduler:
    steps = 0

    def step(self):
        self.steps += 1


@pytest.mark.usefixtures("one_rank")
def test_divergence_guard_policies(tmp_path):
    from pretrain.divergence import DivergenceError, DivergenceGuard
    from test_train import job

    (tmp_path / "latest").write_text("step00000004")
    stop = DivergenceGuard(job(checkpoint={"dir": str(tmp_path)}))
    assert not stop.check(5, 2.0, 1.0, _FakeEngine(True), _FakeScheduler(), False)
    with pytest.raises(DivergenceError, match=r"step 5: non-finite loss \(nan\).*on_nonfinite=stop.*newest is step00000004"):
        stop.check(5, float("nan"), 1.0, _FakeEngine(False), _FakeScheduler(), False)

    skip = DivergenceGuard(job(train={"on_nonfinite": "skip", "max_skipped_steps": 2}, checkpoint={"dir": str(tmp_path)}))
    scheduler = _FakeScheduler()
    assert skip.check(5, float("nan"), float("inf"), _FakeEngine(False), scheduler, False)  # DeepSpeed skipped it
    assert scheduler.steps == 1  # ... and held the schedule back: it moves on with the step
    assert skip.check(6, 2.0, float("nan"), _FakeEngine(True), scheduler, True)  # ZeRO-0: gradients dropped
    assert scheduler.steps == 1  # the engine stepped it
    with pytest.raises(DivergenceError, match="2 updates skipped already, train.max_skipped_steps=2"):
        skip.check(7, float("nan"), 1.0, _FakeEngine(False), scheduler, False)
    with pytest.raises(DivergenceError, match="its update was applied"):
        DivergenceGuard(job(train={"on_nonfinite": "skip"}, checkpoint={"dir": str(tmp_path)})).check(
            7, float("nan"), 1.0, _FakeEngine(True), scheduler, False)


# --- 3. the lock (fast) ---------------------------------------------------------------------------------------------


def test_a_second_job_on_a_checkpoint_dir_is_refused_and_stale_locks_are_taken_over(tmp_path):
    host, other = socket.gethostname(), os.getppid()  # a live process that is not this one
    lock = {"host": host, "pid": other, "start": checkpoint._start_time(other), "since": "then"}
    (tmp_path / checkpoint.LOCK).write_text(json.dumps(lock))
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"in use by another job: host {host}, pid {other}, since then.*delete .*lock.json"):
        checkpoint.acquire_lock(tmp_path)
    (tmp_path / checkpoint.LOCK).write_text(json.dumps({**lock, "start": "0"}))  # that pid, another process: dead
    warning = checkpoint.acquire_lock(tmp_path)
    assert f"took over the stale lock {tmp_path / checkpoint.LOCK} of pid {other}" in warning
    owner = json.loads((tmp_path / checkpoint.LOCK).read_text())
    assert (owner["host"], owner["pid"]) == (host, os.getpid())
    checkpoint.release_lock(tmp_path)
    assert not (tmp_path / checkpoint.LOCK).exists()

    (tmp_path / checkpoint.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(checkpoint.CheckpointError, match="host elsewhere, pid 1.*another host"):
        checkpoint.acquire_lock(tmp_path)
    checkpoint.release_lock(tmp_path)  # not ours: left alone
    assert (tmp_path / checkpoint.LOCK).exists()


# --- 9. verification and fallback (fast) ----------------------------------------------------------------------------


def test_verification_names_missing_truncated_and_corrupt_files(tmp_path):
    tag = _tag(tmp_path, 2, files={"mp_rank_00_model_states.pt": b"m" * 100, "rank0.pt": b"r" * 50,
                                   "rank1.pt": b"s" * 50, "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"o" * 300})
    assert checkpoint.verify(tag) == []
    (tag / "mp_rank_00_model_states.pt").unlink()
    (tag / "rank1.pt").unlink()
    optim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(b"o" * 120)
    (tag / "rank0.pt").write_bytes(b"x" * 50)  # same size, other bytes
    problems = checkpoint.verify(tag)
    assert f"{tag / 'mp_rank_00_model_states.pt'} is missing" in problems
    assert f"{tag / 'rank1.pt'} is missing" in problems
    assert f"{optim} is truncated or corrupt: 120 bytes, 300 written" in problems
    assert f"{tag / 'rank0.pt'} is corrupt: its sha256 is not the one written with it" in problems
    assert checkpoint.verify(tag, share=(0, 2)) == [p for p in problems if "sha256" not in p]  # rank1's half


def test_missing_rank_state_says_how_many_ranks_wrote_the_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"rank1.pt is missing \(the checkpoint was written by 2 ranks\)"):
        checkpoint.load_rank_state(tmp_path, 1, world_size=2)


@pytest.mark.usefixtures("one_rank")
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, capsys):
    good = _tag(tmp_path, 2)
    bad = _tag(tmp_path, 4)
    (tmp_path / "latest").write_text(bad.name)
    (bad / "rank0.pt").write_bytes(b"")
    candidates, notes = checkpoint.resume_candidates(tmp_path)
    assert candidates == [bad, good] and notes == []
    assert checkpoint.first_sound(candidates, notes) == good
    err = capsys.readouterr().err
    assert f"step00000004 is damaged: {bad / 'rank0.pt'} is truncated or corrupt: 0 bytes, 64 written" in err
    assert f"resuming from {good} instead" in err

    (good / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no sound checkpoint to resume from: .*step00000002 is damaged"):
        checkpoint.first_sound(*checkpoint.resume_candidates(tmp_path))
    (bad / checkpoint.JOB_FILE).unlink()  # `latest` names an incomplete folder now
    assert checkpoint.resume_candidates(tmp_path) == ([good], [f"{tmp_path / 'latest'} names step00000004, which is "
                                                               "incomplete (no job.json)"])


# --- 10. a full disk (fast part) ------------------------------------------------------------------------------------


def test_no_space_names_the_device_and_the_file(tmp_path):
    message = checkpoint._write_error(tmp_path / "step00000004" / "x.pt", OSError(errno.ENOSPC, "No space left"))
    assert message.startswith("no space left on ") and message.endswith(f" while writing {tmp_path}/step00000004/x.pt")
    assert "mounted at /" in message or message.startswith("no space left on /")


# --- 12. weights-only loading (fast) --------------------------------------------------------------------------------


def test_a_crafted_pickle_is_refused_and_does_not_run(tmp_path):
    from pretrain.checkpoint_io import _load

    marker = tmp_path / MARKER
    torch.save({"rng": _Evil(marker)}, tmp_path / "rank0.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"rank0.pt is refused: .*would run code.*GLOBAL posix.system"):
        checkpoint.load_rank_state(tmp_path, 0)
    torch.save({"module": _Evil(marker)}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(checkpoint.CheckpointError, match="mp_rank_00_model_states.pt is refused"):
        _load(tmp_path / "mp_rank_00_model_states.pt")
    with checkpoint.weights_only_loads(), pytest.raises(Exception, match="GLOBAL posix.system"):
        torch.load(tmp_path / "rank0.pt", weights_only=False)  # what DeepSpeed's own reads ask for
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None


def test_rank_state_loads_weights_only(tmp_path):
    torch.save({"data": {"samples": 3, "order": {"seed": 0}}, "rng": checkpoint.rng_state()}, tmp_path / "rank0.pt")
    state = checkpoint.load_rank_state(tmp_path, 0)
    checkpoint.set_rng_state(state["rng"])
    assert state["data"]["samples"] == 3


# --- 13. another dataset or context length (fast part) -------------------------------------------------------------


def test_data_changes_are_said_in_words():
    order = {"split": "train", "shards": "aaaa", "dp_rank": 0, "dp_size": 2, "seed": 0, "shuffle": True}
    data = {"path": "data/a", "seq_len": 64}
    assert checkpoint.describe_data_change(data, dict(data), order, {**order, "dp_rank": 1, "dp_size": 4}) is None
    assert (checkpoint.describe_data_change(data, {**data, "seq_len": 128}, order, order)
            == "the context length changed: data.seq_len 64 -> 128")
    assert (checkpoint.describe_data_change(data, {"path": None, "seq_len": 64}, order, order)
            == "the dataset changed: data.path data/a -> (the embedded default)")
    assert (checkpoint.describe_data_change(data, data, order, {**order, "shards": "bbbb"})
            == "the data at data/a is not what the checkpoint was reading: the dataset's shards (other files or "
               "contents) differ")


# --- slow: real training on spawned gloo ranks ----------------------------------------------------------------------


def _job_with(rank: int, world_size: int, sections: dict, env: dict | None = None, patch: str | None = None) -> dict:
    """test_train's job on exact batches, with environment variables set first and optionally a fault patched in:
    'enospc' makes rank 1's write of step 4's optimizer shard fail as a full disk does."""
    from test_train import _run_job

    os.environ.update(env or {})
    if patch == "enospc" and rank == 1:
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if "step00000004" in str(f) and "optim_states" in str(f):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(obj, f, *args, **kwargs)

        torch.save = save
    return _run_job(rank, world_size, sections)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2, 3])
def test_skipped_nonfinite_step_leaves_the_weights_unchanged(zero, tmp_path):
    """NaN injected on rank 1 at step 3 of 4, on_nonfinite=skip: both ranks skip that update (step 3's checkpoint
    holds step 2's weights exactly), the run goes on and finishes."""
    from parallel_harness import run_ranks
    from pretrain.checkpoint_io import load_consolidated

    ckpt = tmp_path / "ckpt"
    sections = {"train": {"steps": 4, "zero_stage": zero, "on_nonfinite": "skip"},
                "checkpoint": {"dir": str(ckpt), "every": 1, "keep": 0}}
    result = run_ranks(2, _job_with, sections, {"TITANS_INJECT_NAN_AT_STEP": "3:1"}, timeout=600)[0]
    losses = result["losses"]
    assert math.isnan(losses[2]) and all(math.isfinite(x) for x in losses[:2] + losses[3:])
    before, after = load_consolidated(ckpt / "step00000002")[0], load_consolidated(ckpt / "step00000003")[0]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(after[k], v) for k, v in load_consolidated(ckpt / "step00000004")[0].items())
    assert checkpoint.read_job(ckpt / "step00000003")["loss"] is None
    assert (ckpt / "latest").read_text() == "step00000004"


@pytest.mark.slow
def test_a_locked_checkpoint_dir_stops_the_job(tmp_path):
    from parallel_harness import RankError, run_ranks

    (tmp_path / checkpoint.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(RankError, match=f"in use by another job: host .*, pid {os.getpid()}"):
        run_ranks(2, _job_with, {"train": {"steps": 2}, "checkpoint": {"dir": str(tmp_path)}}, timeout=300)
    assert not list(tmp_path.glob("step*"))


def _lr_job(rank: int, world_size: int, sections: dict) -> dict:
    """_job_with, also returning the optimizer's param groups (the engine's, after training)."""
    import deepspeed

    engines, real = [], deepspeed.initialize

    def initialize(*args, **kwargs):
        out = real(*args, **kwargs)
        engines.append(out[0])
        return out

    deepspeed.initialize = initialize
    result = _job_with(rank, world_size, sections)
    groups = engines[0].lr_scheduler.optimizer.param_groups
    return {**result, "groups": [{k: v for k, v in g.items() if k in ("lr", "betas", "eps", "weight_decay")}
                                 for g in groups]}


@pytest.mark.slow
def test_changed_optimizer_and_schedule_take_effect_on_resume(tmp_path):
    """Resumed with another lr, betas, eps, weight decay, warmup, floor and length, the run follows the new recipe:
    logged lr = new lr x new schedule at every resumed step; the param groups hold the new values."""
    from parallel_harness import run_ranks
    from pretrain.optim import lr_lambda
    from test_train import job

    metrics = tmp_path / "metrics.jsonl"
    first = {"train": {"steps": 4}, "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 4},
             "logging": {"metrics_file": str(metrics)}}
    run_ranks(1, _lr_job, first, timeout=300)
    changed = {**first, "train": {"steps": 8}, "optimizer": {"lr": 6e-3, "betas": [0.8, 0.9], "eps": 1e-6,
                                                            "weight_decay": 0.05},
               "schedule": {"warmup_steps": 1, "min_lr_ratio": 0.5}}
    groups = run_ranks(1, _lr_job, changed, timeout=300)[0]["groups"]
    records = [json.loads(line) for line in metrics.read_text().splitlines() if '"lr"' in line]
    logged = {r["step"]: r["lr"] for r in records}
    old, new = lr_lambda(job(**first)), lr_lambda(job(**changed))
    assert sorted(logged) == list(range(1, 9))
    for step in range(1, 5):  # the lr logged at a step is the one the scheduler set for the next
        assert logged[step] == pytest.approx(3e-3 * old(step))
    for step in range(5, 9):
        assert logged[step] == pytest.approx(6e-3 * new(step)), (step, logged)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.9) and g["eps"] == 1e-6 for g in groups)


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_and_a_full_disk_keeps_latest(tmp_path):
    """(10) rank 1's disk fills while writing step 4: every rank stops with "no space left on <device> while
    writing <file>", the partial step 4 is gone, `latest` still names step 2. (9) Step 4 written, then its
    optimizer shard truncated: the resume warns, naming the file, and continues from step 2."""
    from parallel_harness import RankError, run_ranks

    ckpt = tmp_path / "ckpt"
    sections = {"train": {"steps": 4}, "checkpoint": {"dir": str(ckpt), "every": 2, "keep": 0}}
    with pytest.raises(RankError, match=r"no space left on .* while writing "
                                        f"{ckpt}/step00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        run_ranks(2, _job_with, sections, None, "enospc", timeout=300)
    assert (ckpt / "latest").read_text() == "step00000002" and not (ckpt / "step00000004").exists()
    assert not (ckpt / checkpoint.LOCK).exists()

    run_ranks(2, _job_with, sections, timeout=300)  # resumes at 2, writes step 4
    optim = ckpt / "step00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    resumed = run_ranks(2, _job_with, {**sections, "train": {"steps": 6}}, timeout=300)[0]
    assert len(resumed["losses"]) == 4  # steps 3-6, from step 2
    assert (ckpt / "latest").read_text() == "step00000006"


def _data_job(rank: int, world_size: int, path: str, seq_len: int, ckpt: str, steps: int, reset: bool) -> list[float]:
    """A job on a real dataset (the loader, not exact batches)."""
    from pretrain.train import train
    from test_train import job

    config = job(model={"vocab_size": 512}, data={"path": path, "seq_len": seq_len}, train={"steps": steps},
                 checkpoint={"dir": ckpt, "every": steps})
    return train(config, reset_data_position=reset).losses


@pytest.mark.slow
def test_resume_on_another_dataset_and_context_length(tmp_path, small_dataset, capfd):
    """Continued on a dataset prepared at seq_len 32: refused in words without --reset-data-position; with it the
    model, optimizer and schedule continue and the data starts from its beginning."""
    from parallel_harness import RankError, run_ranks
    from pretrain.data import prepare_dataset

    root = Path(__file__).resolve().parents[1]
    other = prepare_dataset([root / "data/default/corpus.jsonl.gz"], tmp_path / "short", seq_len=32,
                            tokenizer=small_dataset / "tokenizer.model", val_fraction=0.1, progress=False)
    ckpt = str(tmp_path / "ckpt")
    run_ranks(1, _data_job, str(small_dataset), 64, ckpt, 2, False, timeout=300)
    with pytest.raises(RankError, match=r"was reading other data: the dataset changed: data.path .* -> .*short; the "
                                        r"context length changed: data.seq_len 64 -> 32\. Pass --reset-data-position"):
        run_ranks(1, _data_job, str(other), 32, ckpt, 4, False, timeout=300)
    capfd.readouterr()
    losses = run_ranks(1, _data_job, str(other), 32, ckpt, 4, True, timeout=300)[0]
    assert len(losses) == 2
    assert "data position reset (--reset-data-position): reading " in capfd.readouterr().out


# --- slow: the real launcher, a NaN injected ------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_through_the_launcher_stops_with_the_newest_finite_checkpoint(tmp_path, small_dataset):
    """NaN on rank 1 at step 5 of 6 (checkpoints every 2, keep 1): every rank stops in that step, the launcher exits
    non-zero with one error line, `latest` names step 4, which is the only checkpoint left and loads finite."""
    from pretrain.checkpoint_io import load_consolidated
    from test_launch import DEEPSPEED, overrides, run

    proc = run([DEEPSPEED, "--num_nodes", "1", "--num_gpus", "2", "--master_port", "29546", "pretrain/train.py",
                "--config", "configs/train/tiny_cpu.yaml", *overrides(tmp_path, small_dataset, 6), "checkpoint.every=2",
                "checkpoint.keep=1"], TITANS_INJECT_NAN_AT_STEP="5:1")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out[-4000:]
    errors = [line for line in out.splitlines() if "error: step 5: non-finite loss" in line]
    assert len(errors) == 1 and "newest is step00000004" in errors[0], out[-4000:]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000004"]
    state, _, step = load_consolidated(ckpt)
    assert step == 4 and all(torch.isfinite(v).all() for v in state.values())
    assert not (ckpt / checkpoint.LOCK).exists()
