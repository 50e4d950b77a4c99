"""Sliding-window attention: the mask rule (prefix and companion keys included) against a brute-force loop, backends
against naive, the flash merge against a CPU stand-in of flash-attn's kernels, RoPE against complex rotation, and
the layer's KV cache."""

import pytest
import torch

from titans_parallel import attention
from titans_parallel.attention import Attention, resolve_attention_backend, sliding_window_attention
from titans_parallel.rope import apply_rope, rope_angles

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, H, D = 2, 3, 8
WINDOWS = [1, 3, 9, None]  # 9 = Tk: the window covers every key
SHAPES = [(9, 9), (4, 9), (1, 9)]  # (Tq, Tk)
CPU_BACKENDS = ["naive", "sdpa", "flex"]


def _inputs(q_len, kv_len, prefix_len, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = rand(B, H, q_len, D), rand(B, H, kv_len, D), rand(B, H, kv_len, D)
    pk, pv = (rand(B, H, prefix_len, D), rand(B, H, prefix_len, D)) if prefix_len else (None, None)
    return q, k, v, pk, pv


def _companions(kv_len, companion=True, seed=1):
    """Companion keys and values [B, H, Tk, D] (float64), or (None, None) when companion is False."""
    if not companion:
        return None, None
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, kv_len, D, generator=g, dtype=torch.float64) for _ in range(2))


def _brute_force(q, k, v, window, prefix_k, prefix_v, companion_k=None, companion_v=None):
    """Per query: gather the prefix and the keys (and companion keys, at the same positions) it may see, softmax
    over exactly those."""
    q_len, kv_len = q.shape[2], k.shape[2]
    out = torch.empty_like(q)
    for i in range(q_len):
        p = kv_len - q_len + i
        lo = 0 if window is None else max(0, p - window + 1)
        keys, vals = k[:, :, lo : p + 1], v[:, :, lo : p + 1]
        if companion_k is not None:
            keys = torch.cat([companion_k[:, :, lo : p + 1], keys], 2)
            vals = torch.cat([companion_v[:, :, lo : p + 1], vals], 2)
        if prefix_k is not None:
            keys, vals = torch.cat([prefix_k, keys], 2), torch.cat([prefix_v, vals], 2)
        weights = torch.softmax(torch.einsum("bhd,bhjd->bhj", q[:, :, i], keys) / D**0.5, dim=-1)
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", weights, vals)
    return out


