"""Sliding-window causal attention with an always-visible prefix and optional companion keys, and the layer.

Visibility rule (defined once, in `_make_mask_mod`; every backend follows it): queries q [B, H, Tq, d] sit at the
last Tq of Tk key positions (query i at position p = Tk - Tq + i, so a KV cache just prepends keys). Key j is
visible to the query at p iff j <= p and p - j < window (window=None: every j <= p). A window W therefore shows a
query itself and W - 1 earlier keys. Prefix keys [B, H, P, d] (persistent tokens) are visible to every query.
Companion keys [B, H, Tk, d] (in MAC the retrieved memory tokens h_j = memory(q_j)) share the sequence keys'
positions: companion key j is visible exactly when key j is. One softmax runs over all visible keys jointly.
Packed documents (`documents` [B, Tk], each key position's document id): key j is visible to the query at p only
when both lie in the same document as well; the prefix stays visible to every query.

Backends: "naive" (explicit scores/mask/softmax in the input dtype; the spec), "sdpa" (torch SDPA with a boolean
mask), "flex" (FlexAttention with a block mask), "flash" (flash-attn >= 2.7 sliding-window kernels, the prefix and
the companion keys as further kernel calls merged through log-sum-exps). "auto" picks flash on CUDA when usable,
else flex on CUDA, else sdpa. On CPU, flex runs eagerly (unfused, with a torch warning) and forward only: torch
has no CPU flex backward.
"""

import functools
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from titans_parallel.documents import document_ids, document_positions
from titans_parallel.parallel import (
    SINGLE_RANK,
    ParallelDims,
    apply_to_replicated,
    column_parallel_linear,
    normal_init,
    row_parallel_linear,
)
from titans_parallel.parallel.context import context_parallel_heads, core_heads, core_output, local_heads
from titans_parallel.rope import apply_rope, rope_angles

BACKENDS = ("auto", "naive", "sdpa", "flex", "flash")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _make_mask_mod(prefix_len: int, q_len: int, kv_len: int, window: int | None) -> Callable:
    """FlexAttention-style mask_mod(b, h, q_idx, kv_idx) -> bool over keys [prefix (P) ‖ companion (Tk, optional) ‖
    sequence (Tk)]: key P + j and, with companions, key P + Tk + j both sit at position j."""
    offset = kv_len - q_len

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        j = kv_idx - prefix_len
        j = torch.where(j >= kv_len, j - kv_len, j)
        visible = j <= pos
        if window is not None:
            visible = visible & (pos - j < window)
        return (kv_idx < prefix_len) | visible

    return mask_mod


def visibility_mask(
    q_len: int,
    kv_len: int,
    prefix_len: int = 0,
    window: int | None = None,
    device: torch.device | None = None,
    companion: bool = False,
) -> torch.Tensor:
    """Boolean [Tq, P + Tk] mask (True = visible) over keys [prefix ‖ sequence], or [Tq, P + 2 Tk] over
    [prefix ‖ companion ‖ sequence] when companion is True."""
    mask_mod = _make_mask_mod(prefix_len, q_len, kv_len, window)
    q_idx = torch.arange(q_len, device=device)[:, None]
    kv_idx = torch.arange(_num_keys(prefix_len, kv_len, companion), device=device)[None, :]
    return mask_mod(None, None, q_idx, kv_idx)


