"""Token shards on disk: packing into samples, webdataset tar writing, and the manifest.

A prepared dataset directory::

    manifest.json           both splits in one manifest; written last and atomically (no manifest = incomplete)
    tokenizer.model         the sentencepiece model the ids come from
    train/shard-000000.tar  webdataset shards, sample = {__key__: "%010d" (index in the split), tokens.npy}
    val/shard-000000.tar    (only when a validation fraction was asked for)

``tokens.npy`` is a 1-D array of ``seq_len + 1`` ids, uint16 when ``vocab_size <= 65536`` else uint32.

``manifest.json``::

    format, seq_len, vocab_size, dtype, eos_id
    tokenizer: {file, sha256}
    build:     how the data was made (inputs, val_fraction, text_field, ...): provenance and reuse checks
    splits:    {name: {documents, samples, tokens, dropped_tokens, shards: [{name, samples, bytes, sha256}]}}

``tokens`` counts the tokens in samples (``samples * (seq_len + 1)``); ``dropped_tokens`` is the split's tail,
too short for one more sample. Shard names are relative to the dataset directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
FORMAT = "titans-parallel/token-shards-v1"
SHARD_PATTERN = "shard-%06d.tar"
SAMPLE_FIELD = "tokens.npy"


class ManifestError(ValueError):
    """The manifest is missing, malformed, or does not match its files or the caller's expectations."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class SplitWriter:
    """Packs a stream of token ids into samples of ``seq_len + 1`` and writes them as ``<root>/<split>/`` shards.

    ``add`` takes ids in stream order (documents already joined by eos); ``close`` returns the split's
    manifest entry. Shards are byte-for-byte reproducible (fixed mtime), so equal inputs give equal sha256.
    """

    def __init__(self, root: Path, split: str, seq_len: int, vocab_size: int, shard_samples: int):
        self.dir = Path(root) / split
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("shard-*.tar"):
            stale.unlink()
        self.split = split
        self.sample_len = seq_len + 1
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.shard_samples = shard_samples
        self.documents = 0
        self.samples = 0
        self._pending = np.zeros(0, dtype=np.uint32)
        self._writer: wds.ShardWriter | None = None
        self._finished: list[str] = []

    def add(self, ids: np.ndarray, documents: int = 0) -> None:
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(ids.max())} >= vocab_size {self.vocab_size}")
        self.documents += documents
        stream = np.concatenate([self._pending, ids.astype(np.uint32, copy=False)])
        full = len(stream) // self.sample_len * self.sample_len
        for row in stream[:full].reshape(-1, self.sample_len):
            self._write(row)
        self._pending = stream[full:]

    def _write(self, row: np.ndarray) -> None:
        if self._writer is None:
            self._writer = wds.ShardWriter(
                str(self.dir / SHARD_PATTERN),
                maxcount=self.shard_samples,
                maxsize=float("inf"),
                post=self._finished.append,
                verbose=0,
                mtime=0,
            )
        self._writer.write({"__key__": f"{self.samples:010d}", SAMPLE_FIELD: row.astype(self.dtype)})
        self.samples += 1

    def close(self) -> dict[str, Any]:
        if self._writer is not None:
            self._writer.close()
        shards = []
        for i, fname in enumerate(self._finished):
            path = Path(fname)
            shards.append(
                {
                    "name": f"{self.split}/{path.name}",
                    "samples": min(self.shard_samples, self.samples - i * self.shard_samples),
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                }
            )
        return {
            "documents": self.documents,
            "samples": self.samples,
            "tokens": self.samples * self.sample_len,
            "dropped_tokens": len(self._pending),
            "shards": shards,
        }


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (a reader sees the old file, the new one, or none)."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check ``<root>/manifest.json``."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} does not exist (not a prepared dataset, or preparation did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = {"seq_len", "vocab_size", "dtype", "tokenizer", "splits"} - manifest.keys()
    if missing:
        raise ManifestError(f"{path}: missing field(s) {', '.join(sorted(missing))}")
    return manifest


def check_manifest(
    manifest: dict[str, Any],
    *,
    seq_len: int | None = None,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
) -> None:
    """Raise ManifestError naming the field where the manifest differs from what the caller expects.

    ``vocab_size`` is the model's embedding size: the data's vocabulary must fit in it.
    """
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise ManifestError(f"seq_len mismatch: manifest has {manifest['seq_len']}, the config expects {seq_len}")
    if tokenizer_sha256 is not None and manifest["tokenizer"]["sha256"] != tokenizer_sha256:
        raise ManifestError(
            f"tokenizer mismatch: manifest tokenizer sha256 {manifest['tokenizer']['sha256']}, "
            f"expected {tokenizer_sha256}"
        )
    if vocab_size is not None and manifest["vocab_size"] > vocab_size:
        raise ManifestError(f"vocab_size mismatch: data uses {manifest['vocab_size']} ids, the model has {vocab_size}")


def shard_problems(
    root: str | os.PathLike, shards: list[dict[str, Any]], verify_sha256: bool = False
) -> dict[str, str]:
    """Check shard files against their manifest entries: ``{shard name: problem}`` for damaged ones.

    A missing file raises ManifestError. The size is always compared (cheap); the sha256 only when asked.
    """
    root = Path(root)
    problems = {}
    for shard in shards:
        path = root / shard["name"]
        if not path.is_file():
            raise ManifestError(f"missing shard {shard['name']} (listed in {root / MANIFEST})")
        size = path.stat().st_size
        if size != shard["bytes"]:
            problems[shard["name"]] = f"size {size} bytes, manifest says {shard['bytes']}"
        elif verify_sha256 and sha256_file(path) != shard["sha256"]:
            problems[shard["name"]] = "sha256 differs from the manifest"
    return problems
