"""fp8 baseline: e4m3 codes with one scale per (sequence, KV head), as vLLM and TensorRT-LLM ship it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import BufferSpec, CacheShape, KVState, Scheme, append_rows, require_int, rounding_eps

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
E4M3_REL = 2.0 ** -4          # half an ulp of a 3-bit mantissa, relative
E4M3_SUB = 2.0 ** -10         # half the subnormal spacing (2**-9), absolute in scaled units
MIN_SCALE = 2.0 ** -100       # floor of a head's scale (all-zero heads)


@register
@dataclass
class FP8(Scheme):
    """Keys and values stored as float8 e4m3 after division by a per-(batch, KV head) fp32 scale.

    The scale is set on the first append so that the largest magnitude maps to 448/``headroom``. If a
    later token does not fit, that head's scale grows to fit it (again with headroom) and the tokens
    already stored are re-encoded once (a rare path: with headroom 4 a head's magnitude must quadruple).
    Values never saturate silently. 8 bits per element plus 32 bits per (batch, head).
    """

    name = "fp8"
    chunking_invariant = False    # a scale growth re-encodes earlier tokens
    capturable_append = True      # at a device start: a needed growth flags the step for an eager redo
    headroom: int = 4

    def validate(self) -> None:
        require_int(self.name, "headroom", self.headroom, 1, 64)

    def layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        b, h, c, d = shape.batch, shape.kv_heads, shape.capacity, shape.head_dim
        codes, scale = BufferSpec((b, h, c, d), E4M3), BufferSpec((b, h, 1, 1), torch.float32)
        return {"k_codes": codes, "k_scale": scale, "v_codes": codes, "v_scale": scale}

    def _append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor) -> None:
        if isinstance(start, torch.Tensor):
            self._append_at(state, k, v, start)
            return
        end = start + k.shape[2]
        for x, tag in ((k, "k"), (v, "v")):
            codes, scale = state[f"{tag}_codes"], state[f"{tag}_scale"]
            need = x.float().abs().amax(dim=(2, 3), keepdim=True) / E4M3_MAX
            grow = (need > scale) | (scale == 0)          # an all-zero first append still sets a scale
            if grow.any():
                new_scale = torch.where(grow, (need * self.headroom).clamp_min(MIN_SCALE), scale)
                if start:
                    old = codes[:, :, :start].float() * scale
                    codes[:, :, :start] = _encode(old, new_scale)
                scale.copy_(new_scale)
            codes[:, :, start:end] = _encode(x.float(), scale)

    def _append_at(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
        """:meth:`_append` from a device ``start`` (a CUDA-graph capture: no host reads). The scales stay as
        they are; a head whose new tokens need a larger one raises the REDO flag, and the codes written here
        (clamped at the old scale) are then overwritten by the eager redo of the step
        (:class:`kvpass.graphs.DecodeGraph`), which grows the scale and re-encodes."""
        from ..graphs import REDO, flag
        positions = append_rows(state, start, k.shape[2], k.device)
        for x, tag in ((k, "k"), (v, "v")):
            scale, xf = state[f"{tag}_scale"], x.float()
            flag(((xf.abs().amax(dim=(2, 3), keepdim=True) / E4M3_MAX > scale) | (scale == 0)).any(), REDO)
            # (as bytes: index_copy_ has no float8 kernel on the CPU)
            state[f"{tag}_codes"].view(torch.uint8).index_copy_(2, positions, _encode(xf, scale).view(torch.uint8))

    def decode(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        n, dtype = state.length, state.shape.dtype
        return tuple((state[f"{t}_codes"][:, :, :n].float() * state[f"{t}_scale"]).to(dtype)
                     for t in ("k", "v"))

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Up to two roundings (a re-encode after a scale growth); the scale never exceeds
        # headroom * amax / 448 for the head's whole history.
        out = rounding_eps(k.dtype)

        def bound(x):
            xf = x.float()
            s_max = xf.abs().amax(dim=(2, 3), keepdim=True) * self.headroom / E4M3_MAX
            err = xf.abs() * (2 * E4M3_REL + E4M3_REL ** 2) + 2 * E4M3_SUB * s_max * (1 + E4M3_REL)
            return err + (xf.abs() + err) * out
        return bound(k), bound(v)


def _encode(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
