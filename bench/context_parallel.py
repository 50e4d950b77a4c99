"""Per-rank peak memory and tokens/s of one training forward+backward at CP=1 (one process) and CP=N (N gloo ranks
on this host), with and without activation checkpointing, over widths and sequence lengths.

    python bench/context_parallel.py --seq 4096 8192 --variants mag,swa --cp 1 2
    python bench/context_parallel.py --shape tiny --dim 128 512 --heads 4 8 --variants mag \\
        --seq 4096 16384 65536 --cp 1 2 --activation-checkpointing both --reps 1

Shapes (4 layers, memory in layers 2 and 4, SWA elsewhere, B=1): `bench` is bench/model.py's (D=256, 4 heads,
window 128, memory depth 2 expansion 4 chunk 16); `tiny` is configs/model/tiny.yaml's width (D=128, 4 heads; window 64,
memory depth 2 expansion 2 chunk 16) with the variant's layers where it has MAC. --dim/--heads give other widths
(heads pairwise; they must divide by every cp).

Each (variant, dim, T, cp, checkpointing) runs in fresh processes: build the model (seed 0), then `--warmup` and
`--reps` timed steps (loss, backward, the CP gradient sum). The peak is the growth of the resident set's peak
(ru_maxrss) from the built model over those steps (parameter gradients included), the largest rank's; MiB/Ktok is
that peak per 1024 tokens of the full sequence (constant when memory grows linearly in T); tokens/s is T / rank 0's
median step time. On a host with fewer cores than ranks the ranks share them, so tokens/s there says little; the
peak is what context parallel is for.
"""

from __future__ import annotations

import argparse
import os
import queue
import resource
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import our_model

from pretrain.denormals import flush_denormals
from titans_parallel.parallel import destroy_parallel, init_parallel, sum_context_parallel_grads

SHAPES = {
    "bench": dict(dim=256, heads=4, layers=4, window=128, chunk=16, expansion=4, vocab=4096, batch=1),
    "tiny": dict(dim=128, heads=4, layers=4, window=64, chunk=16, expansion=2, vocab=4096, batch=1),
}


def _rank(rank: int, world: int, port: int, args, cell: tuple, out) -> None:
    variant, dim, heads, seq, checkpointing = cell
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    flush_denormals()
    dims = init_parallel(1, cp=world, seed=0, backend="gloo")
    args.dim = dim
    model = our_model(variant, False, args, parallel=dims, n_heads=heads, expansion=args.expansion)
    model.activation_checkpointing = checkpointing
    ids = torch.randint(0, args.vocab, (args.batch, seq + 1), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        start = time.perf_counter()
        model(ids[:, :-1], ids[:, 1:]).backward()
        sum_context_parallel_grads(model, dims)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.warmup):  # the peak counts from before the warm-up
        step()
    seconds = statistics.median(step() for _ in range(args.reps))
    peak = torch.tensor(float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)  # Linux: KiB
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        out.put((peak.item(), seconds))
    destroy_parallel()


def measure(args, cell: tuple, cp: int) -> tuple[float, float]:
    """(peak MiB of the largest rank, median seconds per step) of `cell` = (variant, dim, heads, T, checkpointing)
    on `cp` fresh ranks; a rank that dies (e.g. out of memory) is a RuntimeError."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, cp, port, args, cell, out)) for r in range(cp)]
    for p in procs:
        p.start()
    while True:
        try:
            result = out.get(timeout=5)
            break
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a rank died: exit codes {[p.exitcode for p in procs]}") from None
    for p in procs:
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--dim", type=int, nargs="+", help="widths (default: the shape's)")
    parser.add_argument("--heads", type=int, nargs="+", help="heads, one per --dim (default: the shape's)")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--variants", default="mag,swa")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2], help="degrees (1: one process)")
    parser.add_argument("--activation-checkpointing", choices=("off", "on", "both"), default="off")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: cores // cp)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    widths = args.dim or [shape["dim"]]
    heads = args.heads or [shape["heads"]] * len(widths)
    if len(heads) != len(widths):
        parser.error("--heads needs one value per --dim")
    args.__dict__.update({k: v for k, v in shape.items() if k not in ("dim", "heads")})
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.activation_checkpointing]
    print(f"shape: {args.shape} {shape} dims={widths} heads={heads} T={args.seq} cp={args.cp} "
          f"checkpointing={args.activation_checkpointing} cores={os.cpu_count()} threads={args.threads} "
          f"warmup={args.warmup} reps={args.reps}")
    print(f"{'variant':8s} {'dim':>4s} {'heads':>5s} {'T':>6s} {'cp':>2s} {'ckpt':>4s} {'peak MiB/rank':>13s} "
          f"{'MiB/Ktok':>8s} {'s/step':>7s} {'tok/s':>7s}", flush=True)
    for variant in args.variants.split(","):
        for dim, n_heads in zip(widths, heads):
            for seq in args.seq:
                for cp in args.cp:
                    for on in settings:
                        mib, seconds = measure(args, (variant, dim, n_heads, seq, on), cp)
                        print(f"{variant:8s} {dim:4d} {n_heads:5d} {seq:6d} {cp:2d} {'on' if on else 'off':>4s} "
                              f"{mib:13,.0f} {mib / (seq / 1024):8.1f} {seconds:7.1f} {seq / seconds:7,.0f}",
                              flush=True)


if __name__ == "__main__":
    main()
