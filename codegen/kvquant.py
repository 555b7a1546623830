"""KVQuant decode attention: non-uniform codes, dense-and-sparse outliers and RoPE re-applied in the kernel,
registered as ``kvpass::kvquant_attention``.

Split-K over the coded positions [s, length) (s = the sink held), plus one program per (batch, kv head)
for the sink, merged by log-sum-exp (:mod:`.decode`). For a tile of positions a program unpacks each
channel's code from the little-endian bit stream (:mod:`kvpass.packing`: any width, a code may straddle two
bytes), looks its level up in the layer's nuq table, scales it by the calibrated per-channel key range and
center (per-token range and center for values), puts the token's exact outliers back in their channels,
and — keys only — rotates the pre-RoPE key by its position: channel i pairs with i +- dims/2, so the
tile is dequantized a second time in partner order and combined with cos/sin of position x inv_freq (the
model's own frequencies and scaling, stored in the cache). Sink keys are pre-RoPE too and are rotated the
same way. The tiles then feed the tensor-core dots; no fp16 copy of the cache is written.

The reference is :meth:`KVQuant.attend` (decode, RoPE, dense attention); like it, the kernel rounds the
pre-RoPE key to the cache dtype before rotating.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.language.extra import libdevice

from .decode import (LOG2E, additive_mask, call_length, dot_precision, flash_init, hide, mask_argument,
                     merged_output, nonempty, online_softmax_step, plan_splits, query_tile, restore_outliers,
                     store_split, visible, workspace)

TUNING = {"block_n": 32, "num_warps": 4, "num_stages": 2}


@triton.jit
def _trig(angle, ACCURATE: tl.constexpr):
    """(cos, sin) of float32 angles: libdevice's (full range reduction: positions reach 1e5 radians) when
    compiled, the interpreter's numpy functions otherwise."""
    if ACCURATE:
        c = libdevice.cos(angle)
        s = libdevice.sin(angle)
    else:
        c = tl.cos(angle)
        s = tl.sin(angle)
    return c, s