@pytest.mark.parametrize("companion", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prefix_len", [0, 4])
@pytest.mark.parametrize("window", WINDOWS)
def test_naive_matches_brute_force(window, prefix_len, shape, companion):
    q, k, v, pk, pv = _inputs(*shape, prefix_len)
    ck, cv = _companions(shape[1], companion)
    out = sliding_window_attention(q, k, v, window, pk, pv, backend="naive", companion_k=ck, companion_v=cv)
    torch.testing.assert_close(out, _brute_force(q, k, v, window, pk, pv, ck, cv), rtol=0, atol=1e-12)


@pytest.mark.parametrize("companion", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prefix_len", [0, 4])
@pytest.mark.parametrize("window", WINDOWS)
def test_backend_matches_naive(backend, window, prefix_len, shape, companion):
    q, k, v, pk, pv = _inputs(*shape, prefix_len)
    ck, cv = _companions(shape[1], companion)
    ref, out = (
        sliding_window_attention(q, k, v, window, pk, pv, name, companion_k=ck, companion_v=cv)
        for name in ("naive", backend)
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("companion", [False, True])
@pytest.mark.parametrize("window", [3, None])
def test_sdpa_gradients_match_naive(window, companion):
    """sdpa trains on CPU; flex has no CPU backward (torch raises), flash is checked below."""
    q, k, v, pk, pv = _inputs(6, 10, 4)
    ck, cv = _companions(10, companion)
    inputs = [t.requires_grad_(True) for t in (q, k, v, pk, pv, ck, cv) if t is not None]
    weight = torch.randn(B, H, 6, D, dtype=torch.float64)
    ref, out = (
        sliding_window_attention(q, k, v, window, pk, pv, backend, companion_k=ck, companion_v=cv)
        for backend in ("naive", "sdpa")
    )
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("companion", [False, True])
@pytest.mark.parametrize("prefix_len", [0, 4])
@pytest.mark.parametrize("shape", [(37, 37), (20, 45), (9, 11)])
@pytest.mark.parametrize("window", [4, 7])
def test_sdpa_query_blocks_match_naive(window, shape, prefix_len, companion):
    """sdpa on Tq >= 2 window runs queries in blocks against the keys each block can see (linear in T); outputs and
    every gradient equal the dense mask's, with a KV-cache offset (Tk > Tq) and a partial last block."""
    q, k, v, pk, pv = _inputs(*shape, prefix_len)
    ck, cv = _companions(shape[1], companion)
    inputs = [t.requires_grad_(True) for t in (q, k, v, pk, pv, ck, cv) if t is not None]
    weight = torch.randn(B, H, shape[0], D, dtype=torch.float64)
    ref, out = (
        sliding_window_attention(q, k, v, window, pk, pv, backend, companion_k=ck, companion_v=cv)
        for backend in ("naive", "sdpa")
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for g, g_ref in zip(torch.autograd.grad((out * weight).sum(), inputs), torch.autograd.grad((ref * weight).sum(), inputs)):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [3, None])
def test_float32_within_tolerance(backend, window):
    """float32 (any backend) stays within 1e-5 of the float64 spec for O(1) inputs."""
    q, k, v, pk, pv = _inputs(9, 9, 4)
    ref = sliding_window_attention(q, k, v, window, pk, pv, backend="naive")
    q, k, v, pk, pv = (t.float() for t in (q, k, v, pk, pv))
    out = sliding_window_attention(q, k, v, window, pk, pv, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_prefix_visible_beyond_window(backend):
    """The last query (far past a window of 2) sees the prefix but not an early key."""
    q, k, v, pk, pv = _inputs(16, 16, 3)
    out = sliding_window_attention(q, k, v, 2, pk, pv, backend=backend)[:, :, -1]
    changed_prefix = sliding_window_attention(q, k, v, 2, pk, pv + 1.0, backend=backend)[:, :, -1]
    k0, v0 = k.clone(), v.clone()
    k0[:, :, 0], v0[:, :, 0] = 5.0, 5.0
    changed_early_key = sliding_window_attention(q, k0, v0, 2, pk, pv, backend=backend)[:, :, -1]
    assert (changed_prefix - out).abs().min() > 1e-3
    assert torch.equal(changed_early_key, out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [3, None])
def test_causality_exact(backend, window):
    """Changing keys/values after position p leaves the outputs up to p bit-identical."""
    q, k, v, pk, pv = _inputs(9, 9, 2)
    out = sliding_window_attention(q, k, v, window, pk, pv, backend=backend)
    for p in range(8):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, p + 1 :] += 3.0
        v2[:, :, p + 1 :] -= 3.0
        out2 = sliding_window_attention(q, k2, v2, window, pk, pv, backend=backend)
        assert torch.equal(out2[:, :, : p + 1], out[:, :, : p + 1])
        assert not torch.equal(out2[:, :, p + 1 :], out[:, :, p + 1 :])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [3, None])
def test_companion_causality_exact(backend, window):
    """Changing companion key/value j leaves outputs before position j bit-identical, changes every output that
    sees position j (j <= p < j + window) and, with a window, leaves later outputs bit-identical."""
    q, k, v, pk, pv = _inputs(9, 9, 2)
    ck, cv = _companions(9)
    out = sliding_window_attention(q, k, v, window, pk, pv, backend, companion_k=ck, companion_v=cv)
    for j in range(9):
        ck2, cv2 = ck.clone(), cv.clone()
        ck2[:, :, j] += 3.0
        cv2[:, :, j] -= 3.0
        out2 = sliding_window_attention(q, k, v, window, pk, pv, backend, companion_k=ck2, companion_v=cv2)
        hi = 9 if window is None else j + window
        assert torch.equal(out2[:, :, :j], out[:, :, :j])
        assert ((out2 - out)[:, :, j:hi].abs().amax(-1) > 1e-6).all()
        assert torch.equal(out2[:, :, hi:], out[:, :, hi:])


def _flash_stand_in_probs(q, k, lse, scale, causal, left, right):
    """softmax(q k^T * scale) normalised by lse, under flash-attn's documented mask ([B, T, H, d] layout):
    query i sees keys [i + Tk - Tq - left, i + Tk - Tq + right] (-1: unbounded), causal forces right = 0."""
    q_len, kv_len = q.shape[1], k.shape[1]
    shift = torch.arange(q_len)[:, None] + kv_len - q_len
    j = torch.arange(kv_len)[None, :]
    right = 0 if causal else right
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= shift - left
    if right >= 0:
        allowed &= j <= shift + right
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(scale).masked_fill(~allowed, float("-inf"))
    if lse is None:
        lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp(), lse


def _flash_fwd_stand_in(q, k, v, dropout_p, scale, causal, left, right, softcap, alibi, return_softmax):
    probs, lse = _flash_stand_in_probs(q, k, None, scale, causal, left, right)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse, None, None


def _flash_bwd_stand_in(dout, q, k, v, out, lse, dq, dk, dv, dropout_p, scale, causal, left, right, *rest):
    """FlashAttention-2 backward: probabilities rebuilt from the given lse, D = rowsum(dout * out)."""
    probs, _ = _flash_stand_in_probs(q, k, lse, scale, causal, left, right)
    d_probs = torch.einsum("bqhd,bkhd->bhqk", dout, v)
    delta = (dout * out).sum(-1).transpose(1, 2)
    d_scores = probs * (d_probs - delta[..., None])
    dq.copy_(torch.einsum("bhqk,bkhd->bqhd", d_scores, k) * scale)
    dk.copy_(torch.einsum("bhqk,bqhd->bkhd", d_scores, q) * scale)
    dv.copy_(torch.einsum("bhqk,bqhd->bkhd", probs, dout))
    return delta


@pytest.mark.parametrize("companion", [False, True])
@pytest.mark.parametrize("prefix_len", [0, 5])
@pytest.mark.parametrize("window", [1, 3, None])
def test_flash_merge_and_gradients(monkeypatch, window, prefix_len, companion):
    """The flash path (layouts, window_size, lse merge, per-part backward with the merged out/lse, gradients
    returned in argument order) on a float64 CPU stand-in for flash-attn's kernels: outputs and all gradients
    equal naive attention's."""
    monkeypatch.setattr(attention, "_flash_kernels", lambda: (_flash_fwd_stand_in, _flash_bwd_stand_in))
    q, k, v, pk, pv = _inputs(6, 10, prefix_len)
    ck, cv = _companions(10, companion)
    inputs = [t.requires_grad_(True) for t in (q, k, v, pk, pv, ck, cv) if t is not None]
    weight = torch.randn(B, H, 6, D, dtype=torch.float64)

    ref = sliding_window_attention(q, k, v, window, pk, pv, backend="naive", companion_k=ck, companion_v=cv)
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    out = attention._flash_attention(q, k, v, window, pk, pv, ck, cv, D**-0.5)
    grads = torch.autograd.grad((out * weight).sum(), inputs)

    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)


def test_backend_resolution(monkeypatch):
    assert resolve_attention_backend("auto", "cpu") == "sdpa"
    assert resolve_attention_backend("flex", "cpu") == "flex"
    with pytest.raises(ValueError, match="unknown attention backend 'flash2'"):
        resolve_attention_backend("flash2", "cpu")
    with pytest.raises(RuntimeError, match="'flash' needs CUDA"):
        resolve_attention_backend("flash", "cpu")
    q, k, v, _, _ = _inputs(4, 4, 0)
    with pytest.raises(RuntimeError, match="'flash' needs CUDA"):
        sliding_window_attention(q, k, v, 2, backend="flash")
    with pytest.raises(ValueError, match="companion_k and companion_v must be given together"):
        sliding_window_attention(q, k, v, 2, backend="naive", companion_k=k)
    with pytest.raises(ValueError, match="companion_k, companion_v must have the shapes of k, v"):
        sliding_window_attention(q, k, v, 2, backend="naive", companion_k=k[:, :, 1:], companion_v=v[:, :, 1:])
    with pytest.raises(ValueError, match="unknown attention backend"):
        Attention(16, 2, 8, window=4, backend="xformers")

    monkeypatch.setattr(attention, "_flash_unavailable", lambda: "flash_attn is not importable (test)")
    assert resolve_attention_backend("auto", "cuda") == "flex"
    with pytest.raises(RuntimeError, match="not importable"):
        resolve_attention_backend("flash", "cuda")
    monkeypatch.setattr(attention, "_flash_unavailable", lambda: None)
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16) == "flash"
    assert resolve_attention_backend("auto", "cuda", torch.float32) == "flex"


