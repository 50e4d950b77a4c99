"""Rank 0's account of a run: what runs (the resolved config, parameter counts, layout, tokens per step, dataset),
how it goes (a line every `logging.every` steps, a progress bar on a terminal and plain progress in the step lines
otherwise, validation, checkpoint lines; TensorBoard and a strict-JSON metrics file), and how it ended.

The metrics file holds one JSON object per line: `{"step", "loss", "lr", "grad_norm", "tokens_per_s",
"peak_mem_gib"[, "mfu"]}` per step and `{"step", "val_loss", "val_ppl"[, "tasks": {"<task>@<length>": exact
accuracy}]}` per evaluation (`train.eval_tasks`); a non-finite value is written as null (the file stays strict
JSON: no bare NaN or Infinity).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from pretrain.config import JobConfig
from pretrain.flops import ParameterCounts
from titans_parallel.typed_config import to_mapping

RESOLVED_CONFIG = "resolved_config.yaml"  # beside the checkpoints: `--config` of an identical run


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def json_safe(obj: Any) -> Any:
    """obj (nested dicts and lists too) with every non-finite float as None, for strict JSON (no bare NaN or
    Infinity)."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n:,}"


def process_wall_time() -> float:
    """Seconds since this process started (start-up included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def dataset_line(root: str | Path | None, tokens_per_step: int, steps: int) -> str:
    if root is None:
        return "dataset: batches supplied by the caller"
    from pretrain.data import read_manifest

    manifest = read_manifest(root)
    splits = manifest["splits"]
    train = splits["train"]
    parts = [f"train {train['samples']:,} sequences ({train['tokens']:,} tokens)"]
    if "val" in splits:
        parts.append(f"val {splits['val']['samples']:,}")
    epochs = steps * tokens_per_step / max(1, train["tokens"])
    return (f"dataset: {root}: {', '.join(parts)}, seq_len {manifest['seq_len']}, vocab {manifest['vocab_size']}; "
            f"{steps} steps read {epochs:.2f} epochs")


def startup_lines(config: JobConfig, dims, counts: ParameterCounts, tokens_per_step: int, dataset: str,
                  backend: str) -> list[str]:
    """The start-up summary (rank 0 prints it; one line per config section)."""
    train = config.train
    lines = [f"config (resolved; in full in {Path(config.checkpoint.dir) / RESOLVED_CONFIG}):"]
    for section, values in to_mapping(config).items():
        flow = yaml.safe_dump(values, default_flow_style=True, width=10**9, sort_keys=False).strip()
        lines.append(f"  {section}: {flow}")
    lines += [
        f"parameters: {_millions(counts.total)} ({_millions(counts.embedding)} embedding, "
        f"{_millions(counts.dense)} in matmuls for the FLOP count)",
        f"layout: {dims.dp_size * config.parallel.cp * dims.tp_size} ranks = dp {dims.dp_size} x tp {dims.tp_size}"
        f"{f' x cp {config.parallel.cp}' if config.parallel.cp > 1 else ''}"
        f"{' (sequence parallel)' if config.parallel.sequence_parallel else ''}, ZeRO-{train.zero_stage}, "
        f"{train.precision}, {backend}{', activation checkpointing per block' if train.activation_checkpointing else ''}",
        f"tokens/step: {tokens_per_step:,} = micro_batch {train.micro_batch_size} x grad_accum {train.grad_accum} "
        f"x dp {dims.dp_size} x seq_len {config.data.seq_len}; {train.steps} steps = "
        f"{_millions(tokens_per_step * train.steps)} tokens",
        dataset,
    ]
    return lines


class Monitor:
    """Rank 0 reports (every method is a no-op elsewhere): `start`, `step`, `validation`, `checkpoint`, `message`,
    `close`."""

    def __init__(self, config: JobConfig, enabled: bool, first_step: int):
        self.config, self.enabled, self.every = config, enabled, config.logging.every
        self.first_step = first_step
        self.bar = self.writer = self.metrics = None
        self.step_ends: list[float] = []  # perf_counter at the end of every step run here
        self.last_checkpoint: Path | None = None
        self.last_val: tuple[int, float] | None = None
        if not enabled:
            return
        if config.logging.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=config.train.steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True)
        if config.logging.metrics_file:
            Path(config.logging.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self.metrics = open(config.logging.metrics_file, "a")
        if config.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(config.logging.tensorboard_dir)

    def start(self, lines: list[str]) -> None:
        """Print the start-up summary, write the resolved config beside the checkpoints and into TensorBoard, and
        say so when there is nothing left to train."""
        if not self.enabled:
            return
        text = yaml.safe_dump(to_mapping(self.config), sort_keys=False)
        out = Path(self.config.checkpoint.dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RESOLVED_CONFIG).write_text(text)
        if self.writer is not None:
            self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), self.first_step)
        for line in lines:
            self._print(line)
        steps = self.config.train.steps
        if self.first_step >= steps:
            self._print(f"nothing to train: the checkpoint is at step {self.first_step} and train.steps={steps}, so "
                        f"this job is complete; to train on from it, raise train.steps (e.g. train.steps={2 * steps})")

    def message(self, text: str) -> None:
        if self.enabled:
            self._print(text)

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def _record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self.metrics.flush()

    def _progress(self, done: int) -> str:
        """' [done/steps, eta]' for the step lines when there is no bar."""
        total = self.config.train.steps
        rate = self.steps_per_second()
        eta = f", eta {_duration((total - done) / rate)}" if rate else ""
        return f" [{done}/{total} {done / total:.0%}{eta}]"

    def steps_per_second(self) -> float | None:
        """Steps/s of this run after its first step (start-up, the first step's warm-up and compiles excluded)."""
        ends = self.step_ends
        return (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else None

    def step(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float, mfu: float | None):
        if not self.enabled:
            return
        self.step_ends.append(time.perf_counter())
        peak_gib = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if (step + 1) % self.every == 0 or step == self.first_step:
            mfu_text = f" mfu {mfu:.1%}" if mfu is not None else ""
            progress = self._progress(step + 1) if self.bar is None else ""
            self._print(f"step {step + 1} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                        f"tokens/s {tokens_per_s:,.0f}{mfu_text} peak_mem {peak_gib:.2f}GiB{progress}")
        scalars = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "peak_mem_gib": peak_gib}
        if mfu is not None:
            scalars["mfu"] = mfu
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step + 1)
        self._record({"step": step + 1, **scalars})

    def validation(self, step: int, loss: float, tasks: dict[str, float] | None = None) -> None:
        """Validation loss and perplexity, and the exact accuracy of each `train.eval_tasks` entry by name."""
        if not self.enabled:
            return
        ppl = math.exp(loss) if loss < 700 else math.inf  # nan stays nan
        self.last_val = (step, loss)
        accuracies = "".join(f" {name} {acc:.3f}" for name, acc in (tasks or {}).items())
        self._print(f"step {step} val_loss {loss:.4f} val_ppl {ppl:.2f}{accuracies}")
        if self.writer is not None:
            self.writer.add_scalar("val/loss", loss, step)
            self.writer.add_scalar("val/ppl", ppl, step)
            for name, acc in (tasks or {}).items():
                self.writer.add_scalar(f"val/{name}", acc, step)
        self._record({"step": step, "val_loss": loss, "val_ppl": ppl, **({"tasks": tasks} if tasks else {})})

    def checkpoint(self, tag_dir: Path, seconds: float) -> None:
        if self.enabled:
            self.last_checkpoint = tag_dir
            self._print(f"checkpoint written: {tag_dir} ({seconds:.1f} s)")

    def close(self, result) -> None:
        """The closing line: steps run, wall time, steps/s after start-up, final train and val loss, the last
        checkpoint."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()
        if not result.losses:
            print(f"done: no steps run (at step {self.first_step} of train.steps={self.config.train.steps}), "
                  f"{_duration(process_wall_time())} wall", flush=True)
            return
        rate = self.steps_per_second()
        parts = [f"done: {len(result.losses)} steps (to step {result.first_step + len(result.losses)}) in "
                 f"{_duration(process_wall_time())} wall",
                 f"{rate:.2f} steps/s after start-up" if rate else None,
                 f"final loss {result.losses[-1]:.4f}",
                 f"val_loss {self.last_val[1]:.4f} (step {self.last_val[0]})" if self.last_val else "no validation",
                 f"{result.tokens_per_second:,.0f} tokens/s overall",
                 f"last checkpoint {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint written"]
        print(", ".join(p for p in parts if p), flush=True)
