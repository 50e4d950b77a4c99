"""`NeuralMemory`: the Titans long-term memory layer (projections, conv, gates, scan, gated output).

Every per-head tensor keeps heads in its leading dimension ([H, ...] parameters, [B, H, T, d] activations; the
projections' output features laid out [H, ...] too) so tensor parallelism splits heads across ranks by construction:
a rank owns n_heads / tp heads, its in_proj / gate_proj output rows (column-parallel), out_proj input columns
(row-parallel) and slices of the per-head parameters (`tensor_parallel_parameter`), and runs the conv, gates, scan
and output norm of its heads alone.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MemoryConfig
from ..parallel import (
    SINGLE_RANK,
    ParallelDims,
    apply_to_replicated,
    column_parallel_linear,
    normal_init,
    row_parallel_linear,
    tensor_parallel_parameter,
)
from ..parallel.context import context_parallel_heads, core_heads, core_output, gather_heads, local_heads
from ..documents import document_ids
from .chunked import memory_scan
from .state import MemoryState, memory_mlp

# Gate bias initialisation (the paper gives none): theta starts at theta_max / 2, eta (momentum decay) at 0.9,
# alpha (forgetting) at 0.01.
THETA_BIAS_INIT = 0.0
ETA_BIAS_INIT = math.log(0.9 / 0.1)
ALPHA_BIAS_INIT = math.log(0.01 / 0.99)


class InitialWeights(nn.ParameterList):
    """W_0 of every memory layer, [H, in_l, out_l] each. Calling the module returns them as a tuple, so each use
    is a module call that module hooks (ZeRO-3's parameter gathering) see."""

    __call__ = nn.Module.__call__  # nn.ParameterList refuses to be called

    def forward(self) -> tuple[torch.Tensor, ...]:
        return tuple(self)


@dataclass
class NeuralMemoryCache:
    """Streaming state of one `NeuralMemory` layer.

    memory: the memory state at the last chunk boundary. pending: (k, v, theta, eta, alpha) of the tokens read since
    that boundary (fewer than chunk_size; [B, H, p, d] and [B, H, p]). conv_tail: the last kernel-1 projected q/k/v
    inputs of the causal conv, [B, kernel-1, H, 3, d].
    """

    memory: MemoryState
    pending: tuple[torch.Tensor, ...]
    conv_tail: torch.Tensor


class NeuralMemory(nn.Module):
    """Neural long-term memory over x [B, T, dim] with `n_heads` heads of width `head_dim`, configured by `config`
    (a `MemoryConfig`, its defaults when None; its fields are named below without prefix).

    q, k, v = SiLU(causal depthwise conv(x W)), l2-normalised q and k; per-token per-head gates
    theta = theta_max * sigmoid(.), eta = sigmoid(.), alpha = sigmoid(.); output = W_o(RMSNorm(y) * SiLU(x W_g)).
    The memory MLP has `depth` layers, widths head_dim -> expansion*head_dim -> ... -> head_dim, learned initial
    weights W_0 per head, zero initial momentum.

    Initialisation (normal, by standard deviation): in_proj and gate_proj weights init_std, out_proj out_std, conv
    1/sqrt(conv_kernel), W_0 layer l 1/sqrt(in_l); output norm weight 1; gate biases the module constants above.
    `compile_scan` fuses the scan's chunk steps with torch.compile (see `memory_scan`). `polyak_step` (with its
    `power_steps`), `momentum_ema` and `normalize_weights` are the scan's stabilisers (docs/memory.md); with all off
    the update is the paper's rule.
    `learning = False` switches test-time learning off (theta = alpha = 0: the memory stays at W_0), to measure
    what it adds.
    Under tensor parallel `self.n_heads` is this rank's head count. Under sequence parallel x and the output are
    [B, T/tp, dim] sequence shards unless `full_sequence` (full [B, T, dim] on every rank, for a mixer that gathers
    the sequence itself). Under context parallel x and the output are [B, T/cp, dim] and the projections cross to
    the full sequence for n_heads / (tp cp) heads before the conv (`parallel.context`), back before out_proj; the
    per-head parameters stay whole (replicated over CP) and the core uses its heads' slice.
    Every entry point (`forward`, `forward_prefixed`, `read`) runs as a call of the module, and each submodule's
    parameters are only used by calling it, so module hooks (ZeRO-3's parameter gathering) see every use.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        head_dim: int,
        config: MemoryConfig | None = None,
        *,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        out_std: float = 0.02,
        full_sequence: bool = False,
        parallel: ParallelDims = SINGLE_RANK,
    ):
        super().__init__()
        self.n_heads, self.head_dim = context_parallel_heads(n_heads, parallel), head_dim
        self.parallel, self.full_sequence = parallel, full_sequence
        self.config = c = config if config is not None else MemoryConfig()
        self.norm_eps = norm_eps
        self.learning = True  # False: no writes and no forgetting, the memory stays at W_0 (evaluation)
        column = functools.partial(
            column_parallel_linear, parallel=parallel, init_method=normal_init(init_std), full_sequence=full_sequence
        )
        per_head = functools.partial(tensor_parallel_parameter, partition_dim=0, parallel=parallel)
        self.in_proj = column(dim, n_heads * 4 * head_dim, bias=False)  # per head: q, k, v, output gate
        self.gate_proj = column(dim, n_heads * 3)  # per head: theta, eta, alpha
        with torch.no_grad():
            bias = self.gate_proj.bias.view(-1, 3)
            bias[:, 0], bias[:, 1], bias[:, 2] = THETA_BIAS_INIT, ETA_BIAS_INIT, ALPHA_BIAS_INIT
        self.conv_weight = per_head(
            (n_heads, 3, head_dim, c.conv_kernel), init_method=normal_init(1 / math.sqrt(c.conv_kernel))
        )
        widths = [head_dim] + [c.expansion * head_dim] * (c.depth - 1) + [head_dim]
        self.initial_weights = InitialWeights(
            per_head((n_heads, fan_in, fan_out), init_method=normal_init(1 / math.sqrt(fan_in)))
            for fan_in, fan_out in zip(widths[:-1], widths[1:])
        )
        self.out_norm_weight = per_head((n_heads, head_dim), init_method=nn.init.ones_)
        self.out_proj = row_parallel_linear(
            n_heads * head_dim, dim, bias=False, parallel=parallel, init_method=normal_init(out_std),
            full_sequence=full_sequence,
        )

    def initial_cache(self, batch_size: int) -> NeuralMemoryCache:
        """The state before the first token: W_0 per head, zero momentum, empty pending chunk, zero conv tail."""
        initial = tuple(local_heads(w, self.parallel, dim=0) for w in self.initial_weights())
        ref = initial[0]
        dtype = torch.promote_types(ref.dtype, torch.float32)  # fp32 state; fp64 stays fp64
        weights = tuple(w.to(dtype).unsqueeze(0).expand(batch_size, *w.shape) for w in initial)
        H, d = self.n_heads, self.head_dim
        pending = tuple(ref.new_zeros(batch_size, H, 0, d) for _ in range(2)) + tuple(
            ref.new_zeros(batch_size, H, 0) for _ in range(3)
        )
        tail = ref.new_zeros(batch_size, self.config.conv_kernel - 1, H, 3, d)
        return NeuralMemoryCache(MemoryState.from_weights(weights), pending, tail)

    def _conv(self, u: torch.Tensor, tail: torch.Tensor, channels: slice, resets: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU on u [B, T, H, c, d] (projection channels `channels` of q, k, v) after
        `tail` [B, K-1, H, c, d]; returns ([B, H, c, T, d], the new tail). With resets [B, T] bool a tap reaching
        back across a document's first token reads zero, as at the start of a sequence."""
        B, T, H, c, d = u.shape
        K = self.config.conv_kernel
        full = torch.cat([tail, u], dim=1)
        weight = local_heads(self.conv_weight, self.parallel, dim=0)[:, channels]
        if resets is None:
            out = F.conv1d(full.flatten(2).transpose(1, 2), weight.reshape(-1, 1, K), groups=H * c * d)
            out = out.view(B, H, c, d, T).transpose(-1, -2)
        else:  # tap i reads token t - (K - 1 - i), kept when it lies in token t's document
            documents = document_ids(resets)
            padded = F.pad(documents, (K - 1, 0))
            weight = weight.to(u.dtype)
            out = sum(full[:, i : i + T] * weight[..., i] * (padded[:, i : i + T] == documents)[..., None, None, None]
                      for i in range(K))
            out = out.permute(0, 2, 3, 1, 4)
        return F.silu(out), full[:, full.shape[1] - (K - 1) :]

    def _gated(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm of y [B, H, T, d] (fp32) times the SiLU gate [B, T, H, d] -> [B, T, H * d], the input
        of out_proj."""
        y = y.to(torch.promote_types(y.dtype, torch.float32))  # fp32 at least; fp64 stays fp64
        weight = local_heads(self.out_norm_weight, self.parallel, dim=0)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.norm_eps) * weight[:, None].to(y.dtype)
        return (y.to(gate.dtype).transpose(1, 2) * F.silu(gate)).flatten(2)

    def forward(self, *args, entry: str = "update"):
        """The module call; `entry` is what runs inside it: "update" (`memory(x, cache)`, see `_update`),
        "update_prefixed" (`forward_prefixed`) or "read" (`read`)."""
        return {"update": self._update, "update_prefixed": self._update_prefixed, "read": self._read}[entry](*args)

    def read(
        self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], conv_tail: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval without update (MAC's h = M(q)): queries from x [B, T, dim] through the memory at fixed
        `weights` (W_l [B, H, in, out]). conv_tail [B, K-1, H, 1, d] continues the query conv of an earlier call.
        Returns (out [B, T, dim], new conv tail); x and out are sharded as in `forward`. The keys and values of
        in_proj are computed too and not used: the projection is one call of the layer."""
        return self(x, weights, conv_tail, entry="read")

    def forward_prefixed(
        self, prefix: torch.Tensor | None, x: torch.Tensor, cache: NeuralMemoryCache | None = None,
        resets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, NeuralMemoryCache | None]:
        """Read prefix [Np, dim] (the same for every batch row and TP rank, never a sequence shard: e.g. persistent
        tokens), then x [B, T, dim], as one sequence `prefix || x` continuing `cache`.

        Returns (out at the prefix [B, Np, dim], the same on every TP rank, or None without a prefix; out at x
        [B, T, dim], sharded like x; the cache after the last token).

        resets [B, T] bool (packed documents, True where one starts; full-sequence, only with cache None): the
        memory reads `prefix || document` for each document as if the sequence began there (W_0, zero momentum,
        the prefix read again, the conv restarted; `_documents_layout`); no cache is returned (None).
        """
        return self(prefix, x, cache, resets, entry="update_prefixed")

    def _read(
        self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], conv_tail: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        H, d = self.n_heads, self.head_dim
        proj = core_heads(self.in_proj(x), self.parallel, self.full_sequence)  # SP gathers, CP: this rank's heads
        B, T, _ = proj.shape
        proj = proj.view(B, T, H, 4, d)
        tail = conv_tail if conv_tail is not None else x.new_zeros(B, self.config.conv_kernel - 1, H, 1, d)
        q, tail = self._conv(proj[:, :, :, :1], tail, slice(0, 1))
        q = F.normalize(q[:, :, 0], dim=-1)
        y = memory_mlp(q.to(weights[0].dtype), weights, self.config.activation)
        return self.out_proj(core_output(self._gated(y, proj[:, :, :, 3]), self.parallel, self.full_sequence)), tail

    def _update(
        self, x: torch.Tensor, cache: NeuralMemoryCache | None = None
    ) -> tuple[torch.Tensor, NeuralMemoryCache]:
        """`memory(x, cache)`: x [B, T, dim] -> (out [B, T, dim], cache after the last token). Feeding a sequence in
        pieces with the returned cache gives the same outputs as one pass, wherever it is split."""
        _, out, cache = self._update_prefixed(None, x, cache)
        return out, cache

    def _update_prefixed(
        self, prefix: torch.Tensor | None, x: torch.Tensor, cache: NeuralMemoryCache | None,
        resets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, NeuralMemoryCache | None]:
        if resets is not None and cache is not None:
            raise ValueError("document resets are only taken from the start of a sequence (cache None)")
        n = 0 if prefix is None else prefix.shape[0]
        proj, gates = self.in_proj(x), self.gate_proj(x)  # the full sequence: under sequence parallel they gather
        proj, gates = (core_heads(t, self.parallel, self.full_sequence) for t in (proj, gates))  # CP: [B, T, H/cp f]
        B, T = proj.shape[:2]
        if n:  # the prefix is not a sequence shard
            prefix = prefix.to(x.dtype)
            proj, gates = (
                torch.cat([local_heads(apply_to_replicated(w, prefix), self.parallel).expand(B, -1, -1), t], dim=1)
                for w, t in ((self.in_proj, proj), (self.gate_proj, gates))
            )
        H, d, T = self.n_heads, self.head_dim, n + T
        cache = cache if cache is not None else self.initial_cache(B)
        proj = proj.view(B, T, H, 4, d)
        if resets is not None:
            return self._documents(proj, gates, n, resets, cache)
        q, k, v, theta, eta, alpha, tail = self._scan_inputs(proj, gates, cache.conv_tail)

        p = cache.pending[0].shape[2]
        if p:  # the pending tokens re-enter the scan; their outputs were already returned
            new = (k, v, theta, eta, alpha)
            k, v, theta, eta, alpha = (torch.cat([old, t], dim=2) for old, t in zip(cache.pending, new))
            q = torch.cat([q.new_zeros(B, H, p, d), q], dim=2)
        boundary = (p + T) // self.config.chunk_size * self.config.chunk_size
        y, memory = self._scan(q, k, v, theta, eta, alpha, cache.memory, 0, boundary)
        if boundary < p + T:
            y_rest, _ = self._scan(q, k, v, theta, eta, alpha, memory, boundary, p + T)
            y = torch.cat([y, y_rest], dim=2)
        y = y[:, :, p:]
        pending = tuple(t[:, :, boundary:] for t in (k, v, theta, eta, alpha))

        prefix_out, out = self._output(y, proj, n)
        return prefix_out, out, NeuralMemoryCache(memory, pending, tail)

    def _scan_inputs(self, proj: torch.Tensor, gates: torch.Tensor, tail: torch.Tensor,
                     resets: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """proj [B, T, H, 4, d] and gates [B, T, H * 3] after the conv tail -> (q, k, v [B, H, T, d]; theta, eta,
        alpha [B, H, T]; the new conv tail)."""
        B, T, H = proj.shape[:3]
        qkv, tail = self._conv(proj[:, :, :, :3], tail, slice(0, 3), resets)
        q, k, v = qkv.unbind(2)  # unbind, not indexing: its backward is one stack, not three zero-filled copies
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        theta, eta, alpha = torch.sigmoid(gates.reshape(B, T, H, 3).permute(0, 2, 3, 1)).unbind(2)  # [B, H, T] each
        theta = self.config.theta_max * theta
        if not self.learning:
            theta, alpha = torch.zeros_like(theta), torch.zeros_like(alpha)
        return q, k, v, theta, eta, alpha, tail

    def _output(self, y: torch.Tensor, proj: torch.Tensor, n: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The scan's outputs y [B, H, n + T, d] at `prefix || x` -> (out at the prefix [B, n, dim] or None, out at
        x [B, T, dim])."""
        gated = self._gated(y, proj[:, :, :, 3])
        out = self.out_proj(core_output(gated[:, n:], self.parallel, self.full_sequence))
        prefix_out = apply_to_replicated(self.out_proj, gather_heads(gated[:, :n], self.parallel)) if n else None
        return prefix_out, out

    def _documents(self, proj: torch.Tensor, gates: torch.Tensor, n: int, resets: torch.Tensor,
                   start: NeuralMemoryCache) -> tuple[torch.Tensor | None, torch.Tensor, None]:
        """`_update_prefixed` over packed documents: proj [B, n + T, H, 4, d], gates [B, n + T, H * 3] of
        `prefix || x` are laid out with the prefix read again before every document (`_documents_layout`), the
        conv and the scan restart there from `start` (the initial cache), and the outputs are read back at
        `prefix || x`."""
        B, T = resets.shape
        index, layout_resets, slots = _documents_layout(resets, n)
        rows = torch.arange(B, device=resets.device)[:, None]
        laid = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (0, 1))[rows, index]  # noqa: E731  (padding: zeros)
        q, k, v, theta, eta, alpha, _ = self._scan_inputs(laid(proj), laid(gates), start.conv_tail, layout_resets)
        y, _ = self._scan(q, k, v, theta, eta, alpha, start.memory, 0, index.shape[1], layout_resets)
        y = y.gather(2, slots[:, None, :, None].expand(-1, y.shape[1], -1, y.shape[-1]))
        return (*self._output(y, proj, n), None)

    def _scan(self, q, k, v, theta, eta, alpha, state: MemoryState, start: int, end: int, resets=None):
        """The scan of tokens start .. end - 1 from `state`: (y [B, H, end - start, d], end state); with resets
        [B, T] (True where a document starts) every document restarts from `state`."""
        if end == start:
            return q.new_zeros(*q.shape[:2], 0, v.shape[-1]), state
        s, c = slice(start, end), self.config
        return memory_scan(
            q[:, :, s], k[:, :, s], v[:, :, s], theta[:, :, s], eta[:, :, s], alpha[:, :, s], state,
            chunk_size=c.chunk_size, retrieve=c.retrieve, activation=c.activation, compile=c.compile_scan,
            polyak_step=c.polyak_step, momentum_ema=c.momentum_ema, normalize_weights=c.normalize_weights,
            power_steps=c.power_steps,
            resets=None if resets is None else resets[:, s], reset_state=state,
        )


def _documents_layout(resets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the n prefix tokens and the T tokens of `prefix || x` go when the prefix is read again before every
    document of a row (resets [B, T] bool; a reset at t = 0 changes nothing): row b becomes
    P, doc_0, P, doc_1, ..., padded to the longest row, length n + T + n R (R: the most resets in a row; one host
    sync for it).

    Returns (index [B, L]: the entry of `prefix || x` at each slot, n + T for padding; layout_resets [B, L]: True
    at the first slot of every prefix read again, where the memory restarts; slots [B, n + T]: the slot of each
    entry's first occurrence).
    """
    B, T = resets.shape
    resets = resets.clone()
    resets[:, 0] = False
    t = torch.arange(T, device=resets.device)
    token_slots = n + t + n * torch.cumsum(resets.long(), dim=1)  # [B, T]
    length = n + T + n * int(resets.sum(1).max())
    index = torch.full((B, length), n + T, dtype=torch.long, device=resets.device)
    index.scatter_(1, token_slots, (n + t).expand(B, T))
    rows, cols = resets.nonzero(as_tuple=True)
    starts = token_slots[rows, cols] - n  # the first slot of each prefix read again
    j = torch.arange(n, device=resets.device)
    index[rows[:, None], starts[:, None] + j] = j.expand(len(rows), n)
    index[:, :n] = j
    layout_resets = torch.zeros(B, length, dtype=torch.bool, device=resets.device)
    layout_resets[rows, starts] = True
    slots = torch.cat([j.expand(B, n), token_slots], dim=1)
    return index, layout_resets, slots
