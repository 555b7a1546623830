"""KVQuant decode main loop in Gluon: nuq levels from per-lane shared-memory tables, RoPE in half2, the outliers
added where they are cheap.

The Triton loop (:func:`.kvquant._kvquant_kernel`) spends about 50 instructions a code and runs at 0.06-0.08x bf16
SDPA on the H200. This loop keeps the codebook loop's shape (:mod:`.codebook_gluon`): W warps a program, each its
own flash loop over its own span and its own workspace split, every tensor with the warp as dimension 0, scores
transposed (32 tokens x 8 query rows) on mma.sync m16n8k16. For 3-bit codes at head_dim 128 (8 codes fill 3 bytes):

- Levels: two adjacent channels' codes are a 6-bit field; a 64-entry table of (level, level) fp16 pairs turns
  it into one half2 register with one ``ld.shared``. Every lane has its own copy in its own bank (entry e of
  lane l at word 32 e + l), so these loads never conflict: 8 KB a table, one for K and one for V.
- Keys: the contraction order is permuted so that lane t holds channels 16t..16t+15 and their RoPE partners
  64 + 16t.., i.e. two 6-byte runs of a token's code row. A lane turns its 4 code words into 16 level pairs,
  scales them by the calibrated per-channel range and center (half2 FMA) and rotates each pair by the token's
  offset n in the tile, R(n theta), from a shared table of cos/sin(n theta) (:func:`key_asm`). The tile's start
  angle goes to the query instead (q . R(s) R(n) k = (R(s)^T q) . (R(n) k)), rotated once a tile in float32.
- Key outliers (at most 2 a token: 1% of 128 channels) are patched into the lane that holds their channel before
  the rotation, with a predicated byte permute a register.
- Values: per-token range and center fold into the probabilities (p * range feeds the product, sum p * center
  is one extra number a row), so the value operand is the levels alone (:func:`value_asm`). Value outliers are
  scattered into a per-warp shared-memory copy of the output (``red.shared.add``) and pulled into the
  accumulator after the tile's product.

Conditions (:func:`applies`): a CUDA device, head_dim 128, 3 bits, at most 2 outliers a token, RoPE over all 128
channels, one new token, at most 8 query heads per kv head. It writes the same (acc, m, l) workspace rows as the
Triton main launch, so the sink launch and the merge are shared. Gluon has no interpreter: the kernel is checked
against :meth:`kvpass.methods.kvquant.KVQuant.attend` on the GPU (tests/test_kernels.py, bench/decode_attention.py),
its assembly against numpy through a PTX emulator and its sm_90 build on the CPU (tests/test_kvquant_gluon.py).
"""

from __future__ import annotations

import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .codebook_gluon import _join16, layouts as codebook_layouts
from .decode import mask_kind
from .gluon_splits import query_indices, softmax_step, store_warp_splits

D_MODEL = 128           # the head_dim this kernel is written for
BITS = 3                # the code width it unpacks
ROW_WORDS = D_MODEL * BITS // 32       # int32 words of a token's code row (12)

# shared memory, bytes from the start of the program's one allocation
K_LUT = 0               # 64 entries x 32 lanes x (level, level) fp16 pairs
V_LUT = 8192
TRIG = 16384            # per (token offset n < 32, lane group t): 16 words (cos pairs, sin pairs)
RANGES = 24576          # per lane group t: 32 words (range lo, range hi, center lo, center hi: 8 pairs each)
OUT_SCATTER = 32768     # per warp: 128 x 8 float32 value-outlier contributions
TABLE_ROWS = OUT_SCATTER // 32          # 32-byte rows of the allocation ahead of the scatter buffers
_BITS = gl.constexpr(BITS)
_ROW_WORDS = gl.constexpr(ROW_WORDS)
_D = gl.constexpr(D_MODEL)
_TRIG = gl.constexpr(TRIG)
_RANGES = gl.constexpr(RANGES)
_OUT_SCATTER = gl.constexpr(OUT_SCATTER)
_TABLE_ROWS = gl.constexpr(TABLE_ROWS)


def _field(reg: str, src: str, bit: int, base: str) -> str:
    """PTX putting in ``reg`` the shared address of the 6-bit field at ``bit`` of ``src``: base + field * 128."""
    op = f"shr.u32 {reg}, {src}, {bit - 7};" if bit >= 7 else f"shl.b32 {reg}, {src}, {7 - bit};"
    return f"{op}\nand.b32 {reg}, {reg}, 0x1F80;\nadd.u32 {reg}, {reg}, {base};\n"


