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
from dataclasses import dataclass, field
from math import isfinite
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pretrain import checkpoint
from pretrain.batches import BatchSource, build_job_loader, dataset_root, loader_batches, with_dataset_eos_id
from pretrain.config import JobConfig, load_job_config, run_cli
from pretrain.data import TokenLoader
from pretrain.denormals import flush_denormals
from pretrain.divergence import DivergenceError, DivergenceGuard, injected_nan_step, without_update
from pretrain.engine import Engine, build_engine, global_grad_norm, init_distributed
from pretrain.eval.niah import fixed_task_batches
from pretrain.eval.tasks import TaskBatch
from pretrain.flops import ParameterCounts, device_peak_flops, flops_per_token, parameter_counts
from pretrain.monitor import Monitor, dataset_line, startup_lines
from pretrain.preemption import PreemptionFlag, mark_clean_exit
from pretrain.resume import ResumePoint, restore, resume_point
from pretrain.universal import universal_checkpoint_info
from pretrain.validation import task_accuracies, validation_loss
from titans_parallel import TitansLM
from titans_parallel.parallel import ParallelDims, destroy_parallel, init_parallel
from titans_parallel.parallel.grads import register_sequence_parallel_grad_hooks


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
    if world % (config.parallel.tp * config.parallel.cp):
        raise SystemExit(f"world size {world} is not divisible by parallel.tp * parallel.cp = "
                         f"{config.parallel.tp} * {config.parallel.cp}")
    ensure_distributed_env()
    flush_denormals()
    started_group = not dist.is_initialized()
    try:
        result = train(config, resume_from=args.resume_from, reset_data_position=args.reset_data_position)
    except (checkpoint.CheckpointError, DivergenceError) as e:  # one line; rank 0 speaks for errors all ranks share
        if os.environ.get("RANK", "0") == "0" or not getattr(e, "agreed", False):
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        # The process group train() started is torn down while the interpreter is whole: left to interpreter exit,
        # gloo's worker threads can abort the process (SIGABRT, "terminate called without an active exception")
        # after a run that finished, and the launcher then reports failure.
        if started_group and dist.is_initialized():
            dist.destroy_process_group()
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
    dims = init_parallel(config.parallel.tp, config.parallel.cp, sequence_parallel=config.parallel.sequence_parallel,
                         seed=config.train.seed)
    try:
        with checkpoint.locked(config.checkpoint.dir):
            return _train(config, dims, batches, resume_from, reset_data_position)
    finally:
        destroy_parallel()


def _train(config: JobConfig, dims: ParallelDims, batches: BatchSource | None, resume_from: str | None,
           reset_data_position: bool = False) -> TrainResult:
    """Build, resume, then the loop: a step, its log line, the divergence check, evaluation and checkpoint when
    due, preemption."""
    if batches is None:
        config = with_dataset_eos_id(config, dataset_root(config))
    resume = resume_point(config, resume_from, reset_data_position)
    model = TitansLM(config.model, dims)
    model.activation_checkpointing = config.train.activation_checkpointing
    register_sequence_parallel_grad_hooks(model, dims)
    built = build_engine(config, model, load_universal=resume is not None and resume.relayout)
    engine, scheduler = built.engine, built.scheduler
    data = _Data.build(config, dims) if batches is None else _Data(batches)
    first_step = 0 if resume is None else _resume(built, resume, data.loader)
    batches = data.batches or loader_batches(data.loader)
    throughput = _Throughput.of(config, dims, engine.module)
    log = _start_monitor(config, dims, engine, first_step, throughput, data.root)
    result = TrainResult(first_step=first_step)
    saver = _Checkpointer(config, engine, data.loader, throughput.tokens_per_step)
    guard, nan_step, stop = DivergenceGuard(config), injected_nan_step(), PreemptionFlag()
    start_time = time.perf_counter()
    for step in range(first_step, config.train.steps):
        step_start = time.perf_counter()
        step_loss, grad_norm, dropped = _train_step(engine, batches, step, config, dims, nan_step)
        result.losses.append(step_loss)
        result.grad_norms.append(grad_norm)
        seconds = time.perf_counter() - step_start
        log.step(step, step_loss, scheduler.get_last_lr()[0], grad_norm, throughput.tokens_per_step / seconds,
                 throughput.mfu(seconds))
        done = step + 1
        if guard.check(done, step_loss, grad_norm, engine, scheduler, dropped):  # DivergenceError: stop
            result.skipped_steps.append(done)
            log.message(f"step {done}: non-finite loss or gradient norm, update skipped ({len(result.skipped_steps)} "
                        f"of train.max_skipped_steps={config.train.max_skipped_steps})")
        if data.root is not None and _evaluation_due(config, done):
            result.val_losses[done] = validation_loss(engine, config, dims, data.root)
            result.task_accuracies[done] = task_accuracies(engine, data.eval_tasks)
            log.validation(done, result.val_losses[done], result.task_accuracies[done])
        preempted = stop.agreed(engine.device)
        if preempted or _checkpoint_due(config, done):
            save_start = time.perf_counter()
            log.checkpoint(saver.save(done, step_loss), time.perf_counter() - save_start)
        if preempted:
            result.preempted = True
            log.message(f"preempted: checkpoint written at step {done}, exiting")
            break
    stop.restore()
    result.tokens_per_second = throughput.tokens_per_step * len(result.losses) / (time.perf_counter() - start_time)
    log.close(result)
    return result


