"""Memory state, activations, the memory function f(x; W) and the gate clamp shared by every form of the memory
scan and by the module's reads."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

RETRIEVE_MODES = ("inclusive", "exclusive", "chunk")

# eta and (1 - alpha) are clamped to [GATE_EPS, 1] so their logs stay finite (docs/memory.md).
GATE_EPS = 1e-6

# The Polyak step (`polyak_step=True`, docs/memory.md): token t's inner learning rate theta_t is multiplied by
# c_t = 2 l_t / (|grad l_t|^2 + 4 rho l_t + eps), the step that would zero l_t if it were a quadratic along its
# gradient, measured in units of a linear memory with unit keys (for which c_t = 1/2 and theta_t = 1 is the exact
# delta rule). rho floors the curvature |grad l|^2 / (4 l), so a vanishing gradient cannot make the step explode.
POLYAK_CURVATURE_FLOOR = 1e-2
POLYAK_EPS = 1e-12


def polyak_scale(loss: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
    """c = 2 l / (|g|^2 + 4 rho l + eps) per token, from its loss l and squared inner-gradient norm |g|^2."""
    return 2 * loss / (grad_sq + 4 * POLYAK_CURVATURE_FLOOR * loss + POLYAK_EPS)


# The bounded step (`power_steps` n > 0, docs/memory.md): with r = f(k) - v and K = J J^T (J = df(k)/dW) the Polyak
# factor is 1 / (2 (r^T K r / |r|^2 + rho)): it measures the curvature along the token's own error, which at depth
# > 1 can be far below K's largest, and a step sized by it can then overshoot along K's top direction (the state
# map expands and the outer gradient grows without bound). With n power steps from r the factor is
# c = 1 / (2 (u^T K u + rho)), u the unit iterate, approaching 1 / (2 (lambda_max(K) + rho)), the normalised-LMS
# step: in the Gauss-Newton view one token's step then overshoots in no direction at theta <= 1 (a chunk sums C of
# them at one state, which can). u is held constant in differentiation.
POWER_EPS = 1e-30  # a zero vector stays zero when normalised


def curvature_scale(curvature: torch.Tensor) -> torch.Tensor:
    """c = 1 / (2 (R + rho)) per token, from the curvature R = u^T K u along its unit power iterate u."""
    return 1 / (2 * (curvature + POLYAK_CURVATURE_FLOOR))


def check_power_steps(power_steps: int, polyak_step: bool) -> int | None:
    """The power steps of the Polyak factor's curvature, or None without it; raises ValueError on bad input."""
    if not isinstance(power_steps, int) or power_steps < 0:
        raise ValueError(f"power_steps must be an int >= 0; got {power_steps!r}")
    if power_steps and not polyak_step:
        raise ValueError(f"power_steps={power_steps} sets the Polyak step's curvature; it needs polyak_step=True")
    return power_steps if polyak_step else None


# `normalize_weights=True` (docs/memory.md): at every chunk end each memory weight matrix W_l [.., in, out] has its
# columns rescaled to the lengths they had at the start of the call, so an update turns the weights but cannot
# grow them, and the Jacobian of a chunk's update stays near an isometry. A column shorter than WEIGHT_NORM_EPS
# counts as that long (a zero column stays zero).
WEIGHT_NORM_EPS = 1e-12


def column_norms(w: torch.Tensor) -> torch.Tensor:
    """|W[.., :, j]| for every column j: [.., in, out] -> [.., 1, out]. (A dot product, not vector_norm: on CPU
    torch's norm over a non-last dimension is 4-10x slower at the memory's shapes.)"""
    return torch.linalg.vecdot(w, w, dim=-2).unsqueeze(-2).sqrt()


def renormalized(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """W with each column rescaled to length target [.., 1, out] (`normalize_weights`)."""
    return w * (target / column_norms(w).clamp_min(WEIGHT_NORM_EPS))


def effective_theta(theta: torch.Tensor, eta: torch.Tensor, momentum_ema: bool) -> torch.Tensor:
    """theta, or theta (1 - eta) with `momentum_ema` (the momentum becomes an average of -theta grad whose
    weights sum to 1, so theta is the effective step however close eta is to 1). eta is already clamped."""
    return theta * (1 - eta) if momentum_ema else theta


class MemoryState(NamedTuple):
    """State of a depth-L memory MLP, per batch element and head.

    weights[l], momentum[l]: [B, H, in_l, out_l] with widths d -> e*d -> ... -> d. Carried in fp32
    (or fp64 when the inputs are fp64).
    """

    weights: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...]

    @classmethod
    def from_weights(cls, weights: tuple[torch.Tensor, ...]) -> "MemoryState":
        """A state at the given weights with zero momentum (S_0 = 0)."""
        return cls(tuple(weights), tuple(torch.zeros_like(w) for w in weights))

    def detach(self) -> "MemoryState":
        return MemoryState(tuple(w.detach() for w in self.weights), tuple(s.detach() for s in self.momentum))


