"""The sample order of one data-parallel rank: which shard sample sits at each stream position.

Pure index arithmetic on the manifest's per-shard sample counts; no I/O. A rank's stream is infinite:
position ``p = 0, 1, 2, ...`` is epoch ``e = p // n``, offset ``o = p % n``, with ``n = N // dp_size``
samples per rank and epoch (``N`` samples in the split). For epoch ``e``:

1. Shard order: the manifest's shards permuted with seed ``(seed, e)``, the same on every rank. Their
   samples, concatenated in that order (each shard in file order), form the epoch stream of ``N`` samples.
2. Rank split: rank ``r`` takes the contiguous range ``[r*n, (r+1)*n)`` of the epoch stream, so ranks read
   disjoint shards (but for the shards cut by range boundaries) and all get exactly ``n`` samples. The
   last ``N - dp_size*n`` samples of the epoch stream (the tail of that epoch's last shard(s)) are dropped
   for that epoch; which samples they are changes with the shard order.
3. Shuffle buffer: the rank's range is cut into ``lanes`` contiguous lanes (far apart in the stream).
   Block ``b`` takes the next ``quota = buffer // lanes`` samples of every lane, lane after lane, and
   permutes them with seed ``(seed, e, r, b)``. Mixing far-apart lanes keeps a block from being one run
   of consecutive text; reading the lanes is sequential. Offsets ``[starts[b], starts[b+1])`` are block ``b``.

Without shuffle the shard order is the manifest's, there is one lane and no permutation: rank ``r`` reads
``[r*n, (r+1)*n)`` of the split in file order.

The order depends on (counts, dp_rank, dp_size, seed, shuffle, buffer, lanes) and nothing else — not on
the number of loader workers or the batch size — so a saved position resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Piece(NamedTuple):
    """Samples ``[start, stop)`` of shard ``shard`` (index in the manifest's shard list)."""

    shard: int
    start: int
    stop: int


class SampleOrder:
    """Deterministic map from a rank's stream position to (epoch, block, slot) and from blocks to shard pieces."""

    def __init__(
        self,
        counts: Sequence[int],
        *,
        dp_rank: int,
        dp_size: int,
        seed: int = 0,
        shuffle: bool = True,
        buffer: int = 2048,
        lanes: int = 8,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if seed < 0 or buffer < 1 or lanes < 1:
            raise ValueError(f"need seed >= 0, buffer >= 1 and lanes >= 1 (got {seed}, {buffer}, {lanes})")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        total = int(self.counts.sum())
        self.samples_per_epoch = total // dp_size
        if self.samples_per_epoch == 0:
            raise ValueError(f"{total} samples cannot give each of {dp_size} data-parallel ranks one sample")
        self.lanes = min(lanes, self.samples_per_epoch) if shuffle else 1
        base, extra = divmod(self.samples_per_epoch, self.lanes)
        self.lane_len = np.array([base + (g < extra) for g in range(self.lanes)], dtype=np.int64)
        self.lane_start = np.concatenate([[0], np.cumsum(self.lane_len)[:-1]])
        self.quota = max(1, buffer // self.lanes)
        blocks = np.arange(math.ceil(self.lane_len[0] / self.quota))
        sizes = np.clip(self.lane_len[None, :] - blocks[:, None] * self.quota, 0, self.quota).sum(axis=1)
        self.block_starts = np.concatenate([[0], np.cumsum(sizes)])
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def locate(self, offset: int) -> tuple[int, int]:
        """(block, slot in block) of an offset within the epoch, 0 <= offset < samples_per_epoch."""
        block = int(np.searchsorted(self.block_starts, offset, side="right")) - 1
        return block, offset - int(self.block_starts[block])

    def block_size(self, block: int) -> int:
        return int(self.block_starts[block + 1] - self.block_starts[block])

    def shard_order(self, epoch: int) -> np.ndarray:
        """Manifest shard indices in epoch ``epoch``'s reading order."""
        if not self.shuffle:
            return np.arange(len(self.counts))
        return np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.counts))

    def block_pieces(self, epoch: int, block: int) -> list[list[Piece]]:
        """Per lane, the shard pieces block ``block`` reads, in stream order (before the permutation)."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = self.shard_order(epoch)
            self._epoch_cache = (epoch, order, np.cumsum(self.counts[order]))
        _, order, ends = self._epoch_cache
        rank_start = self.dp_rank * self.samples_per_epoch
        lo = self.lane_start + np.minimum(block * self.quota, self.lane_len) + rank_start
        hi = self.lane_start + np.minimum((block + 1) * self.quota, self.lane_len) + rank_start
        return [self._pieces(order, ends, int(a), int(z)) for a, z in zip(lo, hi, strict=True)]

    def _pieces(self, order: np.ndarray, ends: np.ndarray, a: int, z: int) -> list[Piece]:
        pieces = []
        while a < z:
            k = int(np.searchsorted(ends, a, side="right"))
            first = int(ends[k] - self.counts[order[k]])
            stop = min(z, int(ends[k]))
            pieces.append(Piece(int(order[k]), a - first, stop - first))
            a = stop
        return pieces

    def block_permutation(self, epoch: int, block: int) -> np.ndarray:
        """Slot ``i`` of the block holds its ``perm[i]``-th sample in stream order."""
        size = self.block_size(block)
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed, 1, epoch, self.dp_rank, block]).permutation(size)