def _num_keys(prefix_len: int, kv_len: int, companion: bool) -> int:
    return prefix_len + (2 if companion else 1) * kv_len


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
    companion_k: torch.Tensor | None = None,
    companion_v: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal sliding-window attention with a fully visible prefix and companion keys (rule in the module docstring).

    q [B, H, Tq, d]; k, v [B, H, Tk, d] with Tk >= Tq; prefix_k, prefix_v [B, H, P, d] or None; companion_k,
    companion_v shaped like k, v or None; documents [B, Tk] (integer document id of each key position, the queries
    at the last Tq) or None. scale defaults to d^-1/2. Returns [B, H, Tq, d].
    """
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if kv_len < q_len:
        raise ValueError(f"need at least as many keys as queries, got Tk={kv_len} < Tq={q_len}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    for name, extra_k, extra_v in (("prefix", prefix_k, prefix_v), ("companion", companion_k, companion_v)):
        if (extra_k is None) != (extra_v is None):
            raise ValueError(f"{name}_k and {name}_v must be given together")
    if companion_k is not None and (companion_k.shape != k.shape or companion_v.shape != v.shape):
        raise ValueError(
            f"companion_k, companion_v must have the shapes of k, v {tuple(k.shape)}, {tuple(v.shape)}, "
            f"got {tuple(companion_k.shape)}, {tuple(companion_v.shape)}"
        )
    if documents is not None and documents.shape != (q.shape[0], kv_len):
        raise ValueError(f"documents must be [B, Tk] = {(q.shape[0], kv_len)}, got {tuple(documents.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    requested, backend = backend, resolve_attention_backend(backend, q.device, q.dtype)
    if backend == "flash" and documents is not None and requested == "auto":
        backend = "flex"
    if backend == "flash" and documents is not None:
        raise ValueError("attention backend 'flash' does not take document resets (its varlen kernels are not wired "
                         "in); use model.attention_backend 'flex' or 'sdpa'")
    if backend == "flash":
        if q.dtype not in _FLASH_DTYPES or q.shape[-1] % 8 or q.shape[-1] > 256:
            raise ValueError(
                f"attention backend 'flash' needs fp16/bf16 and head_dim a multiple of 8 up to 256, "
                f"got {q.dtype}, head_dim {q.shape[-1]}"
            )
        return _flash_attention(q, k, v, window, prefix_k, prefix_v, companion_k, companion_v, scale)

    prefix_len = 0 if prefix_k is None else prefix_k.shape[-2]
    companion = companion_k is not None
    if backend == "sdpa" and window is not None and q_len >= 2 * window:
        return _blocked_sdpa(q, k, v, window, prefix_k, prefix_v, companion_k, companion_v, scale, documents)
    k = torch.cat([t for t in (prefix_k, companion_k, k) if t is not None], dim=-2)
    v = torch.cat([t for t in (prefix_v, companion_v, v) if t is not None], dim=-2)
    if backend == "flex":
        if documents is None:
            block_mask = _flex_block_mask(prefix_len, q_len, kv_len, window, companion, q.device)
        else:
            block_mask = _flex_document_mask(prefix_len, q_len, kv_len, window, companion, documents)
        flex = _compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    mask = visibility_mask(q_len, kv_len, prefix_len, window, q.device, companion)
    if documents is not None:  # [B, 1, Tq, keys]
        mask = mask & _same_document(documents, documents[:, kv_len - q_len :], prefix_len, companion)[:, None]
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q @ k.transpose(-2, -1)) * scale
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def _same_document(key_docs: torch.Tensor, query_docs: torch.Tensor, prefix_len: int, companion: bool
                   ) -> torch.Tensor:
    """[..., Tq, keys] bool: key in the query's document, over keys [prefix (always) || companion || sequence];
    key_docs [..., Tk], query_docs [..., Tq]."""
    same = key_docs[..., None, :] == query_docs[..., :, None]
    prefix = same.new_ones(*same.shape[:-1], prefix_len)
    return torch.cat([prefix, same, same] if companion else [prefix, same], dim=-1)


def _blocked_sdpa(q, k, v, window, prefix_k, prefix_v, companion_k, companion_v, scale, documents=None
                  ) -> torch.Tensor:
    """The sdpa backend in O(T window): queries in blocks of `window`, each against only the keys it can see.

    Block n holds the queries at positions off + n W .. off + (n + 1) W - 1 (off = Tk - Tq) and sees the
    2 W - 1 key positions ending at its last query (`_key_blocks`), plus the prefix; query r of a block sees
    block keys c with r <= c <= r + W - 1 that are real (position >= 0), companion keys likewise. Padded query rows
    (after the last query) see their own position, so no softmax row is empty; they are dropped. With `documents`
    the ids are blocked like the keys (shifted by one, so the zero padding of queries and keys is a document of its
    own) and the mask becomes per row, [B, 1, N, W, keys].
    """
    B, H, q_len, d = q.shape
    offset, n_blocks = k.shape[-2] - q_len, -(-q_len // window)
    span = 2 * window - 1
    q_blocks = F.pad(q, (0, 0, 0, n_blocks * window - q_len)).view(B, H, n_blocks, window, d)
    r = torch.arange(window, device=q.device)[:, None]
    c = torch.arange(span, device=q.device)[None, :]
    first_key = offset + window * torch.arange(n_blocks, device=q.device)[:, None, None] - (window - 1)
    band = (c >= r) & (c <= r + window - 1) & (first_key + c >= 0)  # [N, W, 2W - 1]
    if documents is not None:
        ids = documents[:, None, :, None] + 1
        query_ids = F.pad(ids[:, 0, offset:, 0], (0, n_blocks * window - q_len)).view(B, n_blocks, window)
        key_ids = _key_blocks(ids, window, offset, n_blocks)[:, 0, :, :, 0]  # [B, N, 2W - 1]
        band = (band & (key_ids[:, :, None, :] == query_ids[..., None]))[:, None]  # [B, 1, N, W, 2W - 1]
    keys, values, masks = [], [], []
    if prefix_k is not None:
        keys.append(prefix_k[:, :, None].expand(-1, -1, n_blocks, -1, -1))
        values.append(prefix_v[:, :, None].expand(-1, -1, n_blocks, -1, -1))
        masks.append(band.new_ones(*band.shape[:-1], prefix_k.shape[-2]))
    for part_k, part_v in ((companion_k, companion_v), (k, v)):
        if part_k is not None:
            keys.append(_key_blocks(part_k, window, offset, n_blocks))
            values.append(_key_blocks(part_v, window, offset, n_blocks))
            masks.append(band)
    out = F.scaled_dot_product_attention(
        q_blocks, torch.cat(keys, dim=-2), torch.cat(values, dim=-2), attn_mask=torch.cat(masks, dim=-1), scale=scale
    )
    return out.view(B, H, n_blocks * window, d)[:, :, :q_len]


def _key_blocks(t: torch.Tensor, window: int, offset: int, n_blocks: int) -> torch.Tensor:
    """[B, H, Tk, d] -> [B, H, N, 2W - 1, d]: block n holds key positions offset + n W - (W - 1) ..
    offset + (n + 1) W - 1, zero where a position is before the first key or after the last."""
    left = max(0, window - 1 - offset)
    right = n_blocks * window + offset - t.shape[-2]
    padded = F.pad(t, (0, 0, left, right))[:, :, max(0, offset - window + 1) :]
    return padded.unfold(2, 2 * window - 1, window).transpose(-1, -2)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(
    prefix_len: int, q_len: int, kv_len: int, window: int | None, companion: bool, device: torch.device
) -> BlockMask:
    mask_mod = _make_mask_mod(prefix_len, q_len, kv_len, window)
    return create_block_mask(mask_mod, None, None, q_len, _num_keys(prefix_len, kv_len, companion), device=device)


def _flex_document_mask(prefix_len: int, q_len: int, kv_len: int, window: int | None, companion: bool,
                        documents: torch.Tensor) -> BlockMask:
    """The block mask of `_make_mask_mod`'s rule within documents [B, Tk] (built per call: it depends on them)."""
    visible = _make_mask_mod(prefix_len, q_len, kv_len, window)
    offset = kv_len - q_len

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx - prefix_len
        j = torch.where(j >= kv_len, j - kv_len, j).clamp(min=0)
        same = documents[b, j] == documents[b, q_idx + offset]
        return visible(b, h, q_idx, kv_idx) & ((kv_idx < prefix_len) | same)

    keys = _num_keys(prefix_len, kv_len, companion)
    return create_block_mask(mask_mod, documents.shape[0], None, q_len, keys, device=documents.device)


