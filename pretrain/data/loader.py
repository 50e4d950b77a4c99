"""Streaming loader over token shards: batches for one data-parallel rank with an exact, resumable position.

``build_loader(root, batch_size=B, dp_rank=r, dp_size=D)`` returns a ``TokenLoader``; iterating it yields
``torch.LongTensor [B, seq_len + 1]`` forever (epoch after epoch). The caller slices ``inputs = tokens[:, :-1]``
and ``labels = tokens[:, 1:]``.

Contracts:

- The data-parallel rank and size are arguments, never read from the environment. Ranks that share a
  ``dp_rank`` (tensor/context-parallel peers) get identical batches.
- The rank's sample order is ``order.SampleOrder``: per-epoch seeded shard order, an equal contiguous
  share per rank (the remainder ``N mod dp_size`` is dropped for that epoch), a seeded shuffle buffer.
  Batch ``j`` holds stream positions ``[start + j*B, start + (j+1)*B)`` and may straddle two epochs.
- Loader workers: worker ``w`` of ``W`` builds batches ``j = w, w + W, ...``; torch's DataLoader returns
  workers' batches round-robin, so the batch sequence is the same for every ``num_workers``. Every worker
  reads the shard blocks its batches touch (shared page cache) and decodes only its own samples.
- Position: ``state_dict()`` counts the samples the training loop has taken from this loader (not what
  workers prefetched). ``load_state_dict`` + a new ``iter()`` continue with exactly the next samples an
  uninterrupted run would have seen, under any ``num_workers`` or batch size.
- Checks on start: manifest fields against the caller's ``seq_len`` / ``tokenizer_sha256`` / ``vocab_size``
  (``ManifestError``), every shard file present (``ManifestError``) and its size against the manifest.
- sha256 (``verify_sha256=True``, the default): each shard is hashed against the manifest when a worker first
  opens it, before any of its samples is used, so start-up is not held up by a full read of the dataset. A
  process hashes a file once while its (size, mtime) stay the same (``_VERIFIED``): not again every epoch, nor
  for a later loader in the same process (e.g. each evaluation). Each worker process hashes the shards it
  reads (read from the page cache, about 1-2 GB/s: a small cost beside what training consumes).
- Damage: with ``on_corrupt="raise"`` a damaged shard or sample raises ``CorruptShardError`` naming the shard
  and sample. With ``on_corrupt="skip"`` a shard failing the start or sha256 checks is skipped whole and a
  sample that cannot be read is skipped; the slot is refilled with the next readable sample of the same shuffle block
  (so batch shapes and positions never change), logged, and counted in ``TokenLoader.skipped``.
  Token ids >= the manifest's vocab_size always raise ValueError (never clipped): they mean the data and
  tokenizer disagree, which skipping would hide.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from pretrain.data.order import Piece, SampleOrder
from pretrain.data.shards import (
    SAMPLE_FIELD,
    ManifestError,
    check_manifest,
    read_manifest,
    sha256_file,
    shard_problems,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1

# (resolved path, size, mtime_ns) -> sha256 of the files this process has hashed.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: Path) -> str:
    """sha256 of ``path``, hashed once per process while its size and mtime stay the same."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_file(path)
    return _VERIFIED[key]


class CorruptShardError(RuntimeError):
    """A shard or one of its samples cannot be read; the message names the shard (and sample)."""


class _Raw(NamedTuple):
    shard: int
    index: int
    data: bytes | None
    error: str | None


