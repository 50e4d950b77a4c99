"""Evaluate a trained Titans LM: held-out perplexity by context length and position, S-NIAH recall (passkey in
noise, a number and a UUID hidden in real text) by length and needle depth, with the memory's test-time learning
on and, with --memory-off-too, off beside it.

    python -m pretrain.evaluate --model runs/tiny_cpu/checkpoints --out runs/tiny_cpu/eval [--memory-off-too]

`--model` is a DeepSpeed checkpoint (folder or tag, any ZeRO stage / TP degree) or a safetensors export
(`pretrain.convert --format safetensors`; give `--seq-len`). `--data` is a prepared dataset (default: the embedded
one at the model's vocabulary and seq_len); its val split is the held-out text and the needles' haystack, its
tokenizer writes the needles. Lengths beyond the dataset's seq_len join consecutive val samples (continuous text).
Every sequence is read in pieces of `--stream-chunk` tokens through the model's carried state, so any length fits.
A needle row starts with the tokenizer's eos (the document boundary the model saw in training).

Output: tables on stdout; with --out, `results.json` (every figure; a non-finite number is written as null) and one
heatmap per task and learning mode, `niah_<task>_<on|off>.png` (columns: length, rows: depth).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from pretrain.denormals import flush_denormals
from pretrain.eval.heatmap import write_heatmap
from pretrain.eval.loading import dataset_root, dataset_tokenizer, load_model_and_seq_len, val_stream
from pretrain.eval.memory_contribution import memory_learning
from pretrain.eval.niah import format_niah, niah_sweep
from pretrain.eval.perplexity import length_report, length_rows
from pretrain.eval.tasks import TEXT_NEEDLES, text_needle_batch
from pretrain.monitor import json_safe


def int_list(text: str) -> list[int]:
    """'128,256' -> [128, 256]: positive integers, comma-separated."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def depth_list(text: str) -> list[float]:
    """'0,50,100' -> [0.0, 50.0, 100.0]: needle depths in percent, each in [0, 100]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0 <= v <= 100]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"depths are percentages in [0, 100], got {text!r}")
    return sorted(set(values))


def task_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in TEXT_NEEDLES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"tasks are among {sorted(TEXT_NEEDLES)}, got {text!r}")
    return names


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are the one line `evaluate: error: <message>` (exit status 2), without the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = OneLineParser(prog="evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder / tag, or a safetensors export folder")
    p.add_argument("--data", default=None, help="prepared dataset (default: the embedded one)")
    p.add_argument("--seq-len", type=int, default=None, help="training length (default: the checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", choices=("perplexity", "niah"), action="append", default=[], help="leave a part out")
    p.add_argument("--lengths", type=int_list, default=None,
                   help="perplexity context lengths (default: seq_len x 1/2, 1, 2, 4)")
    p.add_argument("--samples", type=int, default=8, help="sequences per perplexity length")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--stream-chunk", type=int, default=None, help="tokens per model call (default: seq_len)")
    p.add_argument("--niah-tasks", type=task_list, default=list(TEXT_NEEDLES))
    p.add_argument("--niah-lengths", type=int_list, default=None,
                   help="S-NIAH context lengths (default: window x 1/2 ... 16, those that hold each needle)")
    p.add_argument("--depths", type=depth_list, default=[0.0, 25.0, 50.0, 75.0, 100.0], help="needle depths, %%")
    p.add_argument("--niah-samples", type=int, default=8, help="rows per S-NIAH cell")
    p.add_argument("--memory-off-too", action="store_true", help="also run every part with test-time learning off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for results.json and the heatmaps")
    args = p.parse_args(argv)
    for flag in ("samples", "batch_size", "stream_chunk", "niah_samples", "seq_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"argument --{flag.replace('_', '-')}: must be >= 1, got {value}")
    return p, args


def holds_needle(task: str, length: int, encode, eos: int) -> bool:
    """Whether `length` input tokens hold the task's needle, question and answer (one row is built to tell)."""
    try:
        text_needle_batch(TEXT_NEEDLES[task], encode, torch.zeros(1, dtype=torch.long), 1, length, 0.5,
                          torch.Generator().manual_seed(0), eos)
        return True
    except ValueError:
        return False


def niah_plan(parser: argparse.ArgumentParser, tasks: list[str], lengths: list[int], given: bool, encode,
              eos: int) -> dict[str, list[int]]:
    """task -> the lengths it runs at: a given length (--niah-lengths) must hold every needle (else the one-line
    error), a default one too short for a task's needle is left out for that task, and said so."""
    plan = {}
    for task in tasks:
        short = [n for n in lengths if not holds_needle(task, n, encode, eos)]
        if short and given:
            parser.error(f"argument --niah-lengths: {short[0]} is too short to hold the {task} needle and its question")
        plan[task] = [n for n in lengths if n not in short]
        if not plan[task]:
            parser.error(f"argument --niah-lengths: no default length holds the {task} needle; give longer ones")
        if short:
            print(f"S-NIAH {task}: default lengths {short} are too short for its needle and question, left out")
    return plan


