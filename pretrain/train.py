"""Pretrain a Titans LM with DeepSpeed ZeRO over megatron-core TP x DP groups.

    deepspeed [--hostfile H] pretrain/train.py --config configs/train/tiny_cpu.yaml [key=value ...]
    python pretrain/train.py --config ...        # one process, no launcher

Rank 0 logs loss, lr, grad norm, tokens/s, MFU and peak memory (stdout, a progress bar, TensorBoard, a JSONL
metrics file), evaluates validation loss/perplexity every `train.eval_every` steps and writes sharded checkpoints
(`pretrain/checkpoint.py`) every `checkpoint.every` steps, at the end, and on SIGTERM/SIGUSR1 (preemption) before
exiting. A run whose checkpoint.dir has a `latest` resumes from it; `--resume-from PATH` names one.
"""

from __future__ import annotations

from pretrain import quiet  # first: importing it filters known harmless library warnings before megatron/DeepSpeed load

import argparse
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import checkpoint
from pretrain.config import JobConfig, deepspeed_config, load_job_config
from pretrain.flops import device_peak_flops, flops_per_token, parameter_counts
from pretrain.monitor import Monitor, dataset_line, startup_lines
from pretrain.optim import build_optimizer
from pretrain.preemption import PreemptionFlag, mark_clean_exit
from titans_parallel import TitansLM
from titans_parallel.parallel import destroy_parallel, init_parallel
from titans_parallel.parallel.grads import register_sequence_parallel_grad_hooks
from titans_parallel.parallel.metadata import universal_checkpoint_info

BatchSource = Callable[[int, int], torch.Tensor]  # (step, micro_step) -> tokens [B, seq_len + 1] for this rank


@dataclass
class TrainResult:
    first_step: int = 0  # steps already done when this run started (resumed from a checkpoint)
    losses: list[float] = field(default_factory=list)  # mean over micro-batches and DP ranks, per step run here
    grad_norms: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_second: float = 0.0
    preempted: bool = False  # stopped early by SIGTERM/SIGUSR1 after writing a checkpoint


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (configs/train/...)")
    parser.add_argument("--resume-from", default=None, help="a checkpoint tag folder, or a checkpoint folder (its latest)")
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
    if train(config, resume_from=args.resume_from).preempted:
        mark_clean_exit()  # tells the launch scripts' supervisor this rank stopped cleanly


def train(config: JobConfig, batches: BatchSource | None = None, resume_from: str | None = None) -> TrainResult:
    """Run the job on this rank (torch.distributed env set by a launcher or `ensure_distributed_env`).

    `batches` replaces the data loader (tests feed exact global batches); by default the loader streams
    `data.path` (or the embedded default dataset), split by data-parallel rank. Resumes from `resume_from`, else
    from checkpoint.dir's `latest` when there is one.
    """
    import deepspeed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        with quiet.filtered_stdout():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    quiet.rank_policy(dist.get_rank())
    dims = init_parallel(config.parallel.tp, sequence_parallel=config.parallel.sequence_parallel, seed=config.train.seed)
    try:
        return _train(config, dims, batches, deepspeed, resume_from)
    finally:
        destroy_parallel()


@dataclass
class _ResumePoint:
    tag_dir: Path
    job: dict  # the checkpoint's job.json
    changes: list[str]  # allowed config changes (optimizer, schedule, ...), logged
    relayout: bool  # written with another world size, TP degree or ZeRO stage: load through a universal checkpoint


def _resume_point(config: JobConfig, resume_from: str | None) -> _ResumePoint | None:
    tag_dir = (checkpoint.resolve_resume_path(resume_from) if resume_from
               else checkpoint.find_resume_point(config.checkpoint.dir))
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
    return _ResumePoint(tag_dir, job, changes, relayout)


def _universal_checkpoint(tag_dir: Path) -> Path:
    """DeepSpeed's universal form of a checkpoint (made once by rank 0 with ds_to_universal, then reused):
    parameters and optimizer states merged over TP and ZeRO shards, loadable at any layout."""
    out = tag_dir.parent / "universal" / tag_dir.name
    if dist.get_rank() == 0 and not (out / checkpoint.JOB_FILE).is_file():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        workers = max(1, min(8, (os.cpu_count() or 1) // 2))
        ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=workers,
                                  num_merge_workers=workers, keep_temp_folder=False, strict=True,
                                  inject_missing_state=False))
        shutil.copy(tag_dir / checkpoint.JOB_FILE, out / checkpoint.JOB_FILE)  # marks the conversion complete
    dist.barrier()
    return out


