"""Data pipeline throughput: prepare_data on the shared corpus, then the streaming loader.

    python bench/data_throughput.py [--corpus /work/shared/corpus] [--vocab-size 32000] [--seq-len 4096]

Prints (1) prepare_data end to end (tokenizer training + tokenization + shard writing) and tokenization +
writing alone (the same run again with the trained tokenizer given), as input tokens per second; (2) the
loader's samples/s and tokens/s feeding ``batch-size x seq-len`` batches (tokens counted as batch * seq_len,
the tokens a training step consumes), for each requested ``num_workers``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from pretrain.data import build_loader, prepare_dataset, read_manifest


def bench_prepare(corpus: Path, out: Path, args: argparse.Namespace) -> None:
    inputs = sorted(corpus.glob("*.jsonl.gz"))
    common = dict(seq_len=args.seq_len, val_fraction=args.val_fraction, workers=args.workers, progress=False)
    start = time.perf_counter()
    prepare_dataset(inputs, out / "trained", vocab_size=args.vocab_size, **common)
    end_to_end = time.perf_counter() - start
    start = time.perf_counter()
    prepare_dataset(inputs, out / "given", tokenizer=out / "trained" / "tokenizer.model", **common)
    tokenize_only = time.perf_counter() - start

    manifest = read_manifest(out / "given")
    tokens = sum(s["tokens"] + s["dropped_tokens"] for s in manifest["splits"].values())
    mb = sum(f.stat().st_size for f in inputs) / 2**20
    print(
        f"prepare_data: {len(inputs)} files ({mb:.1f} MiB gz), {tokens:,} tokens, vocab {args.vocab_size}, "
        f"seq_len {args.seq_len}, {args.workers} workers"
    )
    for what, seconds in [
        ("end to end (train tokenizer + tokenize + write)", end_to_end),
        ("tokenize + write (tokenizer given)", tokenize_only),
    ]:
        print(f"  {what:<48} {seconds:6.1f} s {tokens / seconds:12,.0f} tokens/s")


def bench_loader(root: Path, args: argparse.Namespace) -> None:
    for workers in args.loader_workers:
        loader = build_loader(
            root, batch_size=args.batch_size, dp_rank=0, dp_size=1, num_workers=workers, seq_len=args.seq_len
        )
        batches = iter(loader)
        next(batches)  # worker start-up is not throughput
        start = time.perf_counter()
        for batch in itertools.islice(batches, args.batches):
            assert batch.shape == (args.batch_size, args.seq_len + 1)
        seconds = time.perf_counter() - start
        samples = args.batches * args.batch_size
        print(
            f"loader {args.batch_size}x{args.seq_len}, num_workers={workers}: "
            f"{args.batches} batches in {seconds:.2f} s, "
            f"{samples / seconds:,.0f} samples/s, {samples * args.seq_len / seconds:,.0f} tokens/s "
            f"({loader.samples_per_epoch} samples per epoch)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=Path("/work/shared/corpus"))
    p.add_argument("--out", type=Path, default=None, help="keep the prepared data here (default: a temp dir)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        bench_prepare(args.corpus, out, args)
        bench_loader(out / "given", args)


if __name__ == "__main__":
    main()