def _level_pairs(out: list[str], lo: str, hi: str, base: str) -> str:
    """PTX loading the 8 level pairs of 16 channels whose 48 code bits start at bit ``sh`` of words (lo, hi):
    pair j (channels 2j, 2j + 1) is the field at bit 6j."""
    lines = [f"shf.r.clamp.b32 x, {lo}, {hi}, sh;\nshr.u32 y, {hi}, sh;\nshf.r.clamp.b32 z, x, y, 30;\n"]
    for j in range(8):
        src, bit = ("x", 6 * j) if j < 5 else ("z", 6 * (j - 5))
        lines.append(_field("f", src, bit, base) + f"ld.shared.b32 {out[j]}, [f];\n")
    return "".join(lines)


def _patch_outlier(s: int) -> str:
    """PTX putting outlier s (channel: byte s of $28, value: half s of $30) into the key registers k0..k15 before the
    rotation, on the lane that holds its channel (16t..16t+15 in k0..k7, 64 + 16t.. in k8..k15)."""
    return (f"shr.u32 id, $28, {8 * s};\nand.b32 id, id, 127;\nand.b32 u, id, 63;\nsub.u32 u, u, t16;\n"
            "setp.lt.u32 own, u, 16;\nshr.u32 r, id, 6;\nshl.b32 r, r, 3;\nshr.u32 x, u, 1;\nadd.u32 r, r, x;\n"
            "@!own mov.u32 r, 99;\nand.b32 x, u, 1;\nsetp.eq.u32 hi, x, 1;\nselp.b32 sel, 0x7610, 0x3254, hi;\n"
            f"prmt.b32 vv, $30, $30, {0x3232 if s else 0x1010:#x};\n"
            + "".join(f"setp.eq.u32 p, r, {i};\n@p prmt.b32 k{i}, k{i}, vv, sel;\n" for i in range(16)))


def key_asm(outliers: int) -> str:
    """One token's key operand on lane (g, t). Inputs (pack 2, each given twice): code words $16, $18 (bytes
    from 6t on: channels 16t..16t+15) and $20, $22 (from 24 + 6t: channels 64 + 16t..), the byte offset of the
    token's trig row $24, 4 x lane id $26; with ``outliers`` (1 or 2) the token's outlier channels (a byte each)
    $28 and their fp16 values $30. Output j (< 8) holds channels 16t + 2j, + 1 and output 8 + j their partners
    64 + 16t + 2j, + 1, rotated: (k_i cos - k_p sin, k_p cos + k_i sin) with k = level * range + center, or the
    exact value at an outlier's channel."""
    k = [f"k{i}" for i in range(16)]
    lines = [".reg .b32 b, lb, sh, ta, ca, x, y, z, f, u, v, t16, id, r, sel, vv;\n.reg .pred own, hi, p;\n",
             ".reg .b32 k<16>, r<16>, c<16>, q<16>;\n",
             "mov.u32 b, global_smem;\nadd.u32 lb, b, $26;\n",
             "and.b32 sh, $26, 4;\nshl.b32 sh, sh, 2;\n",                    # t odd: the run starts at bit 16
             "and.b32 t16, $26, 12;\nshl.b32 t16, t16, 2;\n",
             "shr.u32 ta, $26, 2;\nand.b32 ta, ta, 3;\nshl.b32 ta, ta, 7;\nadd.u32 ta, ta, b;\n",
             "add.u32 ca, b, $24;\n",
             _level_pairs(k[:8], "$16", "$18", "lb"), _level_pairs(k[8:], "$20", "$22", "lb")]
    for i in range(0, 16, 4):
        lines.append(f"ld.shared.v4.b32 {{r{i}, r{i + 1}, r{i + 2}, r{i + 3}}}, [ta+{RANGES + 4 * i}];\n")
        lines.append(f"ld.shared.v4.b32 {{c{i}, c{i + 1}, c{i + 2}, c{i + 3}}}, [ta+{RANGES + 64 + 4 * i}];\n")
        lines.append(f"ld.shared.v4.b32 {{q{i}, q{i + 1}, q{i + 2}, q{i + 3}}}, [ca+{4 * i}];\n")
    lines += [f"fma.rn.f16x2 k{i}, k{i}, r{i}, c{i};\n" for i in range(16)]
    lines += [_patch_outlier(s) for s in range(outliers)]
    for j in range(8):
        lines.append(f"mul.rn.f16x2 u, k{8 + j}, q{8 + j};\nneg.f16x2 u, u;\nfma.rn.f16x2 ${j}, k{j}, q{j}, u;\n"
                     f"mul.rn.f16x2 v, k{j}, q{8 + j};\nfma.rn.f16x2 ${8 + j}, k{8 + j}, q{j}, v;\n")
    return "{\n" + "".join(lines) + "}"


