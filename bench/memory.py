"""Forward+backward throughput of one memory layer against lucidrains' titans-pytorch, in the same process.

    python bench/memory.py                      # CPU shape of issue 2: D=256 H=4 d=64 C=16 B=2 T=1024 depth 2
    python bench/memory.py --dim 1024 --heads 16 --chunk 64 --batch 4 --seq 4096 --device cuda

Ours runs four times: eager and with `compile_scan=True` (each chunk step through torch.compile; its compile time is
spent in the warm-up round, not timed), each with the paper's rule and with the default stabilisers (`polyak_step`,
`momentum_ema`, `normalize_weights`, and beyond depth 2 the bounded step's `power_steps`: docs/memory.md). Peers (pip install -r requirements-bench.txt): titans_pytorch.NeuralMemory
with its default batch_size=None (every inner gradient taken at the initial weights) and with batch_size = chunk
(the paper's rule, which we compute). Both memories are depth-2 MLPs with expansion 4 (lucidrains' default).
All runs are interleaved round by round (`timing.interleaved_medians`), in wall time, or with `--clock cpu` in this
process's CPU time (on a shared, loaded CPU box, where wall time counts the other processes' share of the cores).
"""

from __future__ import annotations

import argparse
import time

import torch

from timing import interleaved_medians

from pretrain.denormals import flush_denormals
from titans_parallel.config import MemoryConfig
from titans_parallel.memory import NeuralMemory

STABILISED = dict(polyak_step=True, momentum_ema=True, normalize_weights=True)  # the defaults
PAPER_RULE = dict(polyak_step=False, momentum_ema=False, normalize_weights=False)
OURS = {  # label: (compile_scan, rule)
    "titans-parallel eager, paper rule": (False, PAPER_RULE),
    "titans-parallel eager, stabilised": (False, STABILISED),
    "titans-parallel compiled, paper rule": (True, PAPER_RULE),
    "titans-parallel compiled, stabilised": (True, STABILISED),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-peer", action="store_true", help="time titans-parallel only")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (CPU only; meaningful with one thread on a loaded box)")
    args = parser.parse_args()
    flush_denormals()

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.dim, device=args.device)
    tokens = args.batch * args.seq
    runs = {
        label: NeuralMemory(
            args.dim, args.heads, args.head_dim,
            MemoryConfig(depth=args.depth, expansion=4, chunk_size=args.chunk, compile_scan=compiled, **rule),
        )
        for label, (compiled, rule) in OURS.items()
    }
    if not args.no_peer:
        from titans_pytorch import NeuralMemory as LucidrainsMemory

        for label, batch_size in (("lucidrains default (batch_size=None)", None), ("lucidrains paper rule", args.chunk)):
            runs[label] = LucidrainsMemory(
                args.dim, chunk_size=args.chunk, batch_size=batch_size, dim_head=args.head_dim, heads=args.heads,
                default_model_kwargs=dict(depth=args.depth, expansion_factor=4.0),
            )
    print(f"shape: B={args.batch} T={args.seq} D={args.dim} H={args.heads} d={args.head_dim} chunk={args.chunk} "
          f"depth={args.depth} device={args.device} threads={torch.get_num_threads()} rounds={args.reps} "
          f"clock={args.clock}")

    def fwd_bwd(module: torch.nn.Module):
        module.to(args.device)
        return lambda: module(x)[0].float().square().mean().backward()

    clock = time.process_time if args.clock == "cpu" and not x.is_cuda else time.perf_counter
    seconds = interleaved_medians(
        {label: fwd_bwd(m) for label, m in runs.items()}, args.warmup, args.reps, x.is_cuda, clock
    )
    rates = {label: tokens / s for label, s in seconds.items()}
    for label, rate in rates.items():
        print(f"{label:42s} {rate:12,.0f} tokens/s  ({seconds[label] * 1e3:8.1f} ms fwd+bwd)")
    for ours in OURS:
        for label, rate in rates.items():
            if label not in OURS:
                print(f"ratio {ours} / {label}: {rates[ours] / rate:.2f}x")
    for mode in ("eager", "compiled"):
        stabilised, paper = rates[f"titans-parallel {mode}, stabilised"], rates[f"titans-parallel {mode}, paper rule"]
        print(f"ratio {mode}: stabilised / paper rule: {stabilised / paper:.2f}x")


if __name__ == "__main__":
    main()
