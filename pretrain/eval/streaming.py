"""Reading a sequence longer than fits at once: through the model's carried state, a piece at a time.

`TitansLM.decode(ids, cache)` continues from the cache of the tokens before (attention keeps its last `window`
keys and values, each memory its weights and momentum), so feeding a sequence in pieces gives the logits of one
pass (to float tolerance) with memory bounded by the piece length, not the sequence length.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from titans_parallel import TitansLM


@torch.no_grad()
def stream_logits(
    model: TitansLM, inputs: torch.Tensor, chunk: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, logits [B, c, vocab]) for consecutive pieces inputs[:, start:start + c] of inputs [B, T],
    c = chunk (the last piece may be shorter); chunk None or >= T: one piece, one call. `model` needs only
    `decode(ids, cache)`; with `model.config.document_reset` one piece is one call of the model and pieces decode
    the rows one by one (each has its own documents)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    T = inputs.shape[1]
    step = T if chunk is None else min(chunk, T)
    # Under model.document_reset rows start documents at different places, which no one cache can follow: one pass
    # without a cache, or the rows one by one.
    document_reset = getattr(getattr(model, "config", None), "document_reset", False)
    if document_reset and step == T:
        yield 0, model(inputs)
        return
    rows = [inputs[b : b + 1] for b in range(inputs.shape[0])] if document_reset else [inputs]
    caches = [None] * len(rows)
    for start in range(0, T, step):
        pieces = []
        for i, row in enumerate(rows):
            logits, caches[i] = model.decode(row[:, start : start + step], caches[i])
            pieces.append(logits)
        yield start, torch.cat(pieces)