def value_asm() -> str:
    """Two tokens' value operand registers on lane (g, t) (a: $16 / $18, b: $17 / $19, pack 2: the code words
    from byte 6g on, channels 16g..16g+15; 4 x lane id $20): output 2j + e holds channel 16g + 2j + e of token a
    (low half) and token b (high half), as levels (the per-token range and center are applied through p)."""
    a = [f"a{j}" for j in range(8)]
    c = [f"c{j}" for j in range(8)]
    lines = [".reg .b32 b, lb, sh, x, y, z, f;\n.reg .b32 a<8>, c<8>;\n",
             f"mov.u32 b, global_smem;\nadd.u32 lb, b, $20;\nadd.u32 lb, lb, {V_LUT};\n",
             "and.b32 sh, $20, 16;\n",                                          # g odd: the run starts at bit 16
             _level_pairs(a, "$16", "$18", "lb"), _level_pairs(c, "$17", "$19", "lb")]
    for j in range(8):
        lines.append(f"prmt.b32 ${2 * j}, a{j}, c{j}, 0x5410;\nprmt.b32 ${2 * j + 1}, a{j}, c{j}, 0x7632;\n")
    return "{\n" + "".join(lines) + "}"


_K_ASM_0 = gl.constexpr(key_asm(0))
_K_ASM_1 = gl.constexpr(key_asm(1))
_K_ASM_2 = gl.constexpr(key_asm(2))
MAX_OUTLIERS = 2        # outliers a token the key assembly patches in (KVQuant's 1% at head_dim 128)
_V_ASM = gl.constexpr(value_asm())
_SINCOS_ASM = gl.constexpr("sin.approx.ftz.f32 $0, $2;\ncos.approx.ftz.f32 $1, $2;")
_RED_ASM = gl.constexpr("{\n.reg .b32 a;\nmov.u32 a, global_smem;\nadd.u32 a, a, $1;\n"
                        "red.shared.add.f32 [a], $2;\nmov.u32 $0, 0;\n}")
_PULL_ASM = gl.constexpr("{\n.reg .b32 a, z;\nmov.u32 a, global_smem;\nadd.u32 a, a, $1;\nmov.b32 z, 0;\n"
                         "ld.shared.f32 $0, [a];\nst.shared.b32 [a], z;\n}")
_WARP_SYNC_ASM = gl.constexpr("bar.warp.sync -1;\nmov.u32 $0, 0;")
_PREFETCH_ASM = gl.constexpr("prefetch.global.L1 [$1];\nmov.u32 $0, 0;")
# the CTA barrier: gl.thread_barrier in Triton 3.6 (the GPU's), gl.barrier from 3.7 on
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
_TWO_PI_HI = gl.constexpr(6.28125)      # 2 pi = hi + lo, hi exact in 8 bits: k * hi is exact for k < 2^16
_TWO_PI_LO = gl.constexpr(2 * math.pi - 6.28125)


@gluon.constexpr_function
def _alloc_rows(warps):
    """32-byte rows of the allocation: the tables, then 128 a warp, rounded up to a power of two."""
    return 1 << (TABLE_ROWS + 128 * int(warps) - 1).bit_length()


@gluon.jit
def _sincos(angle):
    """(sin, cos) of float32 angles: reduced to [-pi, pi] by 2 pi in two parts, then the hardware's approximations."""
    k = gl.floor(angle * 0.15915494309189535 + 0.5)
    r = angle - k * _TWO_PI_HI
    r = r - k * _TWO_PI_LO
    return gl.inline_asm_elementwise(_SINCOS_ASM, "=f,=f,f", [r], dtype=(gl.float32, gl.float32), is_pure=True,
                                     pack=1)


@gluon.jit
def _u16(x):
    """fp16 values -> their bits in the low half of int32."""
    return x.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF


@gluon.jit
def _fill_tables(smem, KLEV, VLEV, KRNG, KCEN, FREQ, head, OUT_ROWS: gl.constexpr, fill: gl.constexpr):
    """Write the level-pair tables, the per-lane-group ranges and centers and the cos/sin(n theta) table, and zero
    the scatter buffers (``smem``: the (rows, 8) int32 allocation, unswizzled: byte 32 row + 4 col)."""
    rr = gl.arange(0, 512, layout=gl.SliceLayout(1, fill))[:, None]
    cc = gl.arange(0, 8, layout=gl.SliceLayout(0, fill))[None, :]
    w = rr * 8 + cc                                       # word: table (w >> 11), entry ((w >> 5) & 63), lane
    e = (w >> 5) & 63
    is_v = w >= 2048
    lo = gl.where(is_v, gl.load(VLEV + (e & 7)), gl.load(KLEV + (e & 7))).to(gl.float16)
    hi = gl.where(is_v, gl.load(VLEV + (e >> 3)), gl.load(KLEV + (e >> 3))).to(gl.float16)
    smem.slice(0, 512).store(_u16(lo) | (_u16(hi) << 16))
    # ranges: row 768 + 4t + r, word 8r + j: r = 0 range lo, 1 range hi, 2 center lo, 3 center hi
    r16 = gl.arange(0, 16, layout=gl.SliceLayout(1, fill))[:, None]
    t = r16 >> 2
    part = r16 & 3
    ch = 64 * (part & 1) + 16 * t + 2 * cc
    src = gl.where(part >= 2, KCEN, KRNG) + head * _D + ch
    smem.slice(_RANGES // 32, 16).store(_u16(gl.load(src)) | (_u16(gl.load(src + 1)) << 16))
    # trig: row 512 + 2 (4n + t) + s, word j: s = 0 cos, 1 sin of (n theta_i, n theta_(i+1)), i = 16t + 2j
    r256 = gl.arange(0, 256, layout=gl.SliceLayout(1, fill))[:, None]
    n = (r256 >> 3).to(gl.float32)
    i = 16 * ((r256 >> 1) & 3) + 2 * cc
    s0, c0 = _sincos(n * gl.load(FREQ + i))
    s1, c1 = _sincos(n * gl.load(FREQ + i + 1))
    is_sin = (r256 & 1) == 1
    smem.slice(_TRIG // 32, 256).store(_u16(gl.where(is_sin, s0, c0).to(gl.float16))
                               | (_u16(gl.where(is_sin, s1, c1).to(gl.float16)) << 16))
    zr = gl.arange(0, 128, layout=gl.SliceLayout(1, fill))[:, None]
    zeros = (zr * cc) * 0
    for r in gl.static_range(0, OUT_ROWS, 128):
        smem.slice(_TABLE_ROWS + r, 128).store(zeros)


@gluon.jit
def _key_operand(w0, w1, w2, w3, trig, lane4, out_idx, out_val, W: gl.constexpr, O: gl.constexpr):
    """Code words (W, 32 tokens, 4 lane groups) int32 and the tokens' outliers (channel bytes, fp16 value halves:
    int32 of the same shape) -> the rotated key operand (W, 32, 128) fp16, k = 8i + 2t + e holding channel
    64 (i >> 3) + 16t + 2 (i & 7) + e."""
    x = [gl.join(w0, w0), gl.join(w1, w1), gl.join(w2, w2), gl.join(w3, w3), gl.join(trig, trig),
         gl.join(lane4, lane4)]
    if O == 0:
        o = gl.inline_asm_elementwise(_K_ASM_0, "=r," * 16 + "r," * 11 + "r", x, dtype=(gl.float16,) * 16,
                                      is_pure=True, pack=2)
    elif O == 1:
        o = gl.inline_asm_elementwise(_K_ASM_1, "=r," * 16 + "r," * 15 + "r",
                                      x + [gl.join(out_idx, out_idx), gl.join(out_val, out_val)],
                                      dtype=(gl.float16,) * 16, is_pure=True, pack=2)
    else:
        o = gl.inline_asm_elementwise(_K_ASM_2, "=r," * 16 + "r," * 15 + "r",
                                      x + [gl.join(out_idx, out_idx), gl.join(out_val, out_val)],
                                      dtype=(gl.float16,) * 16, is_pure=True, pack=2)
    y = gl.permute(_join16(o), [0, 1, 7, 6, 5, 4, 2, 3])               # (w, n, f3, f2, f1, f0, t, e)
    return gl.reshape(y, [W, 32, 128])


@gluon.jit
def _value_operand(v0, v1, lane4, W: gl.constexpr):
    """Code words (W, 32 tokens, 8 lane groups g) int32 -> the value levels operand (W, 128 m, 32 tokens) fp16,
    row m = 16 mt + 8 mh + g holding channel 16 g + 2 mt + mh."""
    a0 = gl.permute(gl.reshape(v0, [W, 16, 2, 8]), [0, 1, 3, 2])           # (w, pair, g, e)
    a1 = gl.permute(gl.reshape(v1, [W, 16, 2, 8]), [0, 1, 3, 2])
    ln = gl.permute(gl.reshape(lane4, [W, 16, 2, 8]), [0, 1, 3, 2])
    o = gl.inline_asm_elementwise(_V_ASM, "=r," * 16 + "r,r,r,r,r,r", [a0, a1, ln], dtype=(gl.float16,) * 16,
                                  is_pure=True, pack=2)
    y = gl.permute(_join16(o), [0, 7, 6, 5, 4, 2, 1, 3])               # (w, f3, f2, f1, f0, g, pair, e)
    return gl.reshape(y, [W, 128, 32])


@gluon.jit
def _prefetch_tile(KC, VC, KOUT, KIDX, VOUT, VIDX, VRNG, VCEN, first, end, lane, O: gl.constexpr):
    """Ask L1 for the lines of code rows [first, first + 32) (W, 1) of each warp, cut at ``end`` (W, 1; > first
    unless the warp has no rows, then at least 1), one line a lane: 13 lanes each for the key and value codes
    (48 bytes a row), one each for the outliers' values and channels and the value ranges and centers."""
    last = gl.maximum(end, 1) - 1
    code_end = last * (_ROW_WORDS * 4) + (_ROW_WORDS * 4 - 1)
    code = gl.minimum(first * (_ROW_WORDS * 4) + (lane % 13) * 128, code_end)
    u8: gl.constexpr = gl.pointer_type(gl.uint8)
    at = gl.where(lane < 13, KC + code, VC + code)
    at = gl.where(lane == 26, KOUT.to(u8) + gl.minimum(first, last) * (2 * O), at)
    at = gl.where(lane == 27, KIDX + gl.minimum(first, last) * O, at)
    at = gl.where(lane == 28, VOUT.to(u8) + gl.minimum(first, last) * (2 * O), at)
    at = gl.where(lane == 29, VIDX + gl.minimum(first, last) * O, at)
    at = gl.where(lane == 30, VRNG.to(u8) + gl.minimum(first, last) * 2, at)
    at = gl.where(lane == 31, VCEN.to(u8) + gl.minimum(first, last) * 2, at)
    gl.inline_asm_elementwise(_PREFETCH_ASM, "=r,l", [at], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _kvquant_gluon_main_kernel(Q, KC, VC, VCEN, VRNG, KOUT, VOUT, KIDX, VIDX, KCEN, KRNG, KLEV, VLEV, FREQ, META,
                               LEN, ACC, M, L, MASK, stride_qb, stride_qh, n_splits, chunk, steps, qk_scale, mask_w,
                               H: gl.constexpr, R: gl.constexpr, NC: gl.constexpr, SINK: gl.constexpr,
                               O: gl.constexpr, HAS_MASK: gl.constexpr, W: gl.constexpr,
                               PREFETCH: gl.constexpr, mma: gl.constexpr, kw_layout: gl.constexpr,
                               vw_layout: gl.constexpr, vp_layout: gl.constexpr, fill_layout: gl.constexpr,
                               lane_layout: gl.constexpr):
    """Program program_id(0) of (batch, kv head) program_id(1): its warp w takes the code positions
    [s + (pid * W + w) * chunk, + chunk) (``steps`` tiles of 32) and writes workspace split pid * W + w of n_splits
    (rows < R). HAS_MASK (:func:`.decode.mask_kind`): MASK (B, 1, mask_w) added to the scores (1: float32, 2: bool,
    False hides); positions past its width are unmasked. PREFETCH: each tile asks L1 for the next tile's lines."""
    D: gl.constexpr = 128
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    OUT_ROWS: gl.constexpr = W * 128                   # 32-byte rows of the scatter buffers
    ALLOC_ROWS: gl.constexpr = _alloc_rows(W)

    pid = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    head = bh % H
    length = gl.minimum(gl.load(LEN).to(gl.int32), NC + SINK)
    s0 = gl.minimum(length, SINK)
    bh64 = bh.to(gl.int64)

    smem = gl.allocate_shared_memory(gl.int32, [ALLOC_ROWS, 8],
                                     gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    _fill_tables(smem, KLEV, VLEV, KRNG, KCEN, FREQ, head, OUT_ROWS, fill_layout)
    _cta_barrier()

    # ---- key code words: lane (g, t) loads words a_t + (s & 1) + 6 (s >> 1), a_t = 3t >> 1, of tokens g + 8j
    wk = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, kw_layout)))[:, None, None]
    nk = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, kw_layout)))[None, :, None]
    tk = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, kw_layout)))[None, None, :]
    a_t = (3 * tk) >> 1
    lane4_k = (4 * (nk & 7) + tk) * 4 + wk * 0
    trig_k = _TRIG + (nk * 4 + tk) * 64 + wk * 0
    lo_k = s0 + (pid * W + wk) * chunk
    hi_k = gl.minimum(lo_k + chunk, length)
    kc = KC.to(gl.pointer_type(gl.int32)) + bh64 * NC * _ROW_WORDS - SINK * _ROW_WORDS
    # ---- value code words: lane (g, t) loads words a_g, a_g + 1 (a_g = 3g >> 1) of its 8 tokens
    wv = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, vw_layout)))[:, None, None]
    nv = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, vw_layout)))[None, :, None]
    gv = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, vw_layout)))[None, None, :]
    a_g = (3 * gv) >> 1
    lane4_v = gl.convert_layout((4 * gv + ((nv >> 1) & 3)) * 4 + wv * 0, vp_layout, assert_trivial=True)
    lo_v = s0 + (pid * W + wv) * chunk
    hi_v = gl.minimum(lo_v + chunk, length)
    vc = VC.to(gl.pointer_type(gl.int32)) + bh64 * NC * _ROW_WORDS - SINK * _ROW_WORDS

    # ---- q^T (W, 128 k, 8 rows) float32 times the RoPE scale, k = 64h + k', split into the two rotation halves
    qk, qn, qw = query_indices(W, D, b_op)
    qch = 64 * (qk >> 6) + 16 * ((qk >> 1) & 3) + 2 * ((qk >> 3) & 7) + (qk & 1) + qw * 0
    q_base = Q + b * stride_qb + head * R * stride_qh
    qt = gl.load(q_base + qn * stride_qh + qch, mask=qn < R, other=0.0).to(gl.float32) * gl.load(META)
    theta = gl.load(FREQ + (qch & 63) + qn * 0)
    q_lo, q_hi = gl.split(gl.permute(gl.reshape(qt, [W, 2, 64, 8]), [0, 2, 3, 1]))
    theta, _ = gl.split(gl.permute(gl.reshape(theta, [W, 2, 64, 8]), [0, 2, 3, 1]))
    L_TW: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, q_lo.type.layout))
    tw = gl.arange(0, W, layout=L_TW)[:, None, None]
    lo_q = s0 + (pid * W + tw) * chunk

    # ---- per-token quantities in the scores' layout (W, 32 tokens, 8 rows)
    L_S: gl.constexpr = gl.SliceLayout(2, mma)
    tok = gl.arange(0, 32, layout=gl.SliceLayout(0, L_S))[None, :]
    ws = gl.arange(0, W, layout=gl.SliceLayout(1, L_S))[:, None]
    rows = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, mma)))[None, None, :]
    lo_s = s0 + (pid * W + ws) * chunk
    hi_s = gl.minimum(lo_s + chunk, length)
    # the output's scatter buffer: warp w, row m (channel 16g + 2mt + mh at m = 16mt + 8mh + g), query row n
    om = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(2, mma)))[None, :, None]
    on = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, mma)))[None, None, :]
    ow = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, mma)))[:, None, None]
    pull_at = _OUT_SCATTER + ((ow * 128 + om) * 8 + on) * 4
    scatter_w = _OUT_SCATTER + ws[:, :, None] * 4096 + rows * 4

    pf_lane = gl.arange(0, 32, layout=gl.SliceLayout(0, lane_layout))[None, :]
    pf_w = gl.arange(0, W, layout=gl.SliceLayout(1, lane_layout))[:, None]
    pf_lo = s0 + (pid * W + pf_w) * chunk                                # the warp's span, as code rows + bh NC
    pf_end = gl.minimum(pf_lo + chunk, length) - SINK + bh64 * NC
    pf_first = pf_lo - SINK + bh64 * NC
    if PREFETCH:
        _prefetch_tile(KC, VC, KOUT, KIDX, VOUT, VIDX, VRNG, VCEN, pf_first, pf_end, pf_lane, O)
    m_i = gl.full([W, 8], float("-inf"), gl.float32, layout=gl.SliceLayout(1, mma))
    l_i = gl.zeros([W, 8], gl.float32, layout=gl.SliceLayout(1, mma))
    c_i = gl.zeros([W, 8], gl.float32, layout=gl.SliceLayout(1, mma))      # sum of p * value center
    o = gl.zeros([W, 128, 8], gl.float32, layout=mma)
    for step in range(0, steps):
        if PREFETCH:
            _prefetch_tile(KC, VC, KOUT, KIDX, VOUT, VIDX, VRNG, VCEN, pf_first + (step + 1) * 32, pf_end, pf_lane, O)
        # keys: the query turned back by the tile's start angle, the tile's keys by their offsets in it
        sin_s, cos_s = _sincos((lo_q + step * 32).to(gl.float32) * theta)
        r_lo = q_lo * cos_s + q_hi * sin_s
        r_hi = q_hi * cos_s - q_lo * sin_s
        qrot = gl.reshape(gl.permute(gl.join(r_lo, r_hi), [0, 3, 1, 2]), [W, D, 8])
        qrot = gl.convert_layout(qrot.to(gl.float16), b_op, assert_trivial=True)
        pk = lo_k + step * 32 + nk
        okk = pk < hi_k
        row_k = kc + pk * _ROW_WORDS + a_t
        w0 = gl.load(row_k, mask=okk, other=0)
        w1 = gl.load(row_k + 1, mask=okk, other=0)
        w2 = gl.load(row_k + 6, mask=okk, other=0)
        w3 = gl.load(row_k + 7, mask=okk, other=0)
        krow = (pk - SINK).to(gl.int64) + bh64 * NC + tk * 0
        if O == 2:
            out_idx = gl.load(KIDX.to(gl.pointer_type(gl.int16)) + krow, mask=okk, other=0).to(gl.int32) & 0xFFFF
            out_val = gl.load(KOUT.to(gl.pointer_type(gl.int32)) + krow, mask=okk, other=0)
        elif O == 1:
            out_idx = gl.load(KIDX + krow, mask=okk, other=0).to(gl.int32)
            out_val = gl.load(KOUT.to(gl.pointer_type(gl.int16)) + krow, mask=okk, other=0).to(gl.int32)
        else:
            out_idx = w0
            out_val = w0
        kop = gl.convert_layout(_key_operand(w0, w1, w2, w3, trig_k, lane4_k, out_idx, out_val, W, O), a_op,
                                assert_trivial=True)
        s = mma_v2(kop, qrot, gl.zeros([W, 32, 8], gl.float32, layout=mma))
        pos = lo_s + step * 32 + tok                                          # (W, 32)
        ok = pos < hi_s
        crow = (pos - SINK).to(gl.int64) + bh64 * NC                          # code row in the (B, H, n) buffers
        s = s * qk_scale
        p, alpha, m_i, l_i = softmax_step(s, pos, hi_s, m_i, l_i, MASK, b, mask_w, HAS_MASK)
        vr = gl.load(VRNG + crow, mask=ok, other=0.0).to(gl.float32)
        vcen = gl.load(VCEN + crow, mask=ok, other=0.0).to(gl.float32)
        c_i = c_i * alpha + gl.sum(p * vcen[:, :, None], axis=1)
        pt = gl.convert_layout((p * vr[:, :, None]).to(gl.float16), b_op)
        pv = lo_v + step * 32 + nv
        okv = pv < hi_v
        row_v = vc + pv * _ROW_WORDS + a_g
        v0 = gl.convert_layout(gl.load(row_v, mask=okv, other=0), vp_layout, assert_trivial=True)
        v1 = gl.convert_layout(gl.load(row_v + 1, mask=okv, other=0), vp_layout, assert_trivial=True)
        vop = gl.convert_layout(_value_operand(v0, v1, lane4_v, W), a_op, assert_trivial=True)
        o = mma_v2(vop, pt, o * alpha[:, None, :])
        # value outliers: p * (exact - quantized) into the scatter buffer, then into o
        for j in gl.static_range(O):
            idx = gl.load(VIDX + crow * O + j, mask=ok, other=0).to(gl.int32) & 127    # kept in the buffer
            val = gl.load(VOUT + crow * O + j, mask=ok, other=0.0).to(gl.float32)
            bit = idx * _BITS
            cb = VC + crow * (_ROW_WORDS * 4) + (bit >> 3)
            code = ((gl.load(cb, mask=ok, other=0).to(gl.int32)
                     | (gl.load(cb + 1, mask=ok & ((bit >> 3) < _ROW_WORDS * 4 - 1), other=0).to(gl.int32) << 8))
                    >> (bit & 7)) & 7
            delta = gl.where(ok, val - (gl.load(VLEV + code) * vr + vcen), 0.0)
            m_of = 16 * ((idx >> 1) & 7) + 8 * (idx & 1) + (idx >> 4)
            at = scatter_w + (m_of * 32)[:, :, None]
            gl.inline_asm_elementwise(_RED_ASM, "=r,r,f", [at, p * delta[:, :, None]], dtype=gl.int32,
                                      is_pure=False, pack=1)
        gl.inline_asm_elementwise(_WARP_SYNC_ASM, "=r,r", [ws], dtype=gl.int32, is_pure=False, pack=1)
        o = o + gl.inline_asm_elementwise(_PULL_ASM, "=f,r", [pull_at], dtype=gl.float32, is_pure=False, pack=1)
        gl.inline_asm_elementwise(_WARP_SYNC_ASM, "=r,r", [ws], dtype=gl.int32, is_pure=False, pack=1)

    # ---- epilogue: the value centers' sum joins every channel
    store_warp_splits(ACC, M, L, o + c_i[:, None, :], m_i, l_i, bh, pid, n_splits, R, W, mma)


