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
    c = chunk (the last piece may be shorter); chunk None or >= T: one piece, one call."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    T = inputs.shape[1]
    step = T if chunk is None else min(chunk, T)
    cache = None
    for start in range(0, T, step):
        logits, cache = model.decode(inputs[:, start : start + step], cache)
        yield start, logits