def perplexity_part(model, stream: torch.Tensor, args, modes: list[bool]) -> list[dict]:
    """`length_report` of every --lengths entry, learning on (and off), with "learning" added to each."""
    reports = []
    bar = tqdm(total=len(args.lengths) * len(modes), desc="perplexity", unit="length", leave=False)
    for length in args.lengths:
        rows = length_rows(stream, length, args.samples)
        for learning in modes:
            with memory_learning(model, learning):
                report = length_report(model, rows, args.batch_size, args.stream_chunk)
            reports.append(dict(report, learning="on" if learning else "off"))
            bar.update(1)
    bar.close()
    return reports


def off_vs_on(loss_on: float, loss_off: float) -> str:
    """How much worse the loss is with learning off, in % ("off vs on")."""
    return f"{100 * (loss_off / loss_on - 1):+9.2f}%"


def format_perplexity(reports: list[dict], seq_len: int) -> str:
    """Per length: loss and perplexity (learning on [/ off, and off vs on]), then loss by position bucket side by
    side."""
    modes = list(dict.fromkeys(r["learning"] for r in reports))
    both = modes == ["on", "off"]
    by = {(r["length"], r["learning"]): r for r in reports}
    lengths = sorted({r["length"] for r in reports})
    head = "".join(f"{'loss ' + m:>11s}{'ppl ' + m:>10s}" for m in modes) + (f"{'off vs on':>11s}" if both else "")
    lines = [f"held-out perplexity by context length (trained at {seq_len}):", f"{'length':>8s}{'seqs':>6s}" + head]
    for n in lengths:
        cols = "".join(f"{by[n, m]['loss']:11.4f}{by[n, m]['ppl']:10.2f}" for m in modes)
        gap = off_vs_on(by[n, "on"]["loss"], by[n, "off"]["loss"]) if both else ""
        lines.append(f"{n:8d}{by[n, modes[0]]['sequences']:6d}" + cols + gap
                     + ("  beyond training" if n > seq_len else ""))
    for n in lengths:
        lines.append(f"loss by position at length {n} (learning {' / '.join(modes)}" + (", off vs on):" if both
                                                                                       else "):"))
        for row in zip(*(by[n, m]["by_position"] for m in modes)):
            gap = off_vs_on(row[0]["loss"], row[1]["loss"]) if both else ""
            lines.append(f"  {row[0]['positions']:32s}" + "".join(f"{b['loss']:9.4f}" for b in row) + gap)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    flush_denormals()
    model, trained_seq_len = load_model_and_seq_len(args.model)
    seq_len = args.seq_len or trained_seq_len
    if seq_len is None:
        parser.error("--seq-len is needed for an export (it does not record the training length)")
    model = model.to(args.device)
    window = model.config.window
    args.lengths = args.lengths or sorted({max(1, seq_len // 2), seq_len, 2 * seq_len, 4 * seq_len})
    args.stream_chunk = args.stream_chunk or seq_len
    root = dataset_root(args.data, model.config.vocab_size, seq_len)
    niah_lengths = args.niah_lengths or sorted({max(1, window // 2)} | {window * f for f in (1, 2, 4, 8, 16)})
    needed = max(args.samples * (max(args.lengths) + 1), max(niah_lengths))  # a big val split is not read whole
    stream = val_stream(root, model.config.vocab_size, needed)
    modes = [True, False] if args.memory_off_too else [True]
    results = dict(model=str(args.model), dataset=str(root), seq_len=seq_len, window=window,
                   stream_chunk=args.stream_chunk, device=args.device)
    print(f"{args.model}: window {window}, trained at seq_len {seq_len}; val split of {root} "
          f"({stream.numel():,} tokens); pieces of {args.stream_chunk} tokens on {args.device}")
    if "perplexity" not in args.skip:
        too_long = [n for n in args.lengths if n + 1 > stream.numel()]
        if too_long:
            parser.error(f"argument --lengths: {too_long[0]} needs {too_long[0] + 1} val tokens; "
                         f"the val split of {root} holds {stream.numel()}")
    if "niah" not in args.skip:
        sp = dataset_tokenizer(root)
        encode, eos = sp.encode, sp.eos_id()
        plan = niah_plan(parser, args.niah_tasks, niah_lengths, args.niah_lengths is not None, encode, eos)
    if "perplexity" not in args.skip:
        results["perplexity"] = perplexity_part(model, stream, args, modes)
        print(format_perplexity(results["perplexity"], seq_len))
    if "niah" not in args.skip:
        results["niah"] = [cell for task, lengths in plan.items() for cell in niah_sweep(
            model, encode, stream, [task], lengths, args.depths, args.niah_samples, args.batch_size, args.stream_chunk,
            args.memory_off_too, args.seed, eos)]
        print(format_niah(results["niah"]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(json_safe(results), indent=1, allow_nan=False))
        for task in args.niah_tasks if "niah" in results else []:
            for learning in ("on", "off") if args.memory_off_too else ("on",):
                cells = {(c["depth"], c["length"]): c["accuracy"] for c in results["niah"]
                         if c["task"] == task and c["learning"] == learning}
                write_heatmap(out / f"niah_{task}_{learning}.png", cells,
                              f"S-NIAH {task}, test-time learning {learning}: exact accuracy (%)")
        print(f"wrote {out / 'results.json'}" + (f" and the heatmaps in {out}" if "niah" in results else ""))


if __name__ == "__main__":
    from pretrain.checkpoint import CheckpointError
    from pretrain.data import ManifestError
    from titans_parallel.typed_config import ConfigError, run_cli

    run_cli(main, errors=(CheckpointError, ConfigError, FileNotFoundError, ManifestError), prog="evaluate")
