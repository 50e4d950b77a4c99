"""Pretrain a Titans LM with DeepSpeed ZeRO over megatron-core TP x DP groups.

    deepspeed [--hostfile H] pretrain/train.py --config configs/train/tiny_cpu.yaml [key=value ...]
    python pretrain/train.py --config ...        # one process, no launcher

Rank 0 logs loss, lr, grad norm, tokens/s, MFU and peak memory (stdout, a progress bar, TensorBoard, a JSONL
metrics file), evaluates validation loss/perplexity and the S-NIAH accuracies of `train.eval_tasks` every
`train.eval_every` steps and writes sharded checkpoints
(`pretrain/checkpoint.py`) every `checkpoint.every` steps, at the end, and on SIGTERM/SIGUSR1 (preemption) before
exiting. A run whose checkpoint.dir has a `latest` resumes from it (the newest sound older checkpoint when that one
is damaged, with a warning); `--resume-from PATH` names one; `--reset-data-position` reads the data from its
beginning (to continue on another dataset or data.seq_len). Rank 0 locks checkpoint.dir (lock.json) for the job.

A non-finite loss or gradient norm on any rank stops every rank in that step with a one-line error and exit code 1,
before any checkpoint of it is written (`train.on_nonfinite=skip`: skip that update instead, up to
`train.max_skipped_steps` times). Testing aid: TITANS_INJECT_NAN_AT_STEP=K[:RANK] makes rank RANK's (default: the
last rank's) loss NaN at step K.

Checkpoint files (`*_model_states.pt`, `*_optim_states.pt` of DeepSpeed, `rank{r}.pt`) are pickles. They are read
weights-only (tensors, plain data and a short list of numpy and DeepSpeed classes), so a crafted one is refused
rather than run; still, resume only from checkpoints you trust.
"""

from __future__ import annotations

from pretrain import quiet  # first: importing it filters known harmless library warnings before megatron/DeepSpeed load

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import isfinite
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import checkpoint
from pretrain.config import JobConfig, load_job_config, run_cli
from pretrain.engine import build_engine, global_grad_norm, init_distributed
from pretrain.eval.niah import fixed_task_batches
from pretrain.eval.tasks import TaskBatch, score
from pretrain.flops import device_peak_flops, flops_per_token, parameter_counts
from pretrain.monitor import Monitor, dataset_line, startup_lines
from pretrain.preemption import PreemptionFlag, mark_clean_exit
from pretrain.universal import to_universal, universal_checkpoint_info
from titans_parallel import TitansLM
from titans_parallel.parallel import destroy_parallel, init_parallel
from titans_parallel.parallel.grads import register_sequence_parallel_grad_hooks

BatchSource = Callable[[int, int], torch.Tensor]  # (step, micro_step) -> tokens [B, seq_len + 1] for this rank


@dataclass
class TrainResult:
    first_step: int = 0  # steps already done when this run started (resumed from a checkpoint)
    losses: list[float] = field(default_factory=list)  # mean over micro-batches and DP ranks, per step run here
    grad_norms: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    task_accuracies: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> {"passkey@256": exact acc}
    tokens_per_second: float = 0.0
    preempted: bool = False  # stopped early by SIGTERM/SIGUSR1 after writing a checkpoint
    skipped_steps: list[int] = field(default_factory=list)  # non-finite steps whose update was skipped


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (configs/train/...)")
    parser.add_argument("--resume-from", default=None, help="a checkpoint tag folder, or a checkpoint folder (its latest)")
    parser.add_argument("--reset-data-position", action="store_true",
                        help="on resume, read the data from its beginning (after a change of dataset or data.seq_len)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides are key.sub=value")
    return args, rest