@dataclass
class _Data:
    """The run's batches: the streaming loader over `root` (its position is checkpointed) with the fixed
    `train.eval_tasks` rows, or the batches a test feeds (`batches`: no loader, no evaluation)."""

    batches: BatchSource | None = None
    loader: TokenLoader | None = None
    root: Path | None = None
    eval_tasks: dict[str, list[TaskBatch]] = field(default_factory=dict)

    @classmethod
    def build(cls, config: JobConfig, dims: ParallelDims) -> _Data:
        root = dataset_root(config)
        tasks = fixed_task_batches(config.train.eval_tasks, root, config.model.vocab_size, config.train.seed,
                                   config.train.micro_batch_size)
        return cls(loader=build_job_loader(config, dims, root), root=root, eval_tasks=tasks)


def _resume(built: Engine, resume: ResumePoint, loader: TokenLoader | None) -> int:
    """Load the checkpoint into the engine (and the loader's position); says so on rank 0; the step reached."""
    first_step = restore(built.engine, resume, loader, built.scheduler, built.recipe_groups)
    if dist.get_rank() == 0:
        how = " (re-laid out through a universal checkpoint)" if resume.relayout else ""
        changed = f"; changed: {', '.join(resume.changes)}" if resume.changes else ""
        print(f"resumed from {resume.tag_dir} at step {first_step}{how}{changed}", flush=True)
    return first_step


@dataclass
class _Throughput:
    """Tokens and model FLOPs per optimizer step (all ranks), and the peak the MFU is measured against."""

    tokens_per_step: int
    step_flops: float
    peak: float | None  # per device, FLOP/s; None: MFU not reported
    counts: ParameterCounts

    @classmethod
    def of(cls, config: JobConfig, dims: ParallelDims, model: nn.Module) -> _Throughput:
        train_cfg = config.train
        tokens = train_cfg.micro_batch_size * train_cfg.grad_accum * dims.dp_size * config.data.seq_len
        counts = parameter_counts(model, dims.tp_size)
        flops = tokens * flops_per_token(config.model, counts.dense, config.data.seq_len)
        return cls(tokens, flops, device_peak_flops(train_cfg.precision, config.logging.peak_tflops), counts)

    def mfu(self, seconds: float) -> float | None:
        return self.step_flops / seconds / (self.peak * dist.get_world_size()) if self.peak else None


def _start_monitor(config: JobConfig, dims: ParallelDims, engine, first_step: int, throughput: _Throughput,
                   root: Path | None) -> Monitor:
    """The run's monitor (rank 0 writes; the others keep quiet) after rank 0's start-up lines."""
    is_main = dist.get_rank() == 0
    log = Monitor(config, is_main, first_step)
    if is_main:
        tokens = throughput.tokens_per_step
        log.start(startup_lines(config, dims, throughput.counts, tokens,
                                dataset_line(root, tokens, config.train.steps),
                                f"{dist.get_backend()} on {engine.device}"))
    return log


def _train_step(engine, batches: BatchSource, step: int, config: JobConfig, dims: ParallelDims,
                nan_step: int | None) -> tuple[float, float, bool]:
    """One optimizer step over train.grad_accum micro-batches: (loss averaged over micro-batches and DP ranks,
    global gradient norm, whether the update was dropped for a non-finite norm, ZeRO-0 fp32 only)."""
    accum = config.train.grad_accum
    loss_sum, dropped, grad_norm = torch.zeros((), device=engine.device), False, None
    for micro in range(accum):
        tokens = batches(step, micro).to(engine.device)
        loss = engine(tokens[:, :-1], tokens[:, 1:])
        if micro == accum - 1 and step + 1 == nan_step:
            loss = loss * float("nan")  # fault injection (TITANS_INJECT_NAN_AT_STEP), a testing aid
        engine.backward(loss)
        if micro == accum - 1:
            grad_norm = global_grad_norm(engine)
            dropped = grad_norm is not None and not isfinite(grad_norm)  # ZeRO-0 fp32 (agreed: a global norm)
        with without_update(engine, dropped):
            engine.step()
        loss_sum += loss.detach().float()
    dist.all_reduce(loss_sum, group=dims.dp_group)
    step_loss = loss_sum.item() / (accum * dims.dp_size)
    return step_loss, float(engine.get_global_grad_norm() if grad_norm is None else grad_norm), dropped


def _evaluation_due(config: JobConfig, done: int) -> bool:
    every = config.train.eval_every
    return bool(every) and (done % every == 0 or done == config.train.steps)


def _checkpoint_due(config: JobConfig, done: int) -> bool:
    """Every checkpoint.every steps and at the end (and on preemption, decided by the loop)."""
    every = config.checkpoint.every
    return bool(every) and done % every == 0 or done == config.train.steps


class _Checkpointer:
    """Writes this run's checkpoints: the engine's states, this rank's data position, the universal-checkpoint
    info and the code version; never non-finite weights."""

    def __init__(self, config: JobConfig, engine, loader: TokenLoader | None, tokens_per_step: int):
        self.config, self.engine, self.loader, self.tokens_per_step = config, engine, loader, tokens_per_step
        self.version = checkpoint.code_version() if dist.get_rank() == 0 else "unknown"
        self.extra = {"universal_checkpoint_info": universal_checkpoint_info(engine.module)}

    def save(self, step: int, loss: float) -> Path:
        """checkpoint.save of `step`, after every rank checked its own weights are finite (one all-reduce)."""
        params = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]  # ZeRO-3: this rank's part
        bad = (~torch.stack([torch.isfinite(p).all() for p in params]).all()).float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise DivergenceError(f"step {step}: the weights are not finite; no checkpoint of them was written")
        rank_state = {"data": self.loader.state_dict() if self.loader is not None else None}
        return checkpoint.save(self.engine, self.config, step, self.tokens_per_step * step, rank_state, self.extra,
                               self.version, loss=loss if isfinite(loss) else None)  # skipped step: weights unchanged


if __name__ == "__main__":
    run_cli(main)
