"""fp16 passthrough: the uncompressed reference cache (stored in the model's dtype: fp16, bf16 or fp32)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import BufferSpec, CacheShape, KVState, Scheme


@register
@dataclass
class FP16(Scheme):
    """Keys and values kept as they are, in preallocated (B, Hkv, capacity, D) buffers of the cache
    dtype. Bits per element are the dtype's width (16 for fp16/bf16 models, 32 for fp32 models)."""

    name = "fp16"

    def layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        dense = BufferSpec((shape.batch, shape.kv_heads, shape.capacity, shape.head_dim), shape.dtype)
        return {"k": dense, "v": dense}

    def _append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        state["k"][:, :, start:start + k.shape[2]] = k
        state["v"][:, :, start:start + v.shape[2]] = v

    def decode(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        n = state.length
        return state["k"][:, :, :n], state["v"][:, :, :n]

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