def ensure_distributed_env() -> None:
    """Let `python pretrain/train.py` run as a single rank without a launcher; refuse `srun python
    pretrain/train.py` with several tasks (each would train alone, on the whole data, into one checkpoint dir)."""
    if "RANK" in os.environ:
        return
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" in os.environ and tasks > 1:
        raise SystemExit(
            f"pretrain/train.py was started as SLURM task {os.environ['SLURM_PROCID']} of {tasks} without a launcher "
            "(RANK/WORLD_SIZE unset): each task would train alone. Start one deepspeed launcher per node instead: "
            "sbatch --nodes N launch/slurm.sbatch CONFIG [key=value ...]"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    config = load_job_config(args.config, overrides)  # fails before any process group exists
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % config.parallel.tp:
        raise SystemExit(f"world size {world} is not divisible by parallel.tp={config.parallel.tp}")
    ensure_distributed_env()
    try:
        result = train(config, resume_from=args.resume_from, reset_data_position=args.reset_data_position)
    except (checkpoint.CheckpointError, DivergenceError) as e:  # one line; rank 0 speaks for errors all ranks share
        if os.environ.get("RANK", "0") == "0" or not getattr(e, "agreed", False):
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if result.preempted:
        mark_clean_exit()  # tells the launch scripts' supervisor this rank stopped cleanly


def train(config: JobConfig, batches: BatchSource | None = None, resume_from: str | None = None,
          reset_data_position: bool = False) -> TrainResult:
    """Run the job on this rank (torch.distributed env set by a launcher or `ensure_distributed_env`).

    `batches` replaces the data loader (tests feed exact global batches); by default the loader streams
    `data.path` (or the embedded default dataset), split by data-parallel rank. Resumes from `resume_from`, else
    from checkpoint.dir's `latest` when there is one (`reset_data_position`: the loader starts from its beginning).
    Rank 0 holds checkpoint.dir's lock meanwhile.
    """
    init_distributed()
    quiet.rank_policy(dist.get_rank())
    dims = init_parallel(config.parallel.tp, sequence_parallel=config.parallel.sequence_parallel, seed=config.train.seed)
    try:
        with checkpoint.locked(config.checkpoint.dir):
            return _train(config, dims, batches, resume_from, reset_data_position)
    finally:
        destroy_parallel()


@dataclass
class _ResumePoint:
    tag_dir: Path
    job: dict  # the checkpoint's job.json
    changes: list[str]  # allowed config changes (optimizer, schedule, ...), logged
    relayout: bool  # written with another world size, TP degree or ZeRO stage: load through a universal checkpoint
    data: dict = field(default_factory=dict)  # this run's data.path and data.seq_len
    reset_data: bool = False  # --reset-data-position: the loader starts from its beginning


def _resume_point(config: JobConfig, resume_from: str | None, reset_data: bool = False) -> _ResumePoint | None:
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
    saved = (job["world_size"], job["config"]["parallel"]["tp"], job["config"]["train"]["zero_stage"])
    relayout = saved != (dist.get_world_size(), config.parallel.tp, config.train.zero_stage)
    if relayout and config.train.zero_stage == 3:
        raise checkpoint.CheckpointError(
            f"{tag_dir} was written by {saved[0]} ranks, tp={saved[1]}, ZeRO-{saved[2]}; loading it at another layout "
            "goes through DeepSpeed's universal checkpoint, which this DeepSpeed cannot load into ZeRO-3: resume "
            "with train.zero_stage 1 or 2"
        )
    return _ResumePoint(tag_dir, job, changes, relayout, {"path": config.data.path, "seq_len": config.data.seq_len},
                        reset_data)


def _train(config: JobConfig, dims, batches: BatchSource | None, resume_from: str | None,
           reset_data_position: bool = False) -> TrainResult:
    is_main = dist.get_rank() == 0
    resume = _resume_point(config, resume_from, reset_data_position)
    model = TitansLM(config.model)
    register_sequence_parallel_grad_hooks(model)
    built = build_engine(config, model, load_universal=resume is not None and resume.relayout)
    engine, scheduler, recipe_groups = built.engine, built.scheduler, built.recipe_groups
    loader = val_root = None
    eval_tasks = {}
    if batches is None:
        loader, val_root = _build_loader(config, dims)
        eval_tasks = fixed_task_batches(config.train.eval_tasks, val_root, config.model.vocab_size, config.train.seed,
                                        config.train.micro_batch_size)
    first_step = 0
    if resume is not None:
        first_step = _load(engine, resume, loader, scheduler, recipe_groups)
        if is_main:
            how = " (re-laid out through a universal checkpoint)" if resume.relayout else ""
            changed = f"; changed: {', '.join(resume.changes)}" if resume.changes else ""
            print(f"resumed from {resume.tag_dir} at step {first_step}{how}{changed}", flush=True)
    if loader is not None:
        batches = _loader_batches(loader)

    train_cfg = config.train
    tokens_per_step = train_cfg.micro_batch_size * train_cfg.grad_accum * dims.dp_size * config.data.seq_len
    counts = parameter_counts(engine.module, dims.tp_size)
    step_flops = tokens_per_step * flops_per_token(config.model, counts.dense, config.data.seq_len)
    peak = device_peak_flops(train_cfg.precision, config.logging.peak_tflops)
    log = Monitor(config, is_main, first_step)
    if is_main:
        log.start(startup_lines(config, dims, counts, tokens_per_step, dataset_line(val_root, tokens_per_step, train_cfg.steps),
                                f"{dist.get_backend()} on {engine.device}"))
    result = TrainResult(first_step=first_step)
    version = checkpoint.code_version() if is_main else "unknown"
    universal_info = {"universal_checkpoint_info": universal_checkpoint_info(engine.module)}
    stop = PreemptionFlag()
    start_time = time.perf_counter()
    guard, nan_step = _DivergenceGuard(config), _injected_nan_step()
    for step in range(first_step, train_cfg.steps):
        step_start = time.perf_counter()
        loss_sum, dropped = torch.zeros((), device=engine.device), False
        for micro in range(train_cfg.grad_accum):
            tokens = batches(step, micro).to(engine.device)
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            if micro == train_cfg.grad_accum - 1 and step + 1 == nan_step:
                loss = loss * float("nan")  # fault injection (TITANS_INJECT_NAN_AT_STEP), a testing aid
            engine.backward(loss)
            if micro == train_cfg.grad_accum - 1:
                grad_norm = global_grad_norm(engine)
                dropped = grad_norm is not None and not isfinite(grad_norm)  # ZeRO-0 fp32 (agreed: a global norm)
            with _without_update(engine, dropped):
                engine.step()
            loss_sum += loss.detach().float()
        dist.all_reduce(loss_sum, group=dims.dp_group)
        step_loss = loss_sum.item() / (train_cfg.grad_accum * dims.dp_size)
        grad_norm = float(engine.get_global_grad_norm() if grad_norm is None else grad_norm)
        result.losses.append(step_loss)
        result.grad_norms.append(grad_norm)
        seconds = time.perf_counter() - step_start
        log.step(step, step_loss, scheduler.get_last_lr()[0], grad_norm, tokens_per_step / seconds,
                 step_flops / seconds / (peak * dist.get_world_size()) if peak else None)
        done = step + 1
        if guard.check(done, step_loss, grad_norm, engine, scheduler, dropped):  # DivergenceError: stop
            result.skipped_steps.append(done)
            log.message(f"step {done}: non-finite loss or gradient norm, update skipped ({len(result.skipped_steps)} "
                        f"of train.max_skipped_steps={train_cfg.max_skipped_steps})")
        if val_root is not None and train_cfg.eval_every and (done % train_cfg.eval_every == 0 or done == train_cfg.steps):
            result.val_losses[done] = _evaluate(engine, config, dims, val_root)
            result.task_accuracies[done] = _evaluate_tasks(engine, eval_tasks)
            log.validation(done, result.val_losses[done], result.task_accuracies[done])
        preempted = stop.agreed(engine.device)
        if preempted or config.checkpoint.every and done % config.checkpoint.every == 0 or done == train_cfg.steps:
            rank_state = {"data": loader.state_dict() if loader is not None else None}
            save_start = time.perf_counter()
            tag_dir = _save(engine, config, done, tokens_per_step * done, rank_state, universal_info, version, step_loss)
            log.checkpoint(tag_dir, time.perf_counter() - save_start)
        if preempted:
            result.preempted = True
            log.message(f"preempted: checkpoint written at step {done}, exiting")
            break
    stop.restore()
    result.tokens_per_second = tokens_per_step * len(result.losses) / (time.perf_counter() - start_time)
    log.close(result)
    return result


def _load(engine, resume: _ResumePoint, loader, scheduler, recipe_groups: list[dict]) -> int:
    """Load model, optimizer and scheduler states (weights-only reads), the RNG and the data position; returns the
    step to continue from. With the same layout every rank gets exactly its own state back; after a change of
    layout ranks that did not exist take rank 0's RNG state, and the data position is re-split by epoch fraction.
    This recipe's optimizer hyperparameters and schedule then replace the restored ones (`_apply_recipe`)."""
    tag_dir = resume.tag_dir
    source = to_universal(tag_dir) if resume.relayout else tag_dir
    with checkpoint.deepspeed_loads(engine):
        load_path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
    if load_path is None:
        raise checkpoint.CheckpointError(f"DeepSpeed could not load {source}")
    _apply_recipe(scheduler, recipe_groups)
    saved_world = resume.job["world_size"]
    rank_state = checkpoint.load_rank_state(tag_dir, dist.get_rank() if dist.get_rank() < saved_world else 0, saved_world)
    if loader is not None:
        _restore_data_position(loader, resume, rank_state)
    checkpoint.set_rng_state(rank_state["rng"])
    return resume.job["step"]


def _apply_recipe(scheduler, recipe_groups: list[dict]) -> None:
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


def _restore_data_position(loader, resume: _ResumePoint, rank_state: dict) -> None:
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


class DivergenceError(RuntimeError):
    """A non-finite loss, gradient norm or weights stopped the job; every rank raises it in the same step."""

    agreed = True


class _DivergenceGuard:
    """A non-finite loss or gradient norm on any rank, agreed by every rank in the same step (one small all-reduce).
    train.on_nonfinite=stop raises DivergenceError; =skip lets the step pass without its update (DeepSpeed's ZeRO 1-3
    and bf16 optimizers skip a step whose gradient norm is not finite, ZeRO-0 fp32 drops its gradients) while the
    schedule moves on, up to train.max_skipped_steps times; a bad step whose update was applied always stops."""

    def __init__(self, config: JobConfig):
        self.policy, self.limit = config.train.on_nonfinite, config.train.max_skipped_steps
        self.latest = Path(config.checkpoint.dir) / checkpoint.LATEST
        self.skipped = 0

    def check(self, step: int, loss: float, grad_norm: float, engine, scheduler, dropped: bool) -> bool:
        """True when step's update was skipped; DivergenceError when the job stops."""
        bad = torch.tensor(float(not (isfinite(loss) and isfinite(grad_norm))), device=engine.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            return False
        applied = engine.was_step_applied() and not dropped
        if self.policy == "skip" and not applied and self.skipped < self.limit:
            self.skipped += 1
            if not engine.was_step_applied():  # DeepSpeed held the scheduler back with the update
                scheduler.step()
            return True
        why = ("train.on_nonfinite=stop" if self.policy == "stop" else "its update was applied" if applied
               else f"{self.skipped} updates skipped already, train.max_skipped_steps={self.limit}")
        newest = self.latest.read_text().strip() if self.latest.is_file() else "none"
        raise DivergenceError(
            f"step {step}: non-finite loss ({loss:.4g}) or gradient norm ({grad_norm:.4g}); stopping ({why}). No "
            f"checkpoint of it was written; the newest is {newest} in {self.latest.parent}: resume from it with a "
            "lower optimizer.lr, or set train.on_nonfinite=skip")


def _injected_nan_step() -> int | None:
    """TITANS_INJECT_NAN_AT_STEP=K[:RANK] (a testing aid): the step (1-based) at which this rank's loss becomes NaN,
    on rank RANK (default: the last); None elsewhere or when unset."""
    value = os.environ.get("TITANS_INJECT_NAN_AT_STEP")
    if not value:
        return None
    step, _, rank = value.partition(":")
    return int(step) if int(rank or dist.get_world_size() - 1) == dist.get_rank() else None


@contextmanager
def _without_update(engine, skip: bool) -> Iterator[None]:
    """ZeRO-0 in fp32 has no overflow check of its own (ZeRO 1-3 and bf16 skip a step whose gradient norm is not
    finite): when `skip`, engine.step runs (gradients cleared, schedule stepped) without the optimizer's step, so
    every parameter and its moments stay as they were."""
    if skip:
        engine.optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if skip:
            del engine.optimizer.step


def _save(engine, config: JobConfig, step: int, tokens_seen: int, rank_state: dict, extra: dict, version: str,
          loss: float) -> Path:
    """checkpoint.save, never of non-finite weights (every rank checks its own, one all-reduce)."""
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]  # ZeRO-3: this rank's partition
    bad = (~torch.stack([torch.isfinite(p).all() for p in params]).all()).float()
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise DivergenceError(f"step {step}: the weights are not finite; no checkpoint of them was written")
    return checkpoint.save(engine, config, step, tokens_seen, rank_state, extra, version,
                           loss=loss if isfinite(loss) else None)  # a skipped step's NaN loss: weights unchanged


def _build_loader(config: JobConfig, dims):
    from pretrain.data import build_loader, prepare_default_dataset
    from pretrain.data.default import default_dataset_dir

    root = config.data.path
    if root is None:  # rank 0 builds (or reuses) the embedded dataset; the loader's manifest check guards the rest
        if dist.get_rank() == 0:
            prepare_default_dataset(vocab_size=config.model.vocab_size, seq_len=config.data.seq_len,
                                    progress=sys.stderr.isatty())
        dist.barrier()
        root = default_dataset_dir(config.model.vocab_size, config.data.seq_len)
    loader = build_loader(
        root, batch_size=config.train.micro_batch_size, dp_rank=dims.dp_rank, dp_size=dims.dp_size,
        num_workers=config.data.num_workers, seq_len=config.data.seq_len, vocab_size=config.model.vocab_size,
        seed=config.train.seed, shuffle_buffer=config.data.shuffle_buffer, on_corrupt=config.data.on_corrupt,
        verify_sha256=config.data.verify_sha256,
    )
    return loader, root


def _loader_batches(loader) -> BatchSource:
    stream: Iterator[torch.Tensor] = iter(loader)
    return lambda step, micro: next(stream)


@torch.no_grad()
def _evaluate(engine, config: JobConfig, dims, root) -> float:
    """Mean validation loss over `train.eval_batches` fixed batches (every DP rank its own share)."""
    from pretrain.data import build_loader

    val = build_loader(
        root, batch_size=config.train.micro_batch_size, dp_rank=dims.dp_rank, dp_size=dims.dp_size, split="val",
        seq_len=config.data.seq_len, vocab_size=config.model.vocab_size, shuffle=False, epochs=1,
    )
    total, count = torch.zeros((), device=engine.device), torch.zeros((), device=engine.device)
    engine.eval()
    for _, tokens in zip(range(config.train.eval_batches), val):
        tokens = tokens.to(engine.device)
        total += engine(tokens[:, :-1], tokens[:, 1:]).float() * tokens.shape[0]
        count += tokens.shape[0]
    engine.train()
    dist.all_reduce(total, group=dims.dp_group)
    dist.all_reduce(count, group=dims.dp_group)
    return (total / count.clamp_min(1)).item()


@torch.no_grad()
def _evaluate_tasks(engine, tasks: dict[str, list[TaskBatch]]) -> dict[str, float]:
    """Exact accuracy of each `train.eval_tasks` entry on its fixed rows. Every rank runs the same rows through
    the engine (one-shot forward: TP gathers the logits, ZeRO-3 its parameters, in the same order everywhere), so
    every rank gets the same figures without a further collective."""
    engine.eval()
    accuracies = {}
    for name, batches in tasks.items():
        exact = [score(engine(b.inputs.to(engine.device)), b.targets.to(engine.device), b.mask.to(engine.device)).exact
                 for b in batches]
        accuracies[name] = torch.cat(exact).float().mean().item()
    engine.train()
    return accuracies


if __name__ == "__main__":
    run_cli(main)
