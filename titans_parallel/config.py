"""Model configuration: one dataclass tree, loaded from YAML (configs/model/*.yaml) with dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .typed_config import check, from_mapping, load_config, to_mapping

LAYER_KINDS = ("mac", "mag", "mal", "lmm", "attn", "swa")
MEMORY_KINDS = ("mac", "mag", "mal", "lmm")  # the layer kinds with a neural memory
_VARIANT_LAYER = {"transformer": "attn"}  # every other variant names its own layer kind
# MemoryConfig options added after models were first saved, at the value that reproduces a model saved before them
# (each is off in the paper's rule): a saved config without the key was trained without the option.
OPTIONS_ABSENT_FROM_OLDER_SAVES = {"polyak_step": False, "momentum_ema": False, "normalize_weights": False,
                                   "power_steps": 0}
# Depths up to which the Polyak step needs no power steps (at depth 1 its curvature is K's only eigenvalue; depth 2
# stays finite over theta_max 0.01-1 without them), and the power steps deeper memories get by default
# (docs/memory.md, "The bounded step").
POLYAK_ONLY_DEPTH, DEEP_POWER_STEPS = 2, 4


@dataclass
class MemoryConfig:
    """Neural long-term memory (docs/memory.md)."""

    depth: int = 2  # layers of the memory MLP
    expansion: int = 4  # hidden width = expansion * head_dim
    chunk_size: int = 16  # tokens whose inner gradients share one chunk-start state
    conv_kernel: int = 4  # causal depthwise conv after the q/k/v projections
    theta_max: float = 0.1  # theta_t = theta_max * sigmoid(.); with polyak_step a fraction of a full correction
    activation: Literal["silu", "gelu"] = "silu"
    retrieve: Literal["inclusive", "exclusive", "chunk"] = "inclusive"
    compile_scan: bool = False  # torch.compile each chunk step (fused kernels; compiles once per shape)
    # Stabilisers of the inner update (docs/memory.md); all false = the paper's rule exactly.
    polyak_step: bool = True  # each token's step scaled to the Polyak step of its own loss (theta 1 = full correction)
    momentum_ema: bool = True  # theta_t -> theta_t (1 - eta_t): momentum averages the steps instead of summing them
    normalize_weights: bool = True  # at every chunk end the memory's weight columns keep their initial lengths
    # With polyak_step: power steps towards the memory's largest curvature that size each step (the bounded step);
    # 0 = the curvature along the token's own error. None: 0 up to depth 2, 4 deeper (resolved at construction).
    power_steps: int | None = None

    def __post_init__(self):
        for name in ("depth", "expansion", "chunk_size", "conv_kernel"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.theta_max >= 0, "theta_max", f"must be >= 0, got {self.theta_max}")
        if self.power_steps is None:
            deep = self.polyak_step and self.depth > POLYAK_ONLY_DEPTH
            self.power_steps = DEEP_POWER_STEPS if deep else 0
        check(self.power_steps >= 0, "power_steps", f"must be >= 0, got {self.power_steps}")
        check(self.polyak_step or self.power_steps == 0, "power_steps",
              f"= {self.power_steps} sizes the Polyak step; it needs polyak_step: true")


@dataclass
class ModelConfig:
    """A Titans language model or one of its baselines, all in one code path.

    variant: mac | mag | mal | lmm (Titans, paper section 4), transformer (Transformer++: full causal attention),
    swa (sliding-window attention only). layer_pattern optionally gives each layer its own kind
    (mac, mag, mal, lmm, attn, swa), e.g. memory in some layers only. `window` is the sliding-window size; for MAC it
    is the segment length (attention runs within a segment) and must be a multiple of memory.chunk_size.
    """

    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None  # default dim // n_heads
    ffn_hidden: int | None = None  # SwiGLU width; default 8/3 * dim rounded up to a multiple of 64
    variant: Literal["mac", "mag", "mal", "lmm", "transformer", "swa"] = "mac"
    layer_pattern: list[str] | None = None
    window: int = 128
    n_persistent: int = 4  # persistent memory tokens per layer (not used by attn layers)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_backend: Literal["auto", "naive", "sdpa", "flex", "flash"] = "auto"
    init_std: float = 0.02
    # Packed documents: every mixer restarts at each eos_id token (it opens the next document), as if the sequence
    # began there (docs/long_context.md). eos_id: the tokenizer's; the training job fills it from the dataset.
    document_reset: bool = False
    eos_id: int | None = None

    def __post_init__(self):
        for name in ("dim", "n_heads", "head_dim", "ffn_hidden", "window"):
            value = getattr(self, name)
            check(value is None or value >= 1, name, f"must be >= 1, got {value}")
        for name in ("norm_eps", "rope_base", "init_std"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        if self.dim % self.n_heads and self.head_dim is None:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim")
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = -(-(8 * self.dim // 3) // 64) * 64
        if self.layer_pattern is None:
            self.layer_pattern = [_VARIANT_LAYER.get(self.variant, self.variant)] * self.n_layers
        if len(self.layer_pattern) != self.n_layers:
            raise ValueError(f"layer_pattern has {len(self.layer_pattern)} entries but n_layers is {self.n_layers}")
        for kind in self.layer_pattern:
            if kind not in LAYER_KINDS:
                raise ValueError(f"layer_pattern entry {kind!r} is not one of {LAYER_KINDS}")
        if "mac" in self.layer_pattern and self.window % self.memory.chunk_size:
            raise ValueError(
                f"MAC segment (window={self.window}) must be a multiple of memory.chunk_size={self.memory.chunk_size}"
            )
        if self.eos_id is not None:
            check(0 <= self.eos_id < self.vocab_size, "eos_id", f"must lie in [0, {self.vocab_size}), got {self.eos_id}")
        check(not (self.document_reset and self.attention_backend == "flash"), "attention_backend",
              "'flash' does not take document resets (model.document_reset); use 'flex' or 'sdpa'")
        if self.vocab_size < 2 or self.n_layers < 1 or self.n_persistent < 0:
            raise ValueError("vocab_size >= 2, n_layers >= 1 and n_persistent >= 0 are required")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "ModelConfig":
        return load_config(cls, path, overrides)

    @classmethod
    def from_saved(cls, mapping: dict) -> "ModelConfig":
        """The config of a saved model (checkpoint, TP shards, export): memory options the mapping lacks read as
        they were before they existed (`OPTIONS_ABSENT_FROM_OLDER_SAVES`), not as today's defaults."""
        memory = {**OPTIONS_ABSENT_FROM_OLDER_SAVES, **(mapping.get("memory") or {})}
        return from_mapping(cls, {**mapping, "memory": memory})

    def to_dict(self) -> dict:
        return to_mapping(self)
