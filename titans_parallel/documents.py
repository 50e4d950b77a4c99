"""Packed documents: a [B, T] reset mask (True where a document starts; the model sets it at every EOS, which opens
the next document) and what each mixer needs from it (docs/long_context.md, "Document resets")."""

from __future__ import annotations

import torch


def document_starts(resets: torch.Tensor) -> torch.Tensor:
    """resets [B, T] bool -> [B, T] long: the position where each token's document starts (0 for the first)."""
    t = torch.arange(resets.shape[-1], device=resets.device)
    return torch.cummax(torch.where(resets | (t == 0), t, 0), dim=-1).values


def document_positions(resets: torch.Tensor) -> torch.Tensor:
    """resets [B, T] bool -> [B, T] long: each token's position inside its document (0 at a reset)."""
    return torch.arange(resets.shape[-1], device=resets.device) - document_starts(resets)


def document_ids(resets: torch.Tensor) -> torch.Tensor:
    """resets [B, T] bool -> [B, T] long: which document of its row a token is in (0, 1, ...; a reset at t = 0
    opens none)."""
    return torch.cumsum(resets.long(), dim=-1) - resets[..., :1].long()
