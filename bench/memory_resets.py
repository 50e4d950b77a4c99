"""Cost of document resets in the chunked memory scan: `memory_scan` fwd+bwd with resets=None against the same call
with --resets resets per row at random positions (different per row, almost all inside a chunk), interleaved round
by round in one process (`timing.interleaved_medians`), printing the time ratio. On CPU each run is timed in this
process's CPU time (`time.process_time`), so other processes on a shared machine do not count; on CUDA in wall time.

    OMP_NUM_THREADS=1 python bench/memory_resets.py   # B=2 H=4 d=64 T=1024 chunk 16 depth 2 (expansion 4), 4 resets/row
    python bench/memory_resets.py --compile --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from timing import interleaved_medians
from titans_parallel.memory import MemoryState, memory_scan
from titans_parallel.memory.grid import ChunkGrid

STABILISED = dict(polyak_step=True, momentum_ema=True, normalize_weights=True)  # the defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--resets", type=int, default=4, help="resets per row")
    parser.add_argument("--paper-rule", action="store_true", help="stabilisers off (default: all three on)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    B, H, T, d, dev = args.batch, args.heads, args.seq, args.head_dim, args.device
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, T, d, device=dev), dim=-1) for _ in range(2))
    v = torch.randn(B, H, T, d, device=dev)
    theta = 0.1 * torch.rand(B, H, T, device=dev)
    eta = torch.rand(B, H, T, device=dev)
    alpha = 0.01 * torch.rand(B, H, T, device=dev)
    widths = [d] + [4 * d] * (args.depth - 1) + [d]
    w0 = [torch.randn(1, H, widths[i], widths[i + 1], device=dev) / widths[i] ** 0.5 for i in range(args.depth)]
    leaves = [t.requires_grad_() for t in (q, k, v, theta, eta, alpha, *w0)]
    resets = torch.zeros(B, T, dtype=torch.bool, device=dev)
    for b in range(B):
        resets[b, torch.randperm(T - 1)[: args.resets] + 1] = True
    rule = {} if args.paper_rule else STABILISED

    def fwd_bwd(with_resets: bool):
        def step() -> None:
            state = MemoryState.from_weights(tuple(w.expand(B, -1, -1, -1) for w in w0))
            kw = dict(resets=resets, reset_state=state) if with_resets else {}
            y, end = memory_scan(q, k, v, theta, eta, alpha, state, chunk_size=args.chunk, compile=args.compile,
                                 **rule, **kw)
            torch.autograd.grad(y.square().mean() + end.weights[-1].square().mean(), leaves)

        return step

    chunks = ChunkGrid.from_resets(resets, args.chunk).chunks
    rule_name = "paper" if args.paper_rule else "stabilised"
    print(f"shape: B={B} H={H} d={d} T={T} chunk={args.chunk} depth={args.depth} resets/row={args.resets} "
          f"({chunks} chunks per row instead of {-(-T // args.chunk)}) rule={rule_name} compile={args.compile} "
          f"device={dev} threads={torch.get_num_threads()} rounds={args.reps}")
    cuda = dev.startswith("cuda")
    steps = {"resets=None": fwd_bwd(False), "resets": fwd_bwd(True)}
    seconds = interleaved_medians(steps, args.warmup, args.reps, cuda, time.perf_counter if cuda else time.process_time)
    for label, s in seconds.items():
        print(f"{label:12s} {s * 1e3:8.1f} ms fwd+bwd  ({B * T / s:10,.0f} tokens/s)")
    print(f"ratio with resets / without: {seconds['resets'] / seconds['resets=None']:.3f}x time")


if __name__ == "__main__":
    main()
