"""KIVI-2 main loop in Gluon: the steady-state split programs of :mod:`.kivi` with every register placed by hand.

The Triton main loop (:func:`.kivi._kivi_main_group`) spends 5.5 instructions a code, most of them moving
dequantized values between the load layout and the tensor cores' operand layouts through shared memory
(bench/results/kernel_profile.json). Here the packed words are loaded straight into the lanes that own them in
the mma.sync operand fragments, so every code is unpacked in the register it is multiplied from, and the sm_90
build holds no shared memory at all (every layout change is asserted trivial):

- one warp a program, one key group (G = 32 tokens) a step, the next group's loads issued a step ahead;
- scores^T (32 tokens, 8 query rows) = codes . (q * s_k)^T + bias: the key scales fold into the query (per
  channel, fixed within a group), so the key operand is the raw codes; the query rows are the N = 8 side, so
  4 query heads pad 8 rows, not 16;
- the head dimension of the score product is permuted so that the four codes a lane needs of a 16-channel
  k-slice are the four bytes of one 32-bit word (a bit slot of the planar packing: :func:`kvpass.packing.pack_planar`);
- values: O^T slot i += codes_i^T . (P^T * s_v,i) + z_v . P^T (a slot of 32 channels is one value group, so the
  value scale and zero are per token there); P^T is the second operand of that product, one register shuffle
  from the scores' accumulator;
- a code becomes an fp16 by one byte permute (shared by the four slots) and one lop3 per pair of codes: slot i's
  bits, left in place, OR-ed into the mantissa of 2^(10 - 2i) give exactly 2^(10 - 2i) + c. The magic is never
  subtracted code by code: products with constant operands of -2^(10 - 2i) take it off (keys: into the score
  bias, with q . z_k; values: into each slot's accumulator), 24 extra mma instructions a group instead of 128
  subtractions.

Conditions (checked by :func:`applies`): a CUDA device, 2 bits, head_dim 128, group 32, one new token, at most 8
query heads per kv head, fp16 scales; a padding mask shared by the heads is added to the scores; a duo layer's
retrieval heads read the query rows of their model kv heads. It writes the same (acc, m, l) workspace rows as
the Triton main launch, so the tail launch and the merge are shared. Gluon has no interpreter: the kernel is
checked against :meth:`kvpass.methods.kivi.KIVI.attend` on the GPU (tests/test_kernels.py, bench/decode_attention.py)
and built for sm_90 on the CPU (tests/test_kivi_gluon.py). On the H200 (bench/results/decode_attention.json,
``gluon_run``): 1.21 / 1.72 / 1.98 / 2.47x bf16 SDPA at 1 x 32K / 1 x 128K / 8 x 32K / 8 x 128K, against 1.10 /
1.22 / 1.29 / 1.33x for the Triton loop; its sm_90 build has 758 instructions a group (the Triton loop 1450),
168 registers.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .decode import mask_kind

# one word (4 bytes of a token's planar row) -> its 16 codes as exact fp16: output 4 * i + 2 * hi + e is the code
# of byte 2 * hi + e at bit slot i (bits 2i, 2i + 1)
# Slot i's code sits at bits 2i, 2i + 1 of its byte: OR-ed (masked in place, no shift) into the mantissa of
# 2^(10 - 2i) (1024, 256, 64, 16: mantissa ulp 4^-i), the fp16 is 2^(10 - 2i) + c exactly; one packed subtraction
# of the magic leaves c. Byte pairs are first moved to bits 0-7 and 16-23 (one permute for all four slots).
_MAGIC = (0x6400, 0x5C00, 0x5400, 0x4C00)


def _slot_lines(src: str, i: int, out: int, sub: bool = True) -> str:
    mask = 0x00030003 << (2 * i)
    magic = _MAGIC[i] * 0x10001
    if not sub:       # the key codes keep the magic: the score bias takes it off (one product per group)
        return f"lop3.b32 ${out}, {src}, {mask:#x}, {magic:#x}, 0xea;\n"
    return (f"lop3.b32 t, {src}, {mask:#x}, {magic:#x}, 0xea;\n"
            f"mov.b32 mag, {magic:#x};\n"
            f"sub.rn.f16x2 ${out}, t, mag;\n")


# One word (4 bytes of a token's planar row, given twice: pack 2) -> its 16 codes plus the magic 2^(10 - 2i) as
# exact fp16, two to an output register: output 2 * i + hi holds bytes 2 * hi (low half) and 2 * hi + 1 at slot i.
_WORD_ASM = gl.constexpr("{\n.reg .b32 lo, hi;\nprmt.b32 lo, $8, 0, 0x4140;\nprmt.b32 hi, $8, 0, 0x4342;\n"
                         + "".join(_slot_lines(src, i, 2 * i + h, sub=False) for i in range(4)
                                   for h, src in ((0, "lo"), (1, "hi"))) + "}")


def _pair_asm(j: int) -> str:
    """Two tokens' words (a: $4, b: $5, pack 2) -> byte j of both at each bit slot i plus the slot's magic as exact
    fp16, output i holding a's in its low half and b's in the high half."""
    sel = ((4 + j) << 12) | ((4 + j) << 8) | (j << 4) | j
    return ("{\n.reg .b32 p, t, mag;\n" + f"prmt.b32 p, $4, $5, {sel:#x};\n"
            + "".join(_slot_lines("p", i, i, sub=False) for i in range(4)) + "}")


_PAIR_ASM_0 = gl.constexpr(_pair_asm(0))
_PAIR_ASM_1 = gl.constexpr(_pair_asm(1))
_PAIR_ASM_2 = gl.constexpr(_pair_asm(2))
_PAIR_ASM_3 = gl.constexpr(_pair_asm(3))


@gluon.jit
def _word_codes(w):
    """(32, 8) int32 words of 32 tokens -> the key operand (32 tokens, 128 permuted channels) fp16, each code plus
    its slot's magic."""
    o = gl.inline_asm_elementwise(_WORD_ASM, "=r," * 8 + "r,r", [gl.join(w, w)], dtype=(gl.float16,) * 8,
                                  is_pure=True, pack=2)                 # each (32 n, 8 w, 2 e)
    x0 = gl.join(o[0], o[1])                                            # (32, 8, e, hi), slot 0
    x1 = gl.join(o[2], o[3])
    x2 = gl.join(o[4], o[5])
    x3 = gl.join(o[6], o[7])
    x = gl.join(gl.join(x0, x1), gl.join(x2, x3))                       # (32, 8, e, hi, i0, i1)
    x = gl.reshape(x, [32, 4, 2, 2, 2, 2, 2])                           # (n, t, h, e, hi, i0, i1)
    x = gl.permute(x, [0, 6, 5, 2, 4, 1, 3])                            # (n, i1, i0, h, hi, t, e)
    return gl.reshape(x, [32, 128])


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
def _code_loads(kc, vc, start, k_off, v_off):
    """One key group's packed words: keys and values, (32 tokens, 8 words) int32 each."""
    return gl.load(kc + start * 8 + k_off), gl.load(vc + start * 8 + v_off)