class TokenShardDataset(IterableDataset):
    """Batches ``(tokens LongTensor [B, seq_len + 1], skipped: int)`` of one DP rank, from position ``start``.

    Use through ``TokenLoader`` (which owns the position); see the module docstring for the contracts.
    ``epochs=None`` streams forever; ``epochs=k`` stops after ``k`` epochs of this rank (the last batch may
    be short), e.g. ``epochs=1, shuffle=False`` for one pass over a validation split.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        split: str = "train",
        seq_len: int | None = None,
        tokenizer_sha256: str | None = None,
        vocab_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 2048,
        shuffle_lanes: int = 8,
        epochs: int | None = None,
        verify_sha256: bool = True,
        on_corrupt: str = "raise",
    ):
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', not {on_corrupt!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.root = Path(root)
        manifest = read_manifest(self.root)
        check_manifest(manifest, seq_len=seq_len, tokenizer_sha256=tokenizer_sha256, vocab_size=vocab_size)
        if split not in manifest["splits"]:
            raise ManifestError(
                f"split {split!r} not in {self.root}/manifest.json (has: {', '.join(manifest['splits'])})"
            )
        self.split = split
        self.shards = manifest["splits"][split]["shards"]
        self.sample_len = manifest["seq_len"] + 1
        self.vocab_size = manifest["vocab_size"]
        self.dtype = np.dtype(manifest["dtype"])
        self.batch_size = batch_size
        self.epochs = epochs
        self.on_corrupt = on_corrupt
        self.start = 0
        self.verify_sha256 = verify_sha256
        self.condemned: dict[str, str] = {}
        for name, problem in shard_problems(self.root, self.shards).items():
            if on_corrupt == "raise":
                raise CorruptShardError(f"{name}: {problem}")
            log.warning("%s: %s; skipping the whole shard", name, problem)
            self.condemned[name] = problem
        counts = [s["samples"] for s in self.shards]
        self.first_index = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        self.order = SampleOrder(
            counts,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=seed,
            shuffle=shuffle,
            buffer=shuffle_buffer,
            lanes=shuffle_lanes,
        )
        digest = hashlib.sha256(json.dumps([[s["name"], s["samples"], s["sha256"]] for s in self.shards]).encode())
        self.identity = {
            "split": split,
            "shards": digest.hexdigest()[:16],
            "dp_rank": dp_rank,
            "dp_size": dp_size,
            "seed": seed,
            "shuffle": shuffle,
            "shuffle_buffer": shuffle_buffer,
            "shuffle_lanes": shuffle_lanes,
        }

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank reads per epoch: ``N // dp_size``."""
        return self.order.samples_per_epoch

    def check_sha256(self, shard: int) -> bool:
        """Whether shard ``shard`` may be read: its sha256 matches the manifest (or is not checked). A mismatch
        raises CorruptShardError (``on_corrupt="raise"``) or condemns the shard (``"skip"``, logged)."""
        meta = self.shards[shard]
        if not self.verify_sha256:
            return True
        digest = cached_sha256(self.root / meta["name"])
        if digest == meta["sha256"]:
            return True
        problem = (
            f"sha256 {digest[:16]} differs from the manifest's {meta['sha256'][:16]} (the file changed after "
            f"prepare_data; rebuild {self.root} or set data.on_corrupt=skip)"
        )
        if self.on_corrupt == "raise":
            raise CorruptShardError(f"{meta['name']}: {problem}")
        log.warning("%s: %s; skipping the whole shard", meta["name"], problem)
        self.condemned[meta["name"]] = problem
        return False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = _BlockReader(self)
        end = None if self.epochs is None else self.epochs * self.samples_per_epoch
        try:
            for batch in itertools.count(worker, workers):
                first = self.start + batch * self.batch_size
                last = first + self.batch_size if end is None else min(first + self.batch_size, end)
                if first >= last:
                    return
                rows, skipped = zip(*(reader.sample(p) for p in range(first, last)), strict=True)
                yield torch.from_numpy(np.stack(rows).astype(np.int64)), sum(skipped)
        finally:
            reader.close()


class _BlockReader:
    """One worker's view of the stream: a cursor per lane and the current permuted shuffle block."""

    def __init__(self, ds: TokenShardDataset):
        self.ds = ds
        self.cursors = [_ShardCursor(ds) for _ in range(ds.order.lanes)]
        self.block: tuple[int, int] | None = None
        self.slots: list[_Raw] = []

    def close(self) -> None:
        for cursor in self.cursors:
            cursor.close()

    def sample(self, position: int) -> tuple[np.ndarray, bool]:
        """The ids at stream ``position`` and whether a skipped sample's slot was refilled."""
        epoch, offset = divmod(position, self.ds.samples_per_epoch)
        block, slot = self.ds.order.locate(offset)
        if self.block != (epoch, block):
            entries = [
                raw
                for cursor, pieces in zip(self.cursors, self.ds.order.block_pieces(epoch, block), strict=True)
                for piece in pieces
                for raw in cursor.read(piece)
            ]
            self.slots = [entries[i] for i in self.ds.order.block_permutation(epoch, block)]
            self.block = (epoch, block)
        for k in range(len(self.slots)):
            raw = self.slots[(slot + k) % len(self.slots)]
            try:
                return self._decode(raw), k > 0
            except CorruptShardError as e:
                if self.ds.on_corrupt == "raise":
                    raise
                if k == 0:
                    log.warning("skipping %s", e)
        raise CorruptShardError(f"no readable sample in shuffle block {block} of epoch {epoch} (split {self.ds.split})")

    def _decode(self, raw: _Raw) -> np.ndarray:
        name = self.ds.shards[raw.shard]["name"]
        where = f"{name}: sample {raw.index}"
        if raw.error is not None:
            raise CorruptShardError(f"{where}: {raw.error}")
        try:
            ids = np.lib.format.read_array(io.BytesIO(raw.data), allow_pickle=False)
        except Exception as e:
            raise CorruptShardError(f"{where}: cannot decode {SAMPLE_FIELD} ({type(e).__name__}: {e})") from e
        if ids.dtype != self.ds.dtype or ids.shape != (self.ds.sample_len,):
            expected = f"{self.ds.dtype}[{self.ds.sample_len}]"
            raise CorruptShardError(f"{where}: {SAMPLE_FIELD} is {ids.dtype}{list(ids.shape)}, expected {expected}")
        if int(ids.max()) >= self.ds.vocab_size:
            raise ValueError(f"{where}: token id {int(ids.max())} >= vocab_size {self.ds.vocab_size}")
        return ids


