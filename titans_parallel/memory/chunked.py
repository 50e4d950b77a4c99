"""The chunked dual form of the memory scan (DESIGN.md section 2): all tokens of a chunk at once, with matmuls.

Per chunk (length C, start state W, S) and per layer l, with X the queries' activations entering layer l:
    Zq_l = (b*X) W_l + (f*X) S_l - (G o (X A_{l-1}^T)) Delta_l
where A, Delta are the keys' activations and back-propagated errors at W. Every coefficient depends on the gates
only, so all chunks' coefficients are computed at once (with autograd) before the sequential loop over chunks.

The loop has an explicit backward (`_ChunkLoop`): the forward runs without autograd and keeps each chunk's start
state and small [C, width] intermediates; the backward walks the chunks in reverse and applies the hand-derived
vector-Jacobian product of one chunk step (second-order terms through Delta included), accumulating state gradients
with fused matmuls. `backward="autograd"` differentiates the same forward code with autograd instead: slower, but
twice differentiable, and the check the explicit backward is tested against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .state import ACTIVATIONS, GATE_EPS, Activation, MemoryState, check_scan_args

BACKWARD_MODES = ("explicit", "autograd")


class ChunkCoefficients(NamedTuple):
    """Gate-only coefficients of N chunks of C tokens, for a flattened batch*heads dimension BH.

    b, f [BH, N, C, 1]: the coefficients of W and S in each token's weights (rows shifted down one for exclusive
    retrieval); mixing [BH, N, C, C]: G = (P R) diag(theta), likewise shifted;
    end_b, end_f, end_eta [BH, N, 1, 1]: W_end = end_b W + end_f S - ..., S_end = end_eta S - ...;
    end_g, end_m [BH, N, C, 1]: the weights of each token's inner gradient in the chunk-end W and S.
    The chunk end is the last real token (the final chunk may be padded).
    """

    b: torch.Tensor
    f: torch.Tensor
    mixing: torch.Tensor
    end_b: torch.Tensor
    end_f: torch.Tensor
    end_eta: torch.Tensor
    end_g: torch.Tensor
    end_m: torch.Tensor

    @classmethod
    def from_gates(cls, theta, eta, alpha, last: int, retrieve: str) -> "ChunkCoefficients":
        """theta, eta, alpha: [BH, N, C]; `last` is the index of the final chunk's last real token."""
        C = theta.shape[-1]
        log_keep = torch.cumsum(torch.log((1 - alpha).clamp(GATE_EPS, 1.0)), dim=-1)
        log_eta = torch.cumsum(torch.log(eta.clamp(GATE_EPS, 1.0)), dim=-1)
        causal = torch.ones(C, C, dtype=torch.bool, device=theta.device).tril()
        P = torch.exp((log_keep[..., :, None] - log_keep[..., None, :]).masked_fill(~causal, float("-inf")))
        R = torch.exp((log_eta[..., :, None] - log_eta[..., None, :]).masked_fill(~causal, float("-inf")))
        G = (P @ R) * theta[..., None, :]
        b = torch.exp(log_keep)
        f = (P @ torch.exp(log_eta)[..., None]).squeeze(-1)

        rows = torch.full(theta.shape[-2:-1], C - 1, dtype=torch.long, device=theta.device)
        rows[-1] = last
        pick = rows.view(1, -1, 1)
        end_log_eta = torch.take_along_dim(log_eta, pick, dim=-1)
        upto = torch.arange(C, device=theta.device) <= rows[:, None]
        end_g = torch.take_along_dim(G, pick[..., None], dim=-2).squeeze(-2)
        end_m = theta * torch.exp((end_log_eta - log_eta).masked_fill(~upto, float("-inf")))
        end_b = torch.take_along_dim(b, pick, dim=-1)
        end_f = torch.take_along_dim(f, pick, dim=-1)

        if retrieve == "exclusive":
            b = torch.cat([torch.ones_like(b[..., :1]), b[..., :-1]], dim=-1)
            f = torch.cat([torch.zeros_like(f[..., :1]), f[..., :-1]], dim=-1)
            G = torch.cat([torch.zeros_like(G[..., :1, :]), G[..., :-1, :]], dim=-2)
        return cls(
            b[..., None], f[..., None], G, end_b[..., None], end_f[..., None], torch.exp(end_log_eta)[..., None],
            end_g[..., None], end_m[..., None],
        )


