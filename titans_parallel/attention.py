"""Sliding-window causal attention with an always-visible prefix, and the attention layer.

Visibility rule (defined once, in `_make_mask_mod`; every backend follows it): queries q [B, H, Tq, d] sit at the
last Tq of Tk key positions (query i at position p = Tk - Tq + i, so a KV cache just prepends keys). Key j is
visible to the query at p iff j <= p and p - j < window (window=None: every j <= p). A window W therefore shows a
query itself and W - 1 earlier keys. Prefix keys [B, H, P, d] (persistent tokens; in MAC also the retrieved
memory tokens) are visible to every query, and one softmax runs over prefix and visible keys jointly.

Backends: "naive" (explicit scores/mask/softmax in the input dtype; the spec), "sdpa" (torch SDPA with a boolean
mask), "flex" (FlexAttention with a block mask), "flash" (flash-attn >= 2.7 sliding-window kernels, the prefix as
a second kernel merged through log-sum-exps). "auto" picks flash on CUDA when usable, else flex on CUDA, else sdpa.
On CPU, flex runs eagerly (unfused, with a torch warning) and forward only: torch has no CPU flex backward.
"""

import functools
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from titans_parallel.rope import apply_rope, rope_angles

BACKENDS = ("auto", "naive", "sdpa", "flex", "flash")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _make_mask_mod(prefix_len: int, q_len: int, kv_len: int, window: int | None) -> Callable:
    """FlexAttention-style mask_mod(b, h, q_idx, kv_idx) -> bool over keys [prefix (P) ‖ sequence keys (Tk)]."""
    offset = kv_len - q_len

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        j = kv_idx - prefix_len
        visible = j <= pos
        if window is not None:
            visible = visible & (pos - j < window)
        return (kv_idx < prefix_len) | visible

    return mask_mod