@gluon.jit
def _scale_loads(KS, KZ, VS, VZ, ks_base, vs_base, start, kch, vs_off, z_off, z_ok):
    """One key group's key scales / zeros by channel (128,), value scales (32 tokens, 4 slots) and the value-zero
    operand (16, 32) (rows 0-3: slots)."""
    grp = ks_base + start * 4                     # (start // 32) * 128
    ksc = gl.load(KS + grp + kch)
    kze = gl.load(KZ + grp + kch)
    vsc = gl.load(VS + vs_base + start * 4 + vs_off)
    az = gl.load(VZ + vs_base + start * 4 + z_off, mask=z_ok, other=0.0)
    return ksc, kze, vsc, az


@gluon.jit
def _by_slot(x):
    """(128, 8) in the permuted channel order -> its four 32-channel slots, (32, 8) each."""
    x = gl.permute(gl.reshape(x, [2, 2, 32, 8]), [2, 3, 1, 0])       # (32, 8, i0, i1)
    x01, x23 = gl.split(x)
    x0, x1 = gl.split(x01)
    x2, x3 = gl.split(x23)
    return x0, x1, x2, x3


@gluon.jit
def _group_step(kw, vw, ksc, kze, vsc, az, qt, m_i, l_i, o0, o1, o2, o3, oz, start, qk_scale, MASK, b, mask_w, tok,
                mma: gl.constexpr, a_op: gl.constexpr, b_op: gl.constexpr, HAS_MASK: gl.constexpr):
    """One key group (32 tokens from ``start``) of a program: its loaded data (:func:`_code_loads`,
    :func:`_scale_loads`) into the running (m, l) (8,) and the value accumulators o0..o3 (32, 8), oz (16, 8)."""
    D: gl.constexpr = 128
    # ---- scores^T (32 tokens, 8 rows) = codes . (q * s_k)^T + (z_k - magic * s_k) . q^T
    kcodes = gl.convert_layout(_word_codes(kw), a_op, assert_trivial=True)
    ks_k = gl.reshape(gl.permute(gl.reshape(ksc, [4, 4, 2, 2, 2]), [0, 2, 3, 1, 4]), [D])     # by channel -> k
    kz_k = gl.reshape(gl.permute(gl.reshape(kze, [4, 4, 2, 2, 2]), [0, 2, 3, 1, 4]), [D])
    qs = qt * gl.convert_layout(ks_k, gl.SliceLayout(1, b_op), assert_trivial=True)[:, None]
    az_k = gl.zeros([16, D], gl.float16, layout=a_op) + gl.convert_layout(kz_k, gl.SliceLayout(0, a_op))[None, :]
    bias = mma_v2(az_k, qt, gl.zeros([16, 8], gl.float32, layout=mma))
    qs0, qs1, qs2, qs3 = _by_slot(qs)
    bias = mma_v2(gl.full([16, 32], -1024.0, gl.float16, layout=a_op), gl.convert_layout(qs0, b_op), bias)
    bias = mma_v2(gl.full([16, 32], -256.0, gl.float16, layout=a_op), gl.convert_layout(qs1, b_op), bias)
    bias = mma_v2(gl.full([16, 32], -64.0, gl.float16, layout=a_op), gl.convert_layout(qs2, b_op), bias)
    bias = mma_v2(gl.full([16, 32], -16.0, gl.float16, layout=a_op), gl.convert_layout(qs3, b_op), bias)
    bias32 = gl.convert_layout(gl.reshape(gl.permute(gl.join(bias, bias), [2, 0, 1]), [32, 8]), mma)
    s = mma_v2(kcodes, qs, bias32) * qk_scale
    if HAS_MASK:
        pos = start + tok
        inside = pos < mask_w
        if HAS_MASK == 2:
            add = gl.where(gl.load(MASK + b * mask_w + pos, mask=inside, other=1) != 0, 0.0, float("-inf"))
        else:
            add = gl.load(MASK + b * mask_w + pos, mask=inside, other=0.0) * 1.4426950408889634
        s = s + add[:, None]
    # ---- online softmax over the tokens (base 2); columns are the query rows; nothing visible: m stays -inf
    m_new = gl.maximum(m_i, gl.max(s, axis=0))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s - m_safe[None, :])
    l_i = l_i * alpha + gl.sum(p, axis=0)
    m_i = m_new
    pt = gl.convert_layout(p.to(gl.float16), b_op)                      # (32 tokens, 8 rows)
    a8 = alpha[None, :]
    # ---- values: O^T slot i += codes_i^T . (P^T * s_v,i); oz += z_v . P^T
    wab = gl.permute(gl.reshape(vw, [16, 2, 8]), [0, 2, 1])             # (16 pairs, 8 words, 2 e)
    c00, c01, c02, c03 = _slot_codes(wab, 0)
    c10, c11, c12, c13 = _slot_codes(wab, 1)
    c20, c21, c22, c23 = _slot_codes(wab, 2)
    c30, c31, c32, c33 = _slot_codes(wab, 3)
    v_lo, v_hi = gl.split(gl.reshape(vsc, [32, 2, 2]))
    s0, s2 = gl.split(v_lo)
    s1, s3 = gl.split(v_hi)
    oz = mma_v2(az, pt, oz * a8)
    # the codes carry the magic 2^(10 - 2i): a constant operand takes magic * sum_t (P^T * s_v,i) off again
    b0 = pt * gl.convert_layout(s0, gl.SliceLayout(1, b_op))[:, None]
    b1 = pt * gl.convert_layout(s1, gl.SliceLayout(1, b_op))[:, None]
    b2 = pt * gl.convert_layout(s2, gl.SliceLayout(1, b_op))[:, None]
    b3 = pt * gl.convert_layout(s3, gl.SliceLayout(1, b_op))[:, None]
    o0 = mma_v2(gl.convert_layout(_value_operand(c00, c10, c20, c30), a_op, assert_trivial=True), b0, o0 * a8)
    o1 = mma_v2(gl.convert_layout(_value_operand(c01, c11, c21, c31), a_op, assert_trivial=True), b1, o1 * a8)
    o2 = mma_v2(gl.convert_layout(_value_operand(c02, c12, c22, c32), a_op, assert_trivial=True), b2, o2 * a8)
    o3 = mma_v2(gl.convert_layout(_value_operand(c03, c13, c23, c33), a_op, assert_trivial=True), b3, o3 * a8)
    o0 = mma_v2(gl.full([32, 32], -1024.0, gl.float16, layout=a_op), b0, o0)
    o1 = mma_v2(gl.full([32, 32], -256.0, gl.float16, layout=a_op), b1, o1)
    o2 = mma_v2(gl.full([32, 32], -64.0, gl.float16, layout=a_op), b2, o2)
    o3 = mma_v2(gl.full([32, 32], -16.0, gl.float16, layout=a_op), b3, o3)
    return m_i, l_i, o0, o1, o2, o3, oz


