"""KVQuant decode attention: non-uniform codes, dense-and-sparse outliers and RoPE re-applied in the kernel,
registered as ``kvpass::kvquant_attention``.

Split-K over the coded positions [s, length) (s = the sink held), plus one program per (batch, kv head)
for the sink, merged by log-sum-exp (:mod:`.decode`). For a tile of positions a program unpacks the codes
from the little-endian bit stream (:mod:`kvpass.packing`: 8 codes fill exactly ``bits`` bytes, so whole
8-channel groups load as one word each), looks each level up in the layer's nuq table, scales it by the
calibrated per-channel key range and center (per-token range and center for values), puts the token's
exact outliers back in their channels, and — keys only — rotates the pre-RoPE key by its position.

The key tile is kept as its two rotate-half halves (partner channels side by side), so each code is read
and dequantized once and RoPE is two multiply-adds per channel pair; the trig comes from angle addition
(:func:`_coded_span`): a per-program table of cos/sin(n theta) for the block's offsets, and the block's
start angle applied to the query rows instead of the keys. Sink keys are pre-RoPE too and are rotated
per element (a few tokens). The tiles then feed the tensor-core dots; no fp16 copy of the cache is written.

Static profile (sm_90, Llama-3-8B decode: D 128, 4 query rows per kv head, bf16, 3 bits, 2 outliers a
token; /tmp-style ``triton.compile`` + cuobjdump, thread-instructions of the main loop per K or V code):
before 170 (255 registers, 600 B of spill stack, 600 spill loads/stores in the loop), after 49 (no spills
in the loop). What is left: the per-row outlier/range vectors are replicated across the tile's threads
(~160 16-bit loads a thread per block) and the level lookup is a gather (pipelined through shared memory).

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

from .decode import (LOG2E, call_length, dot_precision, flash_init, hide, kernel_mask, mask_argument, mask_kind,
                     merged_output, merged_output_lse, nonempty, online_softmax_step, plan_splits, query_tile,
                     restore_outliers, store_split, visible, warp_plan, workspace)

try:
    from . import kvquant_gluon
except ImportError:           # a Triton without Gluon: the Triton loop runs everywhere
    kvquant_gluon = None

# gluon: the Gluon main loop (kvquant_gluon: head_dim 128, 3 bits, full rotary, single tokens) instead of this
# file's where it applies; warps a program (each its own split), programs an SM, the fewest code positions a warp
# takes (fewer programs for short caches: each fills its tables first), whether each tile asks L1 for the next.
TUNING = {"block_n": 16, "num_warps": 2, "num_stages": 2, "programs_per_sm": 16,
          "gluon": {"on": True, "warps": 8, "programs_per_sm": 1, "min_warp_tokens": 64, "prefetch": False}}


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
def _group_codes(base, rows, valid, g, NG: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, PKB: tl.constexpr):
    """Codes (N, 8 * NG) int32 of the channel groups ``g`` (NG,) — group i = channels [8 i, 8 i + 8) — in
    packed rows ``rows`` (N,) of ``base``.

    Eight codes fill exactly BITS bytes, so a group of 8 channels is BITS byte loads per row assembled into
    one little-endian word and cut into its 8 codes by shifts: BITS / 8 loads per code instead of one or
    two byte loads per code."""
    wt: tl.constexpr = tl.uint64 if BITS > 4 else tl.uint32
    at = base + rows[:, None] * PKB + g[None, :] * BITS
    word = tl.load(at, mask=valid[:, None], other=0).to(wt)
    for i in tl.static_range(1, BITS):
        word |= tl.load(at + i, mask=valid[:, None], other=0).to(wt) << (8 * i)
    shift = (tl.arange(0, 8) * BITS).to(wt)
    codes = (word[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (N, 8 * NG)).to(tl.int32)


@triton.jit
def _levels(LEVELS, codes, scale, center):
    """level[code] * scale + center, float32; the 2**bits-entry table stays in L1."""
    return tl.load(LEVELS + codes) * scale + center


@triton.jit
def _restore_pair(lo, hi, ch_lo, ch_hi, OUT, IDX, rows, valid, O: tl.constexpr):
    """``restore_outliers`` for a row split in two halves (N, D/2) float32 of channels ``ch_lo`` / ``ch_hi``
    (D/2,): each outlier is loaded once for both."""
    for i in tl.static_range(O):
        at = tl.load(IDX + rows * O + i, mask=valid, other=0).to(tl.int32)[:, None]
        val = tl.load(OUT + rows * O + i, mask=valid, other=0.0).to(tl.float32)[:, None]
        lo = tl.where(ch_lo[None, :] == at, val, lo)
        hi = tl.where(ch_hi[None, :] == at, val, hi)
    return lo, hi


@triton.jit
def _key_codes(kc, row, valid, groups, ch, BY_GROUP: tl.constexpr, N: tl.constexpr, HALF: tl.constexpr,
               BITS: tl.constexpr, PKB: tl.constexpr):
    """Codes (N, HALF) int32 of one key half: whole channel groups ``groups`` (HALF / 8,) when ``BY_GROUP``
    (the halves are unions of 8-channel groups), else channel by channel ``ch`` (HALF,)."""
    if BY_GROUP:
        codes = _group_codes(kc, row, valid, groups, HALF // 8, N, BITS, PKB)
    else:
        codes = _codes(kc, row, valid, ch, BITS, PKB)
    return codes


@triton.jit
def _split_dot(q, k, PREC: tl.constexpr):
    """q (M, K) float32 . k (N, K)^T in k's dtype with q carried as two k-dtype parts (hi + lo), so a rotated
    float32 query loses no precision on the way into the tensor cores; (M, N) float32."""
    q_hi = q.to(k.dtype)
    s = tl.dot(q_hi, tl.trans(k), input_precision=PREC)
    return tl.dot((q - q_hi.to(tl.float32)).to(k.dtype), tl.trans(k), acc=s, input_precision=PREC)


@triton.jit
def _value_tile(vc, vout, vidx, VLEV, VRNG, VCEN, row, valid, bh64, dt, NC: tl.constexpr, D: tl.constexpr,
                BLOCK: tl.constexpr, BITS: tl.constexpr, PKB: tl.constexpr, O: tl.constexpr):
    """Dequantized values (BLOCK, D) in ``dt`` of coded rows ``row``: per-token range and center, outliers exact."""
    vr = tl.load(VRNG + bh64 * NC + row, mask=valid, other=0.0).to(tl.float32)[:, None]
    vcn = tl.load(VCEN + bh64 * NC + row, mask=valid, other=0.0).to(tl.float32)[:, None]
    v = _levels(VLEV, _group_codes(vc, row, valid, tl.arange(0, D // 8), D // 8, BLOCK, BITS, PKB), vr, vcn)
    return restore_outliers(v, tl.arange(0, D), vout, vidx, row, valid, O).to(dt)


@triton.jit
def _coded_span(q_row, row_ok, qpos, b, tt, acc, m_i, l_i, kc, vc, kout, vout, kidx, vidx, KLEV, VLEV, KRNG,
                KCEN, VRNG, VCEN, FREQ, MASK, rscale, half, lo, hi, h, bh64, qk_scale, mask_w, dt,
                D: tl.constexpr, NC: tl.constexpr, SINK: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
                O: tl.constexpr, T: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                PREC: tl.constexpr, ACCURATE: tl.constexpr, BY_GROUP: tl.constexpr):
    """Flash steps over coded positions [lo, hi); RoPE rotates pairs (i, i + half) for i < half <= D/2
    (BY_GROUP: half is a multiple of 8, so the key codes load by whole 8-channel groups).

    The key splits into two halves of D/2 channels, pair partners side by side: ch_lo = [0, half) then
    [2 half, half + D/2), ch_hi = [half, 2 half) then [half + D/2, D) — unrotated channels pair with each
    other at angle 0 (inv_freq is 0 past half). Each key code is read and dequantized once, into its half.
    RoPE by angle addition: R(start + n) = R(start) R(n) and q . R(start) R(n) k = (R(start)^T q) . (R(n) k),
    so the keys turn by the program's fixed table cos/sin(n theta) (BLOCK, D/2) and the query rows by the
    block's start angle, advanced per block by one rotation of BLOCK theta: D/2 multiplies a block instead
    of BLOCK x D trig. This is exact math, so the angles match the reference's fl(pos x theta) up to float32
    rounding (both within ~pos x theta x 2^-24 rad)."""
    HALF: tl.constexpr = D // 2
    PKB: tl.constexpr = D * BITS // 8
    j = tl.arange(0, HALF)
    rot = j < half
    ch_lo = tl.where(rot, j, half + j)
    ch_hi = tl.where(rot, half + j, HALF + j)
    gi = tl.arange(0, HALF // 8)
    g_lo = tl.where(gi < half // 8, gi, gi + half // 8)
    g_hi = tl.where(gi < half // 8, gi + half // 8, gi + HALF // 8)
    n = tl.arange(0, BLOCK)
    theta = tl.load(FREQ + j, mask=rot, other=0.0)
    cos_n, sin_n = _trig(n.to(tl.float32)[:, None] * theta[None, :], ACCURATE)          # (BLOCK, HALF)
    cos_b, sin_b = _trig(BLOCK * theta, ACCURATE)
    cos_s, sin_s = _trig(lo.to(tl.float32) * theta, ACCURATE)
    rs = tl.where(rot, rscale, 1.0)[None, :]
    q_lo = tl.load(q_row[:, None] + ch_lo[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * rs
    q_hi = tl.load(q_row[:, None] + ch_hi[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * rs
    rng_lo = tl.load(KRNG + h * D + ch_lo).to(tl.float32)[None, :]
    rng_hi = tl.load(KRNG + h * D + ch_hi).to(tl.float32)[None, :]
    cen_lo = tl.load(KCEN + h * D + ch_lo).to(tl.float32)[None, :]
    cen_hi = tl.load(KCEN + h * D + ch_hi).to(tl.float32)[None, :]
    for start in range(lo, hi, BLOCK):
        pos = start + n
        valid = pos < hi
        row = pos - SINK
        k_lo = _levels(KLEV, _key_codes(kc, row, valid, g_lo, ch_lo, BY_GROUP, BLOCK, HALF, BITS, PKB), rng_lo,
                       cen_lo)
        k_hi = _levels(KLEV, _key_codes(kc, row, valid, g_hi, ch_hi, BY_GROUP, BLOCK, HALF, BITS, PKB), rng_hi,
                       cen_hi)
        k_lo, k_hi = _restore_pair(k_lo, k_hi, ch_lo, ch_hi, kout, kidx, row, valid, O)
        k_lo = k_lo.to(dt).to(tl.float32)                     # the reference caches the pre-RoPE key in dt
        k_hi = k_hi.to(dt).to(tl.float32)
        r_lo = (k_lo * cos_n - k_hi * sin_n).to(dt)
        r_hi = (k_hi * cos_n + k_lo * sin_n).to(dt)
        qs_lo = q_lo * cos_s[None, :] + q_hi * sin_s[None, :]                               # R(start)^T q
        qs_hi = q_hi * cos_s[None, :] - q_lo * sin_s[None, :]
        s = (_split_dot(qs_lo, r_lo, PREC) + _split_dot(qs_hi, r_hi, PREC)) * qk_scale
        keep = visible(row_ok, valid, pos, qpos, CAUSAL)
        p, alpha, m_i, l_i = online_softmax_step(hide(s, keep, pos, b, tt, mask_w, MASK, T, HAS_MASK), m_i, l_i)
        v = _value_tile(vc, vout, vidx, VLEV, VRNG, VCEN, row, valid, bh64, dt, NC, D, BLOCK, BITS, PKB, O)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PREC).to(tl.float32)
        cos_s, sin_s = cos_s * cos_b - sin_s * sin_b, sin_s * cos_b + cos_s * sin_b
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
        kc = KC + bh64 * NC * (D * BITS // 8)
        vc = VC + bh64 * NC * (D * BITS // 8)
        outs = bh64 * NC * O
        lo = s0 + split * chunk
        hi = tl.minimum(lo + chunk, length)
        if half % 8 == 0:             # full rotary and the common partial ones: key codes by whole groups
            acc, m_i, l_i = _coded_span(
                q_row, row_ok, qpos, b, tt, acc, m_i, l_i, kc, vc, KOUT + outs, VOUT + outs, KIDX + outs,
                VIDX + outs, KLEV, VLEV, KRNG, KCEN, VRNG, VCEN, FREQ, MASK, rscale, half, lo, hi, h, bh64, qk_scale,
                mask_w, dt, D, NC, SINK, BLOCK, BITS, O, T, CAUSAL, HAS_MASK, PREC, ACCURATE, True)
        else:
            acc, m_i, l_i = _coded_span(
                q_row, row_ok, qpos, b, tt, acc, m_i, l_i, kc, vc, KOUT + outs, VOUT + outs, KIDX + outs,
                VIDX + outs, KLEV, VLEV, KRNG, KCEN, VRNG, VCEN, FREQ, MASK, rscale, half, lo, hi, h, bh64, qk_scale,
                mask_w, dt, D, NC, SINK, BLOCK, BITS, O, T, CAUSAL, HAS_MASK, PREC, ACCURATE, False)
    store_split(ACC, M, L, acc, m_i, l_i, bh, split, n_splits, R * T, ROWS, D)


@triton_op("kvpass::kvquant_attention", mutates_args={})
def kvquant_attention(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor, v_center: torch.Tensor,
                      v_range: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, k_out_idx: torch.Tensor,
                      v_out_idx: torch.Tensor, k_sink: torch.Tensor, v_sink: torch.Tensor, k_center: torch.Tensor,
                      k_range: torch.Tensor, k_levels: torch.Tensor, v_levels: torch.Tensor,
                      rope_inv_freq: torch.Tensor, rope_meta: torch.Tensor, length: torch.Tensor,
                      attn_mask: torch.Tensor | None, bits: int, sink: int, length_hint: int, scale: float,
                      causal: bool, rotary_full: bool) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) over a KVQuant cache (buffers as in :mod:`kvpass.methods.kvquant` and the
    RoPE parameters the base class keeps) holding ``length`` (0-d int64) tokens; the T queries are the last
    T positions. ``attn_mask``: None or float32 (B, T, W) added to the scores of positions < W.
    ``length_hint``: the length on the host (sizes the split plan), -1 when unknown (a CUDA-graph capture).
    ``rotary_full``: RoPE rotates all D channels (the Gluon loop takes only that). Returns (B, Hq, T, D) in
    q.dtype."""
    acc, m, l, rows_pad = _kvquant_splits(q, k_codes, v_codes, v_center, v_range, k_out, v_out, k_out_idx,
                                          v_out_idx, k_sink, v_sink, k_center, k_range, k_levels, v_levels,
                                          rope_inv_freq, rope_meta, length, attn_mask, bits, sink, length_hint,
                                          scale, causal, rotary_full)
    return merged_output(acc, m, l, q, rows_pad, k_codes.shape[1], wrap_triton)