def layouts(warps: int) -> dict:
    """The kernel's constexpr layouts for ``warps`` warps a program: the codebook loop's at 8 channels a code
    (key words (W, 32, 4) a lane group each, value words (W, 32, 8) a lane group g each)."""
    out = codebook_layouts(warps, 8)
    out["fill_layout"] = gl.BlockedLayout([1, 1], [4, 8], [warps, 1], [1, 0])
    out["lane_layout"] = gl.BlockedLayout([1, 1], [1, 32], [warps, 1], [1, 0])
    return out


def shared_bytes(warps: int) -> int:
    """Shared memory a program of ``warps`` warps allocates: the tables and the warps' scatter buffers, rounded up
    to a power of two (shared allocations have power-of-two shapes)."""
    return _alloc_rows(warps) * 32


def applies(q: torch.Tensor, bits: int, outliers: int, rows: int, rotary_full: bool) -> bool:
    """Whether this kernel can run the main programs of a :func:`.kvquant.kvquant_attention` call: a CUDA device,
    head_dim 128, 3-bit codes, at most 2 outliers a token, RoPE over all channels (``rotary_full``), one new
    token, ``rows`` (query heads per kv head) 1-8, fp16 or bf16 queries with unit channel stride."""
    b, hq, t, d = q.shape
    return (q.is_cuda and d == D_MODEL and t == 1 and bits == BITS and outliers <= MAX_OUTLIERS
            and 1 <= rows <= 8 and rotary_full
            and q.dtype in (torch.float16, torch.bfloat16) and q.stride(3) == 1)


