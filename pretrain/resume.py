"""Resume: which checkpoint a run continues from (`resume_point`), and loading it into a built engine
(`restore`): model, optimizer and scheduler states, this recipe's hyperparameters, the RNG, the data position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from pretrain import checkpoint
from pretrain.config import JobConfig
from pretrain.universal import to_universal


@dataclass
class ResumePoint:
    """The checkpoint a run continues from and how: same layout (each rank its own state) or re-laid out."""

    tag_dir: Path
    job: dict  # the checkpoint's job.json
    changes: list[str]  # allowed config changes (optimizer, schedule, ...), logged
    relayout: bool  # written with another world size, TP/CP degree or ZeRO stage: load through a universal checkpoint
    data: dict = field(default_factory=dict)  # this run's data.path and data.seq_len
    reset_data: bool = False  # --reset-data-position: the loader starts from its beginning


def resume_point(config: JobConfig, resume_from: str | None, reset_data: bool = False) -> ResumePoint | None:
    """Where this run continues, or None for a fresh start. `resume_from` is read as `checkpoint.resolve_checkpoint`
    reads a path (a complete tag folder is itself, a folder its `latest`), default checkpoint.dir; a damaged
    `latest` falls back to the newest sound older checkpoint, warned. Every rank verifies and agrees."""
    if resume_from and checkpoint.is_complete(Path(resume_from)):  # one tag folder named: that one or none
        candidates, notes = [Path(resume_from)], []
    else:
        candidates, notes = checkpoint.resume_candidates(resume_from or config.checkpoint.dir)
        if resume_from and not candidates and not notes:
            raise checkpoint.CheckpointError(f"--resume-from {resume_from}: neither a complete checkpoint (no "
                                             f"{checkpoint.JOB_FILE}) nor a folder with {checkpoint.LATEST}", agreed=True)
    tag_dir = checkpoint.first_sound(candidates, notes)  # verified by every rank; a damaged one falls back, warned
    if tag_dir is None:
        return None
    job = checkpoint.read_job(tag_dir)
    changes = checkpoint.check_compatible(job["config"], config)
    parallel = job["config"]["parallel"]
    saved = (job["world_size"], parallel["tp"], parallel.get("cp", 1), job["config"]["train"]["zero_stage"])
    relayout = saved != (dist.get_world_size(), config.parallel.tp, config.parallel.cp, config.train.zero_stage)
    if relayout and config.train.zero_stage == 3:
        raise checkpoint.CheckpointError(
            f"{tag_dir} was written by {saved[0]} ranks, tp={saved[1]}, ZeRO-{saved[2]}; loading it at another layout "
            "goes through DeepSpeed's universal checkpoint, which this DeepSpeed cannot load into ZeRO-3: resume "
            "with train.zero_stage 1 or 2"
        )
    return ResumePoint(tag_dir, job, changes, relayout, {"path": config.data.path, "seq_len": config.data.seq_len},
                        reset_data)


def restore(engine, resume: ResumePoint, loader, scheduler, recipe_groups: list[dict]) -> int:
    """Load model, optimizer and scheduler states (weights-only reads), the RNG and the data position; returns the
    step to continue from. With the same layout every rank gets exactly its own state back; after a change of
    layout ranks that did not exist take rank 0's RNG state, and the data position is re-split by epoch fraction.
    This recipe's optimizer hyperparameters and schedule then replace the restored ones (`apply_recipe`)."""
    tag_dir = resume.tag_dir
    source = to_universal(tag_dir) if resume.relayout else tag_dir
    with checkpoint.deepspeed_loads(engine):
        load_path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
    if load_path is None:
        raise checkpoint.CheckpointError(f"DeepSpeed could not load {source}")
    apply_recipe(scheduler, recipe_groups)
    saved_world = resume.job["world_size"]
    rank_state = checkpoint.load_rank_state(tag_dir, dist.get_rank() if dist.get_rank() < saved_world else 0, saved_world)
    if loader is not None:
        restore_data_position(loader, resume, rank_state)
    checkpoint.set_rng_state(rank_state["rng"])
    return resume.job["step"]


def apply_recipe(scheduler, recipe_groups: list[dict]) -> None:
    """Put this recipe's optimizer hyperparameters (lr, betas, eps, weight decay) and schedule back after a load:
    DeepSpeed restores the saved param_groups and the scheduler's base lrs, which would keep the checkpoint's
    values although the change is logged. The schedule's position (last_epoch) stays the checkpoint's; its shape
    (warmup, decay, train.steps) is this recipe's lr_lambda already."""
    groups = scheduler.optimizer.param_groups
    if len(groups) != len(recipe_groups):
        raise checkpoint.CheckpointError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this recipe "
                                         f"{len(recipe_groups)}")
    for group, recipe in zip(groups, recipe_groups):
        group.update({k: v for k, v in recipe.items() if k != "lr"})
    scheduler.base_lrs = [g["initial_lr"] for g in recipe_groups]
    for group, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]


def restore_data_position(loader, resume: ResumePoint, rank_state: dict) -> None:
    """The saved data position, unless the data changed (refused, said in words) or --reset-data-position."""
    state = checkpoint.load_rank_state(resume.tag_dir, 0)["data"] if resume.relayout else rank_state["data"]
    change = checkpoint.describe_data_change(resume.job["config"]["data"], resume.data,
                                             state["order"] if state else None, loader.dataset.identity)
    if resume.reset_data:
        if dist.get_rank() == 0:
            print(f"data position reset (--reset-data-position): reading {resume.data['path'] or 'the embedded default'}"
                  f" dataset at seq_len {resume.data['seq_len']} from its beginning" + (f"; {change}" if change else ""),
                  flush=True)
        return
    if change or state is None:
        why = f"was reading other data: {change}" if change else "holds no data position (written without a loader)"
        raise checkpoint.CheckpointError(
            f"{resume.tag_dir} {why}. Pass --reset-data-position to read this run's data from its beginning (the "
            f"model, optimizer and schedule continue from step {resume.job['step']})", agreed=True)
    loader.load_state_dict(state, allow_resplit=resume.relayout)