class Activation(NamedTuple):
    """sigma and its first two derivatives, written with differentiable ops."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    grad: Callable[[torch.Tensor], torch.Tensor]
    grad2: Callable[[torch.Tensor], torch.Tensor]


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _silu_grad2(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


_GELU_C, _GELU_A = 0.7978845608028654, 0.044715  # sqrt(2 / pi), cubic coefficient of the tanh approximation


def _gelu_parts(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t = tanh(u), u' and t' for u = c (z + a z^3)."""
    t = torch.tanh(_GELU_C * (z + _GELU_A * z**3))
    du = _GELU_C * (1 + 3 * _GELU_A * z * z)
    return t, du, (1 - t * t) * du


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    t, _, dt = _gelu_parts(z)
    return 0.5 * (1 + t) + 0.5 * z * dt


def _gelu_grad2(z: torch.Tensor) -> torch.Tensor:
    t, du, dt = _gelu_parts(z)
    d2t = (1 - t * t) * (6 * _GELU_A * _GELU_C * z) - 2 * t * dt * du
    return dt + 0.5 * z * d2t


ACTIVATIONS: dict[str, Activation] = {
    "silu": Activation(F.silu, _silu_grad, _silu_grad2),
    "gelu": Activation(lambda z: F.gelu(z, approximate="tanh"), _gelu_grad, _gelu_grad2),
}


def memory_mlp(x: torch.Tensor, weights: tuple[torch.Tensor, ...], activation: str = "silu") -> torch.Tensor:
    """f(x; W) = sigma(...sigma(x W_1) W_2 ...) W_L on row vectors. x: [B, H, T, d_in], W_l: [B, H, in_l, out_l]."""
    sigma = ACTIVATIONS[activation].fn
    for layer, w in enumerate(weights):
        x = x @ w
        if layer < len(weights) - 1:
            x = sigma(x)
    return x


def check_scan_args(q, k, v, theta, eta, alpha, state: MemoryState, chunk_size: int, retrieve: str, activation: str):
    """Validate the memory contract's shapes and options; raises ValueError naming the offender."""
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3] or k.shape[-1] != v.shape[-1]:
        raise ValueError(f"q, k, v must be [B, H, T, d] alike; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    for name, gate in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if gate.shape != q.shape[:3]:
            raise ValueError(f"{name} must be [B, H, T] = {tuple(q.shape[:3])}; got {tuple(gate.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if retrieve not in RETRIEVE_MODES:
        raise ValueError(f"retrieve must be one of {RETRIEVE_MODES}; got {retrieve!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}; got {activation!r}")
    if len(state.weights) == 0 or len(state.weights) != len(state.momentum):
        raise ValueError("state needs one weight and one momentum tensor per memory layer")
    width = q.shape[-1]
    for layer, (w, s) in enumerate(zip(state.weights, state.momentum)):
        if w.shape != s.shape or w.shape[:2] != q.shape[:2] or w.shape[2] != width:
            raise ValueError(
                f"state layer {layer}: weight {tuple(w.shape)} / momentum {tuple(s.shape)} do not chain from width "
                f"{width} with batch/heads {tuple(q.shape[:2])}"
            )
        width = w.shape[3]
    if width != v.shape[-1]:
        raise ValueError(f"the memory maps to width {width} but v has width {v.shape[-1]}")


def check_resets(resets: torch.Tensor | None, reset_state: MemoryState | None, state: MemoryState, q: torch.Tensor):
    """Validate document resets: a [B, T] bool mask and a reset state shaped like `state`; raises ValueError."""
    if resets is None:
        return
    if resets.dtype != torch.bool or resets.shape != q.shape[:1] + q.shape[2:3]:
        raise ValueError(f"resets must be a [B, T] = {(q.shape[0], q.shape[2])} bool mask; got {resets.dtype} "
                         f"{tuple(resets.shape)}")
    if reset_state is None:
        raise ValueError("resets need a reset_state (in the model: W_0 over the batch with zero momentum)")
    shapes = [t.shape for t in state.weights + state.momentum]
    if [t.shape for t in reset_state.weights + reset_state.momentum] != shapes:
        raise ValueError(f"reset_state must be shaped like state: {[tuple(s) for s in shapes]}")
