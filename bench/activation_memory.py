"""Peak memory and tokens/s of forward+backward with and without per-block activation checkpointing
(`train.activation_checkpointing`), at bench/model.py's shape (D=256, 4 layers, window 128, memory in layers 2, 4).

    python bench/activation_memory.py --seq 1024 4096 --variants mac,swa

Peak memory: each (variant, T, on/off) runs one forward+backward in a fresh subprocess and reports its peak over
the built model: on CPU the growth of the peak resident set (ru_maxrss), on CUDA torch.cuda.max_memory_allocated.
Both include the parameter gradients (the same with and without). Tokens/s: every setting alternates round by
round in this process (bench/timing.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from model import our_model
from timing import interleaved_medians

from pretrain.denormals import flush_denormals
from titans_parallel import TitansLM, lm_loss

SHAPE = dict(dim=256, layers=4, window=128, chunk=16, vocab=4096, batch=1)


def fwd_bwd(model: TitansLM, ids: torch.Tensor) -> None:
    """One training step's forward and backward (no optimizer), ids [B, T + 1]."""
    lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()


def peak_mib(args, variant: str, seq: int, checkpointing: bool) -> float:
    """Peak MiB of one forward+backward over the built model, measured here (call it in a fresh process)."""
    torch.manual_seed(0)
    model = our_model(variant, False, args).to(args.device)
    model.activation_checkpointing = checkpointing
    ids = torch.randint(0, args.vocab, (args.batch, seq + 1), device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(model, ids)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd_bwd(model, ids)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # Linux: KiB


def peak_in_subprocess(args, variant: str, seq: int, checkpointing: bool) -> float:
    cmd = [sys.executable, __file__, "--peak-of", variant, str(seq), str(int(checkpointing)), "--device", args.device]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--variants", default="mac,swa")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peak-of", nargs=3, metavar=("VARIANT", "T", "ON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.__dict__.update(SHAPE)
    flush_denormals()
    if args.peak_of:
        variant, seq, on = args.peak_of
        print(json.dumps(peak_mib(args, variant, int(seq), bool(int(on)))))
        return

    variants, settings = args.variants.split(","), (False, True)
    print(f"shape: {SHAPE} T={args.seq} device={args.device} threads={torch.get_num_threads()} rounds={args.reps}")
    peaks = {(v, T, on): peak_in_subprocess(args, v, T, on) for v in variants for T in args.seq for on in settings}
    torch.manual_seed(0)
    models = {v: our_model(v, False, args).to(args.device) for v in variants}
    ids = {T: torch.randint(0, args.vocab, (args.batch, T + 1), device=args.device) for T in args.seq}

    def step(variant: str, seq: int, on: bool):
        def run() -> None:
            models[variant].activation_checkpointing = on
            fwd_bwd(models[variant], ids[seq])
        return run

    keys = [(v, T, on) for v in variants for T in args.seq for on in settings]
    seconds = interleaved_medians({k: step(*k) for k in keys}, args.warmup, args.reps, args.device.startswith("cuda"))
    print(f"{'variant':11s} {'T':>6s} {'peak MiB off':>13s} {'on':>8s} {'on/off':>7s} {'tok/s off':>10s} {'on':>8s} "
          f"{'on/off':>7s}")
    for v in variants:
        for T in args.seq:
            off_mib, on_mib = peaks[v, T, False], peaks[v, T, True]
            off_rate, on_rate = T * args.batch / seconds[v, T, False], T * args.batch / seconds[v, T, True]
            print(f"{v:11s} {T:6d} {off_mib:13.0f} {on_mib:8.0f} {on_mib / off_mib:7.2f} {off_rate:10,.0f} "
                  f"{on_rate:8,.0f} {on_rate / off_rate:7.2f}")


if __name__ == "__main__":
    main()
