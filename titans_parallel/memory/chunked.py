"""The chunked dual form of the memory scan (docs/memory.md): all tokens of a chunk at once, with matmuls.

Per chunk (length C, start state W, S) and per layer l, with X the queries' activations entering layer l:
    Zq_l = (b*X) W_l + (f*X) S_l - (G o (X A_{l-1}^T)) Delta_l
where A, Delta are the keys' activations and back-propagated errors at W. Every coefficient depends on the gates
only, so all chunks' coefficients are computed at once (with autograd) before the sequential loop over chunks.

Inside the loop each layer's weights and momentum are stacked as one [W_l; S_l] tensor [BH, 2 in_l, out_l], so the
retrieval (b*X | f*X) [W; S], the chunk-end update [W; S] -= (g*A | m*A)^T Delta and their gradients are one
matmul each rather than two. At small shapes the loop is bound by passes over the state, not by matmul FLOPs;
`compile=True` runs each chunk step through torch.compile, which fuses a step's elementwise passes.

The loop has an explicit backward (`_ChunkLoop`): the forward runs without autograd and keeps each chunk's start
state and small [C, width] intermediates; the backward walks the chunks in reverse and applies the hand-derived
vector-Jacobian product of one chunk step (second-order terms through Delta included). `backward="autograd"`
differentiates the same forward code with autograd instead: slower, but twice differentiable, and the check the
explicit backward is tested against.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from .grid import ChunkGrid
from .state import (
    ACTIVATIONS,
    GATE_EPS,
    POLYAK_CURVATURE_FLOOR,
    POLYAK_EPS,
    POWER_EPS,
    WEIGHT_NORM_EPS,
    Activation,
    MemoryState,
    check_power_steps,
    check_resets,
    check_scan_args,
    column_norms,
    effective_theta,
    curvature_scale,
    polyak_scale,
)

BACKWARD_MODES = ("explicit", "autograd")
_SAVED = object()  # marks a tensor leaf of what `_ChunkLoop` keeps, stored through save_for_backward


class ChunkCoefficients(NamedTuple):
    """Gate-only coefficients of N chunks of C tokens, for a flattened batch*heads dimension BH.

    retrieval [BH, N, C, 2, 1]: (b, f), each token's coefficients of W and S (rows shifted down one for exclusive
    retrieval); mixing [BH, N, C, C]: G = (P R) diag(theta), likewise shifted;
    decay [BH, N, 2, 1]: (end_b, end_eta) and carry [BH, N, 1, 1]: end_f, in W_end = end_b W + end_f S - ...,
    S_end = end_eta S - ...; update [BH, N, C, 2, 1]: (end_g, end_m), the weights of each token's inner gradient
    in the chunk-end W and S. The chunk end is the last real token (chunks may be padded: `ChunkGrid`).
    """

    retrieval: torch.Tensor
    mixing: torch.Tensor
    decay: torch.Tensor
    carry: torch.Tensor
    update: torch.Tensor

    @classmethod
    def from_gates(cls, theta, eta, alpha, ends: torch.Tensor, retrieve: str) -> "ChunkCoefficients":
        """theta, eta, alpha: [BH, N, C]; ends [BH or 1, N]: each chunk's last real token (`ChunkGrid.ends`; -1: an
        empty chunk, whose coefficients leave the state as it is)."""
        C = theta.shape[-1]
        log_keep = torch.cumsum(torch.log((1 - alpha).clamp(GATE_EPS, 1.0)), dim=-1)
        log_eta = torch.cumsum(torch.log(eta.clamp(GATE_EPS, 1.0)), dim=-1)
        causal = torch.ones(C, C, dtype=torch.bool, device=theta.device).tril()
        P = torch.exp((log_keep[..., :, None] - log_keep[..., None, :]).masked_fill(~causal, float("-inf")))
        R = torch.exp((log_eta[..., :, None] - log_eta[..., None, :]).masked_fill(~causal, float("-inf")))
        G = (P @ R) * theta[..., None, :]
        b = torch.exp(log_keep)
        f = (P @ torch.exp(log_eta)[..., None]).squeeze(-1)

        pick = ends.clamp_min(0)[..., None]
        end_log_eta = torch.take_along_dim(log_eta, pick, dim=-1)
        upto = torch.arange(C, device=theta.device) <= ends[..., None]
        end_g = torch.take_along_dim(G, pick[..., None], dim=-2).squeeze(-2)
        end_m = theta * torch.exp((end_log_eta - log_eta).masked_fill(~upto, float("-inf")))
        decay = torch.stack([torch.take_along_dim(b, pick, dim=-1), torch.exp(end_log_eta)], dim=-2)
        carry = torch.take_along_dim(f, pick, dim=-1).masked_fill(ends[..., None] < 0, 0.0)

        if retrieve == "exclusive":
            b = torch.cat([torch.ones_like(b[..., :1]), b[..., :-1]], dim=-1)
            f = torch.cat([torch.zeros_like(f[..., :1]), f[..., :-1]], dim=-1)
            G = torch.cat([torch.zeros_like(G[..., :1, :]), G[..., :-1, :]], dim=-2)
        retrieval, update = torch.stack([b, f], dim=-1)[..., None], torch.stack([end_g, end_m], dim=-1)[..., None]
        return cls(retrieval, G, decay, carry[..., None], update)


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
    compile: bool = False,
    polyak_step: bool = False,
    momentum_ema: bool = False,
    normalize_weights: bool = False,
    resets: torch.Tensor | None = None,
    reset_state: MemoryState | None = None,
    power_steps: int = 0,
) -> tuple[torch.Tensor, MemoryState]:
    """Run the neural memory over a sequence; returns (y [B, H, T, d_out] in q's dtype, state at the end).

    q, k: [B, H, T, d]; v: [B, H, T, d_out]; theta, eta, alpha: [B, H, T] (theta already scaled);
    state: MemoryState with W_l, S_l [B, H, in_l, out_l]. Chunks of `chunk_size` tokens are counted from the first
    token of the call; T need not be a multiple of it. Computation and the returned state are fp32 (fp64 for fp64
    inputs). Differentiable in every input and in the state; `backward="autograd"` is twice differentiable.
    No per-token weights are ever materialised. `compile`: run the steps of full chunks (forward and explicit
    backward) through torch.compile, fusing their elementwise work; each new shape compiles once (~10 s on CPU).
    Stabilisers (docs/memory.md; both off = the paper's rule): `momentum_ema` scales theta_t by (1 - eta_t);
    `polyak_step` scales token t's step by `state.polyak_scale` of its loss and gradient at the chunk-start state
    (a per-token factor of the mixing and update coefficients, computed inside each chunk step); with
    `power_steps` n > 0 its curvature is the largest curvature of the memory's output instead, estimated by n power
    steps (`state.curvature_scale`);
    `normalize_weights` rescales every W_l's columns at each chunk end to their lengths at the call's start
    (`state.renormalized`; the explicit backward maps gradients through it between chunk steps).
    Document resets: `resets` [B, T] bool, True at the first token of a document; the state before it becomes
    `reset_state` (a MemoryState shaped like `state`, differentiable), the row's chunks are counted from that
    token and with `normalize_weights` the column lengths aimed at are the reset weights'. Every document's outputs
    are those of a call on it alone from `reset_state`; the returned state is the one after the last token.
    (`reset_state` is not read without `resets`.)
    With resets the tokens are laid out in a per-row grid (`ChunkGrid.from_resets`), which costs one host sync
    per call before the loop over chunks; `resets=None` is the plain grid, unchanged.
    """
    check_scan_args(q, k, v, theta, eta, alpha, state, chunk_size, retrieve, activation)
    check_resets(resets, reset_state, state, q)
    polyak = check_power_steps(power_steps, polyak_step)
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}; got {backward!r}")
    if compile and backward != "explicit":
        raise ValueError('compile=True compiles the explicit backward\'s steps; it needs backward="explicit"')
    B, H, T, _ = q.shape
    out_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    stacked = _stacked(state, dtype)
    if T == 0:
        y = q.new_zeros(B, H, 0, v.shape[-1])
    else:
        C = min(chunk_size, T)
        grid = ChunkGrid.plain(T, C, q.device) if resets is None else ChunkGrid.from_resets(resets, C)
        theta = effective_theta(theta.to(dtype), eta.to(dtype).clamp(GATE_EPS, 1.0), momentum_ema)
        gates = (grid.to_grid(g.to(dtype), fill) for g, fill in ((theta, 0.0), (eta, 1.0), (alpha, 0.0)))
        coef = ChunkCoefficients.from_gates(*gates, grid.per_head(grid.ends, H), retrieve)
        inputs = (*(grid.to_grid(x.to(dtype), 0.0) for x in (k, v, q)), *coef)
        restarts = None if resets is None else _Restarts(grid.per_head(grid.starts, H), grid.restart_chunks)
        reset_stacked = [] if resets is None else _stacked(reset_state, dtype)
        if backward == "explicit":
            compiled = compile and C == chunk_size
            y, *stacked = _ChunkLoop.apply(
                activation, retrieve, polyak, normalize_weights, compiled, restarts, *inputs, *stacked,
                *reset_stacked,
            )
        else:
            y, stacked = _forward_chunks(
                ACTIVATIONS[activation], retrieve, polyak, normalize_weights, inputs, stacked, saved=None,
                restarts=restarts, reset_states=reset_stacked,
            )
        y = grid.from_grid(y, B, H, T)
    stacked = [s.unflatten(0, (B, H)) for s in stacked]
    weights = tuple(s[:, :, : w.shape[-2]] for s, w in zip(stacked, state.weights))
    momentum = tuple(s[:, :, w.shape[-2] :] for s, w in zip(stacked, state.weights))
    return y.to(out_dtype), MemoryState(weights, momentum)


def _stacked(state: MemoryState, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each layer's [W_l; S_l] [BH, 2 in_l, out_l] in `dtype`."""
    return [torch.cat([w.to(dtype), s.to(dtype)], dim=-2).flatten(0, 1) for w, s in zip(state.weights, state.momentum)]


class _Restarts(NamedTuple):
    """Which rows start each chunk from the reset state, [BH, N] bool, and the chunks where any row does
    (`ChunkGrid.starts`, `ChunkGrid.restart_chunks`)."""

    starts: torch.Tensor
    chunks: frozenset[int]


def _paired(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """x [BH, C, n] scaled by both columns of coef [BH, C, 2, 1], side by side: (c_0 x | c_1 x) [BH, C, 2n]."""
    return (x[..., None, :] * coef).flatten(-2)


def _top(stacked: torch.Tensor) -> torch.Tensor:
    """The weights W [BH, in, out] of a stacked [W; S] [BH, 2 in, out] (a view)."""
    return stacked[:, : stacked.shape[1] // 2]


class _Intermediates(NamedTuple):
    """What one chunk step keeps for its backward ([BH, C, width] or [BH, C, C], plus the chunk-start state)."""

    states: list  # [W_l; S_l] at the chunk start
    acts: list  # A_0 = k, A_l = sigma(Z_l): the keys' activations entering each layer
    pres: list  # Z_l, l < L
    deltas: list  # Delta_l: errors back-propagated through the memory at the chunk-start weights
    backs: list  # Delta_{l+1} W_{l+1}^T, l < L
    xs: list  # X_l: the queries' activations entering each layer
    zqs: list  # the queries' pre-activations, l < L
    scores: list  # X_l A_{l-1}^T
    scale: torch.Tensor | None  # the Polyak factors c [BH, C] (polyak_step), else None
    probes: list | None  # with power steps: the unit power iterate u back-propagated, d(u . f) / dZ_l, else None
    probe_backs: list | None  # and its (probe_{l+1} W_{l+1}^T), l < L


def _forward_chunks(
    act: Activation,
    retrieve: str,
    polyak: int | None,
    normalize: bool,
    inputs: tuple,
    states: list,
    saved: list | None,
    step=None,
    normalized: list | None = None,
    restarts: _Restarts | None = None,
    reset_states: list = (),
) -> tuple[torch.Tensor, list]:
    """The sequential loop. inputs: (kc, vc, qc, *ChunkCoefficients) chunked [BH, N, ...]; states: [W_l; S_l]
    [BH, 2 in_l, out_l]. Returns (y [BH, N, C, d_out], end states); appends to `saved` if given and, with
    `normalize`, each chunk's (targets, pre-normalisation column lengths (clamped)), [BH, 1, out_l] per layer, to
    `normalized`. `step` replaces the chunk step (by its compiled twin): `_chunk_forward`, or with `normalize`
    and grad mode off (the explicit backward's forward) `_normalized_chunk_forward`. With `restarts`, the rows
    flagged for a chunk start it from `reset_states` (stacked like `states`) and aim at their column lengths from
    then on."""
    in_place = normalize and not torch.is_grad_enabled()
    step = step or (_normalized_chunk_forward if in_place else _chunk_forward)
    targets = [column_norms(_top(s)) for s in states] if normalize else None
    reset_targets = [column_norms(_top(s)) for s in reset_states] if normalize else None
    outputs = []
    for n, chunk in enumerate(zip(*(t.unbind(1) for t in inputs))):
        if restarts is not None and n in restarts.chunks:
            states = _restarted(states, reset_states, restarts.starts[:, n])
            targets = _restarted(targets, reset_targets, restarts.starts[:, n]) if normalize else None
        if in_place:
            z, new_states, kept, norms = step(act, retrieve, polyak, states, targets, *chunk)
        else:
            z, new_states, kept = step(act, retrieve, polyak, states, *chunk)
            if normalize:  # backward="autograd": out of place, autograd keeps the norms' inputs
                norms = [column_norms(_top(s)).clamp_min(WEIGHT_NORM_EPS) for s in new_states]
                new_states = [_with_top(s, _top(s) * (t / r)) for s, t, r in zip(new_states, targets, norms)]
        outputs.append(z)
        if saved is not None:
            saved.append(kept)
        if normalize and normalized is not None:
            normalized.append((targets, norms))
        states = new_states
    return torch.stack(outputs, dim=1), states


def _normalized_chunk_forward(act: Activation, retrieve: str, polyak: int | None, states: list, targets: list, *chunk):
    """`_chunk_forward`, then every end W_l's columns rescaled to `targets` [BH, 1, out_l]; also returns their
    clamped lengths before (the backward's r). One step, so torch.compile fuses the rescaling into it."""
    z, new_states, kept = _chunk_forward(act, retrieve, polyak, states, *chunk)
    norms = [column_norms(_top(s)).clamp_min(WEIGHT_NORM_EPS) for s in new_states]
    for s, t, r in zip(new_states, targets, norms):
        _top(s).mul_(t / r)
    return z, new_states, kept, norms


def _normalized_chunk_backward(act: Activation, retrieve: str, polyak: int | None, s: "_Intermediates", chunk: list,
                               dy, d_ends: list, ends: list, targets: list, lengths: list):
    """`_chunk_backward` of `_normalized_chunk_forward`: d_ends (of the rescaled end states; changed in place
    in eager mode, left as they are under torch.compile) first through the rescaling (`_renormalized_backward`,
    given the rescaled ends and the lengths before), then through the step. Returns (the step's input gradients,
    the start states' gradients, the targets' gradients)."""
    d_weights, d_targets = zip(*(_renormalized_backward(_top(d), w, t, r)
                                 for d, w, t, r in zip(d_ends, ends, targets, lengths)))
    if torch.compiler.is_compiling():
        d_ends = [_with_top(d, d_w) for d, d_w in zip(d_ends, d_weights)]
    chunk_grads, d_starts = _chunk_backward(act, retrieve, polyak, s, chunk, dy, d_ends)
    return chunk_grads, d_starts, d_targets


def _restarted(current: list, reset: list, start: torch.Tensor) -> list:
    """reset in the rows where start [BH] is True, else current (states [BH, 2 in, out] or targets [BH, 1, out])."""
    return [torch.where(start[:, None, None], r, c) for c, r in zip(current, reset)]


def _restarted_backward_(d_current: list, d_reset: list, start: torch.Tensor) -> None:
    """Backward of `_restarted`, in place: moves the flagged rows' gradients from d_current to d_reset."""
    flag = start[:, None, None]
    for d, d_r in zip(d_current, d_reset):
        d_r.add_(torch.where(flag, d, 0.0))
        d.masked_fill_(flag, 0.0)


def _with_top(stacked: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """[top; S] for a stacked [W; S] [BH, 2 in, out]."""
    return torch.cat([top, stacked[:, stacked.shape[1] // 2 :]], dim=1)


def _chunk_forward(
    act: Activation, retrieve: str, polyak: int | None, states: list, k, v, q, retrieval, mixing, decay, carry, update
):
    """One chunk step: (outputs z [BH, C, d_out], chunk-end states, the `_Intermediates` of its backward).
    `polyak`: None (no Polyak factor) or its power steps n. Token i's factor c_i scales column i of mixing and
    row i of the update coefficients. n = 0: c_i comes from its loss and its inner gradient A_{l-1,i}^T Delta_{l,i}
    (rank one, so |.|^2 = |A|^2 |Delta|^2); n > 0: from the curvature along its power iterate (`_probed_factors`)."""
    L = len(states)
    weights = [_top(s) for s in states]
    acts, pres = [k], []
    for layer in range(L - 1):
        pres.append(acts[-1] @ weights[layer])
        acts.append(act.fn(pres[-1]))
    deltas, backs = _backpropagated(act, torch.baddbmm(v, acts[-1], weights[-1], beta=-2, alpha=2), weights, pres)
    scale, probes, probe_backs = None, None, None
    if polyak == 0:
        scale = _polyak_factors(acts, deltas)
    elif polyak is not None:
        scale, probes, probe_backs = _probed_factors(act, acts, pres, weights, deltas[-1], polyak)
    if scale is not None:
        mixing, update = mixing * scale[:, None, :], update * scale[:, :, None, None]

    xs, zqs, scores = [], [], []
    x = q
    for layer in range(L):
        xs.append(x)
        if retrieve == "chunk":
            z = x @ weights[layer]
        else:
            scores.append(x @ acts[layer].transpose(-1, -2))
            z = torch.baddbmm(_paired(x, retrieval) @ states[layer], mixing * scores[-1], deltas[layer], alpha=-1)
        if layer < L - 1:
            zqs.append(z)
            x = act.fn(z)

    new_states = [_updated(s, decay, carry, _paired(a, update), delta) for s, a, delta in zip(states, acts, deltas)]
    return z, new_states, _Intermediates(states, acts, pres, deltas, backs, xs, zqs, scores, scale, probes,
                                         probe_backs)


def _backpropagated(act: Activation, seed: torch.Tensor, weights: list, pres: list) -> tuple[list, list]:
    """seed [BH, C, d_out] back-propagated through the memory at `weights`, token by token: (chain_l =
    d(seed . f(k)) / dZ_l for every layer (chain_{L-1} = seed), backs_l = chain_{l+1} W_{l+1}^T for l < L - 1).
    With seed Delta_L = 2 (f(k) - v) the chain is the inner loss's errors Delta_l."""
    chain, backs = [seed], []
    for layer in range(len(weights) - 1, 0, -1):
        backs.insert(0, chain[0] @ weights[layer].transpose(-1, -2))
        chain.insert(0, backs[0] * act.grad(pres[layer - 1]))
    return chain, backs


def _probed_factors(act: Activation, acts: list, pres: list, weights: list, error: torch.Tensor, steps: int):
    """The bounded step's factors c = `curvature_scale`(u^T K u) [BH, C] with K = J J^T (J = df(k)/dW, so
    K = sum_l |A_{l-1}|^2 B_l B_l^T with B_l = df/dZ_l) and u the unit power iterate after `steps` steps of
    K - (|A_{L-1}|^2 - rho) I from the token's error (K >= |A_{L-1}|^2 I: the shift speeds convergence, rho keeps a
    zero K - |A_{L-1}|^2 I, as at depth 1, from zeroing u). u is computed without autograd and held constant, so
    d(u^T K u) = u^T dK u, the derivative of lambda_max(K) where u is its eigenvector.
    Also returns the probes (`_backpropagated` u: u^T K u = sum_l |A_{l-1}|^2 |probe_l|^2) and their backs."""
    act_sq = [a.square().sum(-1, keepdim=True) for a in acts]
    with torch.no_grad():
        u = F.normalize(error, dim=-1, eps=POWER_EPS)
        for _ in range(steps):
            chain, _ = _backpropagated(act, u, weights, pres)
            tangent = POLYAK_CURVATURE_FLOOR * u  # + (K - |A_{L-1}|^2 I) u: the JVP of sum_l |A_{l-1}|^2 B_l chain_l
            carried = None
            for layer in range(len(weights) - 1):
                injected = act_sq[layer] * chain[layer]
                carried = injected if carried is None else carried + injected
                carried = (carried * act.grad(pres[layer])) @ weights[layer + 1]
            u = F.normalize(tangent if carried is None else tangent + carried, dim=-1, eps=POWER_EPS)
    probes, probe_backs = _backpropagated(act, u, weights, pres)
    curvature = sum(a.squeeze(-1) * p.square().sum(-1) for a, p in zip(act_sq, probes))
    return curvature_scale(curvature), probes, probe_backs


def _updated(stacked, decay, carry, coef_acts, delta) -> torch.Tensor:
    """The chunk-end state [end_b W + end_f S; end_eta S] - coef_acts^T delta of a stacked [W; S] [BH, 2 in, out];
    decay [BH, 2, 1] (end_b, end_eta), carry [BH, 1, 1] (end_f), coef_acts (g*A | m*A) [BH, C, 2 in], delta
    [BH, C, out]. Eager: in place on one new buffer. Under torch.compile: out of place with broadcasts only, which
    fuses into one pass after the matmul (an in-place baddbmm_ there copies the state first, and in-place ops on
    the halves become masked scatter kernels)."""
    if torch.compiler.is_compiling():
        halves = stacked.unflatten(1, (2, -1))
        carried = torch.cat([carry, torch.zeros_like(carry)], dim=1)[..., None]  # [BH, 2, 1, 1]: (end_f, 0)
        decayed = (halves * decay[..., None] + carried * halves[:, 1:]).flatten(1, 2)
        return decayed - coef_acts.transpose(-1, -2) @ delta
    n = stacked.shape[1] // 2
    new = (stacked.view(stacked.shape[0], 2, -1) * decay).view_as(stacked)  # [end_b W; end_eta S]
    new[:, :n].addcmul_(stacked[:, n:], carry)
    return new.baddbmm_(coef_acts.transpose(-1, -2), delta, alpha=-1)


def _polyak_factors(acts: list, deltas: list) -> torch.Tensor:
    """c [BH, C] of each token from its loss l = |Delta_L|^2 / 4 and |grad|^2 = sum_l |A_{l-1}|^2 |Delta_l|^2."""
    grad_sq = sum(a.square().sum(-1) * d.square().sum(-1) for a, d in zip(acts, deltas))
    return polyak_scale(deltas[-1].square().sum(-1) / 4, grad_sq)


def _polyak_backward(s: "_Intermediates", d_scale: torch.Tensor, d_acts: list, d_deltas: list) -> None:
    """Adds the gradient through the Polyak factors c = 2 l / D, D = |g|^2 + 4 rho l + eps, to d_acts, d_deltas."""
    loss = s.deltas[-1].square().sum(-1) / 4
    a_sq = [a.square().sum(-1) for a in s.acts]
    e_sq = [d.square().sum(-1) for d in s.deltas]
    denom = sum(a * e for a, e in zip(a_sq, e_sq)) + 4 * POLYAK_CURVATURE_FLOOR * loss + POLYAK_EPS
    d_loss = d_scale * (2 - 4 * POLYAK_CURVATURE_FLOOR * s.scale) / denom
    d_grad_sq = -d_scale * s.scale / denom
    d_deltas[-1].add_(s.deltas[-1] * (d_loss / 2)[..., None])
    for layer in range(len(s.acts)):
        d_acts[layer].add_(s.acts[layer] * (2 * d_grad_sq * e_sq[layer])[..., None])
        d_deltas[layer].add_(s.deltas[layer] * (2 * d_grad_sq * a_sq[layer])[..., None])


def _probed_backward(s: "_Intermediates", d_scale: torch.Tensor, d_acts: list) -> list:
    """Adds the gradient through the probed factors c = 1 / (2 (R + rho)), R = sum_l |A_{l-1}|^2 |probe_l|^2
    (u held constant), to d_acts; returns the probes' gradients (that of the last, u, is not used)."""
    d_curvature = -2 * s.scale.square() * d_scale
    d_probes = []
    for a, p, d_a in zip(s.acts, s.probes, d_acts):
        d_a.add_(a * (2 * d_curvature * p.square().sum(-1))[..., None])
        d_probes.append(p * (2 * d_curvature * a.square().sum(-1))[..., None])
    return d_probes


def _backpropagated_backward(act: Activation, pres: list, weights: list, chain: list, backs: list, d_chain: list,
                             d_pres: list, d_weights: list) -> None:
    """Backward of `_backpropagated`, in reverse of its order: chain_l = (chain_{l+1} W_{l+1}^T) * sigma'(Z_l).
    d_chain is updated in place (d_chain[-1] ends as the seed's gradient); the gradients of Z_l (l < L - 1) and
    W_l (l > 0) are added to d_pres, d_weights (None: not yet set)."""
    for layer in range(len(weights) - 1):
        z = pres[layer]
        d_back = d_chain[layer] * act.grad(z)
        d_pre = d_chain[layer] * backs[layer] * act.grad2(z)
        d_pres[layer] = d_pre if d_pres[layer] is None else d_pres[layer].add_(d_pre)
        d_chain[layer + 1].baddbmm_(d_back, weights[layer + 1])
        d_weight = d_back.transpose(-1, -2) @ chain[layer + 1]
        d_weights[layer + 1] = d_weight if d_weights[layer + 1] is None else d_weights[layer + 1].add_(d_weight)


@functools.cache
def _compiled(step, device_type: str):
    """torch.compile of a chunk step for fixed shapes (one graph per shape). On CPU the graph's wrapper is C++ as
    well (cpp_wrapper: 1.07-1.09x the Python wrapper at the bench shape, measured side by side)."""
    return torch.compile(step, dynamic=False, options={"cpp_wrapper": device_type == "cpu"})


class _ChunkLoop(torch.autograd.Function):
    """`_forward_chunks` with the hand-derived backward (module docstring); both steps compiled if asked.
    tensors: the 8 chunked inputs, the L start states and, with `restarts`, the L reset states."""

    @staticmethod
    def forward(ctx, activation: str, retrieve: str, polyak: int | None, normalize: bool, compiled: bool,
                restarts: _Restarts | None, *tensors):
        depth = (len(tensors) - 8) // (1 if restarts is None else 2)
        inputs, states, reset_states = tensors[:8], list(tensors[8 : 8 + depth]), list(tensors[8 + depth :])
        saved: list[_Intermediates] = []
        normalized: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        forward_step = _normalized_chunk_forward if normalize else _chunk_forward
        step = _compiled(forward_step, inputs[0].device.type) if compiled else None
        y, end_states = _forward_chunks(
            ACTIVATIONS[activation], retrieve, polyak, normalize, inputs, states, saved, step, normalized, restarts,
            reset_states,
        )
        ctx.activation, ctx.retrieve, ctx.compiled, ctx.polyak, ctx.normalize = (activation, retrieve, compiled,
                                                                                 polyak, normalize)
        ctx.restarts, ctx.depth, ctx.n_tensors = restarts, depth, len(tensors)
        end_weights = [_top(s).clone() for s in end_states] if normalize else None
        leaves, ctx.kept_spec = tree_flatten((saved, normalized, end_weights))
        ctx.kept_others = [_SAVED if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        ctx.save_for_backward(*tensors, *(leaf for leaf in leaves if isinstance(leaf, torch.Tensor)))
        return (y, *end_states)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *d_end_states):
        act, retrieve, restarts = ACTIVATIONS[ctx.activation], ctx.retrieve, ctx.restarts
        tensors, saved, normalized, end_weights = _kept(ctx)
        inputs, initial, reset_states = tensors[:8], tensors[8 : 8 + ctx.depth], tensors[8 + ctx.depth :]
        backward_step = _normalized_chunk_backward if ctx.normalize else _chunk_backward
        step = _compiled(backward_step, inputs[0].device.type) if ctx.compiled else backward_step
        d_states = [torch.zeros_like(s) if d is None else d for s, d in zip(saved[-1].states, d_end_states)]
        dy = torch.zeros_like(inputs[2][..., :1]).expand(*inputs[2].shape[:3], d_states[-1].shape[-1]) if dy is None else dy
        d_resets = [torch.zeros_like(r) for r in reset_states]
        grads = [[] for _ in inputs]
        if ctx.normalize:  # d_targets: the gradient of the targets in force (the call's start, then the resets')
            d_targets = [torch.zeros_like(t) for t in normalized[-1][0]]
            d_reset_targets = [torch.zeros_like(t) for t in d_targets] if reset_states else []
            d_states = [d.clone() for d in d_states]  # eager steps update them in place; later ones are their own
        for n in range(len(saved) - 1, -1, -1):
            chunk = [t[:, n] for t in inputs]
            if ctx.normalize:
                # Chunk n's normalised end is chunk n + 1's start, except in rows that restart there: their d_states
                # are zero (`_restarted_backward_`), so whatever stands in for the end there contributes nothing.
                ends = end_weights if n == len(saved) - 1 else [_top(st) for st in saved[n + 1].states]
                chunk_grads, d_states, d_step_targets = step(
                    act, retrieve, ctx.polyak, saved[n], chunk, dy[:, n], d_states, ends, *normalized[n]
                )
                for d_t, d_step in zip(d_targets, d_step_targets):
                    d_t.add_(d_step)
            else:
                chunk_grads, d_states = step(act, retrieve, ctx.polyak, saved[n], chunk, dy[:, n], d_states)
            for store, grad in zip(grads, chunk_grads):
                store.append(grad)
            if restarts is not None and n in restarts.chunks:  # d_states are the step's own, d_targets ours
                _restarted_backward_(d_states, d_resets, restarts.starts[:, n])
                if ctx.normalize:
                    _restarted_backward_(d_targets, d_reset_targets, restarts.starts[:, n])
        if ctx.normalize:  # the targets are column norms of the start and reset weights
            for d, st, d_t in zip(d_states + d_resets, initial + reset_states, d_targets + d_reset_targets):
                _column_norms_backward_(_top(d), _top(st), d_t)
        return (None,) * 6 + (*(torch.stack(g[::-1], dim=1) for g in grads), *d_states, *d_resets)


def _kept(ctx) -> tuple[tuple, list, list, list | None]:
    """What `_ChunkLoop.forward` kept: (its tensors, the per-chunk `_Intermediates`, the normalisation
    (targets, lengths) per chunk, the end weights), all through `saved_tensors`, so that a non-reentrant activation
    checkpoint frees them after the forward and recomputes them in backward."""
    stored = ctx.saved_tensors
    kept = iter(stored[ctx.n_tensors :])
    leaves = [next(kept) if leaf is _SAVED else leaf for leaf in ctx.kept_others]
    return (stored[: ctx.n_tensors], *tree_unflatten(leaves, ctx.kept_spec))


def _renormalized_backward(
    d_weight: torch.Tensor, normalized: torch.Tensor, target: torch.Tensor, length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of W' = W target / r (r = |W| per column, clamped): from dW' [BH, in, out] and W' returns (dW, the
    target's gradient [BH, 1, out]). With u = W' / target = W / r:
    dW = (target / r) (dW' - u (u . dW')), d target = u . dW'. Eager: dW is dW', changed in place; under
    torch.compile out of place (an in-place update of a graph input is copied back)."""
    safe = target.clamp_min(WEIGHT_NORM_EPS)
    along = torch.linalg.vecdot(normalized, d_weight, dim=-2).unsqueeze(-2) / safe
    if torch.compiler.is_compiling():
        return (d_weight - normalized * (along / safe)) * (target / length), along
    return d_weight.addcmul_(normalized, along / safe, value=-1).mul_(target / length), along


def _column_norms_backward_(d_weight: torch.Tensor, weight: torch.Tensor, d_norms: torch.Tensor) -> None:
    """Adds the gradient through `column_norms`(weight) [BH, 1, out] to d_weight, in place."""
    d_weight.addcmul_(weight, d_norms / column_norms(weight).clamp_min(WEIGHT_NORM_EPS))


def _start_gradient(d_end, decay, carry, read: tuple, d_weight) -> torch.Tensor:
    """The chunk-start state's gradient [BH, 2 in, out]: through the decay (`_updated`: dW = end_b dW',
    dS = end_eta dS' + end_f dW', from d_end [BH, 2 in, out]), plus the retrieval's lhs @ rhs (read: lhs
    [BH, 2 in, C], or [BH, in, C] for W alone, rhs [BH, C, out]) and the keys' d_weight [BH, in, out] (W only).
    Eager: in place on one new buffer; under torch.compile out of place, one pass after the matmul (`_updated`)."""
    lhs, rhs = read
    if torch.compiler.is_compiling():
        d_halves = d_end.unflatten(1, (2, -1))
        carried = torch.cat([torch.zeros_like(carry), carry], dim=1)[..., None]  # [BH, 2, 1, 1]: (0, end_f)
        weight_only = torch.tensor([1.0, 0.0], dtype=d_end.dtype, device=d_end.device)[:, None, None]
        d_start = d_halves * decay[..., None] + carried * d_halves[:, :1] + d_weight[:, None] * weight_only
        d_read = lhs @ rhs
        d_read = d_read.unflatten(1, (2, -1)) if lhs.shape[1] == d_end.shape[1] else d_read[:, None] * weight_only
        return (d_start + d_read).flatten(1, 2)
    d_halves = d_end.view(d_end.shape[0], 2, -1)
    d_start = d_halves * decay  # [end_b dW'; end_eta dS']
    d_start[:, 1].addcmul_(d_halves[:, 0], carry[:, 0])
    d_start = d_start.view_as(d_end)
    (d_start if lhs.shape[1] == d_end.shape[1] else _top(d_start)).baddbmm_(lhs, rhs)
    _top(d_start).add_(d_weight)
    return d_start


def _unpaired(d_paired: torch.Tensor, x: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of `_paired`: the gradients (of x [BH, C, n], of coef [BH, C, 2, 1]) from that of its output."""
    d_paired = d_paired.unflatten(-1, (2, -1))
    return (d_paired * coef).sum(-2), (d_paired * x[..., None, :]).sum(-1, keepdim=True)


def _chunk_backward(act: Activation, retrieve: str, polyak: int | None, s: _Intermediates, chunk: list, dy,
                    d_ends: list):
    """Vector-Jacobian product of one chunk step.

    Given dy [BH, C, d_out] and the gradients of the chunk-end states, returns the
    gradients of the chunk's inputs (k, v, q, retrieval, mixing, decay, carry, update) and of the chunk-start states.
    """
    k, v, q, retrieval, mixing, decay, carry, update = chunk
    if polyak is not None:  # the step used the scaled coefficients; their gradients map back after the query side
        mixing_raw, update_raw = mixing, update
        mixing, update = mixing * s.scale[:, None, :], update * s.scale[:, :, None, None]
    L = len(s.states)
    weights = [_top(st) for st in s.states]
    # Chunk-end update: [W'; S'] = [end_b W + end_f S; end_eta S] - (g*A | m*A)^T Delta.
    d_decay, d_carry, d_update = 0, 0, 0
    d_acts, d_deltas = [], []
    for layer in range(L):
        st, d_end, a, delta = s.states[layer], d_ends[layer], s.acts[layer], s.deltas[layer]
        d_halves, halves = d_end.view(d_end.shape[0], 2, -1), st.view(st.shape[0], 2, -1)
        d_decay = d_decay + torch.linalg.vecdot(d_halves, halves)[..., None]
        d_carry = d_carry + torch.linalg.vecdot(d_halves[:, 0], halves[:, 1])[:, None, None]
        d_a, d_coef = _unpaired(-(delta @ d_end.transpose(-1, -2)), a, update)
        d_acts.append(d_a)
        d_update = d_update + d_coef
        d_deltas.append(-(_paired(a, update) @ d_end))

    # Query side, last layer first. d_reads: the retrieval's gradients of the states [W; S] (W only for "chunk"),
    # as the factors (lhs, rhs) of their matmul.
    d_reads = [None] * L
    d_retrieval = torch.zeros_like(retrieval)
    d_mixing = torch.zeros_like(mixing)
    dz = dy
    for layer in range(L - 1, -1, -1):
        x = s.xs[layer]
        if retrieve == "chunk":
            d_reads[layer] = (x.transpose(-1, -2), dz)
            dx = dz @ weights[layer].transpose(-1, -2)
        else:
            d_reads[layer] = (_paired(x, retrieval).transpose(-1, -2), dz)
            dx, d_coef = _unpaired(dz @ s.states[layer].transpose(-1, -2), x, retrieval)
            d_retrieval += d_coef
            d_scores_mixed = -(dz @ s.deltas[layer].transpose(-1, -2))  # d(mixing o U): [C, C]
            d_deltas[layer] -= (mixing * s.scores[layer]).transpose(-1, -2) @ dz
            d_mixing += d_scores_mixed * s.scores[layer]
            d_u = d_scores_mixed * mixing
            dx.baddbmm_(d_u, s.acts[layer])
            d_acts[layer].baddbmm_(d_u.transpose(-1, -2), x)
        dz = dx * act.grad(s.zqs[layer - 1]) if layer > 0 else dx
    dq = dz
    d_probes = None
    if polyak is not None:
        d_scale = (d_mixing * mixing_raw).sum(-2) + (d_update * update_raw).sum((-2, -1))
        d_mixing, d_update = d_mixing * s.scale[:, None, :], d_update * s.scale[:, :, None, None]
        if s.probes is None:
            _polyak_backward(s, d_scale, d_acts, d_deltas)
        else:
            d_probes = _probed_backward(s, d_scale, d_acts)

    # Keys: first the inner backward pass Delta_l = (Delta_{l+1} W_{l+1}^T) * sigma'(Z_l), in reverse of its order.
    # Their weight gradients go to contiguous buffers first (an in-place matmul into the W half is slow).
    d_weights = [None] * L
    d_pres = [None] * (L - 1)
    _backpropagated_backward(act, s.pres, weights, s.deltas, s.backs, d_deltas, d_pres, d_weights)
    if d_probes is not None:
        _backpropagated_backward(act, s.pres, weights, s.probes, s.probe_backs, d_probes, d_pres, d_weights)
    # Delta_L = 2 (A_{L-1} W_L - v).
    d_err = d_deltas[-1]
    d_acts[-1].baddbmm_(d_err, weights[-1].transpose(-1, -2), alpha=2)
    d_last = s.acts[-1].transpose(-1, -2) @ d_err
    d_weights[-1] = d_last.mul_(2) if d_weights[-1] is None else d_weights[-1].add_(d_last, alpha=2)
    dv = -2 * d_err
    # Keys forward: A_l = sigma(Z_l), Z_l = A_{l-1} W_l.
    for layer in range(L - 2, -1, -1):
        dz_key = torch.addcmul(d_pres[layer], d_acts[layer + 1], act.grad(s.pres[layer]))
        d_acts[layer].baddbmm_(dz_key, weights[layer].transpose(-1, -2))
        d_key = s.acts[layer].transpose(-1, -2) @ dz_key
        d_weights[layer] = d_key if d_weights[layer] is None else d_weights[layer].add_(d_key)
    d_starts = [_start_gradient(d_end, decay, carry, d_read, d_w)
                for d_end, d_read, d_w in zip(d_ends, d_reads, d_weights)]
    dk = d_acts[0]
    return [dk, dv, dq, d_retrieval, d_mixing, d_decay, d_carry, d_update], d_starts
