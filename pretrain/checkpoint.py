"""Checkpoints that survive anything: sharded DeepSpeed states plus this job's own per-rank state, committed
atomically, verified before they are loaded.

A checkpoint is a tag folder `<checkpoint.dir>/stepXXXXXXXX/` holding DeepSpeed's files (every rank's model,
optimizer and scheduler shards), `rank{r}.pt` per rank (RNG states, data-loader position), `manifest.json` (size
and sha256 of every file, hashed in parallel by all ranks) and, written last by rank 0 once every rank has
finished, `job.json` (step, loss, tokens seen, the resolved config, code version). Only then does `latest` move
(write-and-rename), so a crash, a kill or a full disk at any moment leaves the previous checkpoint loadable and
`latest` pointing at it; a save that fails on any rank removes its partial tag folder on every rank's word and
names the file and the filesystem. Tag folders without `job.json` are incomplete and ignored; the newest
`checkpoint.keep` complete ones are kept, and never fewer than the newest one with a finite loss.

Before a resume every file is checked against the manifest (present, size, sha256); a damaged checkpoint is
skipped for the newest sound older one with a warning naming what was wrong. Rank 0 holds `checkpoint.dir/lock.json`
(host, pid) for the whole job: a second job on the same folder is refused, the lock of a dead process on the
same host is taken over with a warning.

Loading safety: every checkpoint file is read with `torch.load(weights_only=True)` (tensors, containers, numbers,
strings) and an explicit list of classes (`safe_globals`): numpy's RNG-state array in `rank{r}.pt`, three of
DeepSpeed's (its loss scaler, ZeRO stage enum and fragment address) in its optimizer files. DeepSpeed's own reads
(which ask for `weights_only=False`) run under `weights_only_loads`, which forces the same. A file that would run
code is refused, naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import JobConfig
from titans_parallel.typed_config import to_mapping

JOB_FILE = "job.json"
LATEST = "latest"
MANIFEST = "manifest.json"
LOCK = "lock.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from here; the message names the file or the keys.
    `agreed`: every rank raised the same error (rank 0 reports it)."""

    def __init__(self, message: str, agreed: bool = False):
        super().__init__(message)
        self.agreed = agreed


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


def resolve_checkpoint(path: str | Path) -> Path:
    """The one reading of a checkpoint path (conversion, evaluation, generation; training's `--resume-from` reads
    it alike, then falls back past a damaged `latest`): a complete tag folder (with its job.json) is that checkpoint;
    any other folder means the tag its `latest` names. A named tag folder wins over a `latest` beside or inside it."""
    path = Path(path)
    if is_complete(path):
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    found = find_resume_point(path)
    if found is None:
        raise CheckpointError(f"{path}: no {JOB_FILE}: not a tag folder, or an incomplete checkpoint (and no {LATEST})")
    return found


def resume_candidates(checkpoint_dir: str | Path) -> tuple[list[Path], list[str]]:
    """The complete checkpoints a resume may use, newest first: the one `latest` names, then the older ones (a
    fallback when it is damaged); and what is wrong with `latest` itself. ([], []) without a `latest`."""
    latest = Path(checkpoint_dir) / LATEST
    if not latest.is_file():
        return [], []
    name = latest.read_text().strip()
    tags = sorted((p for p in latest.parent.glob("step*") if p.is_dir() and p.name <= name and is_complete(p)),
                  reverse=True)
    notes = [] if tags and tags[0].name == name else [f"{latest} names {name}, which is incomplete (no {JOB_FILE})"]
    return tags, notes


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
        raise CheckpointError("checkpoint was trained with a different model config: " + "; ".join(model_diff),
                              agreed=True)  # every rank compares the same job.json
    return [d for d in diffs if d not in model_diff]


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new)) for d in _diff(old.get(key), new.get(key), f"{prefix}{key}.")]
    old = list(old) if isinstance(old, tuple) else old
    new = list(new) if isinstance(new, tuple) else new
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


# What a data-loader position is tied to (pretrain.data.loader identity keys), in words.
_ORDER_WORDS = {"shards": "the dataset's shards (other files or contents)", "split": "the split",
                "seed": "the shuffle seed (train.seed)", "shuffle": "shuffling on/off",
                "shuffle_buffer": "data.shuffle_buffer", "shuffle_lanes": "the shuffle lanes"}


