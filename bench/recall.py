"""Recall beyond the attention window, trained from scratch: MQAR and passkey for every variant (a benchmark, not a
test).

    python bench/recall.py                         # MQAR at the calibrated defaults, all six variants
    python bench/recall.py --task passkey          # passkey at 4x and 16x the window
    python bench/recall.py --variants transformer swa lmm --seeds 0 1 --memory theta_max=0.003

Each variant (tiny model, same width/depth/heads/window) is trained with AdamW (linear warmup + cosine, gradient
clipping 1.0, loss at the scored positions only) on freshly generated batches: batch `step` of seed `s` comes from
a generator seeded by (s, step), so every variant sees the same batch sequence. Then greedy held-out accuracy on a
fixed set (its own seeds, disjoint from training): per sequence (every answer token right) and per token.
Full attention (`transformer`) is the upper bound that validates the task; SWA-only cannot see the facts (they lie
beyond the reach of its stacked windows, L * (W - 1) tokens) and must sit at chance. A non-finite loss stops that
variant (its step is reported); the others go on. Task definitions: `pretrain/eval/tasks.py`.

Defaults (calibrated on 2 shared CPU cores, one thread): dim 64, 2 layers, 2 heads, window 16, chunk 8, AdamW lr 3e-3
(warmup 100, cosine to 0.1x), batch 32. MQAR: 4 pairs over 8 keys / 8 values, 16 queries (answers hidden, as in
Zoology), gap 30 = the reach of 2 SWA layers, T = 70, 2000 steps: full attention 1.000 held-out (~2.5 min), SWA 0.125
= chance. Passkey: 4 digits at 4x and 16x the window (64, 256 tokens, trained alternately; needle depths out of SWA's
reach), 1000 steps: full attention 0.96 per digit (0.85 exact) at both lengths (~3 min), SWA 0.12 / 0.10 (chance 0.1).
What did not learn within ~4,000 steps: 8+ pairs over 16-32 keys (full attention plateaus at 0.2-0.4: with the
answers shown it learns to exclude the values already answered, loss ln(8!)/8 = 1.33, and never binds keys to
values; with them hidden it sits at "one of the values present"); lr 1e-2 (worse); dim 128 / 4 heads (same plateau).
Smaller key/value vocabularies and fewer pairs are what made the binding learnable in budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.denormals import flush_denormals  # noqa: E402
from pretrain.eval.tasks import (  # noqa: E402
    MQARVocab,
    PasskeyVocab,
    merge_scores,
    mqar_batch,
    mqar_length,
    mqar_min_gap,
    passkey_batch,
    passkey_depth_range,
    score,
)
from titans_parallel import ModelConfig, TitansLM  # noqa: E402
from titans_parallel.config import MemoryConfig  # noqa: E402

VARIANTS = ("transformer", "swa", "lmm", "mac", "mag", "mal")
# torch.Generator.manual_seed keeps only the low 32 bits of a seed: training batch `step` of seed s uses
# s * 1_000_003 + step (< 2**31 for s < 2000), held-out batch i at length T uses 2**31 + T * 4096 + i: disjoint.
HELDOUT_SEED = 1 << 31


def train_seed(seed: int, step: int) -> int:
    value = seed * 1_000_003 + step
    if not 0 <= value < HELDOUT_SEED:
        raise ValueError(f"seed {seed} / step {step} out of the training seed range")
    return value


def parse_memory(pairs: list[str]) -> dict:
    """["theta_max=0.1", "depth=1", ...] -> MemoryConfig overrides, each value cast to its field's default type."""
    fields = {f.name: f for f in dataclasses.fields(MemoryConfig)}
    defaults = MemoryConfig()
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--memory {pair!r}: expected key=value with key one of {sorted(fields)}")
        default = getattr(defaults, key)
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--memory {key}: expected true/false, got {raw!r}")
            value = raw.lower() in ("true", "1")
        elif isinstance(default, int):
            value = int(raw)
        elif isinstance(default, float):
            value = float(raw)
        elif default is None:
            value = None if raw.lower() == "none" else _number_or_str(raw)
        else:
            value = raw
        out[key] = value
    return out


