"""KIVI: tuning-free asymmetric 2-bit KV cache (Liu et al., 2024, arXiv:2402.02750).

Keys are quantized per channel over groups of ``group_size`` tokens, values per token over groups of
``group_size`` channels, both with min/max round-to-nearest (zero = min, scale = (max-min)/(2^B-1)).
A full-precision recent window keeps the newest tokens exact. Our reading of the window (recorded here as
METHODS.md asks): keys stay in the window until a *complete* group of G tokens lies entirely outside the
newest ``residual`` tokens, so at least ``residual`` and at most ``residual + G - 1`` recent keys are in
full precision; values leave the window one by one, so exactly the newest ``residual`` values are in full
precision. Once quantized a token's codes never change, so the cache is the same whatever the chunking of
the appends (one prefill or token by token).

Layout (per layer; B batch, H kv heads, C capacity, D head dim, G group, R residual):
  k_codes  (B, H, Nk, D*bits/8) uint8   Nk = floor((C-R)/G)*G, codes packed along D in planar
                                         order (kvpass.packing.pack_planar; 3, 5-7 bits: pack_bits)
  k_scale, k_zero (B, H, Nk/G, D)        one per channel per group of G tokens
  v_codes  (B, H, Nv, D*bits/8) uint8   Nv = C - R
  v_scale, v_zero (B, H, Nv, D/G)        one per token per group of G channels
  k_window (B, H, min(C, R+G-1), D)      ring buffer: position p lives in slot p % size
  v_window (B, H, min(C, R), D)          ring buffer
Bits: ``bits + 2*16/G`` per element for the quantized part (3.0 at 2 bits, G=32, fp16 scales) plus the
windows amortized over the capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import merged, partial_attention
from ..errors import OptionError, ShapeError
from ..packing import pack_planar, unpack_planar
from ..quant import dequantize_minmax, minmax_params, quantize_minmax
from . import register
from .base import BufferSpec, CacheShape, KVState, Scheme, require_dtype, require_int, rounding_eps


@register
@dataclass
class KIVI(Scheme):
    """KIVI with ``bits`` (2 or 4 in the paper; 1..8 accepted), ``group_size`` G (32) and a full-
    precision ``residual`` window R (128, a multiple of G; 0 disables it)."""

    name = "kivi"
    bits: int = 2
    group_size: int = 32
    residual: int = 128
    scale_dtype: torch.dtype = torch.float16
    test_variants = ({"bits": 2, "group_size": 8, "residual": 16}, {"bits": 4, "group_size": 8, "residual": 8},
                     {"bits": 2, "group_size": 8, "residual": 0}, {"bits": 3, "group_size": 16, "residual": 16})

    def validate(self) -> None:
        require_int(self.name, "bits", self.bits, 1, 8, " (the paper uses 2 or 4)")
        require_int(self.name, "group_size", self.group_size, 1)
        require_int(self.name, "residual", self.residual, 0)
        if self.residual % self.group_size:
            raise OptionError(f"kivi: residual ({self.residual}) must be a multiple of group_size "
                              f"({self.group_size})")
        require_dtype(self.name, "scale_dtype", self.scale_dtype)

    def check_shape(self, shape: CacheShape) -> None:
        if shape.head_dim % self.group_size:
            raise ShapeError(f"kivi: head_dim {shape.head_dim} is not divisible by group_size "
                             f"{self.group_size} (values are grouped along channels)")
        if shape.head_dim * self.bits % 8:
            raise ShapeError(f"kivi: head_dim {shape.head_dim} x {self.bits} bits is not whole bytes")

    # token bookkeeping ---------------------------------------------------------------------
    def quantized_keys(self, length: int) -> int:
        """Keys in the quantized store when ``length`` tokens are cached."""
        return max(length - self.residual, 0) // self.group_size * self.group_size

    def quantized_values(self, length: int) -> int:
        """Values in the quantized store when ``length`` tokens are cached."""
        return max(length - self.residual, 0)

    def exact_spans(self, length: int) -> tuple[int, int, int]:
        return 0, self.quantized_keys(length), self.quantized_values(length)

    def layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        b, h, c, d, g = shape.batch, shape.kv_heads, shape.capacity, shape.head_dim, self.group_size
        nk, nv, packed = self.quantized_keys(c), self.quantized_values(c), d * self.bits // 8
        sd = self.scale_dtype
        return {
            "k_codes": BufferSpec((b, h, nk, packed), torch.uint8),
            "k_scale": BufferSpec((b, h, nk // g, d), sd),
            "k_zero": BufferSpec((b, h, nk // g, d), sd),
            "k_window": BufferSpec((b, h, min(c, self.residual + g - 1), d), shape.dtype),
            "v_codes": BufferSpec((b, h, nv, packed), torch.uint8),
            "v_scale": BufferSpec((b, h, nv, d // g), sd),
            "v_zero": BufferSpec((b, h, nv, d // g), sd),
            "v_window": BufferSpec((b, h, min(c, self.residual), d), shape.dtype),
        }

    # append -----------------------------------------------------------------------------
    def _append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        end = start + k.shape[2]
        self._append_part(state, "k", k, start, end, self.quantized_keys)
        self._append_part(state, "v", v, start, end, self.quantized_values)

    def _append_part(self, state, tag, x, start, end, quantized) -> None:
        window = state[f"{tag}_window"]
        q0, q1 = quantized(start), quantized(end)
        if q1 > q0:   # tokens [q0, q1) leave the window: some are in the ring, some are new
            pending = torch.cat([_ring_read(window, q0, start), x], dim=2)[:, :, :q1 - q0]
            codes, scale, zero = (self._quantize_keys if tag == "k" else self._quantize_values)(pending)
            state[f"{tag}_codes"][:, :, q0:q1] = codes
            lo, hi = (q0 // self.group_size, q1 // self.group_size) if tag == "k" else (q0, q1)
            state[f"{tag}_scale"][:, :, lo:hi] = scale
            state[f"{tag}_zero"][:, :, lo:hi] = zero
        first = max(start, q1)   # new tokens that stay in full precision
        if end > first:
            _ring_write(window, first, x[:, :, first - start:])

    def _quantize_keys(self, x):
        """x (B, H, n*G, D) -> packed codes, scale/zero (B, H, n, D): per channel over G tokens."""
        b, h, t, d = x.shape
        groups = x.reshape(b, h, t // self.group_size, self.group_size, d)
        scale, zero = minmax_params(groups, self.bits, dim=3, param_dtype=self.scale_dtype)
        codes = quantize_minmax(groups, scale, zero, self.bits).reshape(b, h, t, d)
        return pack_planar(codes, self.bits), scale.squeeze(3), zero.squeeze(3)

    def _quantize_values(self, x):
        """x (B, H, T, D) -> packed codes, scale/zero (B, H, T, D/G): per token over G channels."""
        b, h, t, d = x.shape
        groups = x.reshape(b, h, t, d // self.group_size, self.group_size)
        scale, zero = minmax_params(groups, self.bits, dim=4, param_dtype=self.scale_dtype)
        codes = quantize_minmax(groups, scale, zero, self.bits).reshape(b, h, t, d)
        return pack_planar(codes, self.bits), scale.squeeze(4), zero.squeeze(4)

    # read back ----------------------------------------------------------------------------
    def _dequant_keys(self, state: KVState, n: int) -> torch.Tensor:
        b, h, d = state.shape.batch, state.shape.kv_heads, state.shape.head_dim
        codes = unpack_planar(state["k_codes"][:, :, :n], self.bits, d)
        codes = codes.reshape(b, h, n // self.group_size, self.group_size, d)
        g = n // self.group_size
        x = dequantize_minmax(codes, state["k_scale"][:, :, :g, None], state["k_zero"][:, :, :g, None],
                              state.shape.dtype)
        return x.reshape(b, h, n, d)

    def _dequant_values(self, state: KVState, n: int) -> torch.Tensor:
        b, h, d = state.shape.batch, state.shape.kv_heads, state.shape.head_dim
        codes = unpack_planar(state["v_codes"][:, :, :n], self.bits, d)
        codes = codes.reshape(b, h, n, d // self.group_size, self.group_size)
        x = dequantize_minmax(codes, state["v_scale"][:, :, :n, :, None], state["v_zero"][:, :, :n, :, None],
                              state.shape.dtype)
        return x.reshape(b, h, n, d)

    def decode(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        length = state.length
        nk, nv = self.quantized_keys(length), self.quantized_values(length)
        k = torch.cat([self._dequant_keys(state, nk), _ring_read(state["k_window"], nk, length)], dim=2)
        v = torch.cat([self._dequant_values(state, nv), _ring_read(state["v_window"], nv, length)], dim=2)
        return k, v

    def attend(self, state: KVState, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
               attn_mask: torch.Tensor | None = None, sliding_window: int | None = None,
               softcap: float | None = None, return_lse: bool = False):
        """Split attention, the structure of the fused kernel: the quantized part (its keys and values
        cover different token ranges, so it is split at the key/value boundary) and the full-precision
        windows, merged by log-sum-exp. Equals dense attention over :meth:`decode`."""
        length, dev = state.length, q.device
        nk, nv = self.quantized_keys(length), self.quantized_values(length)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        qpos = torch.arange(length - q.shape[2], length, device=dev)
        k_q, v_q = self._dequant_keys(state, nk), self._dequant_values(state, nv)
        k_w, v_w = _ring_read(state["k_window"], nk, length), _ring_read(state["v_window"], nv, length)
        # Token ranges where K and V come from the same place: [0, nk) both quantized; [nk, nv) key in
        # the window, value quantized; [nv, length) both full precision.
        spans = [(0, nk, k_q, v_q[:, :, :nk]), (nk, nv, k_w[:, :, :nv - nk], v_q[:, :, nk:]),
                 (nv, length, k_w[:, :, nv - nk:], v_w)]
        kw = dict(scale=scale, causal=causal, attn_mask=attn_mask, sliding_window=sliding_window,
                  softcap=softcap)
        parts = [partial_attention(q, kk, vv, torch.arange(a, b, device=dev), qpos, **kw)
                 for a, b, kk, vv in spans if b > a]
        return merged(parts, q.dtype, return_lse)

    # error model --------------------------------------------------------------------------
    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length, g = k.shape[2], self.group_size
        nk, nv = self.quantized_keys(length), self.quantized_values(length)
        kb = torch.zeros_like(k, dtype=torch.float32)
        vb = torch.zeros_like(v, dtype=torch.float32)
        b, h, _, d = k.shape
        if nk:
            kg = k[:, :, :nk].float().reshape(b, h, nk // g, g, d)
            kb[:, :, :nk] = self._half_step(kg, dim=3, out=k.dtype).reshape(b, h, nk, d)
        if nv:
            vg = v[:, :, :nv].float().reshape(b, h, nv, d // g, g)
            vb[:, :, :nv] = self._half_step(vg, dim=4, out=v.dtype).reshape(b, h, nv, d)
        return kb, vb

    def _half_step(self, x: torch.Tensor, dim: int, out: torch.dtype) -> torch.Tensor:
        # Stored zero <= min (rounded down) and stored scale >= (max - zero)/levels (rounded up):
        # round-to-nearest errs by at most half the stored scale, then the output cast rounds.
        rel = rounding_eps(self.scale_dtype)
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
        span = hi - lo + lo.abs() * rel + 2.0 ** -24
        half = (span / (2 ** self.bits - 1) * (1 + rel) + 2.0 ** -24) / 2
        return half + (x.abs() + half) * rounding_eps(out) + x.abs() * 1e-6


def _ring_read(window: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """Positions [first, end) of a ring buffer (B, H, W, D) whose slot for position p is p % W."""
    if end <= first:
        return window[:, :, :0]
    slots = torch.arange(first, end, device=window.device) % window.shape[2]
    return window[:, :, slots]


def _ring_write(window: torch.Tensor, first: int, x: torch.Tensor) -> None:
    """Store x (B, H, T, D) at positions [first, first + T) of the ring buffer."""
    slots = torch.arange(first, first + x.shape[2], device=window.device) % window.shape[2]
    window[:, :, slots] = x
