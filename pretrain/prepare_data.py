"""Prepare a pretraining dataset from raw text into token shards.

    python -m pretrain.prepare_data --input PATH... --out DIR --vocab-size N --seq-len T [--tokenizer MODEL]
        [--val-fraction F] [--text-field text] [--workers N] [--shard-mb MB] [--force]

Reads txt / jsonl(.gz) / parquet files, globs or directories, trains (or takes) a sentencepiece tokenizer,
and writes packed webdataset shards with a manifest; see ``pretrain.data.prepare`` for the split rule and
``pretrain.data.shards`` for the output layout. The dataset is built beside --out and moved into place when
complete: an existing --out is refused unless --force, and a failed run leaves it as it was.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pretrain.data.prepare import prepare_dataset
from pretrain.data.shards import read_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.prepare_data", description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, globs or directories")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence (samples hold seq_len + 1)")
    p.add_argument(
        "--vocab-size", type=int, help="vocabulary size of the tokenizer to train (or check --tokenizer against)"
    )
    p.add_argument("--tokenizer", help="an existing sentencepiece .model to use instead of training one")
    p.add_argument(
        "--val-fraction", type=float, default=0.01, help="fraction of documents for validation (default 0.01)"
    )
    p.add_argument("--text-field", default="text", help="text field of JSONL records / parquet column (default text)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-mb", type=float, default=64.0, help="approximate shard size in MiB (default 64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="replace an existing --out (once the new build is complete)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = prepare_dataset(
            args.input,
            args.out,
            seq_len=args.seq_len,
            vocab_size=args.vocab_size,
            tokenizer=args.tokenizer,
            val_fraction=args.val_fraction,
            text_field=args.text_field,
            workers=args.workers,
            shard_mb=args.shard_mb,
            progress=not args.no_progress,
            overwrite=args.force,
        )
    except (OSError, ValueError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    manifest = read_manifest(out)
    for name, split in manifest["splits"].items():
        print(
            f"{out}/{name}: {split['documents']} documents, {split['samples']} samples of {manifest['seq_len'] + 1} "
            f"tokens in {len(split['shards'])} shard(s), {split['dropped_tokens']} tail tokens dropped"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
