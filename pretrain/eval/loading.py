"""What an evaluation reads: a model (DeepSpeed checkpoint or safetensors export), a prepared dataset's val split
and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from titans_parallel import TitansLM


def load_model_and_seq_len(path: str | Path) -> tuple[TitansLM, int | None]:
    """A model from a safetensors export folder or a DeepSpeed checkpoint (folder or tag, any ZeRO stage / TP
    degree), in eval mode on the CPU, and the training seq_len when the checkpoint records it."""
    from pretrain.checkpoint_io import build_model, load_consolidated
    from pretrain.convert import load_model
    from titans_parallel.config import ModelConfig

    path = Path(path)
    if (path / "model.safetensors").is_file():
        return load_model(path), None
    state, config, _ = load_consolidated(path, progress=False)
    model = build_model(ModelConfig.from_saved(config["model"]), state).eval()
    return model, config["data"]["seq_len"]


def dataset_root(data: str | Path | None, vocab_size: int, seq_len: int) -> Path:
    """`data`, or the embedded default dataset at this vocabulary and seq_len (prepared on first use)."""
    if data is not None:
        return Path(data)
    from pretrain.data.default import default_dataset_dir, prepare_default_dataset

    prepare_default_dataset(vocab_size=vocab_size, seq_len=seq_len, progress=False)
    return default_dataset_dir(vocab_size, seq_len)


def val_batches(root: str | Path, seq_len: int, vocab_size: int, batch_size: int, n: int) -> list[torch.Tensor]:
    """The first n batches [batch_size, seq_len + 1] of a prepared dataset's val split, in file order."""
    from pretrain.data import build_loader

    loader = build_loader(root, batch_size=batch_size, dp_rank=0, dp_size=1, split="val", seq_len=seq_len,
                          vocab_size=vocab_size, shuffle=False, epochs=1)
    return [tokens for _, tokens in zip(range(n), loader)]


def val_stream(root: str | Path, vocab_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """The val split as one token stream [N] (int64): its samples in file order, joined end to end (the first
    samples holding at least max_tokens tokens, or all of them). The shards pack one text stream (documents joined
    by eos) into consecutive samples without overlap, so the join is the original text; cutting it anew gives
    sequences of any length, also beyond the dataset's seq_len."""
    from pretrain.data import read_manifest

    manifest = read_manifest(root)
    if "val" not in manifest["splits"] or not manifest["splits"]["val"]["samples"]:
        raise FileNotFoundError(f"{root}: the dataset has no val split")
    sample_len = manifest["seq_len"] + 1
    samples = manifest["splits"]["val"]["samples"]
    if max_tokens is not None:
        samples = min(samples, -(-max_tokens // sample_len))
    (tokens,) = val_batches(root, manifest["seq_len"], vocab_size, samples, 1)
    return tokens.reshape(-1)


def dataset_tokenizer(root: str | Path):
    """The dataset's sentencepiece tokenizer (its manifest names the file)."""
    from pretrain.data import read_manifest
    from pretrain.data.tokenizer import load_tokenizer

    return load_tokenizer(Path(root) / read_manifest(root)["tokenizer"]["file"])
