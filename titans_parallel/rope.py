"""Rotary position embedding (RoPE), half-split ("rotate_half") convention.

Angles depend only on absolute integer positions, so a token decoded alone at position t gets exactly the
rotation it gets inside a full forward pass.
"""

import torch


def rope_angles(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [..., T, head_dim] (float32) for integer positions [..., T] (e.g. [T], or [B, T] when
    every row has its own positions).

    Channel i and i + head_dim/2 share the frequency base^(-2i/head_dim). Angles are formed in float64 and
    rounded once, so long positions keep their precision.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, d] by cos, sin broadcastable to it ([T, d], or [B, 1, T, d] for x [B, H, T, d]); computed
    in at least float32, returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, cos.dtype))
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
