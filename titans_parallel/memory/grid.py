"""Where the chunked scan puts each token: the [N, C] chunk grid of a row, plain or restarted at document resets."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..documents import document_positions


class ChunkGrid(NamedTuple):
    """The layout of B rows of T tokens in N chunks of C slots (docs/memory.md, "Document resets").

    Without resets chunk n holds tokens nC .. nC + C - 1 of every row and only the last chunk may be short. With
    resets every document of a row starts a new chunk, so a chunk that a reset cuts is short and a row with fewer
    chunks than N ends in empty ones; unused slots are padding (theta 0, eta 1, alpha 0: no update) and a chunk's
    end state is taken at its last real token.

    slots [B, T]: token t's slot n C + c in its row's grid (None: slot t, the plain grid);
    ends [B or 1, N]: each chunk's last real slot c, -1 for an empty chunk;
    starts [B, N] bool (None without resets): the chunk starts from the reset state;
    restart_chunks: the chunks where some row starts from the reset state (known on the host, so the scan touches
    only those).
    """

    size: int
    chunks: int
    slots: torch.Tensor | None
    ends: torch.Tensor
    starts: torch.Tensor | None = None
    restart_chunks: frozenset[int] = frozenset()

    @classmethod
    def plain(cls, T: int, C: int, device: torch.device) -> "ChunkGrid":
        """Chunks counted from the call's first token; T > 0."""
        N = -(-T // C)
        ends = torch.full((1, N), C - 1, dtype=torch.long, device=device)
        ends[0, -1] = (T - 1) % C
        return cls(C, N, None, ends)

    @classmethod
    def from_resets(cls, resets: torch.Tensor, C: int) -> "ChunkGrid":
        """The grid of a [B, T] reset mask (T > 0). One host sync: the number of chunks N (<= ceil(T / C) plus the
        most resets in a row), which sets the shapes of everything after it, and `restart_chunks`."""
        B, T = resets.shape
        col = document_positions(resets) % C
        chunk = torch.cumsum(col == 0, dim=1) - 1
        restarting = torch.zeros(T, dtype=torch.long, device=resets.device)  # chunk indices are < T
        restarting.scatter_reduce_(0, chunk.flatten(), resets.long().flatten(), "amax")
        *flags, N = torch.cat([restarting, chunk[:, -1].amax()[None] + 1]).tolist()
        ends = torch.full((B, N), -1, dtype=torch.long, device=resets.device).scatter_reduce_(1, chunk, col, "amax")
        starts = torch.zeros(B, N, dtype=torch.long, device=resets.device)
        starts = starts.scatter_reduce_(1, chunk, resets.long(), "amax").bool()
        return cls(C, N, chunk * C + col, ends, starts, frozenset(n for n in range(N) if flags[n]))

    def to_grid(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """[B, H, T, ...] -> [B H, N, C, ...], padding slots set to `fill`."""
        B, H, T = x.shape[:3]
        rest = x.shape[3:]
        if self.slots is None:
            x = x.flatten(0, 1)
            if self.chunks * self.size > T:
                x = torch.cat([x, x.new_full((B * H, self.chunks * self.size - T, *rest), fill)], dim=1)
        else:  # whole rows of the trailing dims at once (4x faster than scatter on CPU)
            grid = x.new_full((B * H * self.chunks * self.size, *rest), fill)
            x = grid.index_copy(0, self._rows(H), x.reshape(B * H * T, *rest))
        return x.view(B * H, self.chunks, self.size, *rest)

    def from_grid(self, y: torch.Tensor, B: int, H: int, T: int) -> torch.Tensor:
        """[B H, N, C, d] -> [B, H, T, d]: every token's output, padding dropped."""
        if self.slots is None:
            return y.reshape(B, H, self.chunks * self.size, y.shape[-1])[:, :, :T]
        return y.reshape(-1, y.shape[-1]).index_select(0, self._rows(H)).view(B, H, T, y.shape[-1])

    @staticmethod
    def per_head(x: torch.Tensor | None, H: int) -> torch.Tensor | None:
        """A per-row [B, N] field repeated for the H heads of each row: [B H, N] ([1, N] stays as it is)."""
        return x if x is None or x.shape[0] == 1 else x.repeat_interleave(H, dim=0)

    def _rows(self, H: int) -> torch.Tensor:
        """[B H T]: where token t of row (b, h) sits in the flattened [B H N C] grid."""
        B = self.slots.shape[0]
        heads = torch.arange(B * H, device=self.slots.device).view(B, H, 1) * (self.chunks * self.size)
        return (heads + self.slots[:, None, :]).flatten()
