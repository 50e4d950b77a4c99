"""Pre-norm residual blocks: a token mixer (attention, memory, or a Titans combination) and a SwiGLU FFN.

Every mixer maps x [B, T, dim] and its cache (None at the start of a sequence) to (out [B, T, dim], cache), so
feeding a sequence in pieces with the returned cache equals one pass (the basis of O(1)-per-token decoding).
Persistent memory: `n_persistent` learned tokens P [Np, dim] per layer, an always-visible attention prefix, and
the first tokens the memory reads (x~ = P || x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCache
from .config import ModelConfig
from .memory import NeuralMemory, NeuralMemoryCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _attention(config: ModelConfig, window: int | None) -> Attention:
    return Attention(config.dim, config.n_heads, config.head_dim, window, config.rope_base, config.attention_backend)


def _memory(config: ModelConfig) -> NeuralMemory:
    m = config.memory
    return NeuralMemory(
        config.dim, config.n_heads, config.head_dim, depth=m.depth, expansion=m.expansion, chunk_size=m.chunk_size,
        conv_kernel=m.conv_kernel, theta_max=m.theta_max, retrieve=m.retrieve, activation=m.activation,
        norm_eps=config.norm_eps,
    )


class PersistentTokens(nn.Module):
    """N_p learned tokens [Np, dim]; `prepend` puts them before a sequence at its start (no cache yet)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(config.n_persistent, config.dim) * config.init_std)

    def prefix(self) -> torch.Tensor | None:
        return self.tokens if self.tokens.shape[0] else None

    def prepend(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)


class AttentionMixer(nn.Module):
    """`attn`: full causal attention (Transformer++, no persistent tokens); `swa`: sliding window + persistent prefix."""

    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        self.attn = _attention(config, None if kind == "attn" else config.window)
        self.persistent = PersistentTokens(config) if kind == "swa" else None

    def forward(self, x: torch.Tensor, cache: KVCache | None):
        prefix = self.persistent.prefix() if self.persistent is not None else None
        return self.attn(x, prefix=prefix, cache=cache)


class MemoryMixer(nn.Module):
    """`lmm`: the neural memory alone, reading P || x."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.persistent = PersistentTokens(config)
        self.memory = _memory(config)

    def forward(self, x: torch.Tensor, cache: NeuralMemoryCache | None):
        return _read_with_persistent(self.memory, self.persistent, x, cache)[::2]


def _read_with_persistent(memory: NeuralMemory, persistent: PersistentTokens, x, cache):
    """Run the memory over P || x at the start of a sequence (over x afterwards).
    Returns (outputs at x, cache, outputs at P or None)."""
    if cache is not None:
        out, cache = memory(x, cache)
        return out, None, cache
    n = persistent.tokens.shape[0]
    out, cache = memory(persistent.prepend(x), None)
    return out[:, n:], out[:, :n], cache


class MAGMixer(nn.Module):
    """Memory as a gate: o = RMSNorm(SWA(P || x)) * sigmoid(RMSNorm(LMM(P || x)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.persistent = PersistentTokens(config)
        self.attn = _attention(config, config.window)
        self.memory = _memory(config)
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.memory_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, cache: tuple | None):
        attn_cache, memory_cache = cache if cache is not None else (None, None)
        y, attn_cache = self.attn(x, prefix=self.persistent.prefix(), cache=attn_cache)
        m, _, memory_cache = _read_with_persistent(self.memory, self.persistent, x, memory_cache)
        return self.attn_norm(y) * torch.sigmoid(self.memory_norm(m)), (attn_cache, memory_cache)


class MALMixer(nn.Module):
    """Memory as a layer: y = LMM(P || x), o = SWA(y) with the memory's outputs at P as the attention prefix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.persistent = PersistentTokens(config)
        self.memory = _memory(config)
        self.attn = _attention(config, config.window)

    def forward(self, x: torch.Tensor, cache: tuple | None):
        memory_cache, attn_cache, prefix = cache if cache is not None else (None, None, None)
        y, persistent_out, memory_cache = _read_with_persistent(self.memory, self.persistent, x, memory_cache)
        prefix = persistent_out if persistent_out is not None else prefix
        if prefix is not None and prefix.shape[1] == 0:
            prefix = None
        out, attn_cache = self.attn(y, prefix=prefix, cache=attn_cache)
        return out, (memory_cache, attn_cache, prefix)


@dataclass
class MACCache:
    """Streaming state of a MAC layer: the memory (updated by attention outputs), the memory weights at the current
    segment's start (for retrieval), the retrieval queries' conv tail, the attention cache of the current segment
    and the position inside it."""

    memory: NeuralMemoryCache
    read_weights: tuple[torch.Tensor, ...]
    read_tail: torch.Tensor | None
    attn: KVCache | None
    offset: int


class MACMixer(nn.Module):
    """Memory as context (paper section 4.1), segment by segment (segment = config.window tokens):
    h = M_before(q(segment)) (retrieval without update); y = Attn over [P || h || segment], P always visible and
    h_j visible to query i iff j <= i (h_j is read from token j, so this keeps the layer causal);
    the memory then learns from y, and o = y * M(y) (its inclusive retrieval)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.segment = config.window
        self.persistent = PersistentTokens(config)
        self.attn = _attention(config, None)
        self.memory = _memory(config)

    def forward(self, x: torch.Tensor, cache: MACCache | None):
        if cache is None:
            memory_cache = self.memory.initial_cache(x.shape[0])
            cache = MACCache(memory_cache, memory_cache.memory.weights, None, None, 0)
        memory_cache, read_weights, read_tail, attn_cache, offset = (
            cache.memory, cache.read_weights, cache.read_tail, cache.attn, cache.offset
        )
        outputs, start = [], 0
        while start < x.shape[1]:
            if offset == 0:
                read_weights, attn_cache = memory_cache.memory.weights, None
            n = min(self.segment - offset, x.shape[1] - start)
            segment = x[:, start : start + n]
            h, read_tail = self.memory.read(segment, read_weights, read_tail)
            y, attn_cache = self.attn(segment, prefix=self.persistent.prefix(), cache=attn_cache, companion=h)
            m, memory_cache = self.memory(y, memory_cache)
            outputs.append(y * m)
            start, offset = start + n, (offset + n) % self.segment
        return torch.cat(outputs, dim=1), MACCache(memory_cache, read_weights, read_tail, attn_cache, offset)


MIXERS = {"mac": MACMixer, "mag": MAGMixer, "mal": MALMixer, "lmm": MemoryMixer}


class Block(nn.Module):
    """x + mixer(norm(x)), then + SwiGLU(norm(.)). kind: mac | mag | mal | lmm | attn | swa."""

    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(config.dim, config.norm_eps)
        self.mixer = MIXERS[kind](config) if kind in MIXERS else AttentionMixer(config, kind)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = SwiGLU(config.dim, config.ffn_hidden)

    def forward(self, x: torch.Tensor, cache=None):
        h, cache = self.mixer(self.mixer_norm(x), cache)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), cache