@torch.library.custom_op("kvpass::kvquant_gluon_main", mutates_args=("acc", "m", "l"))
def kvquant_gluon_main(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor, v_center: torch.Tensor,
                       v_range: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, k_out_idx: torch.Tensor,
                       v_out_idx: torch.Tensor, k_center: torch.Tensor, k_range: torch.Tensor,
                       k_levels: torch.Tensor, v_levels: torch.Tensor, rope_inv_freq: torch.Tensor,
                       rope_meta: torch.Tensor, length: torch.Tensor, acc: torch.Tensor, m: torch.Tensor,
                       l: torch.Tensor, attn_mask: torch.Tensor | None, rows: int, programs: int, chunk: int,
                       sink: int, qk_scale: float, warps: int, prefetch: bool) -> None:
    """Write splits [0, programs * warps) of the workspace (acc (B*H, S, R, 128), m, l (B*H, S, R) float32) for a
    3-bit KVQuant cache (buffers as :mod:`kvpass.methods.kvquant` lays them out, RoPE over all 128 channels; the
    outlier buffers of a dense cache as :func:`.decode.nonempty` stand-ins)
    holding ``length`` (0-d int64) tokens: warp split s takes the code positions [sink + s * chunk, + chunk).
    q (B, Hq, 1, 128) fp16/bf16, ``rows`` query heads per kv head; ``attn_mask``: None or a
    :func:`.decode.kernel_mask` (B, 1, W); ``qk_scale`` includes log2(e); ``prefetch``: each tile asks L1 for the
    next one's lines. An opaque op (Gluon kernels are not
    traced by Inductor), so a compiled graph keeps it as one call."""
    b = q.shape[0]
    h, nc = k_codes.shape[1], k_codes.shape[2]
    o = k_out.shape[-1] if k_out.dim() == 4 else 0          # a one-element stand-in: no outliers
    if programs:
        _kvquant_gluon_main_kernel[(programs, b * h)](
            q, k_codes, v_codes, v_center, v_range, k_out, v_out, k_out_idx, v_out_idx, k_center, k_range, k_levels,
            v_levels, rope_inv_freq, rope_meta, length, acc, m, l, m if attn_mask is None else attn_mask,
            q.stride(0), q.stride(1), acc.shape[1], chunk, -(-chunk // 32), qk_scale,
            0 if attn_mask is None else attn_mask.shape[-1], H=h, R=rows, NC=nc, SINK=sink, O=o,
            HAS_MASK=mask_kind(attn_mask), W=warps, PREFETCH=prefetch, num_warps=warps, **layouts(warps))


@kvquant_gluon_main.register_fake
def _(q, k_codes, v_codes, v_center, v_range, k_out, v_out, k_out_idx, v_out_idx, k_center, k_range, k_levels,
      v_levels, rope_inv_freq, rope_meta, length, acc, m, l, attn_mask, rows, programs, chunk, sink, qk_scale,
      warps, prefetch) -> None:
    return None
