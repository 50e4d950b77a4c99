"""S-NIAH (single needle in a haystack, RULER-style) sweeps: every task at every context length and needle depth,
with the memory's test-time learning on and, optionally, off.

A cell (task, length, depth) is `samples` rows of `tasks.text_needle_batch`, seeded by the cell alone, so the
learning-on and -off runs and every rerun read the same rows. A row is right when greedy decoding after the
question reproduces the answer: the argmax at every scored position is the answer's token (teacher forcing; by
induction this is exactly `TitansLM.generate(temperature=0)` matching the answer, and costs one pass). Rows are
read in pieces of `chunk` tokens through the carried state (`streaming.stream_logits`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from pretrain.eval.memory_contribution import memory_learning
from pretrain.eval.streaming import stream_logits
from pretrain.eval.tasks import TEXT_NEEDLES, Score, TaskBatch, score, text_needle_batch
from titans_parallel import TitansLM

if TYPE_CHECKING:
    from pretrain.config import EvalTaskConfig


def answer_score(model: TitansLM, batch: TaskBatch, chunk: int | None = None) -> Score:
    """Greedy accuracy of `model` on a task batch at its scored positions, read in pieces of `chunk` tokens."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    correct = torch.zeros(batch.inputs.shape[0], dtype=torch.long, device=device)
    for start, logits in stream_logits(model, batch.inputs, chunk):
        end = start + logits.shape[1]
        correct += score(logits, batch.targets[:, start:end], batch.mask[:, start:end]).token_correct
    count = batch.mask.sum(dim=1)
    return Score(exact=(correct == count).cpu(), token_correct=correct.cpu(), token_count=count.cpu())


def cell_generator(seed: int, task: str, length: int, depth: float) -> torch.Generator:
    """The seeded generator of one cell (independent of the other cells and of the order they run in)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{task}/{length}/{depth}".encode()))


def cell_batches(
    task: str,
    length: int,
    depth: float,
    samples: int,
    batch_size: int,
    encode: Callable[[str], list[int]],
    corpus: torch.Tensor,
    seed: int = 0,
    bos_id: int | None = None,
) -> list[TaskBatch]:
    """The `samples` rows of one cell (depth in percent), in batches of at most batch_size rows."""
    generator = cell_generator(seed, task, length, depth)
    return [text_needle_batch(TEXT_NEEDLES[task], encode, corpus, min(batch_size, samples - done), length,
                              depth / 100, generator, bos_id)[0]
            for done in range(0, samples, batch_size)]


def fixed_task_batches(tasks: list[EvalTaskConfig], root: str | Path, vocab_size: int, seed: int,
                       batch_size: int) -> dict[str, list[TaskBatch]]:
    """The rows of each `EvalTaskConfig` (all its depths, `samples` rows each, in batches of at most batch_size)
    from the dataset at `root`: its tokenizer and val text; the same rows on every call. ConfigError naming
    train.eval_tasks[i].length when a length cannot hold the needle."""
    from pretrain.eval.loading import dataset_tokenizer, val_stream
    from titans_parallel.typed_config import ConfigError

    if not tasks:
        return {}
    sp = dataset_tokenizer(root)
    corpus = val_stream(root, vocab_size, max(t.length for t in tasks))
    batches = {}
    for i, t in enumerate(tasks):
        try:
            batches[t.name] = [b for depth in t.depths for b in cell_batches(
                t.task, t.length, depth, t.samples, batch_size, sp.encode, corpus, seed, sp.eos_id())]
        except ValueError as e:
            raise ConfigError(f"train.eval_tasks[{i}].length: {e}") from None
    return batches


def niah_sweep(
    model: TitansLM,
    encode: Callable[[str], list[int]],
    corpus: torch.Tensor,
    tasks: list[str],
    lengths: list[int],
    depths: list[float],
    samples: int,
    batch_size: int,
    chunk: int | None = None,
    memory_off: bool = False,
    seed: int = 0,
    bos_id: int | None = None,
) -> list[dict]:
    """Cells {task, length, depth (percent), learning ("on"/"off"), accuracy (exact), token_accuracy, samples} for
    every task (keys of `TEXT_NEEDLES`) x length x depth (percent, 0 = needle first, 100 = right before the
    question), learning on and, with memory_off, off. encode is the tokenizer, corpus [N] real-text token ids."""
    modes = [True, False] if memory_off else [True]
    cells = []
    bar = tqdm(total=len(tasks) * len(lengths) * len(depths) * len(modes), desc="S-NIAH", unit="cell", leave=False)
    for task in tasks:
        for length in lengths:
            for depth in depths:
                batches = cell_batches(task, length, depth, samples, batch_size, encode, corpus, seed, bos_id)
                for learning in modes:
                    with memory_learning(model, learning):
                        scores = [answer_score(model, b, chunk) for b in batches]
                    exact = torch.cat([s.exact for s in scores])
                    correct = sum(s.token_correct.sum().item() for s in scores)
                    count = sum(s.token_count.sum().item() for s in scores)
                    cells.append(dict(task=task, length=length, depth=depth, learning="on" if learning else "off",
                                      accuracy=exact.float().mean().item(), token_accuracy=correct / count,
                                      samples=samples))
                    bar.update(1)
    bar.close()
    return cells


def format_niah(cells: list[dict]) -> str:
    """One accuracy table (rows: depth %, columns: length; exact accuracy in %) per task and learning mode, with
    the mean over depths of the exact and of the per-token accuracy (answer tokens right) below."""
    out = []
    for task in dict.fromkeys(c["task"] for c in cells):
        for learning in dict.fromkeys(c["learning"] for c in cells):
            mine = [c for c in cells if c["task"] == task and c["learning"] == learning]
            lengths = sorted({c["length"] for c in mine})
            acc = {(c["depth"], c["length"]): c["accuracy"] for c in mine}
            out.append(f"S-NIAH {task}, test-time learning {learning}: exact accuracy (%), depth x length")
            out.append(f"{'depth':>7s}" + "".join(f"{n:>8d}" for n in lengths))
            for depth in sorted({c["depth"] for c in mine}):
                out.append(f"{depth:>6g}%" + "".join(f"{100 * acc[depth, n]:8.0f}" for n in lengths))
            for label, key in (("mean", "accuracy"), ("tokens", "token_accuracy")):
                means = [sum(c[key] for c in mine if c["length"] == n) / sum(c["length"] == n for c in mine)
                         for n in lengths]
                out.append(f"{label:>7s}" + "".join(f"{100 * a:8.0f}" for a in means))
    return "\n".join(out)
