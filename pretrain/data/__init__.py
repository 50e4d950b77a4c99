"""Data pipeline: raw text -> sentencepiece -> packed webdataset shards -> a resumable per-DP-rank stream.

Modules, one concept each: ``sources`` (read text), ``tokenizer`` (train / encode), ``shards`` (write shards,
manifest), ``prepare`` (the build), ``order`` (a rank's sample order), ``loader`` (streaming batches),
``default`` (the embedded dataset). ``python -m pretrain.prepare_data`` is the command line.
"""

from pretrain.data.default import prepare_default_dataset
from pretrain.data.loader import CorruptShardError, TokenLoader, TokenShardDataset, build_loader
from pretrain.data.prepare import prepare_dataset
from pretrain.data.shards import ManifestError, read_manifest, sha256_file

__all__ = [
    "CorruptShardError",
    "ManifestError",
    "TokenLoader",
    "TokenShardDataset",
    "build_loader",
    "prepare_dataset",
    "prepare_default_dataset",
    "read_manifest",
    "sha256_file",
]