def test_rope_is_pairwise_complex_rotation():
    """Channel pairs (i, i + d/2) rotate as complex numbers by position * base^(-2i/d)."""
    d, positions = 8, torch.tensor([0, 1, 7, 1000])
    x = torch.randn(2, 4, d, dtype=torch.float64)
    cos, sin = rope_angles(positions, d, base=500.0)
    freqs = 500.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(
        torch.ones(4, d // 2, dtype=torch.float64), positions[:, None] * freqs
    )
    expected = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=0, atol=1e-6)  # cos/sin are float32


def test_rope_scores_depend_on_relative_position():
    q, k = torch.randn(2, 16, dtype=torch.float64)
    rot = lambda x, p: apply_rope(x[None], *rope_angles(torch.tensor([p]), 16))[0]  # noqa: E731
    torch.testing.assert_close(rot(q, 3) @ rot(k, 1), rot(q, 12) @ rot(k, 10), rtol=0, atol=1e-6)
    assert not torch.allclose(rot(q, 3) @ rot(k, 1), rot(q, 3) @ rot(k, 2))


def _layer(window, backend="auto"):
    torch.manual_seed(0)
    return Attention(dim=12, n_heads=3, head_dim=4, window=window, rope_base=100.0, backend=backend).double()


@pytest.mark.parametrize("companion", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "naive"])
@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("window", [3, None])
def test_layer_decode_matches_full_forward(window, shared_prefix, backend, companion):
    layer = _layer(window, backend)
    x = torch.randn(2, 13, 12, dtype=torch.float64)
    prefix = torch.randn(2, 12, dtype=torch.float64) if shared_prefix else torch.randn(2, 2, 12, dtype=torch.float64)
    comp = torch.randn(2, 13, 12, dtype=torch.float64) if companion else None
    full, full_cache = layer(x, prefix, companion=comp)

    cache, outs = None, []
    for t in range(13):
        out, cache = layer(x[:, t : t + 1], prefix, cache, None if comp is None else comp[:, t : t + 1])
        outs.append(out)
        assert cache.pos == t + 1
        assert cache.k.shape[2] == (t + 1 if window is None else min(t + 1, window - 1))
        assert (cache.ck is None) == (cache.cv is None) == (not companion)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)
    for name in ("k", "v", "ck", "cv") if companion else ("k", "v"):
        torch.testing.assert_close(getattr(cache, name), getattr(full_cache, name), rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [3, None])
