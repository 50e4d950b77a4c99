"""The token-by-token memory recurrence: slow, obviously right, the spec the fast forms are tested against."""

from __future__ import annotations

import torch

from .state import (
    GATE_EPS,
    MemoryState,
    check_scan_args,
    memory_mlp,
    column_norms,
    effective_theta,
    polyak_scale,
    renormalized,
)


def memory_scan_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    state: MemoryState,
    chunk_size: int = 1,
    retrieve: str = "inclusive",
    activation: str = "silu",
    polyak_step: bool = False,
    momentum_ema: bool = False,
    normalize_weights: bool = False,
) -> tuple[torch.Tensor, MemoryState]:
    """Same contract as `memory_scan`, one token at a time.

    S_t = eta_t S_{t-1} - theta_t grad_W l_t(W_{t'}),  W_t = (1 - alpha_t) W_{t-1} + S_t, where t' is the state at
    the start of token t's chunk and the inner gradient comes from autograd (independent of the dual form).
    `momentum_ema`: theta_t -> theta_t (1 - eta_t); `polyak_step`: theta_t -> theta_t * `polyak_scale` of token t's
    loss and gradient at W_{t'} (both differentiated through); `normalize_weights`: after a chunk's last token
    (and the call's), W_l -> `renormalized` to the column norms of the call's first W_l.
    """
    check_scan_args(q, k, v, theta, eta, alpha, state, chunk_size, retrieve, activation)
    out_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v, theta = (t.to(dtype) for t in (q, k, v, theta))
    eta = eta.to(dtype).clamp(GATE_EPS, 1.0)
    theta = effective_theta(theta, eta, momentum_ema)
    keep = (1 - alpha.to(dtype)).clamp(GATE_EPS, 1.0)
    weights = [w.to(dtype) for w in state.weights]
    momentum = [s.to(dtype) for s in state.momentum]
    targets = [column_norms(w) for w in weights]
    outputs = []
    with torch.enable_grad():
        for t in range(q.shape[2]):
            if t % chunk_size == 0:
                chunk_start = [w if w.requires_grad else w.detach().requires_grad_() for w in weights]
                weights = chunk_start
            if retrieve == "chunk":
                outputs.append(memory_mlp(q[:, :, t : t + 1], tuple(chunk_start), activation))
            elif retrieve == "exclusive":
                outputs.append(memory_mlp(q[:, :, t : t + 1], tuple(weights), activation))
            pred = memory_mlp(k[:, :, t : t + 1], tuple(chunk_start), activation)
            loss = (pred - v[:, :, t : t + 1]).pow(2).sum((-1, -2))  # [B, H]
            grads = torch.autograd.grad(loss.sum(), chunk_start, create_graph=True)
            lr = theta[:, :, t]
            if polyak_step:
                lr = lr * polyak_scale(loss, sum(g.pow(2).sum((-1, -2)) for g in grads))
            lr = lr[..., None, None]
            decay, forget_keep = (g[:, :, t, None, None] for g in (eta, keep))
            momentum = [decay * s - lr * g for s, g in zip(momentum, grads)]
            weights = [forget_keep * w + s for w, s in zip(weights, momentum)]
            if retrieve == "inclusive":
                outputs.append(memory_mlp(q[:, :, t : t + 1], tuple(weights), activation))
            if normalize_weights and ((t + 1) % chunk_size == 0 or t == q.shape[2] - 1):
                weights = [renormalized(w, n) for w, n in zip(weights, targets)]
    y = torch.cat(outputs, dim=2) if outputs else q.new_zeros(q.shape[:3] + (v.shape[-1],))
    return y.to(out_dtype), MemoryState(tuple(weights), tuple(momentum))
