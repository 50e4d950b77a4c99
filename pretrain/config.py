"""The training job's configuration: YAML -> typed dataclasses with `key=value` overrides; DeepSpeed's JSON is
derived from it (`deepspeed_config`), never kept by hand.

A recipe names its model either inline (`model: {...}`) or as `model_file: configs/model/x.yaml` plus optional
`model:` keys that override that file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from titans_parallel.config import ModelConfig
from titans_parallel.typed_config import ConfigError, apply_override, from_mapping


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree (heads split across ranks); data parallel = world_size / tp
    sequence_parallel: bool = False  # Megatron sequence parallel inside the TP group


@dataclass
class DataConfig:
    path: str | None = None  # a prepare_data output dir; None = the embedded default dataset (prepared on first use)
    seq_len: int = 256
    num_workers: int = 0
    shuffle_buffer: int = 2048
    on_corrupt: Literal["raise", "skip"] = "raise"
    verify_sha256: bool = False


@dataclass
class OptimizerConfig:
    """AdamW; no weight decay on norms, biases, memory gate biases, W_0, persistent tokens (any tensor < 2-D)."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    """Linear warmup to optimizer.lr, then cosine decay to min_lr_ratio * lr at train.steps."""

    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


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


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    every: int = 100  # steps; 0: only at the end
    keep: int = 2


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard_dir: str | None = "runs/default/tensorboard"
    metrics_file: str | None = "runs/default/metrics.jsonl"  # one JSON line per step (rank 0), appended on resume
    progress: bool = True
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs by name, no MFU on CPU


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
        if self.parallel.sequence_parallel and self.data.seq_len % self.parallel.tp:
            raise ValueError(f"sequence parallel needs data.seq_len={self.data.seq_len} divisible by tp={self.parallel.tp}")
        for name in ("steps", "micro_batch_size", "grad_accum"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")


def load_job_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a recipe (resolving `model_file` relative to the working directory, then the recipe's folder) and
    apply dotted overrides; errors name the file and key."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
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
        base = yaml.safe_load(found.read_text()) or {}
        base.update(data.get("model") or {})
        data["model"] = base
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
