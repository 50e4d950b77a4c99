"""Test-time learning switched off, and the held-out loss by position that shows what it adds."""

import torch

from pretrain.eval.memory_contribution import memory_contribution, memory_learning
from pretrain.eval.perplexity import position_buckets, position_loss
from titans_parallel import ModelConfig, TitansLM
from titans_parallel.config import MemoryConfig
from titans_parallel.memory import NeuralMemory

F64 = torch.float64


def test_learning_off_keeps_the_memory_at_its_initial_weights():
    """Off: an output depends on earlier tokens only through the causal conv (kernel 4), so changing token 0
    changes nothing from position 4 on; on: the memory carries it forward."""
    torch.manual_seed(0)
    memory = NeuralMemory(16, 2, 8, MemoryConfig(chunk_size=4)).to(F64)
    x = torch.randn(1, 24, 16, dtype=F64)
    x2 = x.clone()
    x2[:, 0] = torch.randn(16, dtype=F64)
    with memory_learning(memory, enabled=False):
        off, off2 = memory(x)[0], memory(x2)[0]
    assert torch.equal(off[:, 4:], off2[:, 4:])
    assert memory.learning
    on, on2 = memory(x)[0], memory(x2)[0]
    assert (on[:, 4:] - on2[:, 4:]).abs().max() > 1e-6


def test_position_loss_averages_to_the_model_loss():
    torch.manual_seed(0)
    model = TitansLM(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, variant="mag", window=8)).eval()
    batches = [torch.randint(0, 64, (2, 25)) for _ in range(3)]
    result = position_loss(model, batches)
    with torch.no_grad():
        expected = sum(model(b[:, :-1], b[:, 1:]).item() for b in batches) / 3
    assert abs(result.mean() - expected) < 1e-5
    rows = memory_contribution(model, batches)
    assert [r["positions"] for r in rows][-2:] == ["beyond the window (>= 8)", "all positions"]
    assert abs(rows[-1]["loss_on"] - expected) < 1e-5
    assert rows[-1]["loss_off"] != rows[-1]["loss_on"]


def test_position_buckets_cover_the_sequence():
    rows = position_buckets(100, 16)
    assert rows[0] == ("0-15", 0, 16) and rows[-3][2] == 100
    assert [(s, e) for _, s, e in rows[:-2]] == [(0, 16), (16, 32), (32, 64), (64, 100)]


def test_a_missing_model_is_one_line_naming_it(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "no-such-checkpoint"
    done = subprocess.run([sys.executable, "-m", "pretrain.eval.memory_contribution", "--model", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"memory_contribution: error: {missing}: no such checkpoint folder"