def describe_data_change(saved_data: dict[str, Any], data: dict[str, Any], saved_order: dict[str, Any] | None,
                         order: dict[str, Any] | None) -> str | None:
    """What differs between the data a checkpoint was reading (its job config's `data` section and its loader's
    sample-order identity) and this run's, in plain words; None when the saved position applies here. A change of
    data-parallel layout alone is not one (the position is re-split)."""
    parts = []
    if saved_data.get("path") != data.get("path"):
        parts.append(f"the dataset changed: data.path {saved_data.get('path') or '(the embedded default)'} -> "
                     f"{data.get('path') or '(the embedded default)'}")
    if saved_data.get("seq_len") != data.get("seq_len"):
        parts.append(f"the context length changed: data.seq_len {saved_data.get('seq_len')} -> {data.get('seq_len')}")
    if not parts and saved_order is not None and order is not None:
        changed = [k for k in order if k not in ("dp_rank", "dp_size") and saved_order.get(k) != order[k]]
        if changed:
            where = f" at {data.get('path')}" if data.get("path") else ""
            parts.append(f"the data{where} is not what the checkpoint was reading: "
                         + ", ".join(_ORDER_WORDS.get(k, k) for k in changed) + " differ")
    return "; ".join(parts) or None


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


# --- loading safely -------------------------------------------------------------------------------------------------


def safe_globals() -> list[Any]:
    """The only classes and functions a checkpoint file may name (torch.load weights_only=True allows tensors,
    containers, numbers and strings besides): numpy's array and dtype (np.random.get_state() in rank{r}.pt) and
    the DeepSpeed objects its ZeRO optimizer files hold."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, wherever this numpy keeps it
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct, LossScaler, ZeroStageEnum, fragment_address]


def _read_error(path: str | Path, e: BaseException) -> str:
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), text.splitlines()[0])
        return (f"{path} is refused: it holds more than tensors and plain data, and loading it would run code "
                f"from the file ({detail})")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{path} cannot be read, the file is truncated or corrupt ({type(e).__name__}: {first})"


def torch_load(path: str | Path, **kwargs: Any) -> Any:
    """torch.load(weights_only=True) allowing `safe_globals()`; a CheckpointError naming the file otherwise."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, weights_only=True, **kwargs)
    except Exception as e:
        raise CheckpointError(_read_error(path, e)) from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every torch.load reads weights only with `safe_globals()`, also DeepSpeed's own (engine loads,
    zero_to_fp32, ds_to_universal and its forked workers), which pass weights_only=False."""
    name, previous = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ[name] = "1"
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _patched(obj: Any, name: str, replacement: Callable) -> Iterator[None]:
    """obj.name = replacement (an instance attribute) for the block."""
    own = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def deepspeed_loads(engine) -> Iterator[None]:
    """DeepSpeed's checkpoint reads through `engine`, weights only, an unreadable or refused file named."""
    real = engine.checkpoint_engine.load

    def load(path, map_location=None):
        try:
            return real(path, map_location=map_location)
        except Exception as e:
            raise CheckpointError(_read_error(path, e)) from None

    with weights_only_loads(), _patched(engine.checkpoint_engine, "load", load):
        yield


def load_rank_state(tag_dir: Path, rank: int, world_size: int | None = None) -> dict[str, Any]:
    path = tag_dir / f"rank{rank}.pt"
    if not path.is_file():
        written = f"the checkpoint was written by {world_size} ranks" if world_size else "the checkpoint is damaged"
        raise CheckpointError(f"{path} is missing ({written})")
    return torch_load(path)


# --- verifying ------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _payload_files(tag_dir: Path) -> list[str]:
    """Every file of a tag folder but job.json and the manifest, as sorted relative paths."""
    skip = {JOB_FILE, MANIFEST}
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name not in skip)


def verify(tag_dir: Path, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with the complete checkpoint `tag_dir` ([]: nothing), each problem naming its file. With a
    manifest: every file it lists present at its size, and this share's files (index % n == i of `share` (i, n))
    with its sha256. Without (written before manifests existed): the rank files its job implies present and
    readable as archives."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return _verify_legacy(tag_dir)
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return [f"{manifest} cannot be read ({e})"]
    problems = []
    for i, name in enumerate(sorted(files)):
        path, entry = tag_dir / name, files[name]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path} is truncated or corrupt: {path.stat().st_size} bytes, {entry['bytes']} written")
        elif i % share[1] == share[0] and _sha256(path) != entry["sha256"]:
            problems.append(f"{path} is corrupt: its sha256 is not the one written with it")
    return problems


