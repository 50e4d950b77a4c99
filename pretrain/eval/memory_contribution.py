"""What the memory's test-time learning adds: held-out loss by token position, with it on and off.

    python -m pretrain.eval.memory_contribution --model runs/tiny_cpu/checkpoints [--data DIR] [--batches 8]

`--model` is a DeepSpeed checkpoint (folder or tag, any ZeRO stage / TP degree) or a safetensors export
(`pretrain.convert --format safetensors`). `--data` is a prepared dataset (its val split); by default the embedded
dataset at the model's vocabulary and the checkpoint's seq_len. "Off" sets every memory's `learning` to False
(theta = alpha = 0): the memory then stays at its learned initial weights W_0, so the difference is what learning
while reading adds. Positions are bucketed; the row "beyond the window" averages the positions a
sliding window of `model.window` tokens cannot see back to the start from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from pretrain.denormals import flush_denormals
from pretrain.eval.loading import dataset_root, load_model_and_seq_len, val_batches
from pretrain.eval.perplexity import position_buckets, position_loss
from titans_parallel import TitansLM
from titans_parallel.memory import NeuralMemory


@contextlib.contextmanager
def memory_learning(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, every NeuralMemory of `model` learns while reading, or not (`NeuralMemory.learning`)."""
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    saved = [m.learning for m in memories]
    try:
        for m in memories:
            m.learning = enabled
        yield
    finally:
        for m, learning in zip(memories, saved):
            m.learning = learning


def memory_contribution(model: TitansLM, batches: list[torch.Tensor]) -> list[dict]:
    """Rows {positions, loss_on, loss_off, off_vs_on}: held-out loss per bucket with test-time learning on and
    off (off_vs_on = loss_off / loss_on - 1: how much worse the model is without learning while reading)."""
    on = position_loss(model, tqdm(batches, desc="learning on", unit="batch", leave=False))
    with memory_learning(model, enabled=False):
        off = position_loss(model, tqdm(batches, desc="learning off", unit="batch", leave=False))
    rows = []
    for label, start, end in position_buckets(on.total.shape[0], model.config.window):
        loss_on, loss_off = on.mean(start, end), off.mean(start, end)
        rows.append(dict(positions=label, loss_on=loss_on, loss_off=loss_off, off_vs_on=loss_off / loss_on - 1))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'positions':32s} {'loss (learning on)':>18s} {'loss (off)':>11s} {'off vs on':>10s}"]
    for r in rows:
        lines.append(f"{r['positions']:32s} {r['loss_on']:18.4f} {r['loss_off']:11.4f} {100 * r['off_vs_on']:+9.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder / tag, or a safetensors export folder")
    parser.add_argument("--data", default=None, help="prepared dataset (default: the embedded one)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's data.seq_len")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    flush_denormals()
    model, trained_seq_len = load_model_and_seq_len(args.model)
    seq_len = args.seq_len or trained_seq_len
    if seq_len is None:
        parser.error("--seq-len is needed for an export (it does not record the training length)")
    root = dataset_root(args.data, model.config.vocab_size, seq_len)
    batches = val_batches(root, seq_len, model.config.vocab_size, args.batch_size, args.batches)
    rows = memory_contribution(model, batches)
    print(f"{args.model}: {len(batches)} val batches of {args.batch_size} x {seq_len} tokens from {root}")
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    from pretrain.checkpoint import CheckpointError
    from pretrain.data import ManifestError
    from titans_parallel.typed_config import ConfigError, run_cli

    run_cli(main, errors=(CheckpointError, ConfigError, FileNotFoundError, ManifestError), prog="memory_contribution")
