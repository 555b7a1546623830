"""Quantization primitives shared by the schemes (pure PyTorch; the reference the kernels must equal).

Scales and zero-points are stored in a low-precision dtype (fp16 by default). To keep the analytic
error bound exact after that rounding, the stored scale is rounded *up* and the stored zero-point
*down*: the stored grid ``zero + code * scale, code in [0, 2**bits - 1]`` then always covers the
group's [min, max], so round-to-nearest errs by at most ``scale / 2``.
"""

from __future__ import annotations

import torch

from .errors import KVPassError
from .graphs import NONFINITE, capturing, flag


def round_toward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Round float32 ``x`` to ``dtype`` toward +inf (``up``) or -inf; returns a ``dtype`` tensor."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    target = torch.full_like(y, float("inf") if up else float("-inf"))
    off = (y.float() < x) if up else (y.float() > x)
    return torch.where(off, torch.nextafter(y, target), y)


def minmax_params(x: torch.Tensor, bits: int, dim: int, param_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (KIVI-style) scale and zero-point of ``x`` reduced over ``dim`` (kept, size 1).

    x: float tensor, any shape. returns (scale, zero) in ``param_dtype``: zero = min rounded down,
    scale = (max - zero) / (2**bits - 1) rounded up (at least the dtype's smallest positive value).
    """
    xf = x.float()
    levels = 2 ** bits - 1
    zero = round_toward(xf.amin(dim, keepdim=True), param_dtype, up=False)
    span = xf.amax(dim, keepdim=True) - zero.float()
    tiny = torch.finfo(param_dtype).smallest_normal if param_dtype == torch.bfloat16 else 2.0 ** -24
    # tensor / tensor: IEEE division on every device (CUDA multiplies by the reciprocal of a Python scalar),
    # which the append kernels reproduce bit for bit
    scale = round_toward((span / torch.full_like(span, levels)).clamp_min(tiny), param_dtype, up=True)
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise KVPassError(f"key/value range {xf.abs().max().item():.3g} overflows {param_dtype} "
                          f"scales; pick scale_dtype=torch.float32")
    return scale, zero


def quantize_minmax(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``round((x - zero) / scale)`` clamped to ``[0, 2**bits - 1]``, as uint8 (same shape as x)."""
    q = torch.round((x.float() - zero.float()) / scale.float())
    return q.clamp_(0, 2 ** bits - 1).to(torch.uint8)


def dequantize_minmax(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale + zero`` computed in float32, returned in ``dtype``."""
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def absmax_scale(x: torch.Tensor, qmax: float, dim: int, param_dtype: torch.dtype) -> torch.Tensor:
    """Symmetric scale ``absmax / qmax`` over ``dim`` (kept), rounded up in ``param_dtype``."""
    amax = x.float().abs().amax(dim, keepdim=True)
    scale = round_toward((amax / qmax).clamp_min(2.0 ** -24), param_dtype, up=True)
    if capturing(scale):       # no host read inside a CUDA graph: a device flag, raised after the replay
        flag(~torch.isfinite(scale).all(), NONFINITE)
    elif not torch.isfinite(scale).all():
        raise KVPassError(f"key/value magnitude {amax.max().item():.3g} overflows {param_dtype} scales")
    return scale
