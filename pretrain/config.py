"""The training job's configuration: YAML -> typed dataclasses with `key=value` overrides; DeepSpeed's JSON is
derived from it (`deepspeed_config`), never kept by hand.

A recipe names its model either inline (`model: {...}`) or as `model_file: configs/model/x.yaml` plus optional
`model:` keys that override that file (deep-merged: `model.memory.compile_scan=true` keeps the file's other
`memory` keys). Values are checked when loaded; every error is one `ConfigError` line naming the key. Entry points
run under `run_cli(main)`, which prints that line instead of a traceback (exit status 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from titans_parallel.config import ModelConfig
from titans_parallel.typed_config import (
    ConfigError,
    apply_override,
    check,
    deep_merge,
    from_mapping,
    load_yaml,
    run_cli,
)

__all__ = ["ConfigError", "JobConfig", "deepspeed_config", "load_job_config", "run_cli"]


def _at_least(section: object, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        check(value >= minimum, name, f"must be >= {minimum}, got {value}")


def _positive(key: str, value: float | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    check(math.isfinite(value) and value > 0, key, f"must be > 0 (and finite), got {value}")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree (heads split across ranks); data parallel = world_size / (tp * cp)
    sequence_parallel: bool = False  # Megatron sequence parallel inside the TP group
    cp: int = 1  # context-parallel degree (Ulysses: sequence sharded, heads split over tp * cp)

    def __post_init__(self):
        _at_least(self, 1, "tp")
        _at_least(self, 1, "cp")


@dataclass
class DataConfig:
    path: str | None = None  # a prepare_data output dir; None = the embedded default dataset (prepared on first use)
    seq_len: int = 256
    num_workers: int = 0
    shuffle_buffer: int = 2048
    on_corrupt: Literal["raise", "skip"] = "raise"
    verify_sha256: bool = True  # each shard once per loader process (cached by size + mtime); see data.loader

    def __post_init__(self):
        _at_least(self, 1, "seq_len", "shuffle_buffer")
        _at_least(self, 0, "num_workers")


@dataclass
class OptimizerConfig:
    """AdamW; weight decay on weight matrices only, by role (pretrain.optim.parameter_role): none on norm gains
    (NeuralMemory's [H, d] out_norm_weight included), biases (memory gate biases included), the memory's W_0
    and persistent tokens."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping

    def __post_init__(self):
        _positive("lr", self.lr)
        _positive("eps", self.eps)
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, name, f"must be >= 0, got {value}")
        betas_ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        check(betas_ok, "betas", f"must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class ScheduleConfig:
    """Linear warmup to optimizer.lr, then cosine decay to min_lr_ratio * lr at train.steps."""

    warmup_steps: int = 20
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        _at_least(self, 0, "warmup_steps")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class EvalTaskConfig:
    """An S-NIAH task (`pretrain.eval.tasks.TEXT_NEEDLES`) scored at every validation: exact accuracy over
    `samples` rows at each needle depth (percent) in `length` tokens of the val split's text, the same rows each
    time; logged as `<task>@<length>`."""

    task: Literal["passkey", "number", "uuid"] = "passkey"
    length: int = 256
    depths: list[float] = field(default_factory=lambda: [0.0, 50.0, 100.0])
    samples: int = 4

    def __post_init__(self):
        _at_least(self, 1, "length", "samples")
        check(bool(self.depths) and all(0 <= d <= 100 for d in self.depths), "depths",
              f"must be percentages in [0, 100], got {self.depths}")

    @property
    def name(self) -> str:
        return f"{self.task}@{self.length}"


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 1
    seed: int = 0
    eval_every: int = 100  # 0: never
    eval_batches: int = 4
    eval_tasks: list[EvalTaskConfig] = field(default_factory=list)  # scored with each validation (needs the loader)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # non-finite loss/grad norm: stop (exit 1) or skip that update
    max_skipped_steps: int = 10  # on_nonfinite=skip: stop at the first bad step beyond this many skipped ones
    activation_checkpointing: bool = False  # recompute each block in backward: less activation memory, ~1 more fwd

    def __post_init__(self):
        _at_least(self, 1, "steps", "micro_batch_size", "grad_accum", "eval_batches")
        _at_least(self, 0, "eval_every", "max_skipped_steps")


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    every: int = 100  # steps; 0: only at the end
    keep: int = 2  # 0: keep all

    def __post_init__(self):
        _at_least(self, 0, "every", "keep")


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard_dir: str | None = "runs/default/tensorboard"
    metrics_file: str | None = "runs/default/metrics.jsonl"  # one JSON line per step (rank 0), appended on resume
    progress: bool = True
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs by name, no MFU on CPU

    def __post_init__(self):
        _at_least(self, 1, "every")
        _positive("peak_tflops", self.peak_tflops, optional=True)


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if self.model.n_heads % self.parallel.tp:
            raise ValueError(f"parallel.tp={self.parallel.tp} does not divide model.n_heads={self.model.n_heads}")
        if self.model.vocab_size % self.parallel.tp:
            raise ValueError(f"parallel.tp={self.parallel.tp} does not divide model.vocab_size={self.model.vocab_size}")
        tp, cp = self.parallel.tp, self.parallel.cp
        if cp > 1:
            check(self.model.n_heads % (tp * cp) == 0, "model.n_heads",
                  f"must be divisible by parallel.tp * parallel.cp = {tp} * {cp}, got {self.model.n_heads}")
            shards = cp * tp if self.parallel.sequence_parallel else cp  # sequence parallel splits a CP shard
            check(self.data.seq_len % shards == 0, "data.seq_len",
                  f"must be divisible by parallel.cp={cp}" + (f" * tp={tp} (sequence parallel)" if shards > cp else "")
                  + f", got {self.data.seq_len}")
            check(self.train.zero_stage < 3, "train.zero_stage",
                  f"ZeRO-3 with parallel.cp={cp} is not supported: DeepSpeed 0.19's ZeRO-3 reduce-scatter averages "
                  "gradients over CP instead of summing them (use ZeRO 0-2)")
            for i, task in enumerate(self.train.eval_tasks):
                check(task.length % cp == 0, f"train.eval_tasks[{i}].length",
                      f"context parallel needs it divisible by parallel.cp={cp}, got {task.length}")
        if self.parallel.sequence_parallel and self.data.seq_len % self.parallel.tp:
            raise ValueError(f"sequence parallel needs data.seq_len={self.data.seq_len} divisible by tp={self.parallel.tp}")
        for i, task in enumerate(self.train.eval_tasks):
            check(not self.parallel.sequence_parallel or task.length % self.parallel.tp == 0,
                  f"train.eval_tasks[{i}].length", f"sequence parallel needs it divisible by tp={self.parallel.tp}, "
                  f"got {task.length}")


def load_job_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a recipe (resolving `model_file` relative to the working directory, then the recipe's folder) and
    apply dotted overrides; errors name the file and key."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = load_yaml(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for override in overrides:
        apply_override(data, override)
    model_file = data.pop("model_file", None)
    if model_file is not None:
        candidates = [Path(model_file)] + ([path.parent / model_file] if path is not None else [])
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{path}: model_file {model_file} not found")
        base = load_yaml(found.read_text()) or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{found}: top level must be a mapping")
        data["model"] = deep_merge(base, data.get("model") or {})
    try:
        return from_mapping(JobConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def deepspeed_config(config: JobConfig) -> dict[str, Any]:
    """The DeepSpeed JSON for this job (derived; the YAML is the single source of truth)."""
    train = config.train
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": config.optimizer.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