@triton_op("kvpass::kvquant_attention_lse", mutates_args={})
def kvquant_attention_lse(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor, v_center: torch.Tensor,
                          v_range: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, k_out_idx: torch.Tensor,
                          v_out_idx: torch.Tensor, k_sink: torch.Tensor, v_sink: torch.Tensor,
                          k_center: torch.Tensor, k_range: torch.Tensor, k_levels: torch.Tensor,
                          v_levels: torch.Tensor, rope_inv_freq: torch.Tensor, rope_meta: torch.Tensor,
                          length: torch.Tensor, attn_mask: torch.Tensor | None, bits: int, sink: int,
                          length_hint: int, scale: float, causal: bool,
                          rotary_full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvquant_attention` as one part of a larger key set (a sequence-parallel rank's slice): returns
    (out (B, Hq, T, D) float32, lse (B, Hq, T) float32, natural log; -inf and zeros where no key is visible)."""
    acc, m, l, _ = _kvquant_splits(q, k_codes, v_codes, v_center, v_range, k_out, v_out, k_out_idx, v_out_idx,
                                   k_sink, v_sink, k_center, k_range, k_levels, v_levels, rope_inv_freq, rope_meta,
                                   length, attn_mask, bits, sink, length_hint, scale, causal, rotary_full)
    return merged_output_lse(acc, m, l, q.shape, k_codes.shape[1])


def _kvquant_splits(q, k_codes, v_codes, v_center, v_range, k_out, v_out, k_out_idx, v_out_idx, k_sink, v_sink,
                    k_center, k_range, k_levels, v_levels, rope_inv_freq, rope_meta, length, attn_mask, bits, sink,
                    length_hint, scale, causal, rotary_full):
    """Launch the code splits (this file's loop or the Gluon one) and the sink program; returns the workspace
    (acc, m, l) and the padded row count."""
    b, hq, t, d = q.shape
    h, nc = k_codes.shape[1], k_codes.shape[2]
    r = hq // h
    o = k_out.shape[-1]
    block = TUNING["block_n"]
    coded = nc if length_hint < 0 else max(length_hint - min(length_hint, sink), 0)
    gluon = TUNING["gluon"]
    use_gluon = (gluon["on"] and kvquant_gluon is not None and coded > 0
                 and kvquant_gluon.applies(q, bits, o, r, rotary_full))
    if use_gluon:
        plan = warp_plan(b * h, coded, r * t, q.device, gluon["warps"], gluon["programs_per_sm"],
                         gluon["min_warp_tokens"])
        splits = plan.programs * gluon["warps"] + 1
    else:
        plan = plan_splits(b * h, coded, r * t, block, q.device, TUNING["programs_per_sm"])
        splits = plan.splits + 1
    acc, m, l = workspace(splits, r * t, b * h, d, q.device)
    mask, mask_w = mask_argument(attn_mask, q)
    ne = nonempty
    args = (q, ne(k_codes), ne(v_codes), ne(v_center), ne(v_range), ne(k_out), ne(v_out), ne(k_out_idx),
            ne(v_out_idx), ne(k_sink), ne(v_sink), k_center, k_range, k_levels, v_levels, rope_inv_freq, rope_meta,
            length, mask, acc, m, l, q.stride(0), q.stride(1), q.stride(2), splits, plan.chunk, scale * LOG2E,
            mask_w)
    consts = dict(H=h, R=r, T=t, ROWS=plan.rows_pad, D=d, BITS=bits, O=o, NC=nc, SINK=sink,
                  SINK_CAP=max(k_sink.shape[2], 1), BLOCK=block, CAUSAL=causal, HAS_MASK=mask_kind(attn_mask),
                  PREC=dot_precision(q), ACCURATE=os.environ.get("TRITON_INTERPRET") != "1",
                  num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"])
    if use_gluon:
        torch.ops.kvpass.kvquant_gluon_main(q, k_codes, v_codes, v_center, v_range, ne(k_out), ne(v_out),
                                            ne(k_out_idx), ne(v_out_idx), k_center, k_range, k_levels, v_levels,
                                            rope_inv_freq, rope_meta, length, acc, m, l, attn_mask, r, plan.programs,
                                            plan.chunk, sink, scale * LOG2E, gluon["warps"], gluon["prefetch"])
    elif plan.splits:
        wrap_triton(_kvquant_kernel)[(plan.splits, b * h)](*args, SINK_PART=False, **consts)
    wrap_triton(_kvquant_kernel)[(1, b * h)](*args, SINK_PART=True, **consts)
    return acc, m, l, plan.rows_pad


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
    return kvquant_attention(*_op_arguments(scheme, state, q, scale, causal, attn_mask, length))


def attend_lse(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
               attn_mask: torch.Tensor | None = None, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` returning the float32 pair (out, lse) of ``Scheme.attend(..., return_lse=True)``."""
    return kvquant_attention_lse(*_op_arguments(scheme, state, q, scale, causal, attn_mask, length))


def _op_arguments(scheme, state, q, scale, causal, attn_mask, length) -> tuple:
    """The arguments of ``kvpass::kvquant_attention`` / ``kvquant_attention_lse``."""
    length = call_length(scheme, state, q, attn_mask, length, supports(scheme, q, attn_mask, None, None),
                         "a power-of-two head_dim in [16, 256] and masks shared by all heads")
    b, _, t, d = q.shape
    names = ("k_codes", "v_codes", "v_center", "v_range", "k_out", "v_out", "k_out_idx", "v_out_idx", "k_sink",
             "v_sink", "k_center", "k_range", "k_levels", "v_levels", "rope_inv_freq", "rope_meta")
    return (q, *(state[n] for n in names), state.length_tensor, kernel_mask(attn_mask, b, t, length),
            scheme.bits, scheme.sink, -1 if length is None else length, d ** -0.5 if scale is None else float(scale),
            causal, state.rotary_dims == d and state.positions is None)
