"""Where the training job's batches come from: the dataset root (the embedded default dataset built once when
data.path is unset), the one loader factory for the train and val splits, and the step-indexed batch source the
loop reads.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from pretrain.config import JobConfig
from pretrain.data import ManifestError, TokenLoader, build_loader, prepare_default_dataset, read_manifest
from pretrain.data.default import default_dataset_dir
from titans_parallel.parallel import ParallelDims

BatchSource = Callable[[int, int], torch.Tensor]  # (step, micro_step) -> tokens [B, seq_len + 1] for this rank


def dataset_root(config: JobConfig) -> Path:
    """data.path, or the embedded default dataset for this vocab_size and seq_len (rank 0 builds or reuses it, the
    others wait; the loader's manifest check guards the rest)."""
    if config.data.path is not None:
        return Path(config.data.path)
    if dist.get_rank() == 0:
        prepare_default_dataset(vocab_size=config.model.vocab_size, seq_len=config.data.seq_len,
                                progress=sys.stderr.isatty())
    dist.barrier()
    return default_dataset_dir(config.model.vocab_size, config.data.seq_len)


def with_dataset_eos_id(config: JobConfig, root: Path) -> JobConfig:
    """`config` with model.eos_id taken from the dataset's manifest when model.document_reset needs it and the
    recipe leaves it unset (the same config otherwise)."""
    if not config.model.document_reset or config.model.eos_id is not None:
        return config
    eos_id = read_manifest(root).get("eos_id")
    if eos_id is None:
        raise ManifestError(f"{root}/manifest.json has no eos_id, which model.document_reset needs: set model.eos_id")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, eos_id=int(eos_id)))


def build_job_loader(config: JobConfig, dims: ParallelDims, root: Path, split: Literal["train", "val"] = "train"
                     ) -> TokenLoader:
    """This DP rank's loader over `root`'s split with the recipe's micro-batch, workers, corrupt-shard policy and
    checksum verification. train: the seeded shuffled endless stream (its position is checkpointed); val: one
    in-order pass."""
    order = (dict(seed=config.train.seed, shuffle_buffer=config.data.shuffle_buffer) if split == "train"
             else dict(split="val", shuffle=False, epochs=1))
    return build_loader(
        root, batch_size=config.train.micro_batch_size, dp_rank=dims.dp_rank, dp_size=dims.dp_size,
        num_workers=config.data.num_workers, seq_len=config.data.seq_len, vocab_size=config.model.vocab_size,
        on_corrupt=config.data.on_corrupt, verify_sha256=config.data.verify_sha256, **order,
    )


def loader_batches(loader: TokenLoader) -> BatchSource:
    """The loader's stream as a BatchSource (the step and micro-step are implied by the order of calls)."""
    stream: Iterator[torch.Tensor] = iter(loader)
    return lambda step, micro: next(stream)
