"""KVQuant: sub-4-bit KV cache with pre-RoPE keys, non-uniform datatypes and outliers
(Hooper et al., 2024, arXiv:2401.18079).

- Keys are quantized **before RoPE**, per channel: a calibrated center and half-range per (KV head,
  channel) map inliers to [-1, 1]; attention re-applies RoPE to the dequantized keys by position.
- Values are quantized per token: center and half-range computed online over the token's inliers (fp16).
- **nuqB**: one non-uniform codebook of 2**bits levels in [-1, 1] per layer for K and for V, learned by
  1-D k-means on normalized calibration activations weighted by their Fisher information. At 2 bits the
  levels get **Q-Norm**, an affine correction that keeps the mean and deviation of quantized calibration
  data.
- **Dense-and-sparse**: the ``outliers`` fraction of each token's entries with the largest normalized
  magnitude is kept exactly (fp16 value + uint8 channel index); the rest is clamped to [-1, 1] and
  quantized. Our reading, recorded as METHODS.md asks: the paper thresholds per channel (K) and per token
  (V) with a variable count; kvpass keeps a fixed ``ceil(outliers * D)`` per token (chosen by magnitude
  after the per-channel key normalization, so channel-structured key outliers are what it keeps), which
  makes the sparse store fixed-size, append-only and kernel-friendly. ``outliers=0`` is the dense variant.
- **Attention sink**: the first ``sink`` tokens stay in full precision (and are left out of calibration).

Layout (B batch, H kv heads, C capacity, D head dim, n = C - sink, o outliers per token):
  k_codes, v_codes      (B, H, n, D*bits/8) uint8     packed nuq codes
  v_center, v_range     (B, H, n, 1) fp16             per-token value normalization
  k_out, v_out          (B, H, n, o) fp16             exact outlier values
  k_out_idx, v_out_idx  (B, H, n, o) uint8            their channels
  k_sink, v_sink        (B, H, min(C, sink), D)       first tokens, keys before RoPE
  k_center, k_range     (H, D) fp16                   calibrated key normalization
  k_levels, v_levels    (2**bits,) fp32               this layer's nuq codebooks
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import KVPassError, OptionError, ShapeError
from ..packing import pack_bits, unpack_bits
from ..quant import round_toward
from . import register
from .base import BufferSpec, CacheShape, KVState, Scheme, require_int

PARAM_DTYPE = torch.float16


@register
@dataclass
class KVQuant(Scheme):
    """KVQuant with ``bits`` (2, 3, 4), an ``outliers`` fraction (0.01; 0 = dense), ``sink`` tokens and
    Q-Norm (``qnorm``: None = on at 2 bits)."""

    name = "kvquant"
    key_space = "pre_rope"
    capturable_append = True      # past the sink every token is quantized alone (see _append_at)
    needs_calibration = True
    fisher_weighted = True        # its non-uniform levels are Fisher-weighted k-means (METHODS.md)
    bits: int = 3
    outliers: float = 0.01
    sink: int = 1
    qnorm: bool | None = None
    calibration: object = field(default=None, repr=False, compare=False)
    test_variants = ({"bits": 3}, {"bits": 2, "outliers": 0.0, "sink": 0}, {"bits": 4, "outliers": 0.05, "sink": 2})

    def validate(self) -> None:
        require_int(self.name, "bits", self.bits, 1, 8, " (the paper uses 2, 3 or 4)")
        require_int(self.name, "sink", self.sink, 0)
        if not isinstance(self.outliers, (int, float)) or not 0 <= self.outliers < 0.5:
            raise OptionError(f"kvquant: outliers must be a fraction in [0, 0.5), got {self.outliers!r}")
        if self.qnorm not in (None, True, False):
            raise OptionError(f"kvquant: qnorm must be True, False or None (auto), got {self.qnorm!r}")

    @property
    def use_qnorm(self) -> bool:
        return self.bits <= 2 if self.qnorm is None else self.qnorm

    def per_token_outliers(self, head_dim: int) -> int:
        return 0 if self.outliers == 0 else max(1, math.ceil(self.outliers * head_dim - 1e-9))

    def check_shape(self, shape: CacheShape) -> None:
        if shape.head_dim * self.bits % 8:
            raise ShapeError(f"kvquant: head_dim {shape.head_dim} x {self.bits} bits is not whole bytes")
        if shape.head_dim > 256:
            raise ShapeError(f"kvquant: head_dim {shape.head_dim} > 256 does not fit uint8 outlier indices")
        self._layer_calibration(shape)

    def layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        b, h, c, d = shape.batch, shape.kv_heads, shape.capacity, shape.head_dim
        n, o, s = max(c - self.sink, 0), self.per_token_outliers(d), min(c, self.sink)
        return {
            "k_codes": BufferSpec((b, h, n, d * self.bits // 8), torch.uint8),
            "v_codes": BufferSpec((b, h, n, d * self.bits // 8), torch.uint8),
            "v_center": BufferSpec((b, h, n, 1), PARAM_DTYPE),
            "v_range": BufferSpec((b, h, n, 1), PARAM_DTYPE),
            "k_out": BufferSpec((b, h, n, o), PARAM_DTYPE),
            "v_out": BufferSpec((b, h, n, o), PARAM_DTYPE),
            "k_out_idx": BufferSpec((b, h, n, o), torch.uint8),
            "v_out_idx": BufferSpec((b, h, n, o), torch.uint8),
            "k_sink": BufferSpec((b, h, s, d), shape.dtype),
            "v_sink": BufferSpec((b, h, s, d), shape.dtype),
            "k_center": BufferSpec((h, d), PARAM_DTYPE),
            "k_range": BufferSpec((h, d), PARAM_DTYPE),
            "k_levels": BufferSpec((2 ** self.bits,), torch.float32),
            "v_levels": BufferSpec((2 ** self.bits,), torch.float32),
        }

    # -- calibration ----------------------------------------------------------------------------
    def _layer_calibration(self, shape: CacheShape) -> dict[str, torch.Tensor]:
        if self.calibration is None:
            raise KVPassError("kvquant needs a calibration: kvpass.calibrate(model, 'kvquant', ...) and "
                              "pass calibration=...")
        t = self.calibration.layer(shape.layer)
        want = {"k_center": (shape.kv_heads, shape.head_dim), "k_range": (shape.kv_heads, shape.head_dim),
                "k_levels": (2 ** self.bits,), "v_levels": (2 ** self.bits,)}
        for name, s in want.items():
            if name not in t or tuple(t[name].shape) != s:
                got = None if name not in t else tuple(t[name].shape)
                raise ShapeError(f"kvquant: the calibration's layer {shape.layer} {name} is {got}, this cache "
                                 f"needs {s} (kv_heads={shape.kv_heads}, head_dim={shape.head_dim}, "
                                 f"bits={self.bits})")
        return t

    def initialize(self, state: KVState) -> None:
        for name, x in self._layer_calibration(state.shape).items():
            if name in state.buffers:
                state[name].copy_(x)

    @classmethod
    def fit(cls, activations, **options) -> dict:
        """Per layer: key centers/ranges per (head, channel) from pre-RoPE calibration keys (quantiles at
        the outlier fraction), and Fisher-weighted nuq levels for K and V (Q-Norm at 2 bits)."""
        from ..kmeans import kmeans_1d
        s = cls(**{k: v for k, v in options.items() if k != "calibration"})
        out = {}
        for i, layer in activations.layers.items():
            k = layer.k_pre if layer.k_pre is not None else layer.k
            kf = layer.k_pre_fisher if layer.k_pre is not None else layer.k_fisher
            q = max(s.outliers / 2, 1e-4)
            lo, hi = torch.quantile(k.float(), q, dim=0), torch.quantile(k.float(), 1 - q, dim=0)    # (H, D)
            center, half = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-4)
            center, half = center.to(PARAM_DTYPE), round_toward(half, PARAM_DTYPE, up=True)
            kn = (k.float() - center.float()) / half.float()                                       # (N, H, D)
            vn, _, _ = s._normalize_values(layer.v.float())
            levels = {}
            for tag, x, w in (("k", kn, kf), ("v", vn, layer.v_fisher)):
                x, w = s._drop_outliers(x, w)
                lv = kmeans_1d(x.reshape(1, -1), 2 ** s.bits, None if w is None else w.reshape(1, -1),
                               seed=i)[0].clamp(-1, 1)
                if s.use_qnorm:
                    lv = _qnorm(x.reshape(-1), lv)
                levels[tag] = lv.sort().values
            out.update({f"layers.{i}.k_center": center, f"layers.{i}.k_range": half,
                        f"layers.{i}.k_levels": levels["k"], f"layers.{i}.v_levels": levels["v"]})
        return out

    def _drop_outliers(self, x: torch.Tensor, w: torch.Tensor | None):
        """Calibration samples without each token's o largest-magnitude entries (x, w: (N, H, D))."""
        o = self.per_token_outliers(x.shape[-1])
        if o == 0:
            return x.clamp(-1, 1), w
        keep = torch.ones_like(x, dtype=torch.bool).scatter(-1, x.abs().topk(o, dim=-1).indices, False)
        return x[keep].clamp(-1, 1), None if w is None else w[keep]

    # -- quantization ---------------------------------------------------------------------------
    def _normalize_values(self, v: torch.Tensor):
        """Per-token center/half-range over the inliers (all but the o largest |v - median|)."""
        o = self.per_token_outliers(v.shape[-1])
        x = v.float()
        inl = x
        if o:
            dev = (x - x.median(dim=-1, keepdim=True).values).abs()
            mask = torch.zeros_like(x, dtype=torch.bool).scatter(-1, dev.topk(o, dim=-1).indices, True)
            inl_hi = x.masked_fill(mask, float("-inf")).amax(-1, keepdim=True)
            inl_lo = x.masked_fill(mask, float("inf")).amin(-1, keepdim=True)
        else:
            inl_hi, inl_lo = inl.amax(-1, keepdim=True), inl.amin(-1, keepdim=True)
        center = ((inl_hi + inl_lo) / 2).to(PARAM_DTYPE)
        half = round_toward(((inl_hi - inl_lo) / 2).clamp_min(2.0 ** -14), PARAM_DTYPE, up=True)
        return (x - center.float()) / half.float(), center, half

    def _encode(self, xn: torch.Tensor, levels: torch.Tensor):
        """Normalized x (..., D): codes of the nearest level, plus the o largest-|xn| entries kept exact."""
        o = self.per_token_outliers(xn.shape[-1])
        codes = (xn.clamp(-1, 1).unsqueeze(-1) - levels).abs().argmin(-1)
        idx = xn.abs().topk(o, dim=-1).indices if o else xn.new_zeros(*xn.shape[:-1], 0, dtype=torch.long)
        return codes, idx

    def _append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor) -> None:
        if isinstance(start, torch.Tensor):
            return self._append_at(state, k, v, start)
        end, s = start + k.shape[2], self.sink
        if start < s:                      # the attention sink stays in full precision
            m = min(end, s) - start
            state["k_sink"][:, :, start:start + m] = k[:, :, :m]
            state["v_sink"][:, :, start:start + m] = v[:, :, :m]
            k, v, start = k[:, :, m:], v[:, :, m:], start + m
        if start >= end:
            return
        a, b = start - s, end - s
        kn = (k.float() - state["k_center"][:, None].float()) / state["k_range"][:, None].float()
        vn, vc, vr = self._normalize_values(v)
        state["v_center"][:, :, a:b], state["v_range"][:, :, a:b] = vc, vr
        for tag, x, xn in (("k", k, kn), ("v", v, vn)):
            codes, idx = self._encode(xn, state[f"{tag}_levels"])
            state[f"{tag}_codes"][:, :, a:b] = pack_bits(codes, self.bits)
            state[f"{tag}_out"][:, :, a:b] = torch.gather(x, -1, idx).to(PARAM_DTYPE)
            state[f"{tag}_out_idx"][:, :, a:b] = idx.to(torch.uint8)

    def _append_at(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
        """:meth:`_append` from a device ``start`` (a CUDA-graph capture): the tokens are past the sink (the
        eager prefill holds it; a device flag otherwise) and each is quantized on its own, so they are
        written at their device rows with no host value."""
        from ..graphs import EAGER_ONLY, flag
        flag(start < self.sink, EAGER_ONLY)
        last = max(state["k_codes"].shape[2] - 1, 0)      # past the capacity: flagged, written inside
        rows = (torch.arange(k.shape[2], device=k.device) + start - self.sink).clamp_(0, last)
        kn = (k.float() - state["k_center"][:, None].float()) / state["k_range"][:, None].float()
        vn, vc, vr = self._normalize_values(v)
        state["v_center"].index_copy_(2, rows, vc)
        state["v_range"].index_copy_(2, rows, vr)
        for tag, x, xn in (("k", k, kn), ("v", v, vn)):
            codes, idx = self._encode(xn, state[f"{tag}_levels"])
            state[f"{tag}_codes"].index_copy_(2, rows, pack_bits(codes, self.bits))
            state[f"{tag}_out"].index_copy_(2, rows, torch.gather(x, -1, idx).to(PARAM_DTYPE))
            state[f"{tag}_out_idx"].index_copy_(2, rows, idx.to(torch.uint8))

    def decode_raw(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        length, dtype, d = state.length, state.shape.dtype, state.shape.head_dim
        s = min(length, self.sink)
        n = length - s
        out = []
        for tag in ("k", "v"):
            codes = unpack_bits(state[f"{tag}_codes"][:, :, :n], self.bits, d).long()
            xn = state[f"{tag}_levels"][codes]
            if tag == "k":
                x = xn * state["k_range"][:, None].float() + state["k_center"][:, None].float()
            else:
                x = xn * state["v_range"][:, :, :n].float() + state["v_center"][:, :, :n].float()
            idx = state[f"{tag}_out_idx"][:, :, :n].long()
            x = x.scatter(-1, idx, state[f"{tag}_out"][:, :, :n].float())
            out.append(torch.cat([state[f"{tag}_sink"][:, :, :s], x.to(dtype)], dim=2))
        return out[0], out[1]

    def error_bound(self, k: torch.Tensor, v: torch.Tensor):
        """Sink tokens are exact; outliers err by their fp16 rounding; every other entry by its
        normalized distance to the nearest level (after clamping to [-1, 1]) times the range."""
        shape = CacheShape(k.shape[0], k.shape[1], k.shape[3], k.shape[2], k.dtype)
        cal = self._layer_calibration(shape)
        s = min(k.shape[2], self.sink)
        kc, kr = cal["k_center"].float()[:, None], cal["k_range"].float()[:, None]
        vn, vc, vr = self._normalize_values(v[:, :, s:])
        bounds = []
        for x, xn, rng, levels in ((k[:, :, s:], (k[:, :, s:].float() - kc) / kr, kr, cal["k_levels"]),
                                   (v[:, :, s:], vn, vr.float(), cal["v_levels"])):
            near = (xn.clamp(-1, 1).unsqueeze(-1) - levels.float()).abs().min(-1).values
            err = (near + (xn.abs() - 1).clamp_min(0)) * rng
            codes, idx = self._encode(xn, levels.float())
            err = err.scatter(-1, idx, (torch.gather(x.float(), -1, idx).abs() * 2 ** -10))
            eps = torch.finfo(x.dtype).eps
            b = torch.zeros(*x.shape[:2], s, x.shape[3])
            bounds.append(torch.cat([b, err * (1 + 1e-4) + 1e-5 + (x.float().abs() + err) * eps], dim=2))
        return bounds[0], bounds[1]


def _qnorm(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Q-Norm: the affine map of the levels that keeps the mean and std of quantized samples x."""
    q = levels[(x.unsqueeze(-1) - levels).abs().argmin(-1)]
    a = x.std() / q.std().clamp_min(1e-8)
    b = x.mean() - a * q.mean()
    return (a * levels + b).clamp(-1.5, 1.5)
