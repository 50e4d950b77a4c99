"""Per-rank peak memory and tokens/s of one training forward+backward at CP=1 (one process) and CP=cp (cp gloo
ranks on this host), at bench/model.py's shape (D=256, 4 heads, 4 layers, window 128, memory in layers 2 and 4).

    python bench/context_parallel.py --seq 4096 8192 --variants mag,swa --cp 2

Each (variant, T, degree) runs in fresh processes: build the model (seed 0), then one warm-up step and `--reps`
timed steps (loss, backward, the CP gradient sum). The peak is the growth of the resident set's peak (ru_maxrss)
from the built model over those steps (parameter gradients included), the largest rank's; tokens/s is T / rank 0's
median step time. On a host with fewer cores than ranks the
ranks share them, so tokens/s there says little; the peak is what context parallel is for.
"""

from __future__ import annotations

import argparse
import os
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

SHAPE = dict(dim=256, layers=4, window=128, chunk=16, vocab=4096, batch=1)


def _rank(rank: int, world: int, port: int, args, variant: str, seq: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    flush_denormals()
    dims = init_parallel(1, cp=world, seed=0, backend="gloo")
    model = our_model(variant, False, args, parallel=dims)
    ids = torch.randint(0, args.vocab, (args.batch, seq + 1), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        start = time.perf_counter()
        model(ids[:, :-1], ids[:, 1:]).backward()
        sum_context_parallel_grads(model, dims)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up; the peak counts from before it
    seconds = statistics.median(step() for _ in range(args.reps))
    peak = torch.tensor(float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)  # Linux: KiB
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        out.put((peak.item(), seconds))
    destroy_parallel()


def measure(args, variant: str, seq: int, cp: int) -> tuple[float, float]:
    """(peak MiB of the slowest rank, median seconds per step) on `cp` fresh ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, cp, port, args, variant, seq, out)) for r in range(cp)]
    for p in procs:
        p.start()
    result = out.get()
    for p in procs:
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--variants", default="mag,swa")
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    args.__dict__.update(SHAPE)
    print(f"shape: {SHAPE} T={args.seq} cp={args.cp} cores={os.cpu_count()} reps={args.reps}")
    print(f"{'variant':8s} {'T':>6s} {'peak MiB cp=1':>14s} {f'cp={args.cp}':>8s} {'ratio':>6s} "
          f"{'tok/s cp=1':>11s} {f'cp={args.cp}':>8s}")
    for variant in args.variants.split(","):
        for seq in args.seq:
            (one_mib, one_s), (cp_mib, cp_s) = (measure(args, variant, seq, cp) for cp in (1, args.cp))
            print(f"{variant:8s} {seq:6d} {one_mib:14.0f} {cp_mib:8.0f} {cp_mib / one_mib:6.2f} "
                  f"{seq / one_s:11,.0f} {seq / cp_s:8,.0f}", flush=True)


if __name__ == "__main__":
    main()
