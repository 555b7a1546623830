"""Rotary position embedding (RoPE) as kvpass re-applies it to keys cached before RoPE (KVQuant).

The graph pass reads the model's own rotary frequencies (``inv_freq``) and scaling from the graph, so the
keys kvpass rotates are rotated exactly as the model would: key position p, channel pair i (of the first
``dims`` channels, "rotate-half" layout: pairs (i, i + dims/2)) turns by angle p * inv_freq[i], and the
result is scaled by ``scale`` (transformers' ``attention_scaling``, 1 for plain RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ShapeError


@dataclass(frozen=True)
class Rotary:
    """RoPE parameters: inv_freq (dims/2,) float32, scale (float), dims (rotated channels, even)."""

    inv_freq: torch.Tensor
    scale: float = 1.0

    @property
    def dims(self) -> int:
        return 2 * self.inv_freq.shape[-1]


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale) -> torch.Tensor:
    """Rotate x (..., L, D) at ``positions`` (L,) int; the first 2*len(inv_freq) channels are rotated
    (rotate-half pairs), the rest pass through. Computed in float32, returned in x.dtype."""
    half = inv_freq.shape[-1]
    if 2 * half > x.shape[-1]:
        raise ShapeError(f"rotary covers {2 * half} channels but keys have {x.shape[-1]}")
    angle = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]     # (L, half)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return out.to(x.dtype)
