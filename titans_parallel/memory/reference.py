"""The token-by-token memory recurrence: slow, obviously right, the spec the fast forms are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .state import (
    ACTIVATIONS,
    GATE_EPS,
    POLYAK_CURVATURE_FLOOR,
    POWER_EPS,
    MemoryState,
    check_power_steps,
    check_resets,
    check_scan_args,
    memory_mlp,
    column_norms,
    curvature_scale,
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
    resets: torch.Tensor | None = None,
    reset_state: MemoryState | None = None,
    power_steps: int = 0,
) -> tuple[torch.Tensor, MemoryState]:
    """Same contract as `memory_scan`, one token at a time.

    S_t = eta_t S_{t-1} - theta_t grad_W l_t(W_{t'}),  W_t = (1 - alpha_t) W_{t-1} + S_t, where t' is the state at
    the start of token t's chunk and the inner gradient comes from autograd (independent of the dual form).
    `momentum_ema`: theta_t -> theta_t (1 - eta_t); `polyak_step`: theta_t -> theta_t * `polyak_scale` of token t's
    loss and gradient at W_{t'} (both differentiated through), with `power_steps` n > 0 by `curvature_scale` of
    |J^T u|^2 instead (J = df(k_t; W_{t'})/dW, u: `_power_iterate`, held constant); `normalize_weights`: after a
    chunk's last token (and the call's), W_l -> `renormalized` to the column norms of the call's first W_l.
    `resets` [B, T] bool: before each token where it is True the state becomes `reset_state` (and the
    normalisation targets its column norms) and the row's chunk grid restarts at that token.
    """
    check_scan_args(q, k, v, theta, eta, alpha, state, chunk_size, retrieve, activation)
    check_resets(resets, reset_state, state, q)
    check_power_steps(power_steps, polyak_step)
    out_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v, theta = (t.to(dtype) for t in (q, k, v, theta))
    eta = eta.to(dtype).clamp(GATE_EPS, 1.0)
    theta = effective_theta(theta, eta, momentum_ema)
    keep = (1 - alpha.to(dtype)).clamp(GATE_EPS, 1.0)
    weights = [w.to(dtype) for w in state.weights]
    momentum = [s.to(dtype) for s in state.momentum]
    targets = [column_norms(w) for w in weights]
    offset: int | torch.Tensor = 0  # the first token of each row's chunk grid (per row [B] with resets)
    if resets is not None:
        reset_weights = [w.to(dtype) for w in reset_state.weights]
        reset_momentum = [s.to(dtype) for s in reset_state.momentum]
        reset_targets = [column_norms(w) for w in reset_weights]
        offset = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    chunk_start = weights
    outputs = []
    with torch.enable_grad():
        for t in range(q.shape[2]):
            if resets is not None:
                reset = resets[:, t]
                weights, momentum, targets = (
                    _select(reset, new, old)
                    for new, old in ((reset_weights, weights), (reset_momentum, momentum), (reset_targets, targets))
                )
                offset = torch.where(reset, t, offset)
            starts_chunk = (t - offset) % chunk_size == 0
            chunk_start = [_leaf(w) for w in _select(starts_chunk, weights, chunk_start)]
            weights = _select(starts_chunk, chunk_start, weights)
            if retrieve == "chunk":
                outputs.append(memory_mlp(q[:, :, t : t + 1], tuple(chunk_start), activation))
            elif retrieve == "exclusive":
                outputs.append(memory_mlp(q[:, :, t : t + 1], tuple(weights), activation))
            pred = memory_mlp(k[:, :, t : t + 1], tuple(chunk_start), activation)
            loss = (pred - v[:, :, t : t + 1]).pow(2).sum((-1, -2))  # [B, H]
            grads = torch.autograd.grad(loss.sum(), chunk_start, create_graph=True)
            lr = theta[:, :, t]
            if polyak_step and power_steps:
                u = _power_iterate(k[:, :, t : t + 1], chunk_start, pred - v[:, :, t : t + 1], power_steps, activation)
                probes = torch.autograd.grad((pred * u).sum(), chunk_start, create_graph=True)
                lr = lr * curvature_scale(sum(g.pow(2).sum((-1, -2)) for g in probes))
            elif polyak_step:
                lr = lr * polyak_scale(loss, sum(g.pow(2).sum((-1, -2)) for g in grads))
            lr = lr[..., None, None]
            decay, forget_keep = (g[:, :, t, None, None] for g in (eta, keep))
            momentum = [decay * s - lr * g for s, g in zip(momentum, grads)]
            weights = [forget_keep * w + s for w, s in zip(weights, momentum)]
            if retrieve == "inclusive":
                outputs.append(memory_mlp(q[:, :, t : t + 1], tuple(weights), activation))
            ends_chunk = ((t - offset + 1) % chunk_size == 0) | (t == q.shape[2] - 1)
            if normalize_weights and ends_chunk is not False:
                weights = _select(ends_chunk, [renormalized(w, n) for w, n in zip(weights, targets)], weights)
    y = torch.cat(outputs, dim=2) if outputs else q.new_zeros(q.shape[:3] + (v.shape[-1],))
    return y.to(out_dtype), MemoryState(tuple(weights), tuple(momentum))


def _power_iterate(k: torch.Tensor, weights: list[torch.Tensor], error: torch.Tensor, steps: int,
                   activation: str) -> torch.Tensor:
    """The unit vector [B, H, 1, d_out] after `steps` power steps of K - (|A_{L-1}|^2 - rho) I from `error`, with
    K u = J (J^T u) by a VJP and a JVP of f(k; W) in W (torch.func) and A_{L-1} the last layer's input; no autograd."""
    k, weights = k.detach(), tuple(w.detach() for w in weights)
    memory = lambda *ws: memory_mlp(k, ws, activation)  # noqa: E731
    last_input = k if len(weights) == 1 else ACTIVATIONS[activation].fn(memory_mlp(k, weights[:-1], activation))
    shift = last_input.pow(2).sum(-1, keepdim=True) - POLYAK_CURVATURE_FLOOR
    u = F.normalize(error.detach(), dim=-1, eps=POWER_EPS)
    for _ in range(steps):
        _, pullback = torch.func.vjp(memory, *weights)
        _, curved = torch.func.jvp(memory, weights, pullback(u))
        u = F.normalize(curved - shift * u, dim=-1, eps=POWER_EPS)
    return u


def _leaf(w: torch.Tensor) -> torch.Tensor:
    """w itself if autograd tracks it, else a detached copy that requires grad (to take inner gradients at)."""
    return w if w.requires_grad else w.detach().requires_grad_()


def _select(mask: bool | torch.Tensor, new: list[torch.Tensor], old: list[torch.Tensor]) -> list[torch.Tensor]:
    """new where mask else old: a Python bool picks a whole list (without resets every row agrees), a [B] mask
    picks per batch row of the [B, ...] tensors."""
    if isinstance(mask, bool):
        return new if mask else old
    return [torch.where(mask.view(-1, *[1] * (n.dim() - 1)), n, o) for n, o in zip(new, old)]
