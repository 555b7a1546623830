"""KIVI decode attention as one split-K Triton kernel (plus the shared merge), registered as
``kvpass::kivi_attention`` with :func:`torch.library.triton_op` so Inductor can see into it.

Programs 0..S-1 each own a span of whole blocks of GPB key groups below ``nk`` (the first position whose
key is still in the full-precision ring): there keys and values are both quantized, so the loop has no
position masks. It loads packed codes and dequantizes them in registers — keys per channel with the
scale/zero of their group of G tokens, values per token with one scale/zero per G channels — and feeds
them to the tensor-core dots; no fp16 copy of the cache is ever written. The last program takes the rest:
leftover groups, keys in the ring, values quantized below ``nv`` and then in the ring, each position
picking its source by masked loads (masked-off lanes read no memory). The splits merge by log-sum-exp
(:mod:`.decode`). The reference is :meth:`kvpass.methods.kivi.KIVI.attend`.

Measured on the H200 (bench/results/decode_attention.json) this Triton main loop is only 1.08-1.33x bf16
SDPA although it reads 5.3x fewer bytes: it is bound by instructions and latency, 5.5 per code in the sm_90
build with paired dequantization (10-12 before it: unpack, convert, dequantize, register moves, shared-memory
round trips to the tensor-core operand layouts). The main-loop variants (reshape / group, word loads, scale
folding, magic-number conversion, pairs) are the steps tried; their sweeps are in the result file. Where it
applies (KIVI-2 at head_dim 128, single tokens: TUNING "gluon") the main programs run the Gluon loop of
:mod:`.kivi_gluon` instead (1.21-2.47x), and this file's tail launch and merge finish the call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .decode import (LOG2E, call_length, dot_precision, flash_init, hide, kernel_mask, mask_argument, mask_block,
                     mask_kind, merged_output, merged_output_lse, nonempty, online_softmax_step, plan_splits,
                     query_rows, store_split, visible, workspace)
from .ring import RingPart, ring_arguments, ring_program

try:
    from . import kivi_gluon
except ImportError:           # a Triton without Gluon: the Triton main loop runs everywhere
    kivi_gluon = None

# Launch parameters, tuned on the H200 by bench/decode_attention.py --tune (sum of the CUDA-graph times
# at 1 x 128K and 8 x 128K, Llama-3-8B shapes; bench/results/decode_attention.json). "main": which main
# loop runs where both apply — "group" (_kivi_main_group) needs a bit slot inside one value group
# (head_dim * bits / 8 <= group_size: 2 bits at head_dim 128, group 32), else "reshape" (_kivi_main) runs.
# group: words (32-bit code loads), fold (scales folded into q and p), magic (int->float by mantissa OR),
# pairs (with words, without fold: two codes per packed inline-PTX dequantization, in the scales' type);
# adjacent (with pairs): the pairs are channels (4w, 4w + 1) and (4w + 2, 4w + 3), whose scales load as one
# 32-bit word (sm_90 build: 571 instead of 705 instructions a step, 128 instead of 100 registers; on the
# H200 837.1 against 867.7 us, and ahead of itself under register caps of 112 and 96 or at 24 programs an SM).
# gluon: the Gluon main loop (kivi_gluon: KIVI-2 at head_dim 128, single tokens) instead of the group loop where it
# applies — programs_per_sm and prefetch swept on the H200 (decode_attention.json sweep_gluon: 32 with prefetch,
# 469 us against 837 for the group loop at 1 x 128K + 8 x 128K); a duo layer's rings then run in the tail launch,
# which costs more than it saves below duo_min_tokens (batch x cached tokens; duo_speed.json, its main run against
# the group loop with the rings in the main launch in `previous`: 1 x 32K 52.0 against 37.1 us, 1 x 128K 73.9
# against 70.0, 8 x 32K 95.5 against 114.5).
# programs_per_sm: how many split programs per SM the launch plans for (more hide more latency);
# maxnreg: a register cap (more programs resident per SM, at the price of spills), None: the compiler's.
# tail_programs: programs per (batch, kv head) in the tail launch (the fp16 window and leftover groups), each
# taking every tail_programs-th block of TAIL_N positions: more shorten its serial chain of blocks.
# tail_stages: the tail launch's software-pipeline depth (None: the main loop's); its sm_90 build takes 95 KB
# of shared memory a program at 3 stages (2 programs an SM), 13 KB at 1.
# rings: where a duo layer's rings are attended ("main": ahead of the main launch's split programs when it has
# any; "tail": in the tail launch); ring_tile_main: their tile in the main launch (16 keeps it at 128
# registers on sm_90, as without rings; 32 takes 145 and costs the main loop programs an SM)
TUNING = {"main": "group", "tail_programs": 5, "tail_stages": 1, "rings": "main", "ring_tile_main": 16,
          "group": {"num_warps": 2, "num_stages": 3, "words": True, "fold": False, "magic": False, "pairs": True,
                    "adjacent": True, "programs_per_sm": 16, "maxnreg": None},
          "reshape": {"groups_per_block": 2, "num_warps": 2, "num_stages": 2, "programs_per_sm": 16},
          "gluon": {"on": True, "programs_per_sm": 32, "prefetch": 1, "duo_min_tokens": 1 << 18}}


@triton.jit
def _unpack_tile(packed, BITS: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    """(N, D*BITS/8) uint8 bytes -> (N, D) int32 codes of the planar packing
    (:func:`kvpass.packing.pack_planar`): code i*PK + j sits in byte j at bit i*BITS."""
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        out = packed.to(tl.int32)
    else:
        shifts = tl.arange(0, PER) * BITS
        codes = (packed.to(tl.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        out = tl.reshape(codes, (N, D))
    return out


@triton.jit
def _expand_rows(x, A: tl.constexpr, REP: tl.constexpr, C: tl.constexpr):
    """(A, C) -> (A * REP, C): each row repeated REP times (in registers)."""
    return tl.reshape(tl.broadcast_to(x[:, None, :], (A, REP, C)), (A * REP, C))


@triton.jit
def _expand_cols(x, N: tl.constexpr, A: tl.constexpr, REP: tl.constexpr):
    """(N, A) -> (N, A * REP): each column repeated REP times (in registers)."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], (N, A, REP)), (N, A * REP))