@functools.cache
def _compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention)


def _flash_kernels() -> tuple[Callable, Callable]:
    """flash-attn's forward and backward kernel ops (flash-attn >= 2.7 signatures)."""
    from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    return _flash_attn_forward, _flash_attn_backward


def _flash_attention(q, k, v, window, prefix_k, prefix_v, companion_k, companion_v, scale) -> torch.Tensor:
    """The flash backend on [B, H, T, d] tensors (flash-attn works in [B, T, H, d])."""
    tensors = (q, k, v, prefix_k, prefix_v, companion_k, companion_v)
    tensors = (None if t is None else t.transpose(1, 2).contiguous() for t in tensors)
    window_left = -1 if window is None else window - 1
    return _FlashPrefixAttention.apply(*tensors, window_left, scale).transpose(1, 2)


class _FlashPrefixAttention(torch.autograd.Function):
    """Flash sliding-window attention over keys and optional companion keys, jointly normalised with an unmasked
    prefix ([B, T, H, d]).

    Forward: one kernel call per part (`_flash_parts`): the keys and the companion keys (causal,
    window_size=(window_left, 0), bottom-right aligned) and the prefix (no mask); outputs merge exactly as
    out = sum_i e^{lse_i - lse} o_i with lse = logsumexp_i lse_i.
    Backward: flash-attn's softmax_lse carries no gradient, so merging the outputs of `flash_attn_func` under
    autograd would silently drop the gradient through the normalisers. Instead each part runs flash's backward
    kernel with the *merged* out and lse: the kernel then rebuilds the joint probabilities restricted to that part
    and D = rowsum(dout * out) of the joint softmax, which is exactly the joint gradient (as in ring attention).
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, companion_k, companion_v, window_left, scale):
        flash_fwd, _ = _flash_kernels()
        kv_inputs = (k, v, prefix_k, prefix_v, companion_k, companion_v)
        outs, lses = [], []
        for part_k, part_v, causal, window_size in _flash_parts(*kv_inputs, window_left):
            if part_k is None:
                continue
            o, lse, _, _ = flash_fwd(q, part_k, part_v, 0.0, scale, causal, *window_size, 0.0, None, False)
            outs.append(o)
            lses.append(lse)
        lse = torch.logsumexp(torch.stack(lses), dim=0)  # [B, H, Tq], float32
        out = sum(o.to(lse.dtype) * (l - lse).exp().transpose(1, 2)[..., None] for o, l in zip(outs, lses))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, *kv_inputs, out, lse)
        ctx.window_left, ctx.scale = window_left, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        _, flash_bwd = _flash_kernels()
        q, *kv_inputs, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=lse.dtype)
        grads = []  # dk, dv of each part, in forward's argument order
        for part_k, part_v, causal, window_size in _flash_parts(*kv_inputs, ctx.window_left):
            if part_k is None:
                grads += [None, None]
                continue
            dq_part, dk, dv = torch.empty_like(q), torch.empty_like(part_k), torch.empty_like(part_v)
            flash_bwd(
                dout, q, part_k, part_v, out, lse, dq_part, dk, dv,
                0.0, ctx.scale, causal, *window_size, 0.0, None, False, None,
            )  # fmt: skip
            dq += dq_part
            grads += [dk, dv]
        return dq.to(q.dtype), *grads, None, None


def _flash_parts(k, v, prefix_k, prefix_v, companion_k, companion_v, window_left) -> list[tuple]:
    """(keys, values, causal, window_size) of each flash kernel call, in argument order: the sequence keys, the
    prefix, the companion keys (keys and values None for an absent part)."""
    sliding = (True, (window_left, 0))
    return [(k, v, *sliding), (prefix_k, prefix_v, False, (-1, -1)), (companion_k, companion_v, *sliding)]


@dataclass
class KVCache:
    """Decoding state of one `Attention` layer.

    k, v: [B, H, n, d] rotated keys and values of the last n tokens, n <= window - 1 (all tokens when window is
    None). pos: tokens seen so far, i.e. the absolute position of the next token. ck, cv: the companion keys and
    values of the same n tokens, or None when the sequence has no companion.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int
    ck: torch.Tensor | None = None
    cv: torch.Tensor | None = None