def test_layer_companion_shares_rotation_and_window(window):
    """Companion tokens equal to x give keys equal to x's own (same projection, same RoPE positions), so without a
    prefix every visible key appears twice and the softmax (hence the output) is unchanged; mid-sequence too."""
    layer = _layer(window)
    x = torch.randn(2, 13, 12, dtype=torch.float64)
    out, cache = layer(x[:, :5])
    out_c, cache_c = layer(x[:, :5], companion=x[:, :5])
    torch.testing.assert_close(out_c, out, rtol=0, atol=1e-12)
    out_c, out = layer(x[:, 5:], None, cache_c, x[:, 5:])[0], layer(x[:, 5:], None, cache)[0]
    torch.testing.assert_close(out_c, out, rtol=0, atol=1e-12)


def test_layer_companion_errors():
    layer = _layer(3)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="companion must have x's shape"):
        layer(x, companion=x[:, :4])
    _, cache = layer(x)
    with pytest.raises(ValueError, match="cache was built without companions"):
        layer(x, cache=cache, companion=x)
    _, cache = layer(x, companion=x)
    with pytest.raises(ValueError, match="cache was built with companions"):
        layer(x, cache=cache)


@pytest.mark.parametrize("window", [3, 8, None])
def test_layer_chunked_prefill_matches_full_forward(window):
    layer = _layer(window)
    x = torch.randn(2, 13, 12, dtype=torch.float64)
    prefix = torch.randn(4, 12, dtype=torch.float64)
    full, _ = layer(x, prefix)
    cache, outs = None, []
    for lo, hi in [(0, 5), (5, 6), (6, 13)]:
        out, cache = layer(x[:, lo:hi], prefix, cache)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)


