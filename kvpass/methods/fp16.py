"""fp16 passthrough: the uncompressed reference cache (stored in the model's dtype: fp16, bf16 or fp32)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import key_columns, visible_attention
from . import register
from .base import BufferSpec, CacheShape, KVState, Scheme, append_rows


@register
@dataclass
class FP16(Scheme):
    """Keys and values kept as they are, in preallocated (B, Hkv, capacity, D) buffers of the cache
    dtype. Bits per element are the dtype's width (16 for fp16/bf16 models, 32 for fp32 models)."""

    name = "fp16"
    capturable_append = True      # a device start writes through index_copy_ (see _append)

    def layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        dense = BufferSpec((shape.batch, shape.kv_heads, shape.capacity, shape.head_dim), shape.dtype)
        return {"k": dense, "v": dense}

    def _append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor) -> None:
        if isinstance(start, torch.Tensor):   # a captured step: the position is on the device
            rows = append_rows(state, start, k.shape[2], k.device)
            state["k"].index_copy_(2, rows, k)
            state["v"].index_copy_(2, rows, v)
            return
        state["k"][:, :, start:start + k.shape[2]] = k
        state["v"][:, :, start:start + v.shape[2]] = v

    def attend_captured(self, state: KVState, q: torch.Tensor, *, scale: float | None, causal: bool,
                        attn_mask: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
        """Attention over the whole buffers (as a static cache does), the positions at or past the device
        length hidden: q (B, Hq, T, D), the last T positions -> (B, Hq, T, D)."""
        width = state.shape.capacity if attn_mask is None else min(attn_mask.shape[-1], state.shape.capacity)
        keys = torch.arange(width, device=q.device)
        last = state.length_tensor - q.shape[2] + torch.arange(q.shape[2], device=q.device)   # query positions
        visible = keys[None, :] <= last[:, None] if causal else (keys < state.length_tensor)[None, :]
        return visible_attention(q, state["k"][:, :, :width], state["v"][:, :, :width], visible, scale=scale,
                                 attn_mask=key_columns(attn_mask, keys), softcap=softcap)

    def decode(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        n = state.length
        return state["k"][:, :, :n], state["v"][:, :, :n]

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