def visibility_mask(
    q_len: int, kv_len: int, prefix_len: int = 0, window: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean [Tq, P + Tk] mask (True = visible) over keys [prefix ‖ sequence keys]."""
    mask_mod = _make_mask_mod(prefix_len, q_len, kv_len, window)
    q_idx = torch.arange(q_len, device=device)[:, None]
    kv_idx = torch.arange(prefix_len + kv_len, device=device)[None, :]
    return mask_mod(None, None, q_idx, kv_idx)


@functools.cache
def _flash_unavailable() -> str | None:
    """None when flash-attn >= 2.7 (whose kernel signatures `_flash_attention` uses) imports, else why not."""
    try:
        import flash_attn
        from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward  # noqa: F401
    except Exception as e:  # a broken CUDA install raises OSError/RuntimeError, not only ImportError
        return f"flash_attn is not importable ({type(e).__name__}: {e})"
    version = tuple(int(n) for n in re.findall(r"\d+", flash_attn.__version__)[:2])
    if version < (2, 7):
        return f"flash_attn {flash_attn.__version__} is too old (need >= 2.7)"
    return None


def resolve_attention_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """Concrete backend for `name` on `device`; raises if it is unknown or cannot run there.

    "auto": flash on CUDA when flash-attn imports (and dtype, if given, is fp16/bf16), else flex on CUDA, else sdpa.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    device = torch.device(device)
    if name == "flash":
        if device.type != "cuda":
            raise RuntimeError(f"attention backend 'flash' needs CUDA tensors, got device {device}")
        if reason := _flash_unavailable():
            raise RuntimeError(f"attention backend 'flash' requested but {reason}; use 'flex' or 'sdpa'")
    if name != "auto":
        return name
    if device.type != "cuda":
        return "sdpa"
    if _flash_unavailable() is None and dtype in (None, *_FLASH_DTYPES):
        return "flash"
    return "flex"


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Causal sliding-window attention with a fully visible prefix (rule in the module docstring).

    q [B, H, Tq, d]; k, v [B, H, Tk, d] with Tk >= Tq; prefix_k, prefix_v [B, H, P, d] or None.
    scale defaults to d^-1/2. Returns [B, H, Tq, d].
    """
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if kv_len < q_len:
        raise ValueError(f"need at least as many keys as queries, got Tk={kv_len} < Tq={q_len}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve_attention_backend(backend, q.device, q.dtype)
    if backend == "flash":
        if q.dtype not in _FLASH_DTYPES or q.shape[-1] % 8 or q.shape[-1] > 256:
            raise ValueError(
                f"attention backend 'flash' needs fp16/bf16 and head_dim a multiple of 8 up to 256, "
                f"got {q.dtype}, head_dim {q.shape[-1]}"
            )
        return _flash_attention(q, k, v, window, prefix_k, prefix_v, scale)

    prefix_len = 0
    if prefix_k is not None:
        prefix_len = prefix_k.shape[-2]
        k, v = torch.cat([prefix_k, k], dim=-2), torch.cat([prefix_v, v], dim=-2)
    if backend == "flex":
        block_mask = _flex_block_mask(prefix_len, q_len, kv_len, window, q.device)
        flex = _compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    mask = visibility_mask(q_len, kv_len, prefix_len, window, q.device)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q @ k.transpose(-2, -1)) * scale
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


@functools.lru_cache(maxsize=64)
def _flex_block_mask(
    prefix_len: int, q_len: int, kv_len: int, window: int | None, device: torch.device
) -> BlockMask:
    mask_mod = _make_mask_mod(prefix_len, q_len, kv_len, window)
    return create_block_mask(mask_mod, None, None, q_len, prefix_len + kv_len, device=device)


@functools.cache
def _compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention)


def _flash_kernels() -> tuple[Callable, Callable]:
    """flash-attn's forward and backward kernel ops (flash-attn >= 2.7 signatures)."""
    from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    return _flash_attn_forward, _flash_attn_backward


def _flash_attention(q, k, v, window, prefix_k, prefix_v, scale) -> torch.Tensor:
    """The flash backend on [B, H, T, d] tensors (flash-attn works in [B, T, H, d])."""
    q, k, v, prefix_k, prefix_v = (
        None if t is None else t.transpose(1, 2).contiguous() for t in (q, k, v, prefix_k, prefix_v)
    )
    window_left = -1 if window is None else window - 1
    return _FlashPrefixAttention.apply(q, k, v, prefix_k, prefix_v, window_left, scale).transpose(1, 2)


class _FlashPrefixAttention(torch.autograd.Function):
    """Flash sliding-window attention over keys, jointly normalised with an unmasked prefix ([B, T, H, d]).

    Forward: one kernel for the keys (causal, window_size=(window_left, 0), bottom-right aligned) and one for the
    prefix (no mask); outputs merge exactly as out = sum_i e^{lse_i - lse} o_i with lse = logsumexp_i lse_i.
    Backward: flash-attn's softmax_lse carries no gradient, so merging the outputs of `flash_attn_func` under
    autograd would silently drop the gradient through the normalisers. Instead each part runs flash's backward
    kernel with the *merged* out and lse: the kernel then rebuilds the joint probabilities restricted to that part
    and D = rowsum(dout * out) of the joint softmax, which is exactly the joint gradient (as in ring attention).
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, window_left, scale):
        flash_fwd, _ = _flash_kernels()
        outs, lses = [], []
        for part_k, part_v, causal, window_size in _flash_parts(k, v, prefix_k, prefix_v, window_left):
            o, lse, _, _ = flash_fwd(q, part_k, part_v, 0.0, scale, causal, *window_size, 0.0, None, False)
            outs.append(o)
            lses.append(lse)
        lse = torch.logsumexp(torch.stack(lses), dim=0)  # [B, H, Tq], float32
        out = sum(o.to(lse.dtype) * (l - lse).exp().transpose(1, 2)[..., None] for o, l in zip(outs, lses))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse)
        ctx.window_left, ctx.scale = window_left, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        _, flash_bwd = _flash_kernels()
        q, k, v, prefix_k, prefix_v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=lse.dtype)
        grads = []
        for part_k, part_v, causal, window_size in _flash_parts(k, v, prefix_k, prefix_v, ctx.window_left):
            dq_part, dk, dv = torch.empty_like(q), torch.empty_like(part_k), torch.empty_like(part_v)
            flash_bwd(
                dout, q, part_k, part_v, out, lse, dq_part, dk, dv,
                0.0, ctx.scale, causal, *window_size, 0.0, None, False, None,
            )  # fmt: skip
            dq += dq_part
            grads += [dk, dv]
        grads += [None] * (4 - len(grads))
        return dq.to(q.dtype), *grads, None, None


def _flash_parts(k, v, prefix_k, prefix_v, window_left) -> list[tuple]:
    """(keys, values, causal, window_size) of each flash kernel call: the sequence keys, then the prefix if any."""
    parts = [(k, v, True, (window_left, 0))]
    if prefix_k is not None:
        parts.append((prefix_k, prefix_v, False, (-1, -1)))
    return parts


@dataclass
class KVCache:
    """Decoding state of one `Attention` layer.

    k, v: [B, H, n, d] rotated keys and values of the last n tokens, n <= window - 1 (all tokens when window is
    None). pos: tokens seen so far, i.e. the absolute position of the next token.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int


class Attention(nn.Module):
    """Multi-head sliding-window attention with RoPE and an optional always-visible prefix.

    n_heads is the number of heads this module owns (its tensor-parallel share). wq, wk, wv project to
    n_heads * head_dim; wo projects back to dim. Everything per head is kept as [B, H, T, d].

    RoPE rotates queries and sequence keys at their absolute positions. Prefix tokens are projected by wk, wv and
    are NOT rotated: they are position-free (every query sees them wherever it sits), and a learned persistent
    key can absorb any fixed rotation anyway.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        head_dim: int,
        window: int | None,
        rope_base: float = 10000.0,
        backend: str = "auto",
    ):
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.n_heads, self.head_dim, self.window = n_heads, head_dim, window
        self.rope_base, self.backend = rope_base, backend
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, H * d] -> [B, H, T, d]."""
        return t.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, prefix: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """x [B, T, dim]; prefix [B, P, dim] or [P, dim] (shared by the batch); cache from the previous call or None.

        Returns (out [B, T, dim], new cache). Always returning the cache is free (it slices the keys just
        computed); pass it back to continue the sequence: feeding a sequence in pieces (chunked prefill, then one
        token at a time) gives the same outputs as one call over the whole sequence. The prefix is not cached:
        pass it on every call.
        """
        batch, seq_len, _ = x.shape
        start = 0 if cache is None else cache.pos
        q, k, v = self._heads(self.wq(x)), self._heads(self.wk(x)), self._heads(self.wv(x))
        cos, sin = rope_angles(torch.arange(start, start + seq_len, device=x.device), self.head_dim, self.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)

        prefix_k = prefix_v = None
        if prefix is not None:
            prefix = prefix if prefix.dim() == 3 else prefix[None]
            prefix_k = self._heads(self.wk(prefix)).expand(batch, -1, -1, -1)
            prefix_v = self._heads(self.wv(prefix)).expand(batch, -1, -1, -1)

        y = sliding_window_attention(q, k, v, self.window, prefix_k, prefix_v, self.backend)
        out = self.wo(y.transpose(1, 2).flatten(2))

        n = k.shape[2]
        first = 0 if self.window is None else max(0, n - (self.window - 1))
        return out, KVCache(k[:, :, first:], v[:, :, first:], start + seq_len)