def test_layer_window_limits_context():
    """With window 3, token 10's output ignores token 0..7 but depends on the prefix and token 8."""
    layer = _layer(3)
    x = torch.randn(1, 11, 12, dtype=torch.float64)
    prefix = torch.randn(2, 12, dtype=torch.float64)
    out, _ = layer(x, prefix)
    x_far, x_near = x.clone(), x.clone()
    x_far[:, :8] += 1.0
    x_near[:, 8] += 1.0
    assert torch.equal(layer(x_far, prefix)[0][:, 10], out[:, 10])
    assert not torch.allclose(layer(x_near, prefix)[0][:, 10], out[:, 10])
    assert not torch.allclose(layer(x, prefix + 1.0)[0][:, 10], out[:, 10])


def _documents(resets: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(resets.long(), dim=-1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("companion", [False, True])
@pytest.mark.parametrize("window", [3, 4, None])
def test_documents_attend_as_if_alone(backend, companion, window):
    """With document ids, every document's outputs (and, but for flex on CPU, gradients) are those of a call on
    that document alone (prefix included), for documents shorter and longer than the window; T = 13 >= 2 window
    takes sdpa's query blocks, T alone its dense mask."""
    T = 13
    q, k, v, pk, pv = _inputs(T, T, 2)
    ck, cv = _companions(T, companion)
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[0, [5, 6, 11]] = True  # a one-token document, and one of two tokens at the end
    resets[1, 3] = True
    inputs = [t.requires_grad_(backend != "flex") for t in (q, k, v, pk, pv, ck, cv) if t is not None]
    out = sliding_window_attention(q, k, v, window, pk, pv, backend, companion_k=ck, companion_v=cv,
                                   documents=_documents(resets))
    weight = torch.randn(out.shape, dtype=torch.float64)
    loss_ref = 0
    for b in range(B):
        bounds = [0, *resets[b].nonzero().flatten().tolist(), T]
        for s, e in zip(bounds[:-1], bounds[1:]):
            part = lambda t: None if t is None else t[b : b + 1, :, s:e]  # noqa: E731
            ref = sliding_window_attention(part(q), part(k), part(v), window, pk[b : b + 1], pv[b : b + 1], "naive",
                                           companion_k=part(ck), companion_v=part(cv))
            torch.testing.assert_close(out[b : b + 1, :, s:e], ref, rtol=0, atol=1e-10)
            loss_ref = loss_ref + (ref * weight[b : b + 1, :, s:e]).sum()
    if backend != "flex":  # torch has no CPU flex backward
        for g, g_ref in zip(torch.autograd.grad((out * weight).sum(), inputs), torch.autograd.grad(loss_ref, inputs)):
            torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


def test_layer_with_resets_restarts_rope_and_returns_no_cache():
    """The layer's document reset: the second document's outputs equal the layer run on it alone (RoPE positions
    restart, the prefix is seen again); no cache comes back, and resets with a cache are refused."""
    torch.manual_seed(0)
    layer = Attention(16, 2, 8, window=4, backend="sdpa").double()
    x, prefix = torch.randn(1, 11, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    resets = torch.zeros(1, 11, dtype=torch.bool)
    resets[0, 6] = True
    out, cache = layer(x, prefix=prefix, resets=resets)
    assert cache is None
    torch.testing.assert_close(out[:, 6:], layer(x[:, 6:], prefix=prefix)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:, :6], layer(x[:, :6], prefix=prefix)[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="start of a sequence"):
        layer(x, prefix=prefix, cache=layer(x)[1], resets=resets)
