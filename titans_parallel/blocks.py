"""Pre-norm residual blocks: a token mixer (attention, memory, or a Titans combination) and a SwiGLU FFN.

Every mixer maps x [B, T, dim] and its cache (None at the start of a sequence) to (out [B, T, dim], cache), so
feeding a sequence in pieces with the returned cache equals one pass (the basis of O(1)-per-token decoding).
Packed documents: from the start of a sequence a mixer also takes resets [B, T] bool (True where a document starts)
and runs every document as if the sequence began there; it then returns no cache (None).
Persistent memory: `n_persistent` learned tokens P [Np, dim] per layer, an always-visible attention prefix, and
the first tokens the memory reads (x~ = P || x).

Tensor / sequence parallel (chosen when the model is built: every block, mixer and layer is built with the model's
`ParallelDims`, see `titans_parallel.parallel`): every projection is a column- or row-parallel factory layer, so a
rank runs its own heads. Under sequence parallel a block's input and output, its norms and the residual stream are
this rank's sequence shard [B, T/tp, dim]; the column-parallel projections all-gather the sequence and the
row-parallel ones reduce-scatter it. P is the same on every TP rank and no slice of the sequence: it enters the
projections through `apply_to_replicated`, is never gathered along T, and its gradient is summed over TP there.
MAC runs segment after segment over the whole sequence, so it gathers its input once and builds its attention,
memory and norms with `full_sequence`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCache
from .config import LAYER_KINDS, ModelConfig
from .memory import MemoryState, NeuralMemory, NeuralMemoryCache
from .memory.grid import ChunkGrid
from .parallel import (
    SINGLE_RANK,
    ParallelDims,
    column_parallel_linear,
    gather_from_sequence_parallel_region,
    mark_sequence_parallel,
    normal_init,
    row_parallel_linear,
    scatter_to_sequence_parallel_region,
)
from .parallel.context import replicate_sequence, sequence_shard


class RMSNorm(nn.Module):
    """RMS norm over the last dimension, learned scale. A norm in the sequence-parallel region (the default) has its
    weight (replicated over TP) marked `sequence_parallel` as `parallel` says: under sequence parallel each rank
    sees only its tokens and `register_sequence_parallel_grad_hooks` must sum the gradient over TP.
    `full_sequence=True` is for a norm on a full sequence that every TP rank holds whole (inside MAC), whose
    gradient is complete on every rank."""

    def __init__(self, dim: int, eps: float = 1e-6, parallel: ParallelDims = SINGLE_RANK, *,
                 full_sequence: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        if not full_sequence:
            mark_sequence_parallel(self.weight, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 at least; fp64 stays fp64
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x); w1, w3 column-parallel with N(0, init_std) weights, w2 row-parallel with N(0, out_std)."""

    def __init__(self, dim: int, hidden: int, init_std: float = 0.02, out_std: float = 0.02, *,
                 parallel: ParallelDims = SINGLE_RANK):
        super().__init__()
        column = partial(column_parallel_linear, dim, hidden, bias=False, parallel=parallel,
                         init_method=normal_init(init_std))
        self.w1, self.w3 = column(), column()
        self.w2 = row_parallel_linear(hidden, dim, bias=False, parallel=parallel, init_method=normal_init(out_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def residual_std(config: ModelConfig) -> float:
    """Init std of the projections into the residual stream (wo, w2, out_proj): init_std / sqrt(2 n_layers), GPT-2."""
    return config.init_std / math.sqrt(2 * config.n_layers)


def _attention(config: ModelConfig, window: int | None, parallel: ParallelDims, full_sequence: bool = False
               ) -> Attention:
    return Attention(
        config.dim, config.n_heads, config.head_dim, window, config.rope_base, config.attention_backend,
        init_std=config.init_std, out_std=residual_std(config), full_sequence=full_sequence, parallel=parallel,
    )


def _memory(config: ModelConfig, parallel: ParallelDims, full_sequence: bool = False) -> NeuralMemory:
    return NeuralMemory(
        config.dim, config.n_heads, config.head_dim, config.memory, norm_eps=config.norm_eps,
        init_std=config.init_std, out_std=residual_std(config), full_sequence=full_sequence, parallel=parallel,
    )


class PersistentTokens(nn.Module):
    """N_p learned tokens [Np, dim], N(0, init_std), replicated over TP. Calling the module gives them (None when
    N_p = 0), so each use is a module call that module hooks (ZeRO-3's parameter gathering) see."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(config.n_persistent, config.dim) * config.init_std)

    def forward(self) -> torch.Tensor | None:
        return self.tokens if self.tokens.shape[0] else None

    def memory_prefix(self, memory_cache: NeuralMemoryCache | None) -> torch.Tensor | None:
        """What the memory reads before x: P at the start of a sequence (no memory cache yet), else nothing."""
        return self() if memory_cache is None else None


class AttentionMixer(nn.Module):
    """`attn`: full causal attention (Transformer++, no persistent tokens); `swa`: sliding window + persistent prefix."""

    def __init__(self, config: ModelConfig, parallel: ParallelDims, kind: str):
        super().__init__()
        self.attn = _attention(config, None if kind == "attn" else config.window, parallel)
        self.persistent = PersistentTokens(config) if kind == "swa" else None

    def forward(self, x: torch.Tensor, cache: KVCache | None, resets: torch.Tensor | None = None):
        prefix = self.persistent() if self.persistent is not None else None
        return self.attn(x, prefix=prefix, cache=cache, resets=resets)


class MemoryMixer(nn.Module):
    """`lmm`: the neural memory alone, reading P || x."""

    def __init__(self, config: ModelConfig, parallel: ParallelDims):
        super().__init__()
        self.persistent = PersistentTokens(config)
        self.memory = _memory(config, parallel)

    def forward(self, x: torch.Tensor, cache: NeuralMemoryCache | None, resets: torch.Tensor | None = None):
        _, out, cache = self.memory.forward_prefixed(self.persistent.memory_prefix(cache), x, cache, resets)
        return out, cache


@dataclass
class MAGCache:
    """Streaming state of a MAG layer: its memory and its attention window."""

    memory: NeuralMemoryCache
    attn: KVCache


@dataclass
class MALCache:
    """Streaming state of a MAL layer: its memory, its attention window, and the attention prefix [B, Np, dim]
    (the memory's outputs at the persistent tokens, computed by the first call)."""

    memory: NeuralMemoryCache
    attn: KVCache
    prefix: torch.Tensor


class MAGMixer(nn.Module):
    """Memory as a gate: o = RMSNorm(SWA(P || x)) * sigmoid(RMSNorm(LMM(P || x)))."""

    def __init__(self, config: ModelConfig, parallel: ParallelDims):
        super().__init__()
        self.persistent = PersistentTokens(config)
        self.attn = _attention(config, config.window, parallel)
        self.memory = _memory(config, parallel)
        self.attn_norm = RMSNorm(config.dim, config.norm_eps, parallel)
        self.memory_norm = RMSNorm(config.dim, config.norm_eps, parallel)

    def forward(self, x: torch.Tensor, cache: MAGCache | None, resets: torch.Tensor | None = None):
        memory_cache, attn_cache = (cache.memory, cache.attn) if cache is not None else (None, None)
        y, attn_cache = self.attn(x, prefix=self.persistent(), cache=attn_cache, resets=resets)
        _, m, memory_cache = self.memory.forward_prefixed(
            self.persistent.memory_prefix(memory_cache), x, memory_cache, resets
        )
        out = self.attn_norm(y) * torch.sigmoid(self.memory_norm(m))
        return out, None if resets is not None else MAGCache(memory_cache, attn_cache)


class MALMixer(nn.Module):
    """Memory as a layer: y = LMM(P || x), o = y + SWA(x + y) with the memory's outputs at P as the attention prefix:
    a memory layer and an attention layer, each with its residual, as one mixer (x + o is what the two stacked
    layers give). Attention reading y alone (which starts at the residual-branch scale) learned passkey recall to
    0.47; x + y without the memory's residual y learned it to 0.88 and MQAR only late (docs/memory.md)."""

    def __init__(self, config: ModelConfig, parallel: ParallelDims):
        super().__init__()
        self.persistent = PersistentTokens(config)
        self.memory = _memory(config, parallel)
        self.attn = _attention(config, config.window, parallel)

    def forward(self, x: torch.Tensor, cache: MALCache | None, resets: torch.Tensor | None = None):
        memory_cache, attn_cache, prefix = (None, None, None) if cache is None else (cache.memory, cache.attn,
                                                                                      cache.prefix)
        persistent_out, y, memory_cache = self.memory.forward_prefixed(
            self.persistent.memory_prefix(memory_cache), x, memory_cache, resets
        )
        prefix = prefix if persistent_out is None else persistent_out  # every document reads P from W_0: the same
        out, attn_cache = self.attn(x + y, prefix=prefix, cache=attn_cache, resets=resets)
        return y + out, None if resets is not None else MALCache(memory_cache, attn_cache, prefix)


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
    h = RMSNorm(M_before(q(segment))) (retrieval without update); y = Attn over [P || h || segment], P always
    visible and h_j visible to query i iff j <= i (h_j is read from token j, so this keeps the layer causal);
    the memory then learns from the residual stream after attention, segment + y, and
    o = y * sigmoid(RMSNorm(M(segment + y))) (its inclusive retrieval as a gate, as in MAG). Learning from y alone
    (attention's outputs, near-uniform mixtures early in training) the memory could not tell tokens apart and MQAR
    stayed near chance; the norms put the retrieved tokens at the segment's scale and keep o from starting as a
    product of two near-zero branches (docs/memory.md). The norms see the whole sequence on every TP rank, so their
    weights are not sequence-parallel.
    Segments run in order over the whole sequence: under sequence parallel the mixer gathers its input shard and
    returns its shard of the output; its attention and memory work on the full sequence (full_sequence). Under
    context parallel every CP rank holds the whole sequence too and runs its own heads of every segment
    (`parallel.context.replicate_sequence`), then keeps its CP shard of the output.
    Packed documents (resets): every document starts a segment of its own (the rows are laid out on a segment grid,
    `ChunkGrid.from_resets`, a short last segment padded), and at a document's first segment its row's memory,
    retrieval weights and conv tails restart from the initial state; the padding is dropped."""

    def __init__(self, config: ModelConfig, parallel: ParallelDims):
        super().__init__()
        self.segment, self.parallel = config.window, parallel
        self.persistent = PersistentTokens(config)
        self.attn = _attention(config, None, parallel, full_sequence=True)
        self.memory = _memory(config, parallel, full_sequence=True)
        self.context_norm = RMSNorm(config.dim, config.norm_eps, full_sequence=True)
        self.gate_norm = RMSNorm(config.dim, config.norm_eps, full_sequence=True)

    def forward(self, x: torch.Tensor, cache: MACCache | None, resets: torch.Tensor | None = None):
        # Backward splits: every use of x below sums its gradient over TP, so the gradient is the same on every rank.
        x = gather_from_sequence_parallel_region(x, self.parallel, tensor_parallel_output_grad=False)
        x = replicate_sequence(x, self.parallel)  # CP: the whole sequence on every rank, for its own heads
        if resets is None:
            out, cache = self._segments(x, cache)
        elif cache is not None:
            raise ValueError("document resets are only taken from the start of a sequence (cache None)")
        else:
            B, T, dim = x.shape
            grid = ChunkGrid.from_resets(resets, self.segment)
            laid = grid.to_grid(x[:, None], 0.0).view(B, -1, dim)
            out, cache = self._segments(laid, None, grid)
            out = grid.from_grid(out.view(B, grid.chunks, self.segment, dim), B, 1, T)[:, 0]
            cache = None
        return scatter_to_sequence_parallel_region(sequence_shard(out, self.parallel), self.parallel), cache

    def _segments(self, x: torch.Tensor, cache: MACCache | None, grid: ChunkGrid | None = None
                  ) -> tuple[torch.Tensor, MACCache]:
        """The segment loop over x [B, T, dim] (the full sequence) after `cache`; with `grid` (x laid out in its
        whole segments, cache None) the rows flagged in grid.starts[:, n] restart their memory at segment n, at
        the segments some row restarts (grid.restart_chunks, known on the host)."""
        initial = self.memory.initial_cache(x.shape[0]) if cache is None else None
        if cache is None:
            cache = MACCache(initial, initial.memory.weights, None, None, 0)
        memory_cache, read_weights, read_tail, attn_cache, offset = (
            cache.memory, cache.read_weights, cache.read_tail, cache.attn, cache.offset
        )
        outputs, start = [], 0
        while start < x.shape[1]:
            if grid is not None and start // self.segment in grid.restart_chunks:
                rows = grid.starts[:, start // self.segment]
                memory_cache = _restarted_rows(memory_cache, initial, rows)
                read_tail = None if read_tail is None else read_tail.masked_fill(rows.view(-1, 1, 1, 1, 1), 0)
            if offset == 0:
                read_weights, attn_cache = memory_cache.memory.weights, None
            n = min(self.segment - offset, x.shape[1] - start)
            segment = x[:, start : start + n]
            h, read_tail = self.memory.read(segment, read_weights, read_tail)
            y, attn_cache = self.attn(
                segment, prefix=self.persistent(), cache=attn_cache, companion=self.context_norm(h)
            )
            m, memory_cache = self.memory(segment + y, memory_cache)
            outputs.append(y * torch.sigmoid(self.gate_norm(m)))
            start, offset = start + n, (offset + n) % self.segment
        return torch.cat(outputs, dim=1), MACCache(memory_cache, read_weights, read_tail, attn_cache, offset)


def _restarted_rows(cache: NeuralMemoryCache, initial: NeuralMemoryCache, rows: torch.Tensor) -> NeuralMemoryCache:
    """`cache` with the batch rows flagged in rows [B] back at `initial` (at a chunk boundary: nothing pending)."""
    def pick(fresh: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(rows.view(-1, *(1,) * (old.dim() - 1)), fresh, old)

    memory = MemoryState(tuple(map(pick, initial.memory.weights, cache.memory.weights)),
                         tuple(map(pick, initial.memory.momentum, cache.memory.momentum)))
    return NeuralMemoryCache(memory, cache.pending, pick(initial.conv_tail, cache.conv_tail))


MIXERS = {"mac": MACMixer, "mag": MAGMixer, "mal": MALMixer, "lmm": MemoryMixer,
          "attn": partial(AttentionMixer, kind="attn"), "swa": partial(AttentionMixer, kind="swa")}
assert MIXERS.keys() == set(LAYER_KINDS), "config.LAYER_KINDS and the mixers disagree"


class Block(nn.Module):
    """x + mixer(norm(x)), then + SwiGLU(norm(.)). kind: mac | mag | mal | lmm | attn | swa; every layer is built
    with `parallel`."""

    def __init__(self, config: ModelConfig, kind: str, parallel: ParallelDims):
        super().__init__()
        self.mixer_norm = RMSNorm(config.dim, config.norm_eps, parallel)
        self.mixer = MIXERS[kind](config, parallel)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, parallel)
        self.ffn = SwiGLU(config.dim, config.ffn_hidden, config.init_std, residual_std(config), parallel=parallel)

    def forward(self, x: torch.Tensor, cache=None, resets: torch.Tensor | None = None):
        h, cache = self.mixer(self.mixer_norm(x), cache, resets)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), cache