def memory_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    state: MemoryState,
    chunk_size: int = 16,
    retrieve: str = "inclusive",
    activation: str = "silu",
    backward: str = "explicit",
) -> tuple[torch.Tensor, MemoryState]:
    """Run the neural memory over a sequence; returns (y [B, H, T, d_out] in q's dtype, state at the end).

    q, k: [B, H, T, d]; v: [B, H, T, d_out]; theta, eta, alpha: [B, H, T] (theta already scaled);
    state: MemoryState with W_l, S_l [B, H, in_l, out_l]. Chunks of `chunk_size` tokens are counted from the first
    token of the call; T need not be a multiple of it. Computation and the returned state are fp32 (fp64 for fp64
    inputs). Differentiable in every input and in the state; `backward="autograd"` is twice differentiable.
    No per-token weights are ever materialised.
    """
    check_scan_args(q, k, v, theta, eta, alpha, state, chunk_size, retrieve, activation)
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}; got {backward!r}")
    B, H, T, _ = q.shape
    out_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    flat_state = [t.to(dtype).flatten(0, 1) for t in state.weights + state.momentum]
    L = len(state.weights)
    if T == 0:
        y = q.new_zeros(B, H, 0, v.shape[-1])
    else:
        C = min(chunk_size, T)
        N = -(-T // C)

        def chunks(x: torch.Tensor, fill: float) -> torch.Tensor:
            x = x.to(dtype).flatten(0, 1)
            if N * C > T:
                x = torch.cat([x, x.new_full((x.shape[0], N * C - T, *x.shape[2:]), fill)], dim=1)
            return x.view(B * H, N, C, *x.shape[2:])

        coef = ChunkCoefficients.from_gates(chunks(theta, 0.0), chunks(eta, 1.0), chunks(alpha, 0.0), (T - 1) % C, retrieve)
        inputs = (chunks(k, 0.0), chunks(v, 0.0), chunks(q, 0.0), *coef)
        if backward == "explicit":
            y, *flat_state = _ChunkLoop.apply(activation, retrieve, L, *inputs, *flat_state)
        else:
            y, flat_state = _forward_chunks(ACTIVATIONS[activation], retrieve, inputs, flat_state, saved=None)
        y = y.reshape(B, H, N * C, -1)[:, :, :T]
    unflat = [t.unflatten(0, (B, H)) for t in flat_state]
    return y.to(out_dtype), MemoryState(tuple(unflat[:L]), tuple(unflat[L:]))


class _Intermediates(NamedTuple):
    """What one chunk step keeps for its backward ([BH, C, width] or [BH, C, C], plus the chunk-start state)."""

    weights: list  # W_l at the chunk start
    momentum: list  # S_l at the chunk start
    acts: list  # A_0 = k, A_l = sigma(Z_l): the keys' activations entering each layer
    pres: list  # Z_l, l < L
    deltas: list  # Delta_l: errors back-propagated through the memory at the chunk-start weights
    backs: list  # Delta_{l+1} W_{l+1}^T, l < L
    xs: list  # X_l: the queries' activations entering each layer
    zqs: list  # the queries' pre-activations, l < L
    scores: list  # X_l A_{l-1}^T


def _forward_chunks(act: Activation, retrieve: str, inputs: tuple, flat_state: list, saved: list | None):
    """The sequential loop. inputs: (kc, vc, qc, *ChunkCoefficients) chunked [BH, N, C, ...]; flat_state:
    W_1..W_L, S_1..S_L [BH, in, out]. Returns (y [BH, N, C, d_out], end state); appends to `saved` if given."""
    L = len(flat_state) // 2
    weights, momentum = list(flat_state[:L]), list(flat_state[L:])
    outputs = []
    for k, v, q, b, f, G, eb, ef, ee, g, m in zip(*(t.unbind(1) for t in inputs)):
        acts, pres, backs = [k], [], []
        for layer in range(L - 1):
            pres.append(acts[-1] @ weights[layer])
            acts.append(act.fn(pres[-1]))
        deltas = [torch.baddbmm(v, acts[-1], weights[-1], beta=-2, alpha=2)]  # 2 (f(k) - v)
        for layer in range(L - 1, 0, -1):
            backs.insert(0, deltas[0] @ weights[layer].transpose(-1, -2))
            deltas.insert(0, backs[0] * act.grad(pres[layer - 1]))

        xs, zqs, scores = [], [], []
        x = q
        for layer in range(L):
            xs.append(x)
            if retrieve == "chunk":
                z = x @ weights[layer]
            else:
                scores.append(x @ acts[layer].transpose(-1, -2))
                z = torch.baddbmm(
                    torch.baddbmm((b * x) @ weights[layer], f * x, momentum[layer]), G * scores[-1], deltas[layer], alpha=-1
                )
            if layer < L - 1:
                zqs.append(z)
                x = act.fn(z)
        outputs.append(z)
        if saved is not None:
            saved.append(_Intermediates(weights, momentum, acts, pres, deltas, backs, xs, zqs, scores))

        inputs_t = [a.transpose(-1, -2) for a in acts]
        weights = [
            (w * eb).addcmul_(ef, s).baddbmm_(a_t, g * delta, alpha=-1)
            for w, s, a_t, delta in zip(weights, momentum, inputs_t, deltas)
        ]
        momentum = [(s * ee).baddbmm_(a_t, m * delta, alpha=-1) for s, a_t, delta in zip(momentum, inputs_t, deltas)]
    return torch.stack(outputs, dim=1), weights + momentum


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-batch Frobenius inner product of [BH, x, y] tensors -> [BH, 1, 1] (MKL's bmm is ~40x slower here)."""
    return (a * b).sum((1, 2), keepdim=True)


class _ChunkLoop(torch.autograd.Function):
    """`_forward_chunks` with the hand-derived backward (module docstring)."""

    @staticmethod
    def forward(ctx, activation: str, retrieve: str, L: int, *tensors):
        inputs, flat_state = tensors[:11], list(tensors[11:])
        saved: list[_Intermediates] = []
        y, end_state = _forward_chunks(ACTIVATIONS[activation], retrieve, inputs, flat_state, saved)
        ctx.activation, ctx.retrieve, ctx.intermediates = activation, retrieve, saved
        ctx.save_for_backward(*inputs)
        return (y, *end_state)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *d_end_state):
        act, retrieve, saved = ACTIVATIONS[ctx.activation], ctx.retrieve, ctx.intermediates
        inputs = ctx.saved_tensors
        L = len(saved[0].weights)
        d_state = [torch.zeros_like(w) if d is None else d for w, d in zip(saved[-1].weights + saved[-1].momentum, d_end_state)]
        dy = torch.zeros_like(inputs[2][..., :1]).expand(*inputs[2].shape[:3], d_state[L - 1].shape[-1]) if dy is None else dy
        grads = [[] for _ in inputs]
        for n in range(len(saved) - 1, -1, -1):
            chunk = [t[:, n] for t in inputs]
            chunk_grads, d_state = _chunk_backward(act, retrieve, saved[n], chunk, dy[:, n], d_state[:L], d_state[L:])
            for store, grad in zip(grads, chunk_grads):
                store.append(grad)
        ctx.intermediates = None
        return (None, None, None, *(torch.stack(g[::-1], dim=1) for g in grads), *d_state)


def _chunk_backward(act: Activation, retrieve: str, s: _Intermediates, chunk: list, dy, dW_end, dS_end):
    """Vector-Jacobian product of one chunk step.

    Given dy [BH, C, d_out] and the gradients of the chunk-end state, returns the gradients of the chunk's inputs
    (k, v, q, b, f, G, end_b, end_f, end_eta, end_g, end_m) and of the chunk-start state (W_1..W_L, S_1..S_L).
    """
    k, v, q, b, f, G, eb, ef, ee, g, m = chunk
    L = len(s.weights)
    # Chunk-end update: W' = eb W + ef S - A^T (g Delta), S' = ee S - A^T (m Delta).
    dW = [dw * eb for dw in dW_end]
    dS = [torch.addcmul(ds * ee, dw, ef) for dw, ds in zip(dW_end, dS_end)]
    d_eb = sum(_inner(dw, w) for dw, w in zip(dW_end, s.weights))
    d_ef = sum(_inner(dw, sm) for dw, sm in zip(dW_end, s.momentum))
    d_ee = sum(_inner(ds, sm) for ds, sm in zip(dS_end, s.momentum))
    d_acts, d_deltas, d_g, d_m = [], [], 0, 0
    for layer in range(L):
        a, delta = s.acts[layer], s.deltas[layer]
        pw, ps = a @ dW_end[layer], a @ dS_end[layer]  # -dGamma, -dMu: [C, out]
        d_deltas.append(-(g * pw + m * ps))
        d_g = d_g - (pw * delta).sum(-1, keepdim=True)
        d_m = d_m - (ps * delta).sum(-1, keepdim=True)
        d_acts.append(-torch.baddbmm((g * delta) @ dW_end[layer].transpose(-1, -2), m * delta, dS_end[layer].transpose(-1, -2)))

    # Query side, last layer first.
    d_b = torch.zeros_like(b)
    d_f = torch.zeros_like(f)
    d_G = torch.zeros_like(G)
    dz = dy
    for layer in range(L - 1, -1, -1):
        x, w, sm = s.xs[layer], s.weights[layer], s.momentum[layer]
        if retrieve == "chunk":
            dW[layer].baddbmm_(x.transpose(-1, -2), dz)
            dx = dz @ w.transpose(-1, -2)
        else:
            dW[layer].baddbmm_((b * x).transpose(-1, -2), dz)
            dS[layer].baddbmm_((f * x).transpose(-1, -2), dz)
            dxw, dxs = dz @ w.transpose(-1, -2), dz @ sm.transpose(-1, -2)
            d_b += (x * dxw).sum(-1, keepdim=True)
            d_f += (x * dxs).sum(-1, keepdim=True)
            dx = torch.addcmul(b * dxw, f, dxs)
            d_scores_mixed = -(dz @ s.deltas[layer].transpose(-1, -2))  # d(G o U): [C, C]
            d_deltas[layer] -= (G * s.scores[layer]).transpose(-1, -2) @ dz
            d_G += d_scores_mixed * s.scores[layer]
            d_u = d_scores_mixed * G
            dx.baddbmm_(d_u, s.acts[layer])
            d_acts[layer].baddbmm_(d_u.transpose(-1, -2), x)
        dz = dx * act.grad(s.zqs[layer - 1]) if layer > 0 else dx
    dq = dz

    # Keys: first the inner backward pass Delta_l = (Delta_{l+1} W_{l+1}^T) * sigma'(Z_l), in reverse of its order.
    d_pres = [None] * (L - 1)
    for layer in range(L - 1):
        z = s.pres[layer]
        d_back = d_deltas[layer] * act.grad(z)
        d_pres[layer] = d_deltas[layer] * s.backs[layer] * act.grad2(z)
        d_deltas[layer + 1].baddbmm_(d_back, s.weights[layer + 1])
        dW[layer + 1].baddbmm_(d_back.transpose(-1, -2), s.deltas[layer + 1])
    # Delta_L = 2 (A_{L-1} W_L - v).
    d_err = d_deltas[-1]
    d_acts[-1].baddbmm_(d_err, s.weights[-1].transpose(-1, -2), alpha=2)
    dW[-1].baddbmm_(s.acts[-1].transpose(-1, -2), d_err, alpha=2)
    dv = -2 * d_err
    # Keys forward: A_l = sigma(Z_l), Z_l = A_{l-1} W_l.
    for layer in range(L - 2, -1, -1):
        dz_key = torch.addcmul(d_pres[layer], d_acts[layer + 1], act.grad(s.pres[layer]))
        d_acts[layer].baddbmm_(dz_key, s.weights[layer].transpose(-1, -2))
        dW[layer].baddbmm_(s.acts[layer].transpose(-1, -2), dz_key)
    dk = d_acts[0]
    return [dk, dv, dq, d_b, d_f, d_G, d_eb, d_ef, d_ee, d_g, d_m], dW + dS
