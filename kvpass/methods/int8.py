"""int8 baseline: per-token, per-head symmetric absmax quantization (what torchao and vLLM ship)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import absmax_scale
from . import register
from .base import BufferSpec, CacheShape, KVState, Scheme, append_rows, require_dtype, rounding_eps


@register
@dataclass
class Int8(Scheme):
    """Each token's head vector is scaled by absmax/127 and rounded to int8 in [-127, 127]; the scale is
    kept per (token, head) in ``scale_dtype``: 8 + 16/head_dim bits per element with fp16 scales."""

    name = "int8"
    capturable_append = True      # each token is quantized alone and written at device positions
    scale_dtype: torch.dtype = torch.float16

    def validate(self) -> None:
        require_dtype(self.name, "scale_dtype", self.scale_dtype)

    def layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        b, h, c, d = shape.batch, shape.kv_heads, shape.capacity, shape.head_dim
        codes, scale = BufferSpec((b, h, c, d), torch.int8), BufferSpec((b, h, c, 1), self.scale_dtype)
        return {"k_codes": codes, "k_scale": scale, "v_codes": codes, "v_scale": scale}

    def _append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor) -> None:
        positions = append_rows(state, start, k.shape[2], k.device)     # start may be the length tensor
        for x, tag in ((k, "k"), (v, "v")):
            scale = absmax_scale(x, 127.0, dim=-1, param_dtype=self.scale_dtype)
            codes = torch.round(x.float() / scale.float()).clamp_(-127, 127).to(torch.int8)
            state[f"{tag}_codes"].index_copy_(2, positions, codes)
            state[f"{tag}_scale"].index_copy_(2, positions, scale)

    def decode(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        n, dtype = state.length, state.shape.dtype
        return tuple((state[f"{t}_codes"][:, :, :n].float() * state[f"{t}_scale"][:, :, :n].float()).to(dtype)
                     for t in ("k", "v"))

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rel, out = rounding_eps(self.scale_dtype), rounding_eps(k.dtype)

        def bound(x):
            xf = x.float()
            half_step = (xf.abs().amax(-1, keepdim=True) / 127 * (1 + rel) + 2.0 ** -24) / 2
            return half_step + (xf.abs() + half_step) * out
        return bound(k), bound(v)
