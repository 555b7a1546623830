"""KIVI-2 main loop in Gluon: the steady-state split programs of :mod:`.kivi` with every register placed by hand.

The Triton main loop (:func:`.kivi._kivi_main_group`) spends 5.5 instructions a code, most of them moving
dequantized values between the load layout and the tensor cores' operand layouts through shared memory
(bench/results/kernel_profile.json). Here the packed words are loaded straight into the lanes that own them in
the mma.sync operand fragments, so every code is unpacked in the register it is multiplied from:

- one warp a program, one key group (G = 32 tokens) a step;
- scores S = (q * s_k) . c_k^T + q . z_k: the key scales fold into the query (per channel, fixed within a group)
  and the zeros into one extra 16x8x128 product, so the key operand is the raw codes;
- the head dimension of the score product is permuted so that the four codes a lane needs of a 16-channel
  k-slice are the four bytes of one 32-bit word (a bit slot of the planar packing: :func:`kvpass.packing.pack_planar`);
- values: O^T = c_v^T . (P^T * s_v) + (P . z_v) per bit slot (a slot of 32 channels is one value group, so the
  value scale and zero are per token there): M = channels, N = the query rows, so P (the score accumulator) is
  already the second operand's fragment and only 8 rows are padded, not 12 of 16;
- each code becomes an exact fp16 by one byte permute (shared by the four slots), a shift, a mask-or into the
  mantissa of 1024 and one packed subtraction of 1024, two codes an instruction after the permute.

Conditions (checked by :func:`applies`): a CUDA device, 2 bits, head_dim 128, group 32, one new token, no mask,
at most 8 query heads per kv head, fp16 scales. It writes the same (acc, m, l) workspace rows as the Triton main
launch, so the tail launch and the merge are shared. Gluon has no interpreter: the kernel is checked against
:meth:`kvpass.methods.kivi.KIVI.attend` on the GPU (tests/test_kernels.py, bench/decode_attention.py).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

# one word (4 bytes of a token's planar row) -> its 16 codes as exact fp16: output 4 * i + 2 * hi + e is the code
# of byte 2 * hi + e at bit slot i (bits 2i, 2i + 1)
# Slot i's code sits at bits 2i, 2i + 1 of its byte: OR-ed (masked in place, no shift) into the mantissa of
# 2^(10 - 2i) (1024, 256, 64, 16: mantissa ulp 4^-i), the fp16 is 2^(10 - 2i) + c exactly; one packed subtraction
# of the magic leaves c. Byte pairs are first moved to bits 0-7 and 16-23 (one permute for all four slots).
_MAGIC = (0x6400, 0x5C00, 0x5400, 0x4C00)


def _slot_lines(src: str, i: int, out: int) -> str:
    mask = 0x00030003 << (2 * i)
    magic = _MAGIC[i] * 0x10001
    return (f"lop3.b32 t, {src}, {mask:#x}, {magic:#x}, 0xea;\n"
            f"mov.b32 mag, {magic:#x};\n"
            f"sub.rn.f16x2 ${out}, t, mag;\n")


# One word (4 bytes of a token's planar row, given twice: pack 2) -> its 16 codes as exact fp16, two to an output
# register: output 2 * i + hi holds the codes of bytes 2 * hi (low half) and 2 * hi + 1 at bit slot i.
_WORD_ASM = gl.constexpr("{\n.reg .b32 lo, hi, t, mag;\nprmt.b32 lo, $8, 0, 0x4140;\nprmt.b32 hi, $8, 0, 0x4342;\n"
                         + "".join(_slot_lines(src, i, 2 * i + h) for i in range(4)
                                   for h, src in ((0, "lo"), (1, "hi"))) + "}")


def _pair_asm(j: int) -> str:
    """Two tokens' words (a: $4, b: $5, pack 2) -> byte j of both at each bit slot i as exact fp16, output i
    holding a's code in its low half and b's in the high half."""
    sel = ((4 + j) << 12) | ((4 + j) << 8) | (j << 4) | j
    return ("{\n.reg .b32 p, t, mag;\n" + f"prmt.b32 p, $4, $5, {sel:#x};\n"
            + "".join(_slot_lines("p", i, i) for i in range(4)) + "}")


_PAIR_ASM_0 = gl.constexpr(_pair_asm(0))
_PAIR_ASM_1 = gl.constexpr(_pair_asm(1))
_PAIR_ASM_2 = gl.constexpr(_pair_asm(2))
_PAIR_ASM_3 = gl.constexpr(_pair_asm(3))


@gluon.jit
def _word_codes(w):
    """(32, 8) int32 words of 32 tokens -> the key operand (128 permuted channels, 32 tokens) fp16."""
    o = gl.inline_asm_elementwise(_WORD_ASM, "=r," * 8 + "r,r", [gl.join(w, w)], dtype=(gl.float16,) * 8,
                                  is_pure=True, pack=2)                 # each (32 n, 8 w, 2 e)
    x0 = gl.join(o[0], o[1])                                            # (32, 8, e, hi), slot 0
    x1 = gl.join(o[2], o[3])
    x2 = gl.join(o[4], o[5])
    x3 = gl.join(o[6], o[7])
    x = gl.join(gl.join(x0, x1), gl.join(x2, x3))                       # (32, 8, e, hi, i0, i1)
    x = gl.reshape(x, [32, 4, 2, 2, 2, 2, 2])                           # (n, t, h, e, hi, i0, i1)
    x = gl.permute(x, [6, 5, 2, 4, 1, 3, 0])                            # (i1, i0, h, hi, t, e, n)
    return gl.reshape(x, [128, 32])


@gluon.jit
def _slot_codes(wab, j: gl.constexpr):
    """Byte j of (16 pairs, 8 words, 2 e) int32 words (e: even / odd token) -> slot i's codes, 4 tensors
    (16, 8, 2 e) fp16."""
    if j == 0:
        o = gl.inline_asm_elementwise(_PAIR_ASM_0, "=r," * 4 + "r,r", [wab], dtype=(gl.float16,) * 4,
                                      is_pure=True, pack=2)
    elif j == 1:
        o = gl.inline_asm_elementwise(_PAIR_ASM_1, "=r," * 4 + "r,r", [wab], dtype=(gl.float16,) * 4,
                                      is_pure=True, pack=2)
    elif j == 2:
        o = gl.inline_asm_elementwise(_PAIR_ASM_2, "=r," * 4 + "r,r", [wab], dtype=(gl.float16,) * 4,
                                      is_pure=True, pack=2)
    else:
        o = gl.inline_asm_elementwise(_PAIR_ASM_3, "=r," * 4 + "r,r", [wab], dtype=(gl.float16,) * 4,
                                      is_pure=True, pack=2)
    return o[0], o[1], o[2], o[3]


@gluon.jit
def _value_operand(y0, y1, y2, y3):
    """Bytes 0..3 of one slot, (16 pairs, 8 words, 2 e) each -> the slot's value operand (32 permuted channels,
    32 tokens): channel row 16 * mt + 8 * j2 + g is byte 2 * mt + j2 of word g."""
    y = gl.join(gl.join(y0, y1), gl.join(y2, y3))          # (16 p, 8 g, 2 e, 2 j2, 2 mt)
    y = gl.reshape(y, [2, 2, 4, 8, 2, 2, 2])                # (kt, kk, t, g, e, j2, mt)
    y = gl.permute(y, [6, 5, 3, 0, 1, 2, 4])                # (mt, j2, g, kt, kk, t, e)
    return gl.reshape(y, [32, 32])


@gluon.jit
def _kivi_gluon_main_kernel(Q, KC, KS, KZ, VC, VS, VZ, LEN, ACC, M, L, stride_qb, stride_qh, n_splits, chunk,
                            qk_scale, H: gl.constexpr, R: gl.constexpr, RESIDUAL: gl.constexpr,
                            NK_CAP: gl.constexpr, NV_CAP: gl.constexpr):
    """Split program_id(0) of (batch, kv head) program_id(1): whole groups [split * chunk, ...) below the
    main-loop bound, written to workspace split ``split`` of ``n_splits`` (rows < R)."""
    D: gl.constexpr = 128
    G: gl.constexpr = 32
    PK: gl.constexpr = 32
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    # key words: lane (g, t) holds words 2t, 2t + 1 of tokens g + 8 * nt
    kw_layout: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [1, 1], [1, 0])
    # value words: lane (g, t) holds word g of tokens 2t + e + 8 * kk + 16 * kt
    vw_layout: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[1, 0], [8, 0], [16, 0]], lane_bases=[[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]], warp_bases=[],
        block_bases=[], shape=[32, 8])
    # key scales by channel: lane t holds channels 32 i + 8 t + (0..7)
    ks_layout: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[1], [2], [4], [32], [64]], lane_bases=[[8], [16], [0], [0], [0]], warp_bases=[], block_bases=[],
        shape=[128])
    # value scales (token, slot): lane t holds the 4 slots of tokens 2t + e + 8 * kk + 16 * kt
    vs_layout: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [1, 0], [8, 0], [16, 0]], lane_bases=[[2, 0], [4, 0], [0, 0], [0, 0], [0, 0]],
        warp_bases=[], block_bases=[], shape=[32, 4])

    split = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    head = bh % H
    length = gl.minimum(gl.load(LEN).to(gl.int32), NV_CAP + RESIDUAL)
    held = gl.maximum(length - RESIDUAL, 0)
    nk_main = held // G * G
    lo = split * chunk
    hi = gl.minimum(lo + chunk, nk_main)
    bh64 = bh.to(gl.int64)
    kc = (KC + bh64 * NK_CAP * PK).to(gl.pointer_type(gl.int32))
    vc = (VC + bh64 * NV_CAP * PK).to(gl.pointer_type(gl.int32))
    ks_base = bh64 * (NK_CAP // G) * D
    vs_base = bh64 * NV_CAP * (D // G)

    # the query in the permuted channel order: k = 16 (2 i + h) + 8 hi + 2 t + e is channel 32 i + 8 t + 4 h + 2 hi + e
    qr = gl.arange(0, 16, layout=gl.SliceLayout(1, a_op))
    qk = gl.arange(0, D, layout=gl.SliceLayout(0, a_op))
    qch = (qk >> 5) * 32 + ((qk >> 1) & 3) * 8 + ((qk >> 4) & 1) * 4 + ((qk >> 3) & 1) * 2 + (qk & 1)
    q_ptr = Q + b * stride_qb + (head * R + qr)[:, None] * stride_qh + qch[None, :]
    q = gl.load(q_ptr, mask=(qr < R)[:, None], other=0.0).to(gl.float16)

    kn = gl.arange(0, 32, layout=gl.SliceLayout(1, kw_layout))
    kwd = gl.arange(0, 8, layout=gl.SliceLayout(0, kw_layout))
    vn = gl.arange(0, 32, layout=gl.SliceLayout(1, vw_layout))
    vwd = gl.arange(0, 8, layout=gl.SliceLayout(0, vw_layout))
    kch = gl.arange(0, D, layout=ks_layout)
    sn = gl.arange(0, 32, layout=gl.SliceLayout(1, vs_layout))
    ss = gl.arange(0, 4, layout=gl.SliceLayout(0, vs_layout))
    zm = gl.arange(0, 16, layout=gl.SliceLayout(1, a_op))
    zk = gl.arange(0, 32, layout=gl.SliceLayout(0, a_op))

    m_i = gl.full([16], float("-inf"), gl.float32, layout=gl.SliceLayout(1, mma))
    l_i = gl.zeros([16], gl.float32, layout=gl.SliceLayout(1, mma))
    o0 = gl.zeros([32, 8], gl.float32, layout=mma)
    o1 = gl.zeros([32, 8], gl.float32, layout=mma)
    o2 = gl.zeros([32, 8], gl.float32, layout=mma)
    o3 = gl.zeros([32, 8], gl.float32, layout=mma)
    oz = gl.zeros([16, 8], gl.float32, layout=mma)             # row i: sum_t p z_v of slot i
    for start in range(lo, hi, G):
        start = gl.multiple_of(start, G)
        # ---- keys
        kw = gl.load(kc + (start + kn)[:, None] * 8 + kwd[None, :])
        kcodes = gl.convert_layout(_word_codes(kw), b_op, assert_trivial=True)
        grp = ks_base + start * (D // G)
        ksc = gl.load(KS + grp + kch)                           # (128,) by channel
        kze = gl.load(KZ + grp + kch)
        ksc = gl.reshape(gl.permute(gl.reshape(ksc, [4, 4, 2, 2, 2]), [0, 2, 3, 1, 4]), [D])
        kze = gl.reshape(gl.permute(gl.reshape(kze, [4, 4, 2, 2, 2]), [0, 2, 3, 1, 4]), [D])
        ksc = gl.convert_layout(ksc, gl.SliceLayout(0, a_op), assert_trivial=True)
        kzb = gl.convert_layout(kze, gl.SliceLayout(1, b_op))
        qs = q * ksc[None, :]
        s = mma_v2(qs, kcodes, gl.zeros([16, 32], gl.float32, layout=mma))
        zb = gl.zeros([D, 8], gl.float16, layout=b_op) + kzb[:, None]
        bias = mma_v2(q, zb, gl.zeros([16, 8], gl.float32, layout=mma))
        bias_row = gl.max(bias, axis=1)
        s = (s + bias_row[:, None]) * qk_scale
        # ---- online softmax (base 2)
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        p16 = p.to(gl.float16)
        pa, pb = gl.split(gl.permute(gl.reshape(p16, [2, 8, 32]), [1, 2, 0]))
        pt = gl.convert_layout(gl.permute(pa, [1, 0]), b_op, assert_trivial=True)       # (32 tokens, 8 rows)
        aa, ab = gl.split(gl.permute(gl.reshape(alpha, [2, 8]), [1, 0]))
        a8 = gl.convert_layout(aa, gl.SliceLayout(0, mma))[None, :]
        # ---- values
        vw = gl.load(vc + (start + vn)[:, None] * 8 + vwd[None, :])
        wab = gl.permute(gl.reshape(vw, [16, 2, 8]), [0, 2, 1])         # (16 pairs, 8 words, 2 e)
        c00, c01, c02, c03 = _slot_codes(wab, 0)
        c10, c11, c12, c13 = _slot_codes(wab, 1)
        c20, c21, c22, c23 = _slot_codes(wab, 2)
        c30, c31, c32, c33 = _slot_codes(wab, 3)
        vsp = VS + vs_base + (start + sn)[:, None] * (D // G) + ss[None, :]
        vsc = gl.reshape(gl.load(vsp), [32, 2, 2])
        v_lo, v_hi = gl.split(vsc)
        s0, s2 = gl.split(v_lo)
        s1, s3 = gl.split(v_hi)
        zp = VZ + vs_base + (start + zk)[None, :] * (D // G) + zm[:, None]
        az = gl.load(zp, mask=(zm < 4)[:, None], other=0.0)
        oz = oz * a8 + 0.0
        oz = mma_v2(az, pt, oz)
        o0 = mma_v2(gl.convert_layout(_value_operand(c00, c10, c20, c30), a_op, assert_trivial=True),
                    pt * gl.convert_layout(s0, gl.SliceLayout(1, b_op))[:, None], o0 * a8)
        o1 = mma_v2(gl.convert_layout(_value_operand(c01, c11, c21, c31), a_op, assert_trivial=True),
                    pt * gl.convert_layout(s1, gl.SliceLayout(1, b_op))[:, None], o1 * a8)
        o2 = mma_v2(gl.convert_layout(_value_operand(c02, c12, c22, c32), a_op, assert_trivial=True),
                    pt * gl.convert_layout(s2, gl.SliceLayout(1, b_op))[:, None], o2 * a8)
        o3 = mma_v2(gl.convert_layout(_value_operand(c03, c13, c23, c33), a_op, assert_trivial=True),
                    pt * gl.convert_layout(s3, gl.SliceLayout(1, b_op))[:, None], o3 * a8)
    # ---- epilogue: workspace rows < R; O^T slot i row m is channel 32 i + 4 (m & 7) + 2 (m >> 4) + ((m >> 3) & 1)
    om = gl.arange(0, 32, layout=gl.SliceLayout(1, mma))
    on = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
    zr = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    och = 4 * (om & 7) + 2 * (om >> 4) + ((om >> 3) & 1)
    base = (bh * n_splits + split) * R
    out = ACC + (base + on)[None, :] * D + och[:, None]
    ok = (on < R)[None, :]
    gl.store(out, o0 + gl.sum(gl.where((zr == 0)[:, None], oz, 0.0), axis=0)[None, :], mask=ok)
    gl.store(out + 32, o1 + gl.sum(gl.where((zr == 1)[:, None], oz, 0.0), axis=0)[None, :], mask=ok)
    gl.store(out + 64, o2 + gl.sum(gl.where((zr == 2)[:, None], oz, 0.0), axis=0)[None, :], mask=ok)
    gl.store(out + 96, o3 + gl.sum(gl.where((zr == 3)[:, None], oz, 0.0), axis=0)[None, :], mask=ok)
    mr = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    gl.store(M + base + mr, m_i, mask=mr < R)
    gl.store(L + base + mr, l_i, mask=mr < R)


def applies(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, bits: int,
            group_size: int, attn_mask: torch.Tensor | None, kv_heads: int) -> bool:
    """Whether this kernel can run the main programs of a :func:`.kivi.kivi_attention` call: a CUDA device, 2-bit
    codes at head_dim 128 in groups of 32, one new token, no mask, 1-8 query heads per kv head, fp16 or bf16
    queries and fp16 scales."""
    b, hq, t, d = q.shape
    return (q.is_cuda and bits == 2 and d == 128 and group_size == 32 and t == 1 and attn_mask is None
            and hq % kv_heads == 0 and 1 <= hq // kv_heads <= 8 and q.dtype in (torch.float16, torch.bfloat16)
            and k_scale.dtype == torch.float16 and v_scale.dtype == torch.float16 and q.stride(3) == 1
            and k_codes.shape[3] == 32)


@torch.library.custom_op("kvpass::kivi_gluon_main", mutates_args=("acc", "m", "l"))
def kivi_gluon_main(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, length: torch.Tensor,
                    acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor, splits: int, chunk: int, residual: int,
                    qk_scale: float) -> None:
    """Write splits [0, ``splits``) of the workspace (acc (B*H, S, R, 128), m, l (B*H, S, R) float32) for a KIVI-2
    cache (buffers of :mod:`kvpass.methods.kivi`: k_codes (B, H, NK, 32) uint8, k_scale / k_zero (B, H, NK / 32,
    128) fp16, v_codes (B, H, NV, 32) uint8, v_scale / v_zero (B, H, NV, 4) fp16) holding ``length`` (0-d int64)
    tokens, ``residual`` of them in the fp16 window: split s takes the whole key groups [s * chunk, (s + 1) * chunk)
    below the window. q (B, Hq, 1, 128) fp16/bf16; ``qk_scale`` includes log2(e). An opaque op (Gluon kernels
    are not traced by Inductor), so a compiled graph keeps it as one call."""
    b, hq, _, _ = q.shape
    h = k_codes.shape[1]
    if splits:
        _kivi_gluon_main_kernel[(splits, b * h)](
            q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, length, acc, m, l, q.stride(0), q.stride(1),
            acc.shape[1], chunk, qk_scale, H=h, R=hq // h, RESIDUAL=residual, NK_CAP=k_codes.shape[2],
            NV_CAP=v_codes.shape[2], num_warps=1)


@kivi_gluon_main.register_fake
def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, length, acc, m, l, splits, chunk, residual,
      qk_scale) -> None:
    return None