@triton.jit
def _softmax_block(s, pos, qpos, row_ok, tt, b, mask_w, MASK, m_i, l_i, T: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_MASK: tl.constexpr):
    """Main-loop flash step on base-2 scores s (ROWS, BLOCK) of fully valid positions: causal hiding
    (only with several new tokens), the additive mask (B, T, mask_w) if any (positions past its width are
    not masked), then the online softmax."""
    if CAUSAL and T > 1:
        s = tl.where(pos[None, :] <= qpos[:, None], s, float("-inf"))
    if HAS_MASK:
        s += mask_block(MASK, b, tt, pos, mask_w, row_ok[:, None], T, HAS_MASK)
    return online_softmax_step(s, m_i, l_i)


@triton.jit
def _kivi_main(q, qpos, row_ok, tt, b, mask_w, start_pos, end_pos, qk_scale, MASK, kc_base, ks_base,
               vc_base, vs_base, KS, KZ, VS, VZ, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
               G: tl.constexpr, GPB: tl.constexpr, T: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """Positions [start_pos, end_pos), whole blocks of GPB key groups: keys and values both quantized,
    no position masks. Returns the program's (acc, m, l)."""
    PK: tl.constexpr = D * BITS // 8
    GV: tl.constexpr = D // G
    BLOCK: tl.constexpr = GPB * G
    dt = q.dtype
    d = tl.arange(0, D)
    byte = tl.arange(0, PK)
    n = tl.arange(0, BLOCK)
    gk = tl.arange(0, GPB)
    gv = tl.arange(0, GV)
    m_i, l_i, acc = flash_init(ROWS, D)
    for start in range(start_pos, end_pos, BLOCK):
        pos = start + n
        # keys: per channel, one scale/zero per group of G tokens, broadcast over the group in registers
        kcodes = _unpack_tile(tl.load(kc_base + pos[:, None] * PK + byte[None, :]), BITS, BLOCK, D)
        ksz = ks_base + (start // G + gk)[:, None] * D + d[None, :]
        k_s = _expand_rows(tl.load(KS + ksz).to(tl.float32), GPB, G, D)
        k_z = _expand_rows(tl.load(KZ + ksz).to(tl.float32), GPB, G, D)
        k = (kcodes.to(tl.float32) * k_s + k_z).to(dt)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale
        p, alpha, m_i, l_i = _softmax_block(s, pos, qpos, row_ok, tt, b, mask_w, MASK, m_i, l_i, T, CAUSAL, HAS_MASK)
        # values: per token, one scale/zero per G channels, broadcast across the channels in registers
        vcodes = _unpack_tile(tl.load(vc_base + pos[:, None] * PK + byte[None, :]), BITS, BLOCK, D)
        vsz = vs_base + pos[:, None] * GV + gv[None, :]
        v_s = _expand_cols(tl.load(VS + vsz).to(tl.float32), BLOCK, GV, G)
        v_z = _expand_cols(tl.load(VZ + vsz).to(tl.float32), BLOCK, GV, G)
        v = (vcodes.to(tl.float32) * v_s + v_z).to(dt)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PREC).to(tl.float32)
    return acc, m_i, l_i


@triton.jit
def _code_values(c, dt: tl.constexpr, MAGIC: tl.constexpr):
    """Integer codes (int32) as exact values in ``dt``. MAGIC: no int->float instruction — the code is OR-ed
    into the mantissa of 1024 (fp16) / 128 (bf16) and that constant taken off again in the float type (both
    exact)."""
    if MAGIC:
        if dt == tl.float16:
            out = (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
        else:
            out = (c | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        out = c.to(dt)
    return out


@triton.jit
def _codes(packed, i: tl.constexpr, BITS: tl.constexpr, dt: tl.constexpr, MAGIC: tl.constexpr,
           WORDS: tl.constexpr, N: tl.constexpr, PK: tl.constexpr):
    """Bit slot i of a planar tile as exact code values in ``dt``: (N, PK) channels [i*PK, (i+1)*PK).
    ``packed``: the (N, PK) bytes as int32, or with WORDS the (N, PK/4) little-endian 32-bit words of them
    (4x fewer loads): the four bytes' codes are joined back in byte order in registers."""
    m: tl.constexpr = (1 << BITS) - 1
    if WORDS:
        c0 = (packed >> (i * BITS)) & m
        c1 = (packed >> (8 + i * BITS)) & m
        c2 = (packed >> (16 + i * BITS)) & m
        c3 = (packed >> (24 + i * BITS)) & m
        c = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (N, PK))
    else:
        c = (packed >> (i * BITS)) & m
    return _code_values(c, dt, MAGIC)


@triton.jit
def _slot(x0, x1, x2, x3, i: tl.constexpr):
    """The i-th of four per-slot tensors (Triton has no lists of tensors)."""
    if i == 0:
        out = x0
    elif i == 1:
        out = x1
    elif i == 2:
        out = x2
    else:
        out = x3
    return out


# Two codes of a 32-bit word (bits SHIFT and SHIFT + 16, both masked by MASK) to c * s + z in one packed
# 16-bit pair: OR-ing a code into the mantissa of 128 (bf16) / 1024 (fp16) makes the float 128 + c exactly,
# an fma by (1, -128) leaves c, and one more fma applies the scale and zero — 4 instructions for two codes
# where the generic path spends about 5 per code (shift, mask, int->float, fma, float->half). Operands:
# $0 $1 out (lo, hi), $2 word, $3 $4 scale (lo, hi), $5 $6 zero (lo, hi), $7 shift, $8 mask (both halves).
def _pair_asm(one: str, minus_magic: str, magic: str, packed: str) -> tl.constexpr:
    return tl.constexpr(f"""{{
.reg .b32 t, s, z, one, neg;
mov.b32 one, {one};
mov.b32 neg, {minus_magic};
shr.b32 t, $2, $7;
lop3.b32 t, t, $8, {magic}, 0xea;
fma.rn.{packed} t, t, one, neg;
mov.b32 s, {{$3, $4}};
mov.b32 z, {{$5, $6}};
fma.rn.{packed} t, t, s, z;
mov.b32 {{$0, $1}}, t;
}}""")


_PAIR_ASM_BF16 = _pair_asm("0x3F803F80", "0xC300C300", "0x43004300", "bf16x2")    # 1.0, -128, 128
_PAIR_ASM_FP16 = _pair_asm("0x3C003C00", "0xE400E400", "0x64006400", "f16x2")     # 1.0, -1024, 1024


@triton.jit
def _pair_dequant(words, s_lo, s_hi, z_lo, z_hi, SHIFT: tl.constexpr, BITS: tl.constexpr, N: tl.constexpr,
                  W: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr):
    """The codes at bit SHIFT (lo) and SHIFT + 16 (hi) of (N, W) int32 ``words`` as c * s + z in ``dt``:
    two (N, W) tensors. Scales and zeros broadcast to (N, W). ASM (a GPU, dt fp16/bf16): one packed
    inline-PTX pair per word; else the same values by plain Triton arithmetic (the interpreter's path)."""
    m: tl.constexpr = (1 << BITS) - 1
    if ASM:
        sh = tl.full((N, W), SHIFT, tl.int32)
        mask = tl.full((N, W), m * 0x10001, tl.int32)
        args = [words, tl.broadcast_to(s_lo.to(dt), (N, W)), tl.broadcast_to(s_hi.to(dt), (N, W)),
                tl.broadcast_to(z_lo.to(dt), (N, W)), tl.broadcast_to(z_hi.to(dt), (N, W)), sh, mask]
        if dt == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(_PAIR_ASM_BF16, "=h,=h,r,h,h,h,h,r,r", args,
                                               (tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(_PAIR_ASM_FP16, "=h,=h,r,h,h,h,h,r,r", args,
                                               (tl.float16, tl.float16),
                                               is_pure=True, pack=1)
    else:
        lo = (((words >> SHIFT) & m).to(tl.float32) * s_lo.to(tl.float32) + z_lo.to(tl.float32)).to(dt)
        hi = (((words >> (SHIFT + 16)) & m).to(tl.float32) * s_hi.to(tl.float32) + z_hi.to(tl.float32)).to(dt)
    return lo, hi


# Adjacent pairs (TUNING group "adjacent"): bytes 0, 1 (or 2, 3) of a word — channels 4w, 4w + 1 (or
# 4w + 2, 4w + 3), neighbours in the cache's scale buffers and in the tensor-core operand — are moved to bits
# 0-7 and 16-23 by one byte permute, so the scale and zero pairs load as single 32-bit words and the output
# pair is already in channel order. $0 $1 out, $2 word, $3 scale pair, $4 zero pair, $5 shift, $6 mask,
# $7 the permute's selector (0x4140: bytes 0, 1; 0x4342: bytes 2, 3).
def _adjacent_asm(one: str, minus_magic: str, magic: str, packed: str) -> tl.constexpr:
    return tl.constexpr(f"""{{
.reg .b32 t, one, neg, zero;
mov.b32 one, {one};
mov.b32 neg, {minus_magic};
mov.b32 zero, 0;
prmt.b32 t, $2, zero, $7;
shr.b32 t, t, $5;
lop3.b32 t, t, $6, {magic}, 0xea;
fma.rn.{packed} t, t, one, neg;
fma.rn.{packed} t, t, $3, $4;
mov.b32 {{$0, $1}}, t;
}}""")


_ADJ_ASM_BF16 = _adjacent_asm("0x3F803F80", "0xC300C300", "0x43004300", "bf16x2")
_ADJ_ASM_FP16 = _adjacent_asm("0x3C003C00", "0xE400E400", "0x64006400", "f16x2")


@triton.jit
def _pack_halves(lo, hi):
    """Two 16-bit float tensors as one int32 tensor: lo in bits 0-15, hi in bits 16-31."""
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _half(pair, HI: tl.constexpr, dt: tl.constexpr):
    """The low (HI false) or high 16 bits of int32 ``pair`` as a ``dt`` (16-bit float) value."""
    bits = (pair >> 16) if HI else pair
    return (bits & 0xFFFF).to(tl.int16).to(dt, bitcast=True)


@triton.jit
def _adjacent_dequant(words, s_pair, z_pair, BYTE: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
                      N: tl.constexpr, W: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr):
    """The codes at bit SHIFT of bytes BYTE and BYTE + 1 of (N, W) int32 ``words`` as c * s + z in ``dt``
    (16-bit): two (N, W) tensors. ``s_pair``/``z_pair``: int32, broadcastable to (N, W), the two channels'
    scales / zeros as low and high halves."""
    m: tl.constexpr = (1 << BITS) - 1
    if ASM:
        args = [words, tl.broadcast_to(s_pair, (N, W)), tl.broadcast_to(z_pair, (N, W)),
                tl.full((N, W), SHIFT, tl.int32), tl.full((N, W), m * 0x10001, tl.int32),
                tl.full((N, W), 0x4140 + 0x202 * (BYTE // 2), tl.int32)]
        if dt == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(_ADJ_ASM_BF16, "=h,=h,r,r,r,r,r,r", args, (tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(_ADJ_ASM_FP16, "=h,=h,r,r,r,r,r,r", args, (tl.float16, tl.float16),
                                               is_pure=True, pack=1)
    else:
        lo = (((words >> (8 * BYTE + SHIFT)) & m).to(tl.float32) * _half(s_pair, False, dt).to(tl.float32)
              + _half(z_pair, False, dt).to(tl.float32)).to(dt)
        hi = (((words >> (8 * BYTE + 8 + SHIFT)) & m).to(tl.float32) * _half(s_pair, True, dt).to(tl.float32)
              + _half(z_pair, True, dt).to(tl.float32)).to(dt)
    return lo, hi


@triton.jit
def _slot_adjacent(words, s_a, s_b, z_a, z_b, SLOT: tl.constexpr, BITS: tl.constexpr, N: tl.constexpr,
                   PW: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr):
    """:func:`_slot_pairs` by adjacent pairs: ``s_a``/``z_a`` the packed scale/zero pairs of channels
    (4w, 4w + 1), ``s_b``/``z_b`` of (4w + 2, 4w + 3), each (1, PW) or (N, 1) int32. Returns (N, 4 * PW)."""
    a_lo, a_hi = _adjacent_dequant(words, s_a, z_a, 0, SLOT * BITS, BITS, N, PW, dt, ASM)
    b_lo, b_hi = _adjacent_dequant(words, s_b, z_b, 2, SLOT * BITS, BITS, N, PW, dt, ASM)
    return tl.reshape(tl.join(tl.join(a_lo, b_lo), tl.join(a_hi, b_hi)), (N, 4 * PW))


@triton.jit
def _quarters(x, R: tl.constexpr, PW: tl.constexpr):
    """(R, 4 * PW) -> its columns 4w + 2e + h as four (R, PW) tensors, (e, h) = (0, 0), (1, 0), (0, 1), (1, 1)."""
    a, b = tl.split(tl.reshape(x, (R, PW, 2, 2)))       # h = 0, 1: (R, PW, 2) over (w, e)
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, a1, b0, b1


@triton.jit
def _slot_pairs(words, scale, zero, SLOT: tl.constexpr, BITS: tl.constexpr, N: tl.constexpr, PW: tl.constexpr,
                dt: tl.constexpr, PER_CHANNEL: tl.constexpr, ASM: tl.constexpr):
    """Bit slot SLOT of (N, PW) little-endian words of planar bytes as (N, 4 * PW) values in channel order
    (byte b of word w is column 4w + b). ``scale``/``zero``: (1, 4 * PW) per channel (PER_CHANNEL), else (N, 1)
    per row. Word w's bits SLOT*BITS / +16 hold bytes 0 / 2 (columns 4w, 4w + 2), bits +8 / +24 bytes 1 / 3."""
    if PER_CHANNEL:
        s00, s10, s01, s11 = _quarters(scale, 1, PW)
        z00, z10, z01, z11 = _quarters(zero, 1, PW)
    else:
        s00, s10, s01, s11 = scale, scale, scale, scale
        z00, z10, z01, z11 = zero, zero, zero, zero
    lo0, hi0 = _pair_dequant(words, s00, s10, z00, z10, SLOT * BITS, BITS, N, PW, dt, ASM)        # bytes 0, 2
    lo1, hi1 = _pair_dequant(words, s01, s11, z01, z11, SLOT * BITS + 8, BITS, N, PW, dt, ASM)    # bytes 1, 3
    return tl.reshape(tl.join(tl.join(lo0, hi0), tl.join(lo1, hi1)), (N, 4 * PW))


@triton.jit
def _kivi_main_group(q_row, row_ok, qpos, tt, b, mask_w, start_pos, end_pos, qk_scale, MASK, kc_base, ks_base,
                     vc_base, vs_base, KS, KZ, VS, VZ, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                     G: tl.constexpr, T: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                     PREC: tl.constexpr, FOLD: tl.constexpr, MAGIC: tl.constexpr, WORDS: tl.constexpr,
                     PAIRS: tl.constexpr, ASM: tl.constexpr):
    """:func:`_kivi_main` one key group per step and without register shuffles: bit slot i of the planar
    bytes is the run of channels [i*PK, (i+1)*PK), so its codes come out of the loaded (G, PK) byte tile with
    one shift and mask, in the tile's own layout, and feed their own tensor-core dot (keys: scores +=
    q_i . k_i; values: one accumulator per slot). A step holds one key group, so the key scale/zero are
    (PK,) vectors broadcast over the tokens, and as a slot lies inside one value group (the launcher takes
    this loop only when PK <= G) the value scale/zero are (G,) vectors broadcast over the channels: no
    per-element scale loads.

    PAIRS (with WORDS, not FOLD): dequantize two codes of a word at a time (:func:`_slot_pairs`), with packed
    inline PTX on the GPU (ASM).

    FOLD: never dequantize. Scores: q . (s*c + z) = (q*s) . c + q . z per key group, so q*s (ROWS, PK) is
    formed once per group and dotted with the raw codes. Values: p @ (c*s + z) = (p*s) @ c +
    (p . z) broadcast over the slot's channels. Returns (acc slots 0..3 (ROWS, PK), m, l)."""
    PK: tl.constexpr = D * BITS // 8
    PER: tl.constexpr = 8 // BITS
    GV: tl.constexpr = D // G
    dt = q_row.dtype.element_ty
    # PAIRS computes in the scales' type (fp16 by default, also under a bf16 cache: a bf16 dequantization
    # would round the fp16 scales and zeros to 8 bits and triple the error); the dots take q and p in it
    pdt = KS.dtype.element_ty
    j = tl.arange(0, PK)
    n = tl.arange(0, G)
    u = tl.arange(0, PK // 2)
    if WORDS:
        PW: tl.constexpr = PK // 4
        w = tl.arange(0, PW)
        kwords = kc_base.to(tl.pointer_type(tl.int32))
        vwords = vc_base.to(tl.pointer_type(tl.int32))
    q0 = tl.load(q_row[:, None] + j[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q1 = tl.load(q_row[:, None] + (PK % D) + j[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_row[:, None] + (2 * PK % D) + j[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q3 = tl.load(q_row[:, None] + (3 * PK % D) + j[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc0 = tl.zeros((ROWS, PK), tl.float32)
    acc1 = tl.zeros((ROWS, PK), tl.float32)
    acc2 = tl.zeros((ROWS, PK), tl.float32)
    acc3 = tl.zeros((ROWS, PK), tl.float32)
    # FOLD: the value zeros' share, p . z per slot, kept per position and summed once at the end
    z0 = tl.zeros((ROWS, G), tl.float32)
    z1 = tl.zeros((ROWS, G), tl.float32)
    z2 = tl.zeros((ROWS, G), tl.float32)
    z3 = tl.zeros((ROWS, G), tl.float32)
    for start in range(start_pos, end_pos, G):
        start = tl.multiple_of(start, G)
        pos = start + n
        if WORDS:
            kb = tl.load(kwords + pos[:, None] * PW + w[None, :])                      # (G, PK / 4)
            vb = tl.load(vwords + pos[:, None] * PW + w[None, :])
        else:
            kb = tl.load(kc_base + pos[:, None] * PK + j[None, :]).to(tl.int32)       # (G, PK)
            vb = tl.load(vc_base + pos[:, None] * PK + j[None, :]).to(tl.int32)
        kgrp = KS + ks_base + start * GV + j[None, :]        # group start // G: its scales at (start // G) * D
        zgrp = KZ + ks_base + start * GV + j[None, :]        # (1, PK): 2D loads vectorize, 1D slices do not
        s = tl.zeros((ROWS, G), tl.float32)
        qz = tl.zeros((ROWS, PK), tl.float32)          # FOLD: q . z of the group, reduced once
        for i in tl.static_range(PER):
            qi = _slot(q0, q1, q2, q3, i)
            k_s = tl.load(kgrp + i * PK).to(tl.float32)
            k_z = tl.load(zgrp + i * PK).to(tl.float32)
            if FOLD:
                c = _codes(kb, i, BITS, dt, MAGIC, WORDS, G, PK)
                s += tl.dot((qi * k_s).to(dt), tl.trans(c), input_precision=PREC)
                qz += qi * k_z
            elif PAIRS == 2:
                # scale/zero pairs of channels (2u, 2u + 1) as int32 words: u = 2w -> (4w, 4w + 1), 2w + 1 -> (4w + 2, 4w + 3)
                kp = (KS + ks_base + start * GV + i * PK).to(tl.pointer_type(tl.int32))
                zp = (KZ + ks_base + start * GV + i * PK).to(tl.pointer_type(tl.int32))
                s_a, s_b = tl.split(tl.reshape(tl.load(kp + u[None, :]), (1, PK // 4, 2)))
                z_a, z_b = tl.split(tl.reshape(tl.load(zp + u[None, :]), (1, PK // 4, 2)))
                k = _slot_adjacent(kb, s_a, s_b, z_a, z_b, i, BITS, G, PK // 4, pdt, ASM)
                s += tl.dot(qi.to(pdt), tl.trans(k), input_precision=PREC)
            elif PAIRS:
                k = _slot_pairs(kb, k_s, k_z, i, BITS, G, PK // 4, pdt, True, ASM)
                s += tl.dot(qi.to(pdt), tl.trans(k), input_precision=PREC)
            else:
                k = _codes(kb, i, BITS, tl.float32, False, WORDS, G, PK) * k_s + k_z
                s += tl.dot(qi.to(dt), tl.trans(k.to(dt)), input_precision=PREC)
        if FOLD:
            s += tl.sum(qz, 1)[:, None]
        p, alpha, m_i, l_i = _softmax_block(s * qk_scale, pos, qpos, row_ok, tt, b, mask_w, MASK, m_i, l_i, T,
                                            CAUSAL, HAS_MASK)
        for i in tl.static_range(PER):
            # the slot lies in value group (i*PK) // G: one scale/zero per token
            vsz = vs_base + pos[None, :] * GV + (i * PK) // G
            v_s16 = tl.load(VS + vsz)                # (1, G) in the scales' 16-bit type
            v_z16 = tl.load(VZ + vsz)
            v_s = v_s16.to(tl.float32)
            v_z = v_z16.to(tl.float32)
            if FOLD:
                part = tl.dot((p * v_s).to(dt), _codes(vb, i, BITS, dt, MAGIC, WORDS, G, PK), input_precision=PREC)
                pz = p * v_z
                if i == 0:
                    z0 = z0 * alpha[:, None] + pz
                elif i == 1:
                    z1 = z1 * alpha[:, None] + pz
                elif i == 2:
                    z2 = z2 * alpha[:, None] + pz
                else:
                    z3 = z3 * alpha[:, None] + pz
            elif PAIRS == 2:
                vs16, vz16 = tl.trans(v_s16), tl.trans(v_z16)      # (G, 1): one pair per token
                sv, zv = _pack_halves(vs16, vs16), _pack_halves(vz16, vz16)
                v = _slot_adjacent(vb, sv, sv, zv, zv, i, BITS, G, PK // 4, pdt, ASM)
                part = tl.dot(p.to(pdt), v, input_precision=PREC)
            elif PAIRS:
                v = _slot_pairs(vb, tl.trans(v_s), tl.trans(v_z), i, BITS, G, PK // 4, pdt, False, ASM)
                part = tl.dot(p.to(pdt), v, input_precision=PREC)
            else:
                v = (_codes(vb, i, BITS, tl.float32, False, WORDS, G, PK) * tl.trans(v_s) + tl.trans(v_z))
                part = tl.dot(p.to(dt), v.to(dt), input_precision=PREC)
            if i == 0:
                acc0 = acc0 * alpha[:, None] + part
            elif i == 1:
                acc1 = acc1 * alpha[:, None] + part
            elif i == 2:
                acc2 = acc2 * alpha[:, None] + part
            else:
                acc3 = acc3 * alpha[:, None] + part
    if FOLD:
        acc0 += tl.sum(z0, 1)[:, None]
        acc1 += tl.sum(z1, 1)[:, None]
        acc2 += tl.sum(z2, 1)[:, None]
        acc3 += tl.sum(z3, 1)[:, None]
    return acc0, acc1, acc2, acc3, m_i, l_i


@triton.jit
def _kivi_tail(q, qpos, row_ok, tt, b, length, mask_w, start_pos, nk, nv, qk_scale, MASK, kc_base, ks_base,
               vc_base, vs_base, kw_base, vw_base, KS, KZ, VS, VZ, ROWS: tl.constexpr, D: tl.constexpr,
               BITS: tl.constexpr, G: tl.constexpr, WK: tl.constexpr, WV: tl.constexpr, T: tl.constexpr,
               TAIL_N: tl.constexpr, STRIDE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               PREC: tl.constexpr):
    """Blocks of TAIL_N positions at start_pos, start_pos + STRIDE, ... below ``length``: leftover key groups,
    keys in the ring from nk, values quantized below nv, then the ring; every position picks its source by
    masked loads (masked-off lanes read no memory). Returns the program's (acc, m, l)."""
    PK: tl.constexpr = D * BITS // 8
    GV: tl.constexpr = D // G
    dt = q.dtype
    d = tl.arange(0, D)
    byte = d % PK                 # planar packing: channel d is in byte d % PK at bit (d // PK) * BITS
    shift = (d // PK) * BITS
    m_i, l_i, acc = flash_init(ROWS, D)
    for start in range(start_pos, length, STRIDE):
        pos = start + tl.arange(0, TAIL_N)
        valid = pos < length
        kq = valid & (pos < nk)
        kb = tl.load(kc_base + pos[:, None] * PK + byte[None, :], mask=kq[:, None], other=0)
        kcodes = (kb.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)
        ksz = ks_base + (pos // G)[:, None] * D + d[None, :]
        k_s = tl.load(KS + ksz, mask=kq[:, None], other=0.0).to(tl.float32)
        k_z = tl.load(KZ + ksz, mask=kq[:, None], other=0.0).to(tl.float32)
        kwin = tl.load(kw_base + (pos % WK)[:, None] * D + d[None, :], mask=(valid & (pos >= nk))[:, None],
                       other=0.0)
        k = tl.where(kq[:, None], (kcodes.to(tl.float32) * k_s + k_z).to(dt), kwin)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale
        s = hide(s, visible(row_ok, valid, pos, qpos, CAUSAL), pos, b, tt, mask_w, MASK, T, HAS_MASK)
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        vq = valid & (pos < nv)
        vb = tl.load(vc_base + pos[:, None] * PK + byte[None, :], mask=vq[:, None], other=0)
        vcodes = (vb.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)
        vsz = vs_base + pos[:, None] * GV + (d // G)[None, :]
        v_s = tl.load(VS + vsz, mask=vq[:, None], other=0.0).to(tl.float32)
        v_z = tl.load(VZ + vsz, mask=vq[:, None], other=0.0).to(tl.float32)
        vwin = tl.load(vw_base + (pos % WV)[:, None] * D + d[None, :], mask=(valid & (pos >= nv))[:, None],
                       other=0.0)
        v = tl.where(vq[:, None], (vcodes.to(tl.float32) * v_s + v_z).to(dt), vwin)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PREC).to(tl.float32)
    return acc, m_i, l_i


@triton.jit
def _kivi_split_kernel(
        Q, KC, KS, KZ, KW, VC, VS, VZ, VW, LEN, MASK, ACC, M, L,
        KV_MAP, K_SINK, V_SINK, K_RING, V_RING, S_MAP, OUT, stride_ob, stride_oh, ring_rows, n_rings,
        stride_qb, stride_qh, stride_qt, n_main, chunk, qk_scale, mask_w,
        H: tl.constexpr, R: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
        BITS: tl.constexpr, G: tl.constexpr, RESIDUAL: tl.constexpr, NK_CAP: tl.constexpr,
        NV_CAP: tl.constexpr, WK: tl.constexpr, WV: tl.constexpr, GPB: tl.constexpr, TAIL_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, SLOTS: tl.constexpr,
        FOLD: tl.constexpr, MAGIC: tl.constexpr, WORDS: tl.constexpr, PAIRS: tl.constexpr, ASM: tl.constexpr,
        MAPPED: tl.constexpr, HS: tl.constexpr, SINK: tl.constexpr, RECENT: tl.constexpr, RING_N: tl.constexpr,
        TAIL: tl.constexpr, N_TAIL: tl.constexpr):
    """Without TAIL, programs 0..n_main-1: ``chunk`` positions each of the whole GPB-group blocks below nk
    (:func:`_kivi_main`, or :func:`_kivi_main_group` with SLOTS and GPB 1); with TAIL, N_TAIL programs per
    (batch, kv head) for everything after them (:func:`_kivi_tail`: program p takes blocks p, p + N_TAIL, ...),
    written as splits n_main + p. Two launches, so that the main loop's register count is not the tail's.

    A duo layer (:mod:`.duo`): MAPPED — the cache's kv head h is the model's kv head KV_MAP[h] (its query
    rows are read there; the merge writes them there); HS > 0 — the launch that carries the streaming heads'
    rings (the main one when it has programs, else the tail) puts ``ring_rows`` rows before its (batch, kv
    head) rows, whose first n_rings = B * HS programs attend one ring each (:func:`.ring.ring_attend`,
    writing OUT). First, so that they are scheduled first: a ring is a few dependent tile steps, which at the
    end of a launch would be its critical path."""
    if HS > 0 and tl.program_id(1) < ring_rows:
        ring_program(Q, OUT, K_SINK, V_SINK, K_RING, V_RING, S_MAP, MASK, LEN, n_rings, qk_scale, mask_w, stride_qb,
                     stride_qh, stride_ob, stride_oh, HS, R, ROWS, D, SINK, RECENT, RING_N, HAS_MASK, PREC)
    else:
        split = n_main + tl.program_id(0) if TAIL else tl.program_id(0)
        # never past the capacity (NV_CAP + RESIDUAL), even if an overflowing captured step raised the length
        length = tl.minimum(tl.load(LEN).to(tl.int32), NV_CAP + RESIDUAL)
        held = tl.maximum(length - RESIDUAL, 0)
        nk = held // G * G
        nv = held
        nk_main = nk // (GPB * G) * (GPB * G)

        PK: tl.constexpr = D * BITS // 8
        bh = tl.program_id(1) - ring_rows if HS > 0 else tl.program_id(1)
        b = bh // H
        head = bh % H
        if MAPPED:
            head = tl.load(KV_MAP + head)
        row_ok, tt, qpos, q_row, q = query_rows(Q, b, head, length, stride_qb, stride_qh, stride_qt, R, T, ROWS,
                                                D)
        bh64 = bh.to(tl.int64)
        kc_base = KC + bh64 * NK_CAP * PK
        ks_base = bh64 * (NK_CAP // G) * D
        vc_base = VC + bh64 * NV_CAP * PK
        vs_base = bh64 * NV_CAP * (D // G)
        if not TAIL:
            lo = split * chunk
            hi = tl.minimum(lo + chunk, nk_main)
            if SLOTS:
                a0, a1, a2, a3, m_s, l_s = _kivi_main_group(
                    q_row, row_ok, qpos, tt, b, mask_w, lo, hi, qk_scale, MASK, kc_base, ks_base, vc_base, vs_base,
                    KS, KZ, VS, VZ, ROWS, D, BITS, G, T, CAUSAL, HAS_MASK, PREC, FOLD, MAGIC, WORDS, PAIRS, ASM)
                _store_slots(ACC, M, L, a0, a1, a2, a3, m_s, l_s, bh, split, n_main + N_TAIL, R * T, ROWS, D, PK)
            else:
                acc, m_i, l_i = _kivi_main(q, qpos, row_ok, tt, b, mask_w, lo, hi, qk_scale, MASK, kc_base,
                                           ks_base, vc_base, vs_base, KS, KZ, VS, VZ, ROWS, D, BITS, G, GPB, T,
                                           CAUSAL, HAS_MASK, PREC)
                store_split(ACC, M, L, acc, m_i, l_i, bh, split, n_main + N_TAIL, R * T, ROWS, D)
        else:
            acc_t, m_t, l_t = _kivi_tail(q, qpos, row_ok, tt, b, length, mask_w, nk_main + tl.program_id(0) * TAIL_N,
                                         nk, nv, qk_scale, MASK, kc_base, ks_base, vc_base, vs_base,
                                         KW + bh64 * WK * D, VW + bh64 * WV * D, KS, KZ, VS, VZ, ROWS, D, BITS, G,
                                         WK, WV, T, TAIL_N, N_TAIL * TAIL_N, CAUSAL, HAS_MASK, PREC)
            store_split(ACC, M, L, acc_t, m_t, l_t, bh, split, n_main + N_TAIL, R * T, ROWS, D)


@triton.jit
def _store_slots(ACC, M, L, a0, a1, a2, a3, m_i, l_i, bh, split, n_splits, rows, ROWS: tl.constexpr,
                 D: tl.constexpr, PK: tl.constexpr):
    """store_split for slot accumulators: slot i holds channels [i*PK, (i+1)*PK)."""
    r = tl.arange(0, ROWS)
    j = tl.arange(0, PK)
    ok = r < rows
    base = (bh * n_splits + split) * rows
    out = ACC + (base + r)[:, None] * D + j[None, :]
    tl.store(out, a0, mask=ok[:, None])
    if D // PK > 1:
        tl.store(out + PK, a1, mask=ok[:, None])
    if D // PK > 2:
        tl.store(out + 2 * PK, a2, mask=ok[:, None])
    if D // PK > 3:
        tl.store(out + 3 * PK, a3, mask=ok[:, None])
    tl.store(M + base + r, m_i, mask=ok)
    tl.store(L + base + r, l_i, mask=ok)


@triton_op("kvpass::kivi_attention", mutates_args={})
def kivi_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                   k_window: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                   v_window: torch.Tensor, length: torch.Tensor, attn_mask: torch.Tensor | None,
                   bits: int, group_size: int, residual: int, length_hint: int, scale: float,
                   causal: bool) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) over a KIVI cache (buffers as in :mod:`kvpass.methods.kivi`, contiguous,
    window dtype == q dtype) holding ``length`` (0-d int64 tensor) tokens; the T queries are the last T
    positions. ``attn_mask``: None or float32 (B, T, W) added to the scores of positions < W (W >= the length,
    or positions past it are unmasked). ``length_hint``: the length on the host, which sizes the split plan
    (the kernel reads ``length``); -1: unknown (a CUDA-graph capture), the plan covers the capacity and the
    programs past the length exit at once. Returns (B, Hq, T, D) q.dtype.
    """
    acc, m, l, rows_pad = _kivi_splits(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window,
                                       length, attn_mask, bits, group_size, residual, length_hint, scale, causal)
    return merged_output(acc, m, l, q, rows_pad, k_window.shape[1], wrap_triton)


@triton_op("kvpass::kivi_attention_lse", mutates_args={})
def kivi_attention_lse(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                       k_window: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                       v_window: torch.Tensor, length: torch.Tensor, attn_mask: torch.Tensor | None,
                       bits: int, group_size: int, residual: int, length_hint: int, scale: float,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kivi_attention` as one part of a larger key set (a sequence-parallel rank's slice): returns
    (out (B, Hq, T, D) float32, lse (B, Hq, T) float32, natural log; -inf and zeros where no key is
    visible), merged from the same splits (:func:`kvpass.codegen.decode.merged_output_lse`)."""
    acc, m, l, _ = _kivi_splits(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window,
                                length, attn_mask, bits, group_size, residual, length_hint, scale, causal)
    return merged_output_lse(acc, m, l, q.shape, k_window.shape[1])


def _kivi_splits(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, length, attn_mask,
                 bits, group_size, residual, length_hint, scale, causal, ring: RingPart | None = None):
    """Launch the split programs of :func:`kivi_attention`; returns their workspace (acc, m, l) and the
    padded row count. ``ring``: a duo layer's streaming heads, attended in the tail launch."""
    b, hq, t, d = q.shape
    h = k_window.shape[1]
    hs = 0 if ring is None else ring.s_map.shape[0]
    r = hq // (h + hs)
    pk = d * bits // 8
    slots = TUNING["main"] == "group" and bits >= 2 and 16 <= pk <= group_size
    tune = TUNING["group" if slots else "reshape"]
    pairs = (slots and tune["words"] and tune.get("pairs", False) and not tune["fold"] and q.dtype != torch.float32
             and k_scale.dtype in (torch.float16, torch.bfloat16) and v_scale.dtype == k_scale.dtype)
    pairs = pairs and bits <= 4          # 128 + c is exact in bf16 only below 128
    gpb = 1 if slots else tune["groups_per_block"]
    # the Gluon main loop (KIVI-2 at head_dim 128, single tokens; see kivi_gluon.applies): one warp a program
    held = k_codes.shape[2] if length_hint < 0 else length_hint - residual
    gluon_main = (TUNING["gluon"]["on"] and kivi_gluon is not None and slots
                  and kivi_gluon.applies(q, k_codes, k_scale, v_scale, bits, group_size, r)
                  and (ring is None or b * held >= TUNING["gluon"]["duo_min_tokens"]))
    programs_per_sm = TUNING["gluon"]["programs_per_sm"] if gluon_main else tune.get("programs_per_sm", 4)
    nk = max(held, 0) // group_size * group_size
    block = gpb * group_size
    plan = plan_splits(b * h, nk // block * block, r * t, block, q.device, programs_per_sm)
    n_tail = max(1, int(TUNING["tail_programs"]))
    acc, m, l = workspace(plan.splits + n_tail, r * t, b * h, d, q.device)
    mask, mask_w = mask_argument(attn_mask, q)
    ring_args, ring_consts = ring_arguments(ring, m, q)
    n_rings = b * hs
    args = (q, nonempty(k_codes), nonempty(k_scale), nonempty(k_zero), nonempty(k_window), nonempty(v_codes),
            nonempty(v_scale), nonempty(v_zero), nonempty(v_window), length, mask, acc, m, l, *ring_args)
    rest = (q.stride(0), q.stride(1), q.stride(2), plan.splits, plan.chunk, scale * LOG2E, mask_w)
    consts = dict(H=h, R=r, T=t, ROWS=plan.rows_pad, D=d, BITS=bits, G=group_size, RESIDUAL=residual,
                  NK_CAP=k_codes.shape[2], NV_CAP=v_codes.shape[2], WK=max(k_window.shape[2], 1),
                  WV=max(v_window.shape[2], 1), GPB=gpb, TAIL_N=32, CAUSAL=causal, HAS_MASK=mask_kind(attn_mask),
                  PREC=dot_precision(q),
                  SLOTS=slots, FOLD=slots and tune["fold"], WORDS=slots and tune["words"],
                  MAGIC=slots and tune["magic"] and q.dtype != torch.float32 and bits < 8,
                  PAIRS=(2 if tune.get("adjacent") else 1) if pairs else 0, ASM=pairs and q.is_cuda,
                  **ring_consts, N_TAIL=n_tail,
                  num_warps=tune["num_warps"], num_stages=tune["num_stages"],
                  **({"maxnreg": tune["maxnreg"]} if tune.get("maxnreg") and q.is_cuda else {}))
    # the rings ride in the Triton main launch when there is one (ahead of its split programs), else in the tail
    in_main = plan.splits > 0 and TUNING["rings"] == "main" and not gluon_main
    main_rows = -(-n_rings // plan.splits) if in_main else 0
    tail_rows = 0 if in_main else -(-n_rings // n_tail)
    if plan.splits and gluon_main:
        torch.ops.kvpass.kivi_gluon_main(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, length, acc, m, l,
                                         None if ring is None else ring.kv_map, attn_mask, r, plan.splits, plan.chunk,
                                         residual, scale * LOG2E, TUNING["gluon"]["prefetch"])
    elif plan.splits:     # a main launch without the rings is built without their code (HS 0)
        main_consts = dict(consts, HS=consts["HS"] if in_main else 0,
                           RING_N=min(consts["RING_N"], TUNING["ring_tile_main"]))
        wrap_triton(_kivi_split_kernel)[(plan.splits, main_rows + b * h)](*args, main_rows, n_rings, *rest,
                                                                        TAIL=False, **main_consts)
    tail_consts = dict(consts, num_stages=TUNING["tail_stages"] or consts["num_stages"],
                       HS=0 if in_main else consts["HS"])
    wrap_triton(_kivi_split_kernel)[(n_tail, tail_rows + b * h)](*args, tail_rows, n_rings, *rest, TAIL=True,
                                                                **tail_consts)
    return acc, m, l, plan.rows_pad


def supports(scheme, q: torch.Tensor, attn_mask, sliding_window, softcap) -> bool:
    """Whether :func:`attend` handles this call (else the caller uses the PyTorch reference)."""
    d = q.shape[-1]
    g = scheme.group_size
    return (scheme.bits in (1, 2, 4, 8) and sliding_window is None and softcap is None
            and d >= 16 and d & (d - 1) == 0 and 16 <= g <= d and g & (g - 1) == 0
            and d * scheme.bits // 8 >= 2
            and (attn_mask is None or attn_mask.dim() != 4 or attn_mask.shape[1] == 1))


def attend(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
           attn_mask: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
    """:meth:`KIVI.attend` through the kernel: q (B, Hq, T, D) -> (B, Hq, T, D) in q.dtype. ``length``: the
    cached length if the caller knows it on the host (saves a device sync; must equal the state's). While a
    CUDA graph is being captured the length is never read on the host: the launch is planned for the
    cache's capacity and the mask (any width >= the length) is passed whole."""
    return kivi_attention(*_op_arguments(scheme, state, q, scale, causal, attn_mask, length))


def attend_lse(scheme, state, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
               attn_mask: torch.Tensor | None = None, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` returning the float32 pair (out (B, Hq, T, D), lse (B, Hq, T)) of
    :meth:`KIVI.attend` with ``return_lse=True`` (a sequence-parallel rank's part)."""
    return kivi_attention_lse(*_op_arguments(scheme, state, q, scale, causal, attn_mask, length))


def _op_arguments(scheme, state, q, scale, causal, attn_mask, length) -> tuple:
    """The arguments of ``kvpass::kivi_attention`` / ``kivi_attention_lse`` for :func:`attend`."""
    length = call_length(scheme, state, q, attn_mask, length, supports(scheme, q, attn_mask, None, None),
                         "1, 2, 4 or 8 bits, a power-of-two head_dim, a power-of-two group_size in [16, head_dim] "
                         "and masks shared by all heads")
    b, _, t, d = q.shape
    return (q, state["k_codes"], state["k_scale"], state["k_zero"], state["k_window"], state["v_codes"],
            state["v_scale"], state["v_zero"], state["v_window"], state.length_tensor,
            kernel_mask(attn_mask, b, t, length), scheme.bits, scheme.group_size, scheme.residual,
            -1 if length is None else length, d ** -0.5 if scale is None else float(scale), causal)