class Attention(nn.Module):
    """Multi-head sliding-window attention with RoPE, an optional always-visible prefix and optional companions.

    wq, wk, wv project dim -> n_heads * head_dim (column-parallel), wo projects back (row-parallel, N(0, out_std)
    init, the others N(0, init_std)). Under tensor parallel a rank owns n_heads / tp heads: `self.n_heads` is that
    local count. Everything per head is kept as [B, H, T, d].

    Under sequence parallel x (and companion) arrive as this rank's sequence shard [B, T/tp, dim] and the output
    leaves as one, unless `full_sequence` (full [B, T, dim] in and out on every rank, for a mixer that gathers the
    sequence itself). The prefix is never a sequence shard.

    RoPE rotates queries, sequence keys and companion keys at their absolute positions (token t's companion at
    token t's). Prefix tokens are projected by wk, wv and are NOT rotated: they are position-free (every query sees
    them wherever it sits), and a learned persistent key can absorb any fixed rotation anyway.

    Under context parallel x arrives as this rank's [B, T/cp, dim] and q, k, v cross to the full sequence for
    n_heads / (tp cp) heads (`parallel.context`: RoPE at full-sequence positions), back before wo.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        head_dim: int,
        window: int | None,
        rope_base: float = 10000.0,
        backend: str = "auto",
        *,
        init_std: float = 0.02,
        out_std: float = 0.02,
        full_sequence: bool = False,
        parallel: ParallelDims = SINGLE_RANK,
    ):
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.n_heads, self.head_dim, self.window = context_parallel_heads(n_heads, parallel), head_dim, window
        self.parallel, self.full_sequence = parallel, full_sequence
        self.rope_base, self.backend = rope_base, backend
        inner = n_heads * head_dim
        column = functools.partial(
            column_parallel_linear, dim, inner, bias=False, parallel=parallel, init_method=normal_init(init_std),
            full_sequence=full_sequence,
        )
        self.wq, self.wk, self.wv = column(), column(), column()
        self.wo = row_parallel_linear(
            inner, dim, bias=False, parallel=parallel, init_method=normal_init(out_std), full_sequence=full_sequence
        )

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, H * d] -> [B, H, T, d]."""
        return t.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def _rotated_keys_values(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
        """t [B, T, dim] -> [RoPE-rotated keys, values], each [B, H, T, d]."""
        k, v = (core_heads(w(t), self.parallel, self.full_sequence) for w in (self.wk, self.wv))
        return [apply_rope(self._heads(k), cos, sin), self._heads(v)]

    def forward(
        self,
        x: torch.Tensor,
        prefix: torch.Tensor | None = None,
        cache: KVCache | None = None,
        companion: torch.Tensor | None = None,
        resets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """x [B, T, dim]; prefix [B, P, dim] or [P, dim] (shared by the batch; the same on every TP rank); cache from
        the previous call or None; companion [B, T, dim] or None: token t's companion, a key/value seen exactly when
        token t is. (x, companion and out are [B, T/tp, dim] sequence shards under sequence parallel, see the class.)

        Returns (out [B, T, dim], new cache). Always returning the cache is free (it slices the keys just
        computed); pass it back to continue the sequence: feeding a sequence in pieces (chunked prefill, then one
        token at a time) gives the same outputs as one call over the whole sequence. The prefix is not cached:
        pass it on every call. Companions are cached with their tokens: pass them on every call or on none.

        resets [B, T] bool (packed documents, True where one starts; only from the start of a sequence, cache None):
        every document attends as if the sequence began there (its own keys, RoPE positions counted from its first
        token, the prefix); no cache is returned (None).
        """
        if companion is not None and companion.shape != x.shape:
            raise ValueError(f"companion must have x's shape {tuple(x.shape)}, got {tuple(companion.shape)}")
        if cache is not None and (cache.ck is None) != (companion is None):
            raise ValueError(
                f"companion {'not ' if companion is None else ''}given, but the cache was built "
                f"{'with' if companion is None else 'without'} companions: pass them on every call or on none"
            )
        if resets is not None and cache is not None:
            raise ValueError("document resets are only taken from the start of a sequence (cache None)")
        q = self._heads(core_heads(self.wq(x), self.parallel, self.full_sequence))  # SP gathers, CP all-to-all
        batch, _, seq_len, _ = q.shape
        start = 0 if cache is None else cache.pos
        if resets is None:
            positions = torch.arange(start, start + seq_len, device=x.device)
        else:
            positions = document_positions(resets)[:, None]  # [B, 1, T]: per row, broadcast over the heads
        cos, sin = rope_angles(positions, self.head_dim, self.rope_base)
        q = apply_rope(q, cos, sin)
        kv = self._rotated_keys_values(x, cos, sin)
        kv += [None, None] if companion is None else self._rotated_keys_values(companion, cos, sin)
        if cache is not None:
            cached = (cache.k, cache.v, cache.ck, cache.cv)
            kv = [t if t is None else torch.cat([c, t], dim=2) for c, t in zip(cached, kv)]
        k, v, ck, cv = kv

        prefix_k = prefix_v = None
        if prefix is not None:  # not a sequence shard: never gathered along T
            prefix = prefix if prefix.dim() == 3 else prefix[None]
            prefix_k, prefix_v = (
                self._heads(local_heads(apply_to_replicated(w, prefix), self.parallel)).expand(batch, -1, -1, -1)
                for w in (self.wk, self.wv)
            )

        documents = None if resets is None else document_ids(resets)
        y = sliding_window_attention(
            q, k, v, self.window, prefix_k, prefix_v, self.backend, companion_k=ck, companion_v=cv, documents=documents
        )
        out = self.wo(core_output(y.transpose(1, 2).flatten(2), self.parallel, self.full_sequence))
        if resets is not None:
            return out, None

        n = k.shape[2]
        first = 0 if self.window is None else max(0, n - (self.window - 1))
        k, v, ck, cv = (t if t is None else t[:, :, first:] for t in kv)
        return out, KVCache(k, v, start + seq_len, ck, cv)
