"""Held-out loss and perplexity by context length and by token position, read through the carried state.

A sequence of any length is cut from the val split's token stream (`loading.val_stream`: consecutive val samples
joined, so lengths beyond the dataset's seq_len are real continuous text) and read in pieces of `chunk` tokens
(`streaming.stream_logits`); the loss at position p is the next-token cross-entropy after p + 1 tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.eval.streaming import stream_logits
from titans_parallel import TitansLM


@dataclass
class PositionLoss:
    """Summed next-token loss and counts per position [T] (float64), over every sequence seen."""

    total: torch.Tensor
    count: torch.Tensor

    def mean(self, start: int = 0, end: int | None = None) -> float:
        count = self.count[start:end].sum().item()
        return self.total[start:end].sum().item() / count if count else math.nan


@torch.no_grad()
def token_losses(model: TitansLM, tokens: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy [B, T] (float64) of tokens [B, T + 1] (inputs [:, :-1], labels [:, 1:]), read in
    pieces of `chunk` tokens through the carried state (None: one pass)."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pieces = []
    for start, logits in stream_logits(model, inputs, chunk):
        target = labels[:, start : start + logits.shape[1]]
        pieces.append(F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none").double())
    return torch.cat(pieces, dim=1)


def position_loss(model: TitansLM, batches: Iterable[torch.Tensor], chunk: int | None = None) -> PositionLoss:
    """Per-position cross-entropy of `model` over token batches [B, T + 1] (inputs = [:, :-1], labels = [:, 1:])."""
    total = count = None
    for tokens in batches:
        losses = token_losses(model, tokens, chunk).cpu()
        if total is None:
            total, count = torch.zeros(losses.shape[1], dtype=torch.float64), torch.zeros(losses.shape[1])
        total += losses.sum(0)
        count += losses.shape[0]
    if total is None:
        raise ValueError("no batches to evaluate")
    return PositionLoss(total, count.double())


def position_buckets(seq_len: int, window: int) -> list[tuple[str, int, int]]:
    """(label, start, end) rows: within the first window, doubling spans after it, beyond the window, all."""
    rows, start, end = [], 0, min(window, seq_len)
    while start < seq_len:
        rows.append((f"{start}-{end - 1}", start, end))
        start, end = end, min(2 * end, seq_len)
    if window < seq_len:
        rows.append((f"beyond the window (>= {window})", window, seq_len))
    rows.append(("all positions", 0, seq_len))
    return rows


def length_rows(stream: torch.Tensor, length: int, n: int) -> torch.Tensor:
    """The first min(n, len(stream) // (length + 1)) non-overlapping sequences [n', length + 1] of a token stream;
    ValueError when not even one fits."""
    fit = min(n, stream.numel() // (length + 1))
    if fit < 1:
        raise ValueError(f"length {length} needs {length + 1} val tokens; the val split holds {stream.numel()}")
    return stream[: fit * (length + 1)].view(fit, length + 1)


def perplexity(loss: float) -> float:
    """exp(loss); inf past float range, nan stays nan."""
    return math.exp(loss) if loss < 700 else math.inf


def length_report(model: TitansLM, rows: torch.Tensor, batch_size: int, chunk: int | None) -> dict:
    """{length, sequences, loss, ppl, by_position: [{positions, start, end, loss, ppl}]} of sequences rows
    [N, length + 1], buckets from `position_buckets` at the model's window."""
    length = rows.shape[1] - 1
    device = next(model.parameters()).device
    losses = position_loss(model, (b.to(device) for b in rows.split(batch_size)), chunk)
    buckets = [dict(positions=label, start=start, end=end, loss=losses.mean(start, end),
                    ppl=perplexity(losses.mean(start, end)))
               for label, start, end in position_buckets(length, model.config.window)]
    return dict(length=length, sequences=rows.shape[0], loss=losses.mean(), ppl=perplexity(losses.mean()),
                by_position=buckets)
