"""Pretrain a Titans LM with DeepSpeed ZeRO over megatron-core TP x DP groups.

    deepspeed [--hostfile H] pretrain/train.py --config configs/train/tiny_cpu.yaml [key=value ...]
    python pretrain/train.py --config ...        # one process, no launcher

Rank 0 logs loss, lr, grad norm, tokens/s, MFU and peak memory (stdout, a progress bar, TensorBoard), evaluates
validation loss/perplexity every `train.eval_every` steps and writes sharded checkpoints.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.config import JobConfig, deepspeed_config, load_job_config
from pretrain.flops import dense_parameter_count, device_peak_flops, flops_per_token
from pretrain.optim import build_optimizer
from titans_parallel import TitansLM
from titans_parallel.parallel import destroy_parallel, init_parallel
from titans_parallel.parallel.grads import register_sequence_parallel_grad_hooks
from titans_parallel.typed_config import to_mapping

BatchSource = Callable[[int, int], torch.Tensor]  # (step, micro_step) -> tokens [B, seq_len + 1] for this rank


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean over micro-batches and DP ranks, per step
    grad_norms: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_second: float = 0.0


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (configs/train/...)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides are key.sub=value")
    return args, rest


def ensure_distributed_env() -> None:
    """Let `python pretrain/train.py` run as a single rank without a launcher."""
    if "RANK" in os.environ:
        return
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
    train(config)


def train(config: JobConfig, batches: BatchSource | None = None) -> TrainResult:
    """Run the job on this rank (torch.distributed env set by a launcher or `ensure_distributed_env`).

    `batches` replaces the data loader (tests feed exact global batches); by default the loader streams
    `data.path` (or the embedded default dataset), split by data-parallel rank.
    """
    import deepspeed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    dims = init_parallel(config.parallel.tp, sequence_parallel=config.parallel.sequence_parallel, seed=config.train.seed)
    try:
        return _train(config, dims, batches, deepspeed)
    finally:
        destroy_parallel()


def _train(config: JobConfig, dims, batches: BatchSource | None, deepspeed) -> TrainResult:
    is_main = dist.get_rank() == 0
    model = TitansLM(config.model)
    register_sequence_parallel_grad_hooks(model)
    optimizer, scheduler = build_optimizer(model, config)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config), mpu=dims.mpu
    )
    loader = val_root = None
    if batches is None:
        loader, val_root = _build_loader(config, dims)
        batches = _loader_batches(loader)

    train_cfg = config.train
    tokens_per_step = train_cfg.micro_batch_size * train_cfg.grad_accum * dims.dp_size * config.data.seq_len
    step_flops = tokens_per_step * flops_per_token(
        config.model, dense_parameter_count(engine.module) * dims.tp_size, config.data.seq_len
    )
    peak = device_peak_flops(train_cfg.precision, config.logging.peak_tflops)
    log = _Logger(config, is_main)
    result = TrainResult()
    start_time = time.perf_counter()
    for step in range(train_cfg.steps):
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
        if config.checkpoint.every and done % config.checkpoint.every == 0 or done == train_cfg.steps:
            _save(engine, config, done, loader, tokens_per_step * done)
    result.tokens_per_second = tokens_per_step * train_cfg.steps / (time.perf_counter() - start_time)
    log.close(result)
    return result


def _global_grad_norm(engine) -> float | None:
    """The pre-clipping global gradient norm when the engine will not record it (ZeRO-0 in fp32 clips without
    keeping the norm); DeepSpeed's own rule, so TP-sharded parameters count once per shard. None otherwise."""
    if engine.zero_optimization_stage() or engine.bfloat16_enabled():
        return None
    from deepspeed.runtime.utils import clip_grad_norm_

    return float(clip_grad_norm_(engine.module.parameters(), max_norm=float("inf"), mpu=engine.mpu))


def _build_loader(config: JobConfig, dims):
    from pretrain.data import build_loader, prepare_default_dataset

    root = config.data.path
    if root is None:
        if dist.get_rank() == 0:
            prepare_default_dataset(vocab_size=config.model.vocab_size, seq_len=config.data.seq_len)
        dist.barrier()
        root = prepare_default_dataset(vocab_size=config.model.vocab_size, seq_len=config.data.seq_len, progress=False)
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
    for i, tokens in zip(range(config.train.eval_batches), val):
        tokens = tokens.to(engine.device)
        total += engine(tokens[:, :-1], tokens[:, 1:]).float() * tokens.shape[0]
        count += tokens.shape[0]
    engine.train()
    dist.all_reduce(total, group=dims.dp_group)
    dist.all_reduce(count, group=dims.dp_group)
    return (total / count.clamp_min(1)).item()


def _save(engine, config: JobConfig, step: int, loader, tokens_seen: int) -> None:
    state = {"step": step, "tokens_seen": tokens_seen, "config": to_mapping(config),
             "data": loader.state_dict() if loader is not None else None}
    engine.save_checkpoint(config.checkpoint.dir, tag=f"step{step:08d}", client_state=state)
    if dist.get_rank() == 0 and config.checkpoint.keep > 0:
        tags = sorted(p for p in Path(config.checkpoint.dir).glob("step*") if p.is_dir())
        for old in tags[: -config.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


class _Logger:
    """Rank 0: a line every `logging.every` steps, a tqdm bar with ETA, TensorBoard scalars."""

    def __init__(self, config: JobConfig, enabled: bool):
        self.enabled, self.every = enabled, config.logging.every
        self.bar = self.writer = None
        if not enabled:
            return
        if config.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=config.train.steps, desc="train", unit="step", dynamic_ncols=True)
        if config.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(config.logging.tensorboard_dir)

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float, mfu: float | None):
        if not self.enabled:
            return
        peak_gib = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if (step + 1) % self.every == 0 or step == 0:
            mfu_text = f" mfu {mfu:.1%}" if mfu is not None else ""
            self._print(f"step {step + 1} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                        f"tokens/s {tokens_per_s:,.0f}{mfu_text} peak_mem {peak_gib:.2f}GiB")
        if self.writer is not None:
            for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm), ("tokens_per_s", tokens_per_s),
                                ("peak_mem_gib", peak_gib)) + ((("mfu", mfu),) if mfu is not None else ()):
                self.writer.add_scalar(f"train/{name}", value, step + 1)

    def validation(self, step: int, loss: float) -> None:
        if self.enabled:
            self._print(f"step {step} val_loss {loss:.4f} val_ppl {torch.tensor(loss).exp().item():.2f}")
            if self.writer is not None:
                self.writer.add_scalar("val/loss", loss, step)

    def close(self, result: TrainResult) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        print(f"done: {len(result.losses)} steps, final loss {result.losses[-1]:.4f}, "
              f"{result.tokens_per_second:,.0f} tokens/s overall", flush=True)


if __name__ == "__main__":
    main()