@gluon.jit
def _kivi_gluon_main_kernel(Q, KC, KS, KZ, VC, VS, VZ, LEN, ACC, M, L, KV_MAP, MASK, stride_qb, stride_qh,
                            n_splits, chunk, qk_scale, mask_w, H: gl.constexpr, R: gl.constexpr,
                            RESIDUAL: gl.constexpr, NK_CAP: gl.constexpr, NV_CAP: gl.constexpr,
                            MAPPED: gl.constexpr, HAS_MASK: gl.constexpr, PREFETCH: gl.constexpr):
    """Split program_id(0) of (batch, kv head) program_id(1): whole groups [split * chunk, ...) below the
    main-loop bound, written to workspace split ``split`` of ``n_splits`` (rows < R). PREFETCH 1: the next group's
    loads are issued before this group's arithmetic (registers carried over the loop); 2: its packed words only.
    MAPPED (a duo layer's retrieval heads): cache head h holds the model's kv head KV_MAP[h], whose R query rows it
    reads. HAS_MASK
    (:func:`.decode.mask_kind`): MASK (B, 1, mask_w) added to the scores (1: float32, 2: bool, False hides);
    positions past its width are unmasked."""
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
    if MAPPED:
        head = gl.load(KV_MAP + head)
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

    # q^T (128 permuted channels, 8 rows): k = 16 (2 i + h) + 8 hi + 2 t + e is channel 32 i + 8 t + 4 h + 2 hi + e
    qk = gl.arange(0, D, layout=gl.SliceLayout(1, b_op))
    qn = gl.arange(0, 8, layout=gl.SliceLayout(0, b_op))
    qch = (qk >> 5) * 32 + ((qk >> 1) & 3) * 8 + ((qk >> 4) & 1) * 4 + ((qk >> 3) & 1) * 2 + (qk & 1)
    q_ptr = Q + b * stride_qb + (head * R + qn)[None, :] * stride_qh + qch[:, None]
    qt = gl.load(q_ptr, mask=(qn < R)[None, :], other=0.0).to(gl.float16)

    kn = gl.arange(0, 32, layout=gl.SliceLayout(1, kw_layout))
    kwd = gl.arange(0, 8, layout=gl.SliceLayout(0, kw_layout))
    k_off = kn[:, None] * 8 + kwd[None, :]
    vn = gl.arange(0, 32, layout=gl.SliceLayout(1, vw_layout))
    vwd = gl.arange(0, 8, layout=gl.SliceLayout(0, vw_layout))
    v_off = vn[:, None] * 8 + vwd[None, :]
    kch = gl.arange(0, D, layout=ks_layout)
    sn = gl.arange(0, 32, layout=gl.SliceLayout(1, vs_layout))
    ss = gl.arange(0, 4, layout=gl.SliceLayout(0, vs_layout))
    vs_off = sn[:, None] * 4 + ss[None, :]
    zm = gl.arange(0, 16, layout=gl.SliceLayout(1, a_op))
    zk = gl.arange(0, 32, layout=gl.SliceLayout(0, a_op))
    z_off = zk[None, :] * 4 + zm[:, None]
    z_ok = (zm < 4)[:, None]
    tok = gl.arange(0, 32, layout=gl.SliceLayout(1, mma))

    m_i = gl.full([8], float("-inf"), gl.float32, layout=gl.SliceLayout(0, mma))
    l_i = gl.zeros([8], gl.float32, layout=gl.SliceLayout(0, mma))
    o0 = gl.zeros([32, 8], gl.float32, layout=mma)
    o1 = gl.zeros([32, 8], gl.float32, layout=mma)
    o2 = gl.zeros([32, 8], gl.float32, layout=mma)
    o3 = gl.zeros([32, 8], gl.float32, layout=mma)
    oz = gl.zeros([16, 8], gl.float32, layout=mma)             # row i: sum_t p z_v of slot i
    # PREFETCH 1: the next group's loads are in flight while this one computes; 2: its packed words only
    first = gl.maximum(gl.minimum(lo, hi - G), 0)
    kw, vw = _code_loads(kc, vc, first, k_off, v_off)
    ksc, kze, vsc, az = _scale_loads(KS, KZ, VS, VZ, ks_base, vs_base, first, kch, vs_off, z_off, z_ok)
    for start in range(lo, hi, G):
        nxt = gl.maximum(gl.minimum(start + G, hi - G), 0)
        if PREFETCH == 1:
            kw_n, vw_n = _code_loads(kc, vc, nxt, k_off, v_off)
            ksc_n, kze_n, vsc_n, az_n = _scale_loads(KS, KZ, VS, VZ, ks_base, vs_base, nxt, kch, vs_off, z_off, z_ok)
        elif PREFETCH == 2:
            kw_n, vw_n = _code_loads(kc, vc, nxt, k_off, v_off)
            ksc, kze, vsc, az = _scale_loads(KS, KZ, VS, VZ, ks_base, vs_base, start, kch, vs_off, z_off, z_ok)
        else:
            kw, vw = _code_loads(kc, vc, start, k_off, v_off)
            ksc, kze, vsc, az = _scale_loads(KS, KZ, VS, VZ, ks_base, vs_base, start, kch, vs_off, z_off, z_ok)
        m_i, l_i, o0, o1, o2, o3, oz = _group_step(kw, vw, ksc, kze, vsc, az, qt, m_i, l_i, o0, o1, o2, o3, oz,
                                                   start, qk_scale, MASK, b, mask_w, tok, mma, a_op, b_op, HAS_MASK)
        if PREFETCH == 1:
            kw, vw, ksc, kze, vsc, az = kw_n, vw_n, ksc_n, kze_n, vsc_n, az_n
        elif PREFETCH == 2:
            kw, vw = kw_n, vw_n
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
    gl.store(M + base + on, m_i, mask=on < R)
    gl.store(L + base + on, l_i, mask=on < R)