class _ShardCursor:
    """Sequential reader of one lane: raw samples of shard pieces; reopens only for another shard or to go back.

    Samples are single tar members ``<key>.tokens.npy``, read with webdataset's tar iterator.
    """

    def __init__(self, ds: TokenShardDataset):
        self.ds = ds
        self.shard: int | None = None
        self.next = 0
        self.file: io.BufferedReader | None = None
        self.members: Iterator[dict[str, Any]] = iter(())
        self.error: str | None = None

    def read(self, piece: Piece) -> list[_Raw]:
        meta = self.ds.shards[piece.shard]
        reopen = self.shard != piece.shard or self.next > piece.start
        if meta["name"] in self.ds.condemned or reopen and not self.ds.check_sha256(piece.shard):
            problem = self.ds.condemned[meta["name"]]
            return [_Raw(piece.shard, i, None, f"shard skipped: {problem}") for i in range(piece.start, piece.stop)]
        if reopen:
            self.close()
            self.shard, self.next, self.error = piece.shard, 0, None
            self.file = open(self.ds.root / meta["name"], "rb")
            self.members = tar_file_iterator(self.file)
        out = []
        while self.next < piece.stop:
            data, error = self._advance(piece.shard, meta["samples"])
            if self.next >= piece.start:
                out.append(_Raw(piece.shard, self.next, data, error))
            self.next += 1
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file, self.shard = None, None

    def _advance(self, shard: int, count: int) -> tuple[bytes | None, str | None]:
        if self.error is None:
            try:
                member = next(self.members)
            except StopIteration:
                self.error = f"truncated: the shard ends after {self.next} of {count} samples"
            except Exception as e:
                reason = e.args[0] if e.args else e
                self.error = f"unreadable from sample {self.next} on ({type(e).__name__}: {reason})"
        if self.error is not None:
            return None, self.error
        expected = f"{self.ds.first_index[shard] + self.next:010d}"
        if base_plus_ext(member["fname"]) != (expected, SAMPLE_FIELD):
            return None, f"member {member['fname']!r}, expected {expected}.{SAMPLE_FIELD}"
        return member["data"], None


class TokenLoader:
    """The training loop's data source for one DP rank: an iterable of ``LongTensor [B, seq_len + 1]``.

    Each ``iter()`` starts a torch DataLoader at the current position. ``state_dict()`` / ``load_state_dict()``
    save and restore that position (call ``load_state_dict`` before ``iter``).
    """

    def __init__(self, dataset: TokenShardDataset, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.position = 0
        self.skipped = 0

    @property
    def samples_per_epoch(self) -> int:
        return self.dataset.samples_per_epoch

    @property
    def epoch(self) -> int:
        return self.position // self.samples_per_epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        dataset = copy.copy(self.dataset)
        dataset.start = self.position
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        for tokens, skipped in loader:
            self.position += tokens.shape[0]
            self.skipped += skipped
            yield tokens

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "samples", "epoch", "sample_in_epoch", "samples_per_epoch", "skipped", "order"}``.

        ``samples`` (taken by the training loop, all epochs) is the position; ``epoch`` / ``sample_in_epoch``
        restate it for humans; ``order`` identifies the sample order (split, shard-list digest, dp_rank,
        dp_size, seed, shuffle settings) and must match on load.
        """
        return {
            "version": STATE_VERSION,
            "samples": self.position,
            "epoch": self.epoch,
            "sample_in_epoch": self.position % self.samples_per_epoch,
            "samples_per_epoch": self.samples_per_epoch,
            "skipped": self.skipped,
            "order": dict(self.dataset.identity),
        }

    def load_state_dict(self, state: dict[str, Any], allow_resplit: bool = False) -> None:
        """Restore a position. A state saved with another data-parallel layout (dp_rank / dp_size) is refused
        unless ``allow_resplit``: then the position keeps the epoch and the fraction of it already read, which
        is exact only for the same layout (a resplit epoch may repeat or skip some of its samples)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self.dataset.identity
        diff = {k: (state["order"].get(k), mine[k]) for k in mine if state["order"].get(k) != mine[k]}
        resplit = allow_resplit and set(diff) <= {"dp_rank", "dp_size"}
        if diff and not resplit:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"data loader state is for a different sample order ({detail})")
        if resplit:
            fraction = int(state["sample_in_epoch"]) / int(state["samples_per_epoch"])
            self.position = int(state["epoch"]) * self.samples_per_epoch + int(fraction * self.samples_per_epoch)
        else:
            self.position = int(state["samples"])
        self.skipped = int(state["skipped"])


def build_loader(
    root: str | os.PathLike,
    *,
    batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    **dataset_options: Any,
) -> TokenLoader:
    """A ``TokenLoader`` over ``root`` (a prepared dataset directory); options go to ``TokenShardDataset``."""
    dataset = TokenShardDataset(root, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, **dataset_options)
    return TokenLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)
