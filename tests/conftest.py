"""Shared fixtures."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """Token shards of the embedded corpus with a 512-piece tokenizer and seq_len 64 (a few seconds to build)."""
    from pretrain.data import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "shards"
    return prepare_dataset([ROOT / "data/default/corpus.jsonl.gz"], out, seq_len=64, vocab_size=512, val_fraction=0.1,
                           progress=False)