def _verify_legacy(tag_dir: Path) -> list[str]:
    from pretrain.checkpoint_io import expected_rank_files

    job = read_job(tag_dir)
    config = job["config"]
    tp, world = config["parallel"]["tp"], job["world_size"]
    files = [p for f in expected_rank_files(tag_dir, config["train"]["zero_stage"], tp, world // tp,
                                            config["train"]["precision"] == "bf16") for p in f.model + f.optim]
    files += [tag_dir / f"rank{r}.pt" for r in range(world)]
    problems = []
    for path in files:
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as e:
            problems.append(f"{path} is truncated or corrupt ({e})")
    return problems


def first_sound(candidates: list[Path], notes: list[str]) -> Path | None:
    """The first of `candidates` (newest first) that `verify` passes, every rank checking its share of the files
    (collective); rank 0 warns about each one skipped, naming what was wrong. None when there are no candidates;
    a CheckpointError listing the problems when none is sound."""
    rank, world = dist.get_rank(), dist.get_world_size()
    notes = list(notes)
    for tag_dir in candidates:
        try:
            mine = verify(tag_dir, (rank, world))
        except CheckpointError as e:
            mine = [str(e)]
        problems = sorted({p for ps in _all_gather(mine) for p in ps})
        if not problems:
            if notes and rank == 0:
                print(f"warning: {'; '.join(notes)}: resuming from {tag_dir} instead", file=sys.stderr, flush=True)
            return tag_dir
        notes.append(f"{tag_dir.name} is damaged: {'; '.join(problems)}")
    if notes:
        raise CheckpointError("no sound checkpoint to resume from: " + "; ".join(notes), agreed=True)
    return None


# --- the lock -------------------------------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc), telling a reused pid apart; None off Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] != "Z" and (start is None or fields[19] == start)  # a zombie or a new process on that pid: dead