def _number_or_str(raw: str):
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


class Task:
    """Training batches by (seed, step) and the fixed held-out sets, for one task."""

    def __init__(self, args):
        self.args = args
        reach = args.layers * (args.window - 1)
        if args.task == "mqar":
            self.vocab = MQARVocab(args.keys, args.values, args.filler)
            self.vocab_size = self.vocab.size
            self.lengths = [mqar_length(args.pairs, args.gap, args.queries)]
            self.chance = 1.0 / args.values
            out_of_reach = args.gap >= mqar_min_gap(args.window, args.layers)
            self.describe = (
                f"MQAR: {args.pairs} pairs, {args.queries or args.pairs} queries, gap {args.gap}, T={self.lengths[0]}, "
                f"keys/values/filler {args.keys}/{args.values}/{args.filler}, answers "
                f"{'shown' if args.show_answers else 'hidden'}; SWA reach {reach} "
                f"({'pairs out of reach' if out_of_reach else 'PAIRS WITHIN REACH'})"
            )
        else:
            self.vocab = PasskeyVocab()
            self.vocab_size = self.vocab.size
            self.lengths = [m * args.window for m in args.lengths]
            self.depths = {T: passkey_depth_range(T, args.digits, args.window, args.layers) for T in self.lengths}
            self.chance = 0.1
            self.describe = f"passkey: {args.digits} digits, lengths {self.lengths}, needle depths " + ", ".join(
                f"T={T}: {lo:.2f}-{hi:.2f}" for T, (lo, hi) in self.depths.items()
            ) + f" (out of SWA reach {reach})"
        self._heldout = {}

    def make(self, n: int, generator: torch.Generator, length: int):
        if self.args.task == "mqar":
            return mqar_batch(n, self.args.pairs, self.args.gap, generator, self.vocab, self.args.show_answers,
                              self.args.queries)
        return passkey_batch(n, length, self.args.digits, generator, self.depths[length], self.vocab)

    def train_batch(self, seed: int, step: int):
        generator = torch.Generator().manual_seed(train_seed(seed, step))
        return self.make(self.args.batch, generator, self.lengths[step % len(self.lengths)])

    def heldout(self, length: int):
        if length not in self._heldout:
            n, size = self.args.eval_size, self.args.eval_batch
            self._heldout[length] = [
                self.make(min(size, n - i), torch.Generator().manual_seed(HELDOUT_SEED + length * 4096 + i // size),
                          length)
                for i in range(0, n, size)
            ]
        return self._heldout[length]


def build_model(args, variant: str, vocab_size: int, seed: int) -> TitansLM:
    memory = MemoryConfig(**{"chunk_size": args.chunk, **args.memory_overrides})
    config = ModelConfig(
        vocab_size=vocab_size, dim=args.dim, n_layers=args.layers, n_heads=args.heads, variant=variant,
        window=args.window, n_persistent=args.persistent, memory=memory,
    )
    torch.manual_seed(seed)
    return TitansLM(config)


def lr_multiplier(step: int, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: TitansLM, task: Task) -> dict:
    model.eval()
    out = {}
    for T in task.lengths:
        scores = [score(model(b.inputs), b.targets, b.mask) for b in task.heldout(T)]
        merged = merge_scores(scores)
        out[str(T)] = {"exact": merged.exact_accuracy, "token": merged.token_accuracy}
    model.train()
    return out


def train_one(args, task: Task, variant: str, seed: int) -> dict:
    from pretrain.optim import param_groups

    model = build_model(args, variant, task.vocab_size, seed)
    n_params = model.num_parameters()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, args.warmup, args.steps, args.min_lr_ratio)
    )
    record = {"variant": variant, "seed": seed, "params": n_params, "first_nonfinite_step": None,
              "nonfinite_grad_steps": 0, "curve": []}
    nonfinite, window_loss, window_acc, window_n = 0, 0.0, 0.0, 0
    start = last = time.perf_counter()
    steps_done = 0
    for step in range(args.steps):
        batch = task.train_batch(seed, step)
        logits = model(batch.inputs)
        scored = logits[batch.mask].float()
        answers = batch.targets[batch.mask]
        loss = F.cross_entropy(scored, answers)
        if not torch.isfinite(loss):
            nonfinite += 1
            record["first_nonfinite_step"] = step
            print(f"  [{variant} seed {seed}] step {step}: non-finite loss ({loss.item()}); stopping this variant",
                  flush=True)
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        if not torch.isfinite(grad_norm):
            nonfinite += 1
            record["nonfinite_grad_steps"] += 1
            if record["first_nonfinite_step"] is None:
                record["first_nonfinite_step"] = step
            optimizer.zero_grad(set_to_none=True)  # skip the update
        else:
            optimizer.step()
        schedule.step()
        steps_done = step + 1
        window_loss += loss.item()
        window_acc += (scored.argmax(-1) == answers).float().mean().item()
        window_n += 1
        if steps_done % args.log_every == 0 or steps_done == args.steps:
            now = time.perf_counter()
            entry = {"step": steps_done, "loss": window_loss / window_n, "train_token_acc": window_acc / window_n,
                     "s_per_step": (now - last) / window_n, "lr": schedule.get_last_lr()[0], "nonfinite": nonfinite}
            record["curve"].append(entry)
            print(f"  [{variant} seed {seed}] step {steps_done:5d}  loss {entry['loss']:.4f}  train acc "
                  f"{entry['train_token_acc']:.3f}  lr {entry['lr']:.2e}  {entry['s_per_step']:.3f} s/step  "
                  f"non-finite {nonfinite}", flush=True)
            window_loss, window_acc, window_n, last = 0.0, 0.0, 0, now
    train_s = time.perf_counter() - start
    record.update(steps=steps_done, nonfinite=nonfinite, train_s=train_s)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    record["heldout"] = evaluate(model, task) if finite else None
    record["wall_s"] = time.perf_counter() - start
    return record