@triton.jit
def _codes(base, rows, valid, ch, BITS: tl.constexpr, PKB: tl.constexpr):
    """Codes (N, D) of channels ``ch`` (D,) in packed rows ``rows`` (N,) of ``base`` (PKB bytes a row)."""
    bit = ch * BITS
    lo = bit // 8
    row = base + rows[:, None] * PKB
    b0 = tl.load(row + lo[None, :], mask=valid[:, None], other=0).to(tl.int32)
    if 8 % BITS == 0:               # 1, 2, 4, 8 bits: a code never straddles two bytes
        word = b0
    else:
        b1 = tl.load(row + lo[None, :] + 1, mask=valid[:, None] & (lo + 1 < PKB)[None, :], other=0).to(tl.int32)
        word = b0 | (b1 << 8)
    return (word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _dequant(codes_base, out_base, idx_base, LEVELS, rows, valid, ch, scale, center, BITS: tl.constexpr,
             PKB: tl.constexpr, O: tl.constexpr):
    """Float32 (N, D) entries of channels ``ch``: level * scale + center, the token's O outliers exact."""
    x = tl.load(LEVELS + _codes(codes_base, rows, valid, ch, BITS, PKB)) * scale + center
    return restore_outliers(x, ch, out_base, idx_base, rows, valid, O)


@triton.jit
def _rope(k, kp, pos, d, half, inv_freq, rscale, dt, ACCURATE: tl.constexpr):
    """Rotate pre-RoPE keys k (N, D) float32 (kp: the same keys in partner order) at positions ``pos``; the
    pre-RoPE key is first rounded to ``dt`` as the reference caches it."""
    k = k.to(dt).to(tl.float32)
    kp = kp.to(dt).to(tl.float32)
    c, s = _trig(pos.to(tl.float32)[:, None] * inv_freq[None, :], ACCURATE)
    c = c * rscale
    s = s * rscale
    rotated = tl.where((d < half)[None, :], k * c - kp * s, k * c + kp * s)
    return tl.where((d < 2 * half)[None, :], rotated, k).to(dt)


@triton.jit
def _flash(q, k, v, s_scale, pos, keep, b, tt, mask_w, MASK, acc, m_i, l_i, T: tl.constexpr,
           HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """One flash step over key/value tiles (N, D) in the query dtype, positions ``keep`` allows."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * s_scale
    p, alpha, m_i, l_i = online_softmax_step(hide(s, keep, pos, b, tt, mask_w, MASK, T, HAS_MASK), m_i, l_i)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PREC).to(tl.float32)
    return acc, m_i, l_i


@triton.jit
def _kvquant_kernel(
        Q, KC, VC, VCEN, VRNG, KOUT, VOUT, KIDX, VIDX, KSINK, VSINK, KCEN, KRNG, KLEV, VLEV, FREQ, META,
        LEN, MASK, ACC, M, L, stride_qb, stride_qh, stride_qt, n_splits, chunk, qk_scale, mask_w,
        H: tl.constexpr, R: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
        BITS: tl.constexpr, O: tl.constexpr, NC: tl.constexpr, SINK: tl.constexpr, SINK_CAP: tl.constexpr,
        BLOCK: tl.constexpr, SINK_PART: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        PREC: tl.constexpr, ACCURATE: tl.constexpr):
    """Without SINK_PART: split ``program_id(0)`` of the coded positions; with it: the sink, as the last split."""
    length = tl.minimum(tl.load(LEN).to(tl.int32), NC + SINK)
    s0 = tl.minimum(length, SINK)
    bh, b, h, row_ok, tt, qpos, q_row, q = query_tile(Q, length, stride_qb, stride_qh, stride_qt, H, R, T, ROWS, D)
    d = tl.arange(0, D)
    dt = q.dtype
    # RoPE: rotate-half pairs over the first `dims` channels, scaled by `rscale` (transformers' attention_scaling)
    rscale = tl.load(META)
    half = (tl.load(META + 1) / 2).to(tl.int32)
    partner = tl.where(d < half, d + half, tl.where(d < 2 * half, d - half, d))
    inv_freq = tl.load(FREQ + d % tl.maximum(half, 1), mask=d < 2 * half, other=0.0)
    n = tl.arange(0, BLOCK)
    bh64 = bh.to(tl.int64)
    m_i, l_i, acc = flash_init(ROWS, D)
    if SINK_PART:
        split = n_splits - 1
        for start in range(0, s0, BLOCK):
            pos = start + n
            valid = pos < s0
            at = bh64 * SINK_CAP * D + pos[:, None] * D
            kraw = tl.load(KSINK + at + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            kpar = tl.load(KSINK + at + partner[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            k = _rope(kraw, kpar, pos, d, half, inv_freq, rscale, dt, ACCURATE)
            v = tl.load(VSINK + at + d[None, :], mask=valid[:, None], other=0.0)
            keep = visible(row_ok, valid, pos, qpos, CAUSAL)
            acc, m_i, l_i = _flash(q, k, v, qk_scale, pos, keep, b, tt, mask_w, MASK, acc, m_i, l_i, T, HAS_MASK,
                                   PREC)
    else:
        split = tl.program_id(0)
        PKB: tl.constexpr = D * BITS // 8
        kc = KC + bh64 * NC * PKB
        vc = VC + bh64 * NC * PKB
        kout = KOUT + bh64 * NC * O
        vout = VOUT + bh64 * NC * O
        kidx = KIDX + bh64 * NC * O
        vidx = VIDX + bh64 * NC * O
        kr = tl.load(KRNG + h * D + d).to(tl.float32)[None, :]
        kcn = tl.load(KCEN + h * D + d).to(tl.float32)[None, :]
        kr_p = tl.load(KRNG + h * D + partner).to(tl.float32)[None, :]
        kcn_p = tl.load(KCEN + h * D + partner).to(tl.float32)[None, :]
        lo = s0 + split * chunk
        hi = tl.minimum(lo + chunk, length)
        for start in range(lo, hi, BLOCK):
            pos = start + n
            valid = pos < hi
            row = pos - SINK
            kraw = _dequant(kc, kout, kidx, KLEV, row, valid, d, kr, kcn, BITS, PKB, O)
            kpar = _dequant(kc, kout, kidx, KLEV, row, valid, partner, kr_p, kcn_p, BITS, PKB, O)
            k = _rope(kraw, kpar, pos, d, half, inv_freq, rscale, dt, ACCURATE)
            vr = tl.load(VRNG + bh64 * NC + row, mask=valid, other=0.0).to(tl.float32)[:, None]
            vcn = tl.load(VCEN + bh64 * NC + row, mask=valid, other=0.0).to(tl.float32)[:, None]
            v = _dequant(vc, vout, vidx, VLEV, row, valid, d, vr, vcn, BITS, PKB, O).to(dt)
            keep = visible(row_ok, valid, pos, qpos, CAUSAL)
            acc, m_i, l_i = _flash(q, k, v, qk_scale, pos, keep, b, tt, mask_w, MASK, acc, m_i, l_i, T, HAS_MASK,
                                   PREC)
    store_split(ACC, M, L, acc, m_i, l_i, bh, split, n_splits, R * T, ROWS, D)


@triton_op("kvpass::kvquant_attention", mutates_args={})
def kvquant_attention(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor, v_center: torch.Tensor,
                      v_range: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, k_out_idx: torch.Tensor,
                      v_out_idx: torch.Tensor, k_sink: torch.Tensor, v_sink: torch.Tensor, k_center: torch.Tensor,
                      k_range: torch.Tensor, k_levels: torch.Tensor, v_levels: torch.Tensor,
                      rope_inv_freq: torch.Tensor, rope_meta: torch.Tensor, length: torch.Tensor,
                      attn_mask: torch.Tensor | None, bits: int, sink: int, length_hint: int, scale: float,
                      causal: bool) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) over a KVQuant cache (buffers as in :mod:`kvpass.methods.kvquant` and the
    RoPE parameters the base class keeps) holding ``length`` (0-d int64) tokens; the T queries are the last
    T positions. ``attn_mask``: None or float32 (B, T, W) added to the scores of positions < W.
    ``length_hint``: the length on the host (sizes the split plan), -1 when unknown (a CUDA-graph capture).
    Returns (B, Hq, T, D) in q.dtype."""
    b, hq, t, d = q.shape
    h, nc = k_codes.shape[1], k_codes.shape[2]
    r = hq // h
    o = k_out.shape[-1]
    block = TUNING["block_n"]
    coded = nc if length_hint < 0 else max(length_hint - min(length_hint, sink), 0)
    plan = plan_splits(b * h, coded, r * t, block, q.device)
    splits = plan.splits + 1
    acc, m, l = workspace(splits, r * t, b * h, d, q.device)
    mask, mask_w = mask_argument(attn_mask, q)
    ne = nonempty
    args = (q, ne(k_codes), ne(v_codes), ne(v_center), ne(v_range), ne(k_out), ne(v_out), ne(k_out_idx),
            ne(v_out_idx), ne(k_sink), ne(v_sink), k_center, k_range, k_levels, v_levels, rope_inv_freq, rope_meta,
            length, mask, acc, m, l, q.stride(0), q.stride(1), q.stride(2), splits, plan.chunk, scale * LOG2E,
            mask_w)
    consts = dict(H=h, R=r, T=t, ROWS=plan.rows_pad, D=d, BITS=bits, O=o, NC=nc, SINK=sink,
                  SINK_CAP=max(k_sink.shape[2], 1), BLOCK=block, CAUSAL=causal, HAS_MASK=attn_mask is not None,
                  PREC=dot_precision(q), ACCURATE=os.environ.get("TRITON_INTERPRET") != "1",
                  num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"])
    if plan.splits:
        wrap_triton(_kvquant_kernel)[(plan.splits, b * h)](*args, SINK_PART=False, **consts)
    wrap_triton(_kvquant_kernel)[(1, b * h)](*args, SINK_PART=True, **consts)
    return merged_output(acc, m, l, q, plan.rows_pad, h, wrap_triton)


def supports(scheme, q: torch.Tensor, attn_mask, sliding_window, softcap) -> bool:
    """Whether :func:`attend` handles this call: power-of-two head_dim <= 256, masks shared by all heads, no
    sliding window or soft-capping."""
    d = q.shape[-1]
    return (16 <= d <= 256 and d & (d - 1) == 0 and sliding_window is None and softcap is None
            and (attn_mask is None or attn_mask.dim() != 4 or attn_mask.shape[1] == 1))


def attend(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
           attn_mask: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
    """:meth:`KVQuant.attend` through the kernel: q (B, Hq, T, D) -> (B, Hq, T, D) in q.dtype. ``length``: the
    cached length if known on the host; while a CUDA graph records it is never read."""
    length = call_length(scheme, state, q, attn_mask, length, supports(scheme, q, attn_mask, None, None),
                         "a power-of-two head_dim in [16, 256] and masks shared by all heads")
    b, _, t, d = q.shape
    names = ("k_codes", "v_codes", "v_center", "v_range", "k_out", "v_out", "k_out_idx", "v_out_idx", "k_sink",
             "v_sink", "k_center", "k_range", "k_levels", "v_levels", "rope_inv_freq", "rope_meta")
    return kvquant_attention(q, *(state[n] for n in names), state.length_tensor,
                             additive_mask(attn_mask, b, t, length), scheme.bits, scheme.sink,
                             -1 if length is None else length, d ** -0.5 if scale is None else float(scale), causal)
