"""Why a deep memory's outer gradient overflows at large theta_max: the Polyak step against the largest curvature.

    OMP_NUM_THREADS=1 python bench/memory_curvature.py --part check      # the token loop below = memory_scan_reference
    OMP_NUM_THREADS=1 python bench/memory_curvature.py --part ratio      # 1. the curvature ratio along a trajectory
    OMP_NUM_THREADS=1 python bench/memory_curvature.py --part gradient   # 2. outer-gradient growth with T, per step factor
    OMP_NUM_THREADS=1 python bench/memory_curvature.py --part recall     # 3. the associative-store probe, per step factor

A float64 token loop (chunk 1) of the default rule (momentum_ema, normalize_weights) whose step factor c_t is one
of: `polyak` (the scan's: 2 l / (|g|^2 + 4 rho l)), `exact` (1 / (2 (lambda_max(K) + rho)), the normalised-LMS step),
`trace` (1 / (2 (trace bound + rho))), `power1` / `power2` (lambda_max estimated by a Rayleigh quotient after
1/2 or 1 power steps from r, differentiated through: `power_estimate`) or `boundedN` / `unshiftedN` (the scan's
`power_steps` rule: N power steps of K - (|A_{L-1}|^2 - rho) I, or of K, from r, the iterate held constant:
`held_estimate`). With J = d f(k; W) / dW and r = f(k; W) - v, K = J J^T =
sum_l |A_{l-1}|^2 B_l B_l^T (A_{l-1}: layer l's input, B_l = d f / d z_l); |g|^2 = 4 r^T K r. In the Gauss-Newton
view the step's state Jacobian has an eigenvalue near 1 - theta c 2 lambda_max, which is below -1 (the map
expands) once theta * lambda_max |r|^2 / r^T K r > 2 under the Polyak factor: that ratio is 1 for a linear memory
with unit keys and spreads with depth. Inputs, gates and weights are drawn as `bench/memory_stability.py` draws them
(batch 1, one head, head_dim 32, expansion 4). Figures and verdict: docs/memory.md.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from titans_parallel.memory import MemoryState
from titans_parallel.memory.reference import memory_scan_reference

RHO, EPS, GATE_EPS, NORM_EPS = 1e-2, 1e-12, 1e-6, 1e-12
EXPANSION, WIDTH = 4, 32
DTYPE = torch.float64
FACTORS = ("polyak", "exact", "trace", "power1", "power2", "bounded2", "bounded4", "unshifted2", "unshifted4",
           "unshifted8")


def initial_weights(batch: int, depth: int, g: torch.Generator) -> list[torch.Tensor]:
    widths = [WIDTH] + [EXPANSION * WIDTH] * (depth - 1) + [WIDTH]
    return [(torch.randn(batch, a, b, generator=g) / math.sqrt(a)).to(DTYPE) for a, b in zip(widths, widths[1:])]


def draw(seq: int, depth: int, theta_max: float, batch: int = 1, seed: int = 0):
    """q, k, v [B, T, d] and theta, eta, alpha [B, T], drawn as bench/memory_stability.py's sweep; weights [B, in, out]."""
    g = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(batch, seq, WIDTH, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(batch, seq, WIDTH, generator=g)
    theta = theta_max * torch.sigmoid(torch.randn(batch, seq, generator=g))
    eta = torch.sigmoid(torch.randn(batch, seq, generator=g))
    alpha = torch.sigmoid(torch.randn(batch, seq, generator=g) - 4)
    return [t.to(DTYPE) for t in (q, k, v, theta, eta, alpha)], initial_weights(batch, depth, g)


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def mlp(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    for i, w in enumerate(weights):
        x = x @ w
        if i < len(weights) - 1:
            x = F.silu(x)
    return x


def column_norms(w: torch.Tensor) -> torch.Tensor:
    return w.square().sum(-2, keepdim=True).sqrt()


def power_estimate(K: torch.Tensor, r: torch.Tensor, power: int) -> torch.Tensor:
    """r^T K^(p+1) r / r^T K^p r: the Rayleigh quotient after p/2 power steps from r, <= lambda_max (p = 0: the
    Polyak factor's curvature). p = 1 is |J g|^2 / |g|^2, one JVP of the memory along its own gradient."""
    u = r
    for _ in range(power // 2):
        u = torch.einsum("bop,bp->bo", K, u)
    Ku = torch.einsum("bop,bp->bo", K, u)
    if power % 2:
        return Ku.square().sum(-1) / (u * Ku).sum(-1)
    return (u * Ku).sum(-1) / u.square().sum(-1)


def held_estimate(K: torch.Tensor, shift: torch.Tensor, r: torch.Tensor, steps: int) -> torch.Tensor:
    """u^T K u with u the unit iterate after `steps` power steps of K - shift I from r, held constant (no gradient)."""
    with torch.no_grad():
        u = F.normalize(r, dim=-1, eps=1e-30)
        for _ in range(steps):
            u = F.normalize(torch.einsum("bop,bp->bo", K, u) - shift[:, None] * u, dim=-1, eps=1e-30)
    return torch.einsum("bo,bop,bp->b", u, K, u)


def scan(q, k, v, theta, eta, alpha, weights, factor: str = "polyak", record: bool = False):
    """The default rule, token by token, with step factor `factor`. Returns outputs [B, T, d], end weights and
    (with `record`) per-token dicts of the curvature figures."""
    batch, seq, _ = q.shape
    depth = len(weights)
    eta = eta.clamp(GATE_EPS, 1.0)
    step = theta * (1 - eta)
    keep = (1 - alpha).clamp(GATE_EPS, 1.0)
    W, S = list(weights), [torch.zeros_like(w) for w in weights]
    targets = [column_norms(w) for w in W]
    eye = torch.eye(WIDTH, dtype=q.dtype).expand(batch, WIDTH, WIDTH)
    outputs, records = [], []
    for t in range(seq):
        acts, pre = [k[:, t]], []
        for i, w in enumerate(W):
            pre.append(torch.einsum("bi,bij->bj", acts[-1], w))
            acts.append(F.silu(pre[-1]) if i < depth - 1 else pre[-1])
        r = acts[-1] - v[:, t]
        loss = r.square().sum(-1)
        delta = [None] * depth
        delta[-1] = 2 * r
        for i in range(depth - 1, 0, -1):
            delta[i - 1] = torch.einsum("bj,bij->bi", delta[i], W[i]) * silu_grad(pre[i - 1])
        grads = [acts[i][:, :, None] * delta[i][:, None, :] for i in range(depth)]
        grad_sq = sum(acts[i].square().sum(-1) * delta[i].square().sum(-1) for i in range(depth))
        if record or factor != "polyak":
            jac = [None] * depth  # B_l [B, d_out, width_l]
            jac[-1] = eye
            for i in range(depth - 1, 0, -1):
                jac[i - 1] = torch.einsum("boj,bij->boi", jac[i], W[i]) * silu_grad(pre[i - 1])[:, None, :]
            act_sq = [acts[i].square().sum(-1) for i in range(depth)]
            K = sum(act_sq[i][:, None, None] * jac[i] @ jac[i].transpose(-1, -2) for i in range(depth))
            trace_bound = sum(act_sq[i] * jac[i].square().sum((-1, -2)) for i in range(depth))
        if factor == "polyak":
            c = 2 * loss / (grad_sq + 4 * RHO * loss + EPS)
        elif factor == "exact":
            c = 1 / (2 * (torch.linalg.eigvalsh(K)[..., -1] + RHO))
        elif factor == "trace":
            c = 1 / (2 * (trace_bound + RHO))
        elif factor.startswith("power"):
            c = 1 / (2 * (power_estimate(K, r, int(factor[-1])) + RHO))
        else:
            shift = act_sq[-1] - RHO if factor.startswith("bounded") else torch.zeros_like(act_sq[-1])
            steps = int(factor.removeprefix("bounded").removeprefix("unshifted"))
            c = 1 / (2 * (held_estimate(K, shift, r, steps) + RHO))
        if record:
            with torch.no_grad():
                lam = torch.linalg.eigvalsh(K)[..., -1]
                rKr = torch.einsum("bo,bop,bp->b", r, K, r)
                records.append(dict(ratio=lam * loss / rKr, gain=c * 2 * lam, trace=trace_bound / lam,
                                    grad_sq_error=(grad_sq - 4 * rKr).abs() / grad_sq, theta=theta[:, t]))
        rate = (step[:, t] * c)[:, None, None]
        S = [eta[:, t, None, None] * s - rate * g for s, g in zip(S, grads)]
        W = [keep[:, t, None, None] * w + s for w, s in zip(W, S)]
        outputs.append(mlp(q[:, t, None, :], W)[:, 0])
        W = [w * (n / column_norms(w).clamp_min(NORM_EPS)) for w, n in zip(W, targets)]
    return torch.stack(outputs, 1), W, records


def check() -> None:
    for depth in (1, 2, 4):
        (q, k, v, theta, eta, alpha), W0 = draw(24, depth, 1.0, batch=2)
        heads = [x[:, None] for x in (q, k, v, theta, eta, alpha)]
        ref, state = memory_scan_reference(*heads, MemoryState.from_weights(tuple(w[:, None] for w in W0)),
                                           chunk_size=1, polyak_step=True, momentum_ema=True, normalize_weights=True)
        y, W, _ = scan(q, k, v, theta, eta, alpha, W0)
        dy = (y - ref[:, 0]).abs().max().item()
        dw = max((a - b[:, 0]).abs().max().item() for a, b in zip(W, state.weights))
        print(f"depth {depth}: max |y - reference| {dy:.1e}, max |W - reference| {dw:.1e}", flush=True)
        assert dy < 1e-10 and dw < 1e-10


def ratio(seq: int, depths: list[int], thetas: list[float]) -> None:
    print(f"1. T={seq}, chunk 1, Polyak factor, float64. ratio = lambda_max |r|^2 / r^T K r; expanding = share of "
          "tokens with theta c 2 lambda_max > 2")
    print("depth theta_max | ratio median / p90 / max | trace / lambda_max median | expanding | max theta c 2 lambda_max")
    for depth in depths:
        for theta_max in thetas:
            (q, k, v, theta, eta, alpha), W0 = draw(seq, depth, theta_max)
            with torch.no_grad():
                _, _, records = scan(q, k, v, theta, eta, alpha, W0, record=True)
            cat = {key: torch.cat([r[key] for r in records]) for key in records[0]}
            assert cat["grad_sq_error"].max() < 1e-8, "|g|^2 != 4 r^T K r"
            r, push = cat["ratio"], cat["theta"] * cat["gain"]
            print(f"{depth:5d} {theta_max:9g} | {r.quantile(.5):6.2f} {r.quantile(.9):6.2f} {r.max():7.2f} | "
                  f"{cat['trace'].quantile(.5):5.1f} | {(push > 2).double().mean():6.3f} | {push.max():6.2f}",
                  flush=True)


def gradient(seqs: list[int], depths: list[int], thetas: list[float], factors: list[str]) -> None:
    print("2. largest input-gradient norm (loss = mean y^2 + sum mean W_end^2), float64, chunk 1, at T = "
          + " / ".join(map(str, seqs)))
    for depth in depths:
        for theta_max in thetas:
            for factor in factors:
                cells, start = [], time.perf_counter()
                for seq in seqs:
                    inputs, W0 = draw(seq, depth, theta_max)
                    leaves = [x.clone().requires_grad_() for x in inputs]
                    y, W, _ = scan(*leaves, W0, factor=factor)
                    loss = y.square().mean() + sum(w.square().mean() for w in W)
                    norm = max(g.norm().item() for g in torch.autograd.grad(loss, leaves))
                    cells.append(f"{norm:9.2e}")
                print(f"depth {depth} theta_max {theta_max:g} {factor:7s}: {' '.join(cells)}  "
                      f"(max |W| {max(w.abs().max().item() for w in W):.2f}, {time.perf_counter() - start:.0f} s)",
                      flush=True)


@torch.no_grad()
def store_recall(depth: int, theta_max: float, factor: str, batch: int = 64, pairs: int = 16, filler: int = 64) -> float:
    """16 random unit-key pairs, then 64 filler writes (eta 0.9, alpha 0); share of keys nearest their own value."""
    g = torch.Generator().manual_seed(0)
    seq = pairs + filler
    k = F.normalize(torch.randn(batch, seq, WIDTH, generator=g), dim=-1).to(DTYPE)
    v = torch.randn(batch, seq, WIDTH, generator=g).to(DTYPE)
    W0 = initial_weights(batch, depth, g)
    full = torch.ones(batch, seq, dtype=DTYPE)
    _, W, _ = scan(k, k, v, theta_max * full, 0.9 * full, 0 * full, W0, factor=factor)
    similarity = F.normalize(mlp(k[:, :pairs], W), dim=-1) @ F.normalize(v[:, :pairs], dim=-1).transpose(-1, -2)
    return (similarity.argmax(-1) == torch.arange(pairs)).double().mean().item()


def recall(depths: list[int], thetas: list[float], factors: list[str]) -> None:
    print("3. recall of 16 pairs after 64 filler writes, chunk 1, batch 64 (chance 0.06); columns: theta_max")
    print("depth factor  " + " ".join(f"{t:>6g}" for t in thetas))
    for depth in depths:
        for factor in factors:
            print(f"{depth:5d} {factor:7s} " + " ".join(f"{store_recall(depth, t, factor):6.2f}" for t in thetas),
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("check", "ratio", "gradient", "recall"), default="check")
    parser.add_argument("--seq", type=int, default=1024, help="T of --part ratio")
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 512, 1024], help="Ts of --part gradient")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--thetas", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--factors", nargs="+", choices=FACTORS, default=list(FACTORS))
    args = parser.parse_args()
    if args.part == "check":
        check()
    elif args.part == "ratio":
        ratio(args.seq, args.depths, args.thetas)
    elif args.part == "gradient":
        gradient(args.seqs, args.depths, args.thetas, args.factors)
    else:
        recall(args.depths, args.thetas, args.factors)


if __name__ == "__main__":
    main()
