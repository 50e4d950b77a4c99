"""Checkpoints that survive anything: sharded DeepSpeed states plus this job's own per-rank state, committed
atomically.

A checkpoint is a tag folder `<checkpoint.dir>/stepXXXXXXXX/` holding DeepSpeed's files (every rank's model,
optimizer and scheduler shards), `rank{r}.pt` per rank (RNG states, data-loader position) and, written last by
rank 0 once every rank has finished, `job.json` (step, tokens seen, the resolved config, code version). Only then
does `latest` move (write-and-rename), so a crash or kill at any moment leaves the previous checkpoint loadable and
`latest` pointing at it. Tag folders without `job.json` are incomplete and ignored; the newest `checkpoint.keep`
complete ones are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import JobConfig
from titans_parallel.typed_config import to_mapping

JOB_FILE = "job.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from here; the message names the file or the keys."""


def tag_name(step: int) -> str:
    return f"step{step:08d}"


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / JOB_FILE).is_file()


def find_resume_point(checkpoint_dir: str | Path) -> Path | None:
    """The tag folder `latest` names (it is only ever written after a complete checkpoint), or None."""
    latest = Path(checkpoint_dir) / LATEST
    if not latest.is_file():
        return None
    tag_dir = latest.parent / latest.read_text().strip()
    if not is_complete(tag_dir):
        raise CheckpointError(f"{latest} names {tag_dir.name}, which has no {JOB_FILE}: the checkpoint is incomplete")
    return tag_dir


def resolve_resume_path(path: str | Path) -> Path:
    """--resume-from accepts a tag folder or a checkpoint folder (then its `latest`)."""
    path = Path(path)
    if is_complete(path):
        return path
    found = find_resume_point(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"--resume-from {path}: neither a complete checkpoint (no {JOB_FILE}) nor a folder with {LATEST}")
    return found


def read_job(tag_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((tag_dir / JOB_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {tag_dir / JOB_FILE}: {e}") from None


# Model keys that choose how the same function is computed, not which function: they may differ on resume (and be
# absent from checkpoints written before they existed).
EXECUTION_KEYS = ("model.memory.compile_scan",)


def check_compatible(saved: dict[str, Any], config: JobConfig) -> list[str]:
    """Refuse a checkpoint of another model (lists every differing model key); return the other changed settings
    (optimizer, schedule, EXECUTION_KEYS, ...: allowed, to be logged)."""
    current = to_mapping(config)
    diffs = [d for section in current for d in _diff(saved.get(section, {}), current[section], f"{section}.")]
    model_diff = [d for d in diffs if d.startswith("model.") and d.split(":", 1)[0] not in EXECUTION_KEYS]
    if model_diff:
        raise CheckpointError("checkpoint was trained with a different model config: " + "; ".join(model_diff))
    return [d for d in diffs if d not in model_diff]


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new)) for d in _diff(old.get(key), new.get(key), f"{prefix}{key}.")]
    old = list(old) if isinstance(old, tuple) else old
    new = list(new) if isinstance(new, tuple) else new
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def code_version() -> str:
    """git commit of the code (with '+dirty' for local changes), or 'unknown' outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if commit.returncode == 0 else "unknown"


def save(engine, config: JobConfig, step: int, tokens_seen: int, rank_state: dict[str, Any],
         extra_client_state: dict[str, Any] | None = None, version: str = "unknown") -> Path:
    """Write a complete checkpoint for `step` on every rank (collective); returns its tag folder."""
    root = Path(config.checkpoint.dir)
    tag = tag_name(step)
    tag_dir = root / tag
    rank = dist.get_rank()
    if rank == 0 and tag_dir.exists():  # a leftover of an interrupted save of this very step
        shutil.rmtree(tag_dir)
    dist.barrier()
    job = {"step": step, "tokens_seen": tokens_seen, "config": to_mapping(config), "code_version": version,
           "world_size": dist.get_world_size()}
    engine.save_checkpoint(str(root), tag=tag, client_state={**job, **(extra_client_state or {})}, save_latest=False)
    _atomic_torch_save({**rank_state, "rng": rng_state()}, tag_dir / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        _atomic_write(tag_dir / JOB_FILE, json.dumps(job, indent=1))
        _atomic_write(root / LATEST, tag)
        _prune(root, config.checkpoint.keep, keep_tag=tag)
    dist.barrier()
    return tag_dir


def load_rank_state(tag_dir: Path, rank: int) -> dict[str, Any]:
    path = tag_dir / f"rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint was written by fewer ranks than this run has")
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # truncated or corrupt pickle
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _prune(root: Path, keep: int, keep_tag: str) -> None:
    """Delete complete checkpoints beyond the newest `keep`, and incomplete ones older than `keep_tag`."""
    tags = sorted(p for p in root.glob("step*") if p.is_dir())
    complete = [p for p in tags if is_complete(p)]
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [p for p in tags if not is_complete(p) and p.name < keep_tag]
    for path in doomed:
        if path.name != keep_tag:
            shutil.rmtree(path, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