def _train(config: JobConfig, dims, batches: BatchSource | None, deepspeed, resume_from: str | None) -> TrainResult:
    is_main = dist.get_rank() == 0
    resume = _resume_point(config, resume_from)
    model = TitansLM(config.model)
    register_sequence_parallel_grad_hooks(model)
    optimizer, scheduler = build_optimizer(model, config)
    ds_config = deepspeed_config(config)
    if resume is not None and resume.relayout:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=dims.mpu
    )
    if config.train.zero_stage == 3:
        _register_mixer_parameters(engine.module, deepspeed)
    loader = val_root = None
    if batches is None:
        loader, val_root = _build_loader(config, dims)
    first_step = 0
    if resume is not None:
        first_step = _load(engine, resume, loader)
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
    for step in range(first_step, train_cfg.steps):
        step_start = time.perf_counter()
        loss_sum = torch.zeros((), device=engine.device)
        for micro in range(train_cfg.grad_accum):
            tokens = batches(step, micro).to(engine.device)
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(loss)
            if micro == train_cfg.grad_accum - 1:
                grad_norm = _global_grad_norm(engine)
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
        if val_root is not None and train_cfg.eval_every and (done % train_cfg.eval_every == 0 or done == train_cfg.steps):
            result.val_losses[done] = _evaluate(engine, config, dims, val_root)
            log.validation(done, result.val_losses[done])
        preempted = stop.agreed(engine.device)
        if preempted or config.checkpoint.every and done % config.checkpoint.every == 0 or done == train_cfg.steps:
            rank_state = {"data": loader.state_dict() if loader is not None else None}
            save_start = time.perf_counter()
            tag_dir = checkpoint.save(engine, config, done, tokens_per_step * done, rank_state, universal_info, version)
            log.checkpoint(tag_dir, time.perf_counter() - save_start)
        if preempted:
            result.preempted = True
            log.message(f"preempted: checkpoint written at step {done}, exiting")
            break
    stop.restore()
    result.tokens_per_second = tokens_per_step * len(result.losses) / (time.perf_counter() - start_time)
    log.close(result)
    return result


def _register_mixer_parameters(model: TitansLM, deepspeed) -> None:
    """ZeRO-3 gathers a module's parameters when that module's forward runs. Mixers also use their submodules'
    parameters directly (MAC's retrieval reads the memory's projections, persistent tokens and attention prefixes
    are multiplied by hand), so every mixer's parameters are registered as its own: gathered for its whole forward
    and backward."""
    for block in model.layers:
        for param in block.mixer.parameters():
            deepspeed.zero.register_external_parameter(block.mixer, param)


def _load(engine, resume: _ResumePoint, loader) -> int:
    """Load model, optimizer and scheduler states, the RNG and the data position; returns the step to continue
    from. With the same layout every rank gets exactly its own state back; after a change of layout ranks that did
    not exist take rank 0's RNG state, and the data position is re-split by epoch fraction."""
    tag_dir = resume.tag_dir
    source = _universal_checkpoint(tag_dir) if resume.relayout else tag_dir
    load_path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
    if load_path is None:
        raise checkpoint.CheckpointError(f"DeepSpeed could not load {source}")
    rank = dist.get_rank() if dist.get_rank() < resume.job["world_size"] else 0
    rank_state = checkpoint.load_rank_state(tag_dir, rank)
    if loader is not None:
        loader.load_state_dict(checkpoint.load_rank_state(tag_dir, 0)["data"] if resume.relayout else rank_state["data"],
                               allow_resplit=resume.relayout)
    checkpoint.set_rng_state(rank_state["rng"])
    return resume.job["step"]


def _global_grad_norm(engine) -> float | None:
    """The pre-clipping global gradient norm when the engine will not record it (ZeRO-0 in fp32 clips without
    keeping the norm); DeepSpeed's own rule, so TP-sharded parameters count once per shard. None otherwise."""
    if engine.zero_optimization_stage() or engine.bfloat16_enabled():
        return None
    from deepspeed.runtime.utils import clip_grad_norm_

    return float(clip_grad_norm_(engine.module.parameters(), max_norm=float("inf"), mpu=engine.mpu))


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


if __name__ == "__main__":
    main()