def summarise(records: list[dict], task: Task) -> dict:
    """Per variant: mean held-out accuracy over seeds, and its ratio to full attention's (per length)."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == variant]
        entry = {"seeds": [r["seed"] for r in runs], "params": runs[0]["params"],
                 "wall_s": sum(r["wall_s"] for r in runs) / len(runs),
                 "first_nonfinite_step": [r["first_nonfinite_step"] for r in runs], "heldout": {}}
        for T in task.lengths:
            accs = [r["heldout"][str(T)] if r["heldout"] else {"exact": 0.0, "token": 0.0} for r in runs]
            entry["heldout"][str(T)] = {k: sum(a[k] for a in accs) / len(accs) for k in ("exact", "token")}
        out[variant] = entry
    full = out.get("transformer")
    for entry in out.values():
        for T in task.lengths:
            h = entry["heldout"][str(T)]
            ref = full["heldout"][str(T)]["token"] if full else None
            h["token_vs_full"] = h["token"] / ref if ref else None
    return out


def print_table(records: list[dict], summary: dict, task: Task):
    cols = [f"T={T}" for T in task.lengths]
    head = f"{'variant':<12} {'seed':>4} {'params':>8} {'steps':>6} {'wall s':>7} {'non-finite@':>11}"
    for c in cols:
        head += f" {c + ' exact':>12} {c + ' token':>12} {'vs full':>7}"
    print("\n" + head)
    print("-" * len(head))

    def row(variant, seed, params, steps, wall, bad, accs):
        line = f"{variant:<12} {seed:>4} {params:>8} {steps:>6} {wall:>7.0f} {bad:>11}"
        for T in task.lengths:
            a = accs.get(str(T)) if accs else None
            if a is None:
                line += f" {'-':>12} {'-':>12} {'-':>7}"
            else:
                ratio = a.get("token_vs_full")
                line += f" {a['exact']:>12.3f} {a['token']:>12.3f} {'-' if ratio is None else f'{ratio:.2f}':>7}"
        return line

    full = summary.get("transformer")
    for variant, entry in summary.items():
        runs = [r for r in records if r["variant"] == variant]
        for r in runs:
            bad = "-" if r["first_nonfinite_step"] is None else str(r["first_nonfinite_step"])
            accs = None
            if r["heldout"]:
                accs = {T: dict(a, token_vs_full=a["token"] / full["heldout"][T]["token"]
                                if full and full["heldout"][T]["token"] else None) for T, a in r["heldout"].items()}
            print(row(variant, r["seed"], r["params"], r["steps"], r["wall_s"], bad, accs))
        if len(runs) > 1:
            bad = ",".join("-" if s is None else str(s) for s in entry["first_nonfinite_step"])
            print(row(variant, "mean", entry["params"], runs[0]["steps"], entry["wall_s"], bad, entry["heldout"]))
    print(f"chance: {task.chance:.3f} per token")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("mqar", "passkey"), default="mqar")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--chunk", type=int, default=8, help="memory.chunk_size (MAC: must divide --window)")
    p.add_argument("--persistent", type=int, default=4, help="persistent memory tokens per layer")
    p.add_argument("--memory", nargs="*", default=[], metavar="KEY=VALUE", help="MemoryConfig overrides")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=None, help="default: 2000 (MQAR), 1000 (passkey)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pairs", type=int, default=4, help="MQAR: key/value pairs")
    p.add_argument("--gap", type=int, default=None, help="MQAR: filler tokens between pairs and queries "
                   "(default: the smallest that puts the pairs out of SWA's reach, layers * (window - 1))")
    p.add_argument("--queries", type=int, default=16, help="MQAR: queries (successive permutations of the keys)")
    p.add_argument("--keys", type=int, default=8, help="MQAR: key vocabulary")
    p.add_argument("--values", type=int, default=8, help="MQAR: value vocabulary")
    p.add_argument("--filler", type=int, default=16, help="MQAR: filler vocabulary")
    p.add_argument("--show-answers", action="store_true",
                   help="MQAR: the value follows each query key in the input (teacher forcing) instead of BLANK")
    p.add_argument("--lengths", nargs="+", type=int, default=[4, 16], help="passkey: lengths as multiples of window")
    p.add_argument("--digits", type=int, default=4, help="passkey: digits of the key")
    p.add_argument("--eval-size", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/recall-<task>.json)")
    args = p.parse_args(argv)
    flush_denormals()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps is None:
        args.steps = 2000 if args.task == "mqar" else 1000
    if args.gap is None:
        args.gap = mqar_min_gap(args.window, args.layers)
    args.memory_overrides = parse_memory(args.memory)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"recall-{args.task}.json")

    task = Task(args)
    print(task.describe)
    print(f"model: dim {args.dim}, {args.layers} layers, {args.heads} heads, window {args.window}, chunk {args.chunk}, "
          f"memory overrides {args.memory_overrides or 'none'}; AdamW lr {args.lr} (warmup {args.warmup}, cosine), "
          f"{args.steps} steps x batch {args.batch}, seeds {args.seeds}, {torch.get_num_threads()} threads", flush=True)
    records = []
    for variant in args.variants:
        for seed in args.seeds:
            print(f"{variant} seed {seed}:", flush=True)
            try:
                record = train_one(args, task, variant, seed)
            except Exception as error:  # a benchmark reports a broken variant and goes on
                print(f"  [{variant} seed {seed}] failed: {type(error).__name__}: {error}", flush=True)
                record = {"variant": variant, "seed": seed, "params": 0, "steps": 0, "wall_s": 0.0,
                          "first_nonfinite_step": None, "heldout": None, "error": f"{type(error).__name__}: {error}"}
            records.append(record)
            if record.get("heldout"):
                print("  held-out " + "  ".join(f"T={T}: exact {a['exact']:.3f} token {a['token']:.3f}"
                                                for T, a in record["heldout"].items())
                      + f"  ({record['wall_s']:.0f} s)", flush=True)
    summary = summarise(records, task)
    print_table(records, summary, task)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    out.write_text(json.dumps({"task": task.describe, "chance": task.chance, "lengths": task.lengths,
                               "config": config, "summary": summary, "runs": records}, indent=1))
    print(f"results: {out}")
    return summary


if __name__ == "__main__":
    main()