def acquire_lock(root: Path) -> str | None:
    """Take `root/lock.json` for this process (making `root`); returns a warning when it took over the lock of a
    dead process on this host, raises a CheckpointError naming the owner when another job holds it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    warning = None
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                owner = {}
            same_host = owner.get("host") == me["host"]
            if owner and not (same_host and (owner.get("pid") == me["pid"] or not _alive(owner["pid"], owner.get("start")))):
                where = "" if same_host else " (another host: this one cannot tell whether it still runs)"
                raise CheckpointError(
                    f"checkpoint.dir {root} is in use by another job: host {owner.get('host')}, pid {owner.get('pid')}, "
                    f"since {owner.get('since')}{where}. Two jobs on one checkpoint.dir overwrite each other's "
                    f"checkpoints: wait for it, give this job another checkpoint.dir, or delete {path} if that job "
                    "is gone", agreed=True)
            warning = (f"warning: took over the stale lock {path} of pid {owner.get('pid')} on {owner.get('host')} "
                       "(no longer running)" if owner else f"warning: took over the unreadable lock {path}")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return warning
    raise CheckpointError(f"could not take the lock {path}: other jobs keep taking it", agreed=True)


def release_lock(root: Path) -> None:
    """Remove `root/lock.json` if this process holds it."""
    path = root / LOCK
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(checkpoint_dir: str | Path) -> Iterator[None]:
    """Rank 0 holds the checkpoint folder's lock for the block; every rank raises the same CheckpointError when
    another job holds it (collective)."""
    root, rank = Path(checkpoint_dir), dist.get_rank()
    outcome: tuple[str | None, str | None] = (None, None)
    if rank == 0:
        try:
            outcome = (None, acquire_lock(root))
        except CheckpointError as e:
            outcome = (str(e), None)
    error, warning = _broadcast(outcome)
    if error:
        raise CheckpointError(error, agreed=True)
    if warning and rank == 0:
        print(warning, file=sys.stderr, flush=True)
    try:
        yield
    finally:
        if rank == 0:
            release_lock(root)


# --- saving ---------------------------------------------------------------------------------------------------------


def _all_gather(obj: Any) -> list[Any]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _filesystem(path: Path) -> str:
    """The device and mount point holding `path` ('/dev/sda1 (mounted at /data)'), as far as they can be told."""
    mount = _existing(path).resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    device = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == str(mount):
                device = fields[0]
    return f"{device} (mounted at {mount})" if device else str(mount)


def _no_space(path: Path) -> bool:
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def _write_error(path: Path, e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or _no_space(path):
        return f"no space left on {_filesystem(path)} while writing {path}"
    return f"cannot write {path}: {type(e).__name__}: {e}"


class _WriteGuard:
    """This rank's first failed checkpoint write, kept rather than raised, so every rank still reaches DeepSpeed's
    barriers and ours; the ranks then agree and fail together."""

    def __init__(self):
        self.error: str | None = None

    def run(self, path: Path, fn: Callable, *args: Any) -> None:
        if self.error is None:
            try:
                fn(*args)
            except Exception as e:
                self.error = _write_error(Path(path), e)

    def deepspeed_writes(self, engine):
        real = engine.checkpoint_engine.save
        return _patched(engine.checkpoint_engine, "save",
                        lambda state_dict, path: self.run(Path(path), real, state_dict, path))


def _fail_together(errors: list[str | None], tag_dir: Path) -> None:
    """When any rank failed: rank 0 removes the partial tag folder, every rank raises the first error."""
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    dist.barrier()
    rank, error = failed[0]
    raise CheckpointError(f"checkpoint {tag_dir.name} not written (rank {rank}: {error}); its partial folder is "
                          f"removed and {tag_dir.parent / LATEST} is unchanged", agreed=True)


def save(engine, config: JobConfig, step: int, tokens_seen: int, rank_state: dict[str, Any],
         extra_client_state: dict[str, Any] | None = None, version: str = "unknown",
         loss: float | None = None) -> Path:
    """Write a complete checkpoint for `step` on every rank (collective); returns its tag folder. A failed write
    on any rank (a full disk: "no space left on <device> while writing <file>") raises a CheckpointError on every
    rank after removing the partial folder; `latest` is unchanged."""
    if loss is not None and not math.isfinite(loss):
        raise CheckpointError(f"refusing to write a checkpoint of step {step}: its loss is {loss}", agreed=True)
    root = Path(config.checkpoint.dir)
    tag = tag_name(step)
    tag_dir = root / tag
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and tag_dir.exists():  # a leftover of an interrupted save of this very step
        shutil.rmtree(tag_dir)
    dist.barrier()
    job = {"step": step, "loss": loss, "tokens_seen": tokens_seen, "config": to_mapping(config),
           "code_version": version, "world_size": world}
    guard = _WriteGuard()
    with guard.deepspeed_writes(engine):
        engine.save_checkpoint(str(root), tag=tag, client_state={**job, **(extra_client_state or {})},
                               save_latest=False)
    path = tag_dir / f"rank{rank}.pt"
    guard.run(path, _atomic_torch_save, {**rank_state, "rng": rng_state()}, path)
    _fail_together(_all_gather(guard.error), tag_dir)
    names = _broadcast(_payload_files(tag_dir) if rank == 0 else None)
    hashes = {name: {"bytes": (tag_dir / name).stat().st_size, "sha256": _sha256(tag_dir / name)}
              for i, name in enumerate(names) if i % world == rank}
    gathered = _all_gather(hashes)
    if rank == 0:
        files = {name: entry for part in gathered for name, entry in part.items()}
        guard.run(tag_dir / MANIFEST, _atomic_write, tag_dir / MANIFEST, json.dumps({"files": files}, indent=1))
        guard.run(tag_dir / JOB_FILE, _atomic_write, tag_dir / JOB_FILE, json.dumps(job, indent=1))
        guard.run(root / LATEST, _atomic_write, root / LATEST, tag)
        if guard.error is None:
            _prune(root, config.checkpoint.keep, keep_tag=tag)
    _fail_together(_broadcast([guard.error]), tag_dir)
    return tag_dir


def _finite_loss(tag_dir: Path) -> bool:
    """job.json's loss is finite (or not recorded: written before losses were)."""
    try:
        loss = read_job(tag_dir).get("loss")
    except CheckpointError:
        return False
    return loss is None or math.isfinite(loss)


def _prune(root: Path, keep: int, keep_tag: str) -> None:
    """Delete complete checkpoints beyond the newest `keep` (never the newest with a finite loss), and incomplete
    ones older than `keep_tag`."""
    tags = sorted(p for p in root.glob("step*") if p.is_dir())
    complete = [p for p in tags if is_complete(p)]
    doomed = complete[:-keep] if keep > 0 else []
    finite = [p for p in complete if _finite_loss(p)]
    if finite and finite[-1] in doomed:
        doomed.remove(finite[-1])
    doomed += [p for p in tags if not is_complete(p) and p.name < keep_tag]
    for path in doomed:
        if path.name != keep_tag:
            shutil.rmtree(path, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
