"""KIVI append as two Triton launches (``kvpass::kivi_append``): flush, then ring write; a decode step's
few tokens in one launch (flush, barrier, ring write in one program per batch x kv head).

The reference is :meth:`kvpass.methods.kivi.KIVI._append`. With ``start`` = tokens cached before the call
(read from the state's length tensor on the device, so a captured decode step needs no host sync) and
``end`` = start + T:
1. **flush**: key groups [q0, q1) of G tokens that now lie wholly outside the residual window are quantized
   per channel (min/max over the group's G tokens) and packed; values [q0v, q1v) per token (min/max over
   each G channels). A token being flushed is read from the ring if it was cached before (pos < start), else
   from the new tokens. One program per key group or per block of value tokens and (batch, kv head).
2. **ring write**: new tokens that stay in full precision go to ring slot pos % W. It is a separate launch
   because a new token may take the ring slot of an older one being flushed.
Scales and zero-points round exactly as :func:`kvpass.quant.minmax_params` (zero down, scale up to fp16;
IEEE division; round-half-even codes), so the packed bytes equal the reference's bit for bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .decode import nonempty

VALUE_BLOCK = 16       # value tokens per flush program


@triton.jit
def _f16_toward(x, UP: tl.constexpr):
    """float32 -> float16 rounded toward +inf (UP) or -inf: round to nearest, then one ulp if it went the
    wrong way (the same result as :func:`kvpass.quant.round_toward`)."""
    y = x.to(tl.float16)
    yf = y.to(tl.float32)
    bits = y.to(tl.int16, bitcast=True).to(tl.int32)
    if UP:
        wrong = yf < x
        step = tl.where(yf == 0.0, 1 - bits, tl.where(yf < 0.0, -1, 1))          # 0 -> smallest positive
    else:
        wrong = yf > x
        step = tl.where(yf == 0.0, 0x8001 - bits, tl.where(yf > 0.0, -1, 1))     # 0 -> smallest negative
    fixed = (bits + step).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.where(wrong, fixed, y)


@triton.jit
def _round_half_even(t):
    r = tl.floor(t + 0.5)
    tie = (r - t) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _quantize(x, lo, hi, LEVELS: tl.constexpr):
    """x (..., n) with its min lo / max hi (broadcastable): (codes int32, scale fp16, zero fp16)."""
    zero = _f16_toward(lo, False)
    span = hi - zero.to(tl.float32)
    scale = _f16_toward(tl.maximum(tl.math.div_rn(span, tl.full(span.shape, LEVELS, tl.float32)), 2.0 ** -24),
                        True)
    t = tl.math.div_rn(x - zero.to(tl.float32), scale.to(tl.float32))
    codes = tl.minimum(tl.maximum(_round_half_even(t), 0.0), LEVELS * 1.0).to(tl.int32)
    return codes, scale, zero


@triton.jit
def _pack(codes, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(N, D) int32 codes -> (N, D*BITS/8) uint8 in planar order (:func:`kvpass.packing.pack_planar`):
    code i*PK + j in byte j at bit i*BITS, PK = D*BITS/8."""
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        out = codes.to(tl.uint8)
    else:
        c3 = tl.reshape(codes, (N, PER, D // PER))
        shifts = tl.arange(0, PER) * BITS
        out = tl.sum(c3 << shifts[None, :, None], 1).to(tl.uint8)
    return out


@triton.jit
def _flush_key_group(K, KC, KS, KZ, KW, bh, start, g0, T, D: tl.constexpr, BITS: tl.constexpr,
                     G: tl.constexpr, NK_CAP: tl.constexpr, WK: tl.constexpr):
    """Quantize and pack key group [g0, g0 + G): per channel over the group's tokens (older ones from the
    ring, the rest from the new tokens)."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    PK: tl.constexpr = D * BITS // 8
    d = tl.arange(0, D)
    pos = g0 + tl.arange(0, G)
    old = pos < start
    x = tl.load(KW + bh * WK * D + (pos % WK)[:, None] * D + d[None, :], mask=old[:, None], other=0.0)
    x_new = tl.load(K + bh * T * D + (pos - start)[:, None] * D + d[None, :], mask=~old[:, None], other=0.0)
    x = tl.where(old[:, None], x, x_new).to(tl.float32)                 # (G, D)
    codes, scale, zero = _quantize(x, tl.min(x, 0)[None, :], tl.max(x, 0)[None, :], LEVELS)
    byte = tl.arange(0, PK)
    tl.store(KC + bh * NK_CAP * PK + pos[:, None] * PK + byte[None, :], _pack(codes, G, D, BITS))
    grp = bh * (NK_CAP // G) * D + (g0 // G) * D + d
    tl.store(KS + grp, tl.reshape(scale, (D,)))
    tl.store(KZ + grp, tl.reshape(zero, (D,)))


@triton.jit
def _flush_values(V, VC, VS, VZ, VW, bh, start, p0, q1, T, D: tl.constexpr, BITS: tl.constexpr,
                  G: tl.constexpr, NV_CAP: tl.constexpr, WV: tl.constexpr, VB: tl.constexpr):
    """Quantize and pack value tokens [p0, min(p0 + VB, q1)): per token over each G channels."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    PK: tl.constexpr = D * BITS // 8
    GV: tl.constexpr = D // G
    d = tl.arange(0, D)
    pos = p0 + tl.arange(0, VB)
    ok = pos < q1
    old = pos < start
    x = tl.load(VW + bh * WV * D + (pos % WV)[:, None] * D + d[None, :], mask=(ok & old)[:, None], other=0.0)
    x_new = tl.load(V + bh * T * D + (pos - start)[:, None] * D + d[None, :], mask=(ok & ~old)[:, None],
                    other=0.0)
    x3 = tl.reshape(tl.where(old[:, None], x, x_new).to(tl.float32), (VB, GV, G))
    codes3, scale, zero = _quantize(x3, tl.min(x3, 2)[:, :, None], tl.max(x3, 2)[:, :, None], LEVELS)
    byte = tl.arange(0, PK)
    tl.store(VC + bh * NV_CAP * PK + pos[:, None] * PK + byte[None, :],
             _pack(tl.reshape(codes3, (VB, D)), VB, D, BITS), mask=ok[:, None])
    gv = tl.arange(0, GV)
    sz = bh * NV_CAP * GV + pos[:, None] * GV + gv[None, :]
    tl.store(VS + sz, tl.reshape(scale, (VB, GV)), mask=ok[:, None])
    tl.store(VZ + sz, tl.reshape(zero, (VB, GV)), mask=ok[:, None])


@triton.jit
def _ring_write(K, V, KW, VW, bh, start, i, T, D: tl.constexpr, G: tl.constexpr, RESIDUAL: tl.constexpr,
                WK: tl.constexpr, WV: tl.constexpr):
    """New tokens ``i`` (N,) that stay in full precision to their ring slots pos % W."""
    end = start + T
    qk = tl.maximum(end - RESIDUAL, 0) // G * G
    qv = tl.maximum(end - RESIDUAL, 0)
    pos = start + i
    d = tl.arange(0, D)
    src = bh * T * D + i[:, None] * D + d[None, :]
    inside = i < T
    keep_k = inside & (pos >= qk)
    keep_v = inside & (pos >= qv)
    tl.store(KW + bh * WK * D + (pos % WK)[:, None] * D + d[None, :],
             tl.load(K + src, mask=keep_k[:, None], other=0.0), mask=keep_k[:, None])
    tl.store(VW + bh * WV * D + (pos % WV)[:, None] * D + d[None, :],
             tl.load(V + src, mask=keep_v[:, None], other=0.0), mask=keep_v[:, None])


@triton.jit
def _flush_kernel(K, V, LEN, KC, KS, KZ, KW, VC, VS, VZ, VW, T,
                  H: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                  RESIDUAL: tl.constexpr, NK_CAP: tl.constexpr, NV_CAP: tl.constexpr, WK: tl.constexpr,
                  WV: tl.constexpr, KEY_PROGRAMS: tl.constexpr, VB: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    start = tl.load(LEN).to(tl.int32)
    end = start + T
    if tl.maximum(end - RESIDUAL, 0) > NV_CAP:
        return      # past the capacity (a captured step flags it): write nothing out of bounds
    if pid < KEY_PROGRAMS:
        q0 = tl.maximum(start - RESIDUAL, 0) // G * G
        q1 = tl.maximum(end - RESIDUAL, 0) // G * G
        g0 = q0 + pid * G
        if g0 < q1:
            _flush_key_group(K, KC, KS, KZ, KW, bh, start, g0, T, D, BITS, G, NK_CAP, WK)
    else:
        q0 = tl.maximum(start - RESIDUAL, 0)
        q1 = tl.maximum(end - RESIDUAL, 0)
        p0 = q0 + (pid - KEY_PROGRAMS) * VB
        if p0 < q1:
            _flush_values(V, VC, VS, VZ, VW, bh, start, p0, q1, T, D, BITS, G, NV_CAP, WV, VB)


@triton.jit
def _small_append_kernel(K, V, LEN, KC, KS, KZ, KW, VC, VS, VZ, VW, T,
                         H: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                         RESIDUAL: tl.constexpr, NK_CAP: tl.constexpr, NV_CAP: tl.constexpr, WK: tl.constexpr,
                         WV: tl.constexpr, VB: tl.constexpr):
    """A decode step's append (T <= min(G, VB)) in one launch, one program per (batch, kv head): at most one
    key group and T value tokens to flush, then — after a barrier, as the flush may read the ring slots the
    new tokens take — the ring write."""
    bh = tl.program_id(1).to(tl.int64)
    start = tl.load(LEN).to(tl.int32)
    end = start + T
    if tl.maximum(end - RESIDUAL, 0) > NV_CAP:
        return      # past the capacity (a captured step flags it): write nothing out of bounds
    g0 = tl.maximum(start - RESIDUAL, 0) // G * G
    if g0 < tl.maximum(end - RESIDUAL, 0) // G * G:
        _flush_key_group(K, KC, KS, KZ, KW, bh, start, g0, T, D, BITS, G, NK_CAP, WK)
    p0 = tl.maximum(start - RESIDUAL, 0)
    q1 = tl.maximum(end - RESIDUAL, 0)
    if p0 < q1:
        _flush_values(V, VC, VS, VZ, VW, bh, start, p0, q1, T, D, BITS, G, NV_CAP, WV, VB)
    tl.debug_barrier()
    _ring_write(K, V, KW, VW, bh, start, tl.arange(0, VB), T, D, G, RESIDUAL, WK, WV)


@triton.jit
def _ring_write_kernel(K, V, LEN, KW, VW, T, D: tl.constexpr, G: tl.constexpr, RESIDUAL: tl.constexpr,
                       WK: tl.constexpr, WV: tl.constexpr, BLOCK_T: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    start = tl.load(LEN).to(tl.int32)
    _ring_write(K, V, KW, VW, bh, start, blk * BLOCK_T + tl.arange(0, BLOCK_T), T, D, G, RESIDUAL, WK, WV)


@triton_op("kvpass::kivi_append", mutates_args={"k_codes", "k_scale", "k_zero", "k_window", "v_codes",
                                                 "v_scale", "v_zero", "v_window"})
def kivi_append(k: torch.Tensor, v: torch.Tensor, length: torch.Tensor, k_codes: torch.Tensor,
                k_scale: torch.Tensor, k_zero: torch.Tensor, k_window: torch.Tensor, v_codes: torch.Tensor,
                v_scale: torch.Tensor, v_zero: torch.Tensor, v_window: torch.Tensor, bits: int, group_size: int,
                residual: int) -> None:
    """Append k, v (B, H, T, D) contiguous, in the window dtype, to a KIVI cache holding ``length`` (0-d int64,
    not updated here) tokens; the buffers are those of :mod:`kvpass.methods.kivi` (fp16 scales)."""
    b, h, t, d = k.shape
    g = group_size
    key_programs = (t + g - 1) // g + 1                # groups that can complete in one call
    value_programs = (t + VALUE_BLOCK - 1) // VALUE_BLOCK + 1
    wk, wv = max(k_window.shape[2], 1), max(v_window.shape[2], 1)
    ne = nonempty
    if t <= min(g, VALUE_BLOCK):                       # a decode step: one launch
        wrap_triton(_small_append_kernel)[(1, b * h)](
            k, v, length, ne(k_codes), ne(k_scale), ne(k_zero), ne(k_window), ne(v_codes), ne(v_scale),
            ne(v_zero), ne(v_window), t, H=h, D=d, BITS=bits, G=g, RESIDUAL=residual, NK_CAP=k_codes.shape[2],
            NV_CAP=v_codes.shape[2], WK=wk, WV=wv, VB=VALUE_BLOCK)
        return
    wrap_triton(_flush_kernel)[(key_programs + value_programs, b * h)](
        k, v, length, ne(k_codes), ne(k_scale), ne(k_zero), ne(k_window), ne(v_codes), ne(v_scale), ne(v_zero),
        ne(v_window), t, H=h, D=d, BITS=bits, G=g, RESIDUAL=residual, NK_CAP=k_codes.shape[2],
        NV_CAP=v_codes.shape[2], WK=wk, WV=wv, KEY_PROGRAMS=key_programs, VB=VALUE_BLOCK)
    block_t = 16
    wrap_triton(_ring_write_kernel)[(triton.cdiv(t, block_t), b * h)](
        k, v, length, ne(k_window), ne(v_window), t, D=d, G=g, RESIDUAL=residual, WK=wk, WV=wv, BLOCK_T=block_t)


def supports(scheme, k: torch.Tensor) -> bool:
    """Whether :func:`append` covers this scheme and input (else the PyTorch reference runs)."""
    d, g = k.shape[-1], scheme.group_size
    return (scheme.bits in (1, 2, 4, 8) and scheme.scale_dtype == torch.float16 and d & (d - 1) == 0
            and g & (g - 1) == 0 and g <= d and d * scheme.bits // 8 >= 1 and math.prod(k.shape) < 2 ** 31)


def append(scheme, state, k: torch.Tensor, v: torch.Tensor) -> None:
    """:meth:`KIVI._append` through the kernels (k, v already validated by :meth:`Scheme.append`)."""
    kivi_append(k.contiguous(), v.contiguous(), state.length_tensor, state["k_codes"], state["k_scale"],
                state["k_zero"], state["k_window"], state["v_codes"], state["v_scale"], state["v_zero"],
                state["v_window"], scheme.bits, scheme.group_size, scheme.residual)
