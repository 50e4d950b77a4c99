"""Held-out loss by length and position: streaming through the carried state equals one pass; long sequences are
consecutive val samples joined."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.eval.loading import val_batches, val_stream
from pretrain.eval.memory_contribution import memory_learning
from pretrain.eval.perplexity import length_report, length_rows, token_losses
from titans_parallel import ModelConfig, TitansLM
from titans_parallel.config import MemoryConfig


def tiny(variant: str, **memory) -> TitansLM:
    torch.manual_seed(0)
    return TitansLM(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, variant=variant, window=8,
                                n_persistent=2, memory=MemoryConfig(chunk_size=4, **memory))).eval()


@pytest.mark.parametrize("variant,memory", [("mac", {}), ("mag", {}), ("mal", {}), ("mac", {"normalize_weights": True})])
@pytest.mark.parametrize("chunk", [1, 5, 16, 100])
def test_streaming_gives_the_one_pass_loss(variant, memory, chunk):
    """Pieces of any size (not a multiple of the memory chunk or window) give the one-shot forward's losses."""
    model = tiny(variant, **memory)
    tokens = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = F.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:], reduction="none")
    for learning in (True, False):
        with memory_learning(model, learning):
            streamed = token_losses(model, tokens, chunk)
            one_shot = token_losses(model, tokens, None)
        assert streamed.shape == (2, 40)
        assert torch.allclose(streamed, one_shot, atol=1e-5, rtol=1e-5), (streamed - one_shot).abs().max()
    assert torch.allclose(token_losses(model, tokens, chunk).float(), reference, atol=1e-5)


def test_length_report_means_and_buckets():
    model = tiny("mac")
    stream = torch.randint(0, 64, (500,), generator=torch.Generator().manual_seed(2))
    rows = length_rows(stream, 30, 8)
    assert rows.shape == (8, 31) and torch.equal(rows.reshape(-1), stream[: 8 * 31])
    assert length_rows(stream, 99, 8).shape == (5, 100)  # as many as fit
    with pytest.raises(ValueError, match="needs 501 val tokens"):
        length_rows(stream, 500, 1)
    report = length_report(model, rows, batch_size=3, chunk=7)
    expected = token_losses(model, rows).mean().item()
    assert report["length"] == 30 and report["sequences"] == 8
    assert report["loss"] == pytest.approx(expected, abs=1e-6) and report["ppl"] == pytest.approx(math.exp(expected))
    assert [b["positions"] for b in report["by_position"]] == ["0-7", "8-15", "16-29", "beyond the window (>= 8)",
                                                             "all positions"]
    first = token_losses(model, rows)[:, :8].mean().item()
    assert report["by_position"][0]["loss"] == pytest.approx(first, abs=1e-6)


def test_val_stream_joins_consecutive_samples(small_dataset):
    seq_len = 64
    stream = val_stream(small_dataset, 512)
    (first,) = val_batches(small_dataset, seq_len, 512, 3, 1)
    assert torch.equal(stream[: 3 * (seq_len + 1)], first.reshape(-1))
    long = length_rows(stream, 4 * seq_len, 1)
    assert torch.equal(long[0, : 2 * (seq_len + 1)], first[:2].reshape(-1))  # beyond seq_len: samples 0, 1, ...