def applies(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, bits: int,
            group_size: int, rows: int) -> bool:
    """Whether this kernel can run the main programs of a :func:`.kivi.kivi_attention` call: a CUDA device, 2-bit
    codes at head_dim 128 in groups of 32, one new token, ``rows`` (query heads per kv head) 1-8, fp16 or bf16
    queries and fp16 scales (masks: as :func:`.decode.kernel_mask` gives them)."""
    b, hq, t, d = q.shape
    return (q.is_cuda and bits == 2 and d == 128 and group_size == 32 and t == 1
            and 1 <= rows <= 8 and q.dtype in (torch.float16, torch.bfloat16)
            and k_scale.dtype == torch.float16 and v_scale.dtype == torch.float16 and q.stride(3) == 1
            and k_codes.shape[3] == 32)


@torch.library.custom_op("kvpass::kivi_gluon_main", mutates_args=("acc", "m", "l"))
def kivi_gluon_main(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, length: torch.Tensor,
                    acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor, kv_map: torch.Tensor | None,
                    attn_mask: torch.Tensor | None, rows: int, splits: int, chunk: int, residual: int,
                    qk_scale: float, prefetch: int) -> None:
    """Write splits [0, ``splits``) of the workspace (acc (B*H, S, R, 128), m, l (B*H, S, R) float32) for a KIVI-2
    cache (buffers of :mod:`kvpass.methods.kivi`: k_codes (B, H, NK, 32) uint8, k_scale / k_zero (B, H, NK / 32,
    128) fp16, v_codes (B, H, NV, 32) uint8, v_scale / v_zero (B, H, NV, 4) fp16) holding ``length`` (0-d int64)
    tokens, ``residual`` of them in the fp16 window: split s takes the whole key groups [s * chunk, (s + 1) * chunk)
    below the window. q (B, Hq, 1, 128) fp16/bf16, ``rows`` query heads per kv head; ``kv_map``: None, or int32 (H,)
    the model kv head of each cache head (a duo layer's retrieval heads); ``attn_mask``: None or a
    :func:`.decode.kernel_mask` (B, 1, W) (float32 added to the scores, or bool); ``qk_scale`` includes log2(e);
    ``prefetch``: issue each group's loads a step ahead (1; registers held over the loop), its packed words only
    (2), or not (0). An opaque op (Gluon kernels
    are not traced by Inductor), so a compiled graph keeps it as one call."""
    b = q.shape[0]
    h = k_codes.shape[1]
    if splits:
        _kivi_gluon_main_kernel[(splits, b * h)](
            q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, length, acc, m, l, m if kv_map is None else kv_map,
            m if attn_mask is None else attn_mask, q.stride(0), q.stride(1), acc.shape[1], chunk, qk_scale,
            0 if attn_mask is None else attn_mask.shape[-1], H=h, R=rows, RESIDUAL=residual,
            NK_CAP=k_codes.shape[2], NV_CAP=v_codes.shape[2], MAPPED=kv_map is not None,
            HAS_MASK=mask_kind(attn_mask), PREFETCH=int(prefetch), num_warps=1)


@kivi_gluon_main.register_fake
def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, length, acc, m, l, kv_map, attn_mask, rows, splits,
      chunk, residual, qk_scale, prefetch) -> None:
    return None
