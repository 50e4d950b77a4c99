"""NeuralMemory: causality, streaming equals one pass, per-head layout."""

import pytest
import torch

from titans_parallel.config import MemoryConfig
from titans_parallel.memory import NeuralMemory

F64 = torch.float64


def make_memory(chunk_size=4, depth=2, retrieve="inclusive", seed=0):
    torch.manual_seed(seed)
    return NeuralMemory(24, 3, 8, MemoryConfig(depth=depth, chunk_size=chunk_size, retrieve=retrieve)).to(F64)


@pytest.mark.parametrize("retrieve", ["inclusive", "exclusive"])
def test_causal(retrieve):
    memory = make_memory(retrieve=retrieve)
    x = torch.randn(2, 21, 24, dtype=F64)
    y, _ = memory(x)
    for t in (0, 5, 8, 20):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        y2, _ = memory(x2)
        assert torch.equal(y2[:, : t + 1], y[:, : t + 1])
        if t < 20:
            assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


@pytest.mark.parametrize("pieces", [[8, 4, 9], [5, 1, 7, 8], [1] * 21])
def test_streaming_equals_one_pass(pieces):
    """Pieces at multiples of the chunk size, and anywhere else (token-by-token decoding)."""
    memory = make_memory(chunk_size=4, depth=3)
    x = torch.randn(2, 21, 24, dtype=F64)
    y, full_cache = memory(x)
    outs, cache, start = [], None, 0
    for n in pieces:
        out, cache = memory(x[:, start : start + n], cache)
        outs.append(out)
        start += n
    assert (torch.cat(outs, dim=1) - y).abs().max().item() <= 1e-12
    for a, b in zip(cache.memory.weights + cache.memory.momentum, full_cache.memory.weights + full_cache.memory.momentum):
        assert (a - b).abs().max().item() <= 1e-12
    assert cache.pending[0].shape[2] == 21 % 4


def test_every_parameter_gets_a_gradient():
    memory = make_memory()
    y, _ = memory(torch.randn(2, 13, 24, dtype=F64))
    y.square().sum().backward()
    for name, p in memory.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_heads_are_independent():
    """Per-head parameters live in a leading [H] dimension: perturbing head 1's W_0 changes only head 1's channels."""
    memory = make_memory()
    x = torch.randn(1, 9, 24, dtype=F64)
    outputs = {}

    def capture(module, args, output):
        outputs["pre_out"] = args[0]

    memory.out_proj.register_forward_hook(capture)
    memory(x)
    before = outputs["pre_out"].view(1, 9, 3, 8).clone()
    with torch.no_grad():
        memory.initial_weights[0][1] += 0.5
    memory(x)
    after = outputs["pre_out"].view(1, 9, 3, 8)
    assert torch.equal(before[:, :, [0, 2]], after[:, :, [0, 2]])
    assert not torch.allclose(before[:, :, 1], after[:, :, 1])


def test_a_deep_memory_takes_the_bounded_step_by_default():
    """MemoryConfig resolves power_steps from the depth (4 beyond depth 2) and the module's scan uses it."""
    memory = make_memory(depth=3)
    assert memory.config.power_steps == 4 and make_memory(depth=2).config.power_steps == 0
    x = torch.randn(2, 21, 24, dtype=F64)
    y, _ = memory(x)
    memory.config.power_steps = 0
    y_polyak, _ = memory(x)
    assert (y - y_polyak).abs().max().item() > 1e-8
