"""Stability of the memory's inner update, with and without its stabilisers (docs/memory.md), in one process.

    python bench/memory_stability.py                 # both parts below
    python bench/memory_stability.py --part sweep    # finiteness only

1. sweep: forward and backward of `memory_scan` over --seq tokens (random unit q/k, unit-variance v, random gates
   theta = theta_max * sigmoid(n), eta = sigmoid(n), alpha = sigmoid(n - 4), n ~ N(0, 1)) for every theta_max,
   depth, chunk size and input precision; reports whether outputs, end state and every input gradient are finite,
   the largest |W| at the end and the largest input-gradient norm, for each rule in --rules: the paper's rule,
   the stabilised rule (polyak_step + momentum_ema), that rule with normalize_weights, that with the bounded
   step (--power-steps, default 4) and `defaults` (MemoryConfig's at each depth: the bounded step deeper than 2).
2. store: the memory alone as an associative store: --pairs random key/value pairs, then --filler random writes,
   constant gates (eta 0.9, alpha 0); recall = the share of the pairs' keys whose retrieval is nearest (cosine) to
   their own value among the pairs' values. Swept over theta_max for each rule.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch
import torch.nn.functional as F

from titans_parallel.config import MemoryConfig
from titans_parallel.memory import MemoryState, memory_scan

RULES = {
    "paper": {},
    "stabilised": dict(polyak_step=True, momentum_ema=True),
    "normalised": dict(polyak_step=True, momentum_ema=True, normalize_weights=True),
    "bounded": dict(polyak_step=True, momentum_ema=True, normalize_weights=True, power_steps=4),
    "defaults": None,  # MemoryConfig's at each depth: `normalised`, and `bounded` deeper than 2
}


def rule_options(rule: str, depth: int, power_steps: int) -> dict:
    """The scan options of a rule at a memory depth (`bounded` with `power_steps`)."""
    if rule == "bounded":
        return dict(RULES[rule], power_steps=power_steps)
    if RULES[rule] is not None:
        return RULES[rule]
    config = MemoryConfig(depth=depth)
    return dict(polyak_step=config.polyak_step, momentum_ema=config.momentum_ema,
                normalize_weights=config.normalize_weights, power_steps=config.power_steps)


def initial_state(batch: int, heads: int, width: int, depth: int, expansion: int, g: torch.Generator) -> MemoryState:
    widths = [width] + [expansion * width] * (depth - 1) + [width]
    weights = tuple(
        torch.randn(batch, heads, n_in, n_out, generator=g) / math.sqrt(n_in) for n_in, n_out in zip(widths, widths[1:])
    )
    return MemoryState.from_weights(weights)


def sweep_case(
    theta_max: float, depth: int, chunk: int, dtype: torch.dtype, rule: dict, args
) -> tuple[bool, float, float]:
    """(everything finite, max |W| at the end, largest input-gradient norm) for one forward + backward."""
    g = torch.Generator().manual_seed(args.seed)
    B, H, T, d = args.batch, args.heads, args.seq, args.head_dim
    q, k = (F.normalize(torch.randn(B, H, T, d, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(B, H, T, d, generator=g)
    theta = theta_max * torch.sigmoid(torch.randn(B, H, T, generator=g))
    eta = torch.sigmoid(torch.randn(B, H, T, generator=g))
    alpha = torch.sigmoid(torch.randn(B, H, T, generator=g) - 4)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, theta, eta, alpha)]
    state = initial_state(B, H, d, depth, 4, g)
    y, end = memory_scan(*leaves, state, chunk_size=chunk, **rule)
    loss = y.float().square().mean() + sum(w.square().mean() for w in end.weights)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    finite = bool(torch.isfinite(loss)) and all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    grad_norm = max(g.double().norm().item() for g in grads if g is not None)  # fp32 norms overflow first
    return finite, max(w.abs().max().item() for w in end.weights), grad_norm


def run_sweep(args) -> None:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
    print(f"sweep: T={args.seq} B={args.batch} H={args.heads} d={args.head_dim} seed {args.seed}; cell = finite? "
          f"max|W| at the end, largest input-gradient norm")
    header = f"{'rule':11s} {'depth':>5s} {'chunk':>5s} {'dtype':>5s} " + " ".join(f"{t:>24g}" for t in args.thetas)
    print(header)
    failures = {rule: 0 for rule in args.rules}
    for rule, depth, chunk, dtype in itertools.product(args.rules, args.depths, args.chunks, args.dtypes):
        start = time.perf_counter()
        cells = []
        for theta_max in args.thetas:
            options = rule_options(rule, depth, args.power_steps)
            finite, w_max, grad_norm = sweep_case(theta_max, depth, chunk, dtypes[dtype], options, args)
            failures[rule] += not finite
            cells.append(f"{'ok' if finite else 'NONFINITE':>9s} {w_max:6.2g} {grad_norm:7.1e}")
        print(f"{rule:11s} {depth:5d} {chunk:5d} {dtype:>5s} " + " ".join(cells) +
              f"   ({time.perf_counter() - start:.1f} s)", flush=True)
    cases = len(args.depths) * len(args.chunks) * len(args.dtypes) * len(args.thetas)
    for rule, n in failures.items():
        print(f"{rule}: {cases - n} of {cases} cases finite")


@torch.no_grad()
def store_recall(theta_max: float, rule: dict, args) -> float:
    g = torch.Generator().manual_seed(0)
    B, P, T, d = args.store_batch, args.pairs, args.pairs + args.filler, args.head_dim
    k = F.normalize(torch.randn(B, 1, T, d, generator=g), dim=-1)
    v = torch.randn(B, 1, T, d, generator=g)
    eta, alpha = torch.full((B, 1, T), 0.9), torch.zeros(B, 1, T)
    state = initial_state(B, 1, d, args.store_depth, 4, g)
    _, state = memory_scan(k, k, v, torch.full((B, 1, T), theta_max), eta, alpha, state, chunk_size=16, **rule)
    read = lambda w: memory_scan(  # noqa: E731  retrieval at the final state, no update
        k[:, :, :P], k[:, :, :P], v[:, :, :P], torch.zeros(B, 1, P), eta[:, :, :P], alpha[:, :, :P], w,
        chunk_size=16, retrieve="chunk",
    )[0]
    similarity = F.normalize(read(state), dim=-1) @ F.normalize(v[:, :, :P], dim=-1).transpose(-1, -2)
    return (similarity.argmax(-1) == torch.arange(P)).float().mean().item()


def run_store(args) -> None:
    print(f"\nstore: {args.pairs} pairs, then {args.filler} filler writes, d={args.head_dim}, depth {args.store_depth}, "
          f"eta 0.9, chunk 16; recall of the pairs (chance {1 / args.pairs:.2f})")
    print(f"{'rule':11s} " + " ".join(f"{t:>7g}" for t in args.store_thetas) + "   best / at best/3 / at best*3")
    for rule in args.rules:
        options = rule_options(rule, args.store_depth, args.power_steps)
        recalls = [store_recall(t, options, args) for t in args.store_thetas]
        best = max(range(len(recalls)), key=recalls.__getitem__)
        around = [recalls[i] if 0 <= i < len(recalls) else float("nan") for i in (best - 1, best + 1)]
        print(f"{rule:11s} " + " ".join(f"{r:7.2f}" for r in recalls) +
              f"   {recalls[best]:.2f} at {args.store_thetas[best]:g} / {around[0]:.2f} / {around[1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("sweep", "store", "all"), default="all")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--thetas", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16", "fp64"),
                        help="fp64: the gradient's growth without overflow")
    parser.add_argument("--power-steps", type=int, default=4, help="of the bounded rule")
    parser.add_argument("--seed", type=int, default=0, help="of the sweep's inputs, gates and weights")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--filler", type=int, default=64)
    parser.add_argument("--store-batch", type=int, default=64)
    parser.add_argument("--store-depth", type=int, default=2)
    parser.add_argument("--store-thetas", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    args = parser.parse_args()
    if args.part in ("sweep", "all"):
        run_sweep(args)
    if args.part in ("store", "all"):
        run_store(args)


if __name__ == "__main__":
    main()
