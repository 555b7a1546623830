"""MILLION / CQ decode main loop in Gluon: the codebooks in shared memory, centroids gathered into the mma operands.

The Triton main loop (:func:`.codebook._codebook_main_kernel`) gathers every centroid from global memory. Its 32 lanes
hit 32 different cache lines, so L1 serves one lane a cycle: 0.18-0.44x bf16 SDPA on the H200. Here each program
copies its layer's (or head's) key and value codebooks, 256 x D fp16 each (128 KB at head_dim 128), into shared
memory once, and the loop reads centroids from there with ``ld.shared`` (a bank conflict at most, not a cache line,
a lane). The hot loop has no other shared-memory traffic: every layout change is asserted trivial.

- A program is W warps (one CTA an SM: the codebooks fill its shared memory); each warp runs its own flash loop
  over its own span of the codes and writes its own workspace split, so warps never synchronise after the fill.
  Every tensor carries the warp as its leading dimension.
- Keys: scores^T (32 tokens, 8 query rows) = K . q^T on mma.sync m16n8k16. The head dimension of the product is
  permuted so that lane t's 16 channel pairs are channels 32t..32t+31, i.e. whole codes in 32 / C contiguous
  bytes of a token's code row: lane t loads them as words and turns each byte straight into the C / 2 shared-memory
  loads of its centroid's channel pairs, which are the operand registers (:data:`_K_ASM`).
- Values: O^T (128 channels, 8 rows) += V^T . P^T. The output channels are permuted so lane g's rows are channels
  16g..16g+15 (whole codes again); its operand registers pair two tokens of one channel, so each (token a, token b)
  pair of centroid words becomes two registers by two byte permutes (:data:`_V_ASM`).
- Scores in base 2, one online softmax a warp; P^T reaches the value product through register shuffles.

Conditions (:func:`applies`): a CUDA device, head_dim 128, 8-bit codes over C = 2, 4 or 8 channels (MILLION-4,
MILLION-2 / CQ-2, CQ-1), fp16 codebooks, one new token, at most 8 query heads per kv head. It writes the same
(acc, m, l) workspace rows as the Triton main launch, so the sink + window launch and the merge are shared. Gluon
has no interpreter: the kernel is checked against :meth:`kvpass.methods._vq.ChannelGroupVQ.attend` on the GPU
(tests/test_kernels.py, bench/decode_attention.py) and built for sm_90 on the CPU (tests/test_codebook_gluon.py).
On the H200 (bench/results/decode_attention.json, ``codebook_gluon_run``): MILLION-4 0.84 / 1.14 / 1.25 / 1.36x and
CQ-1 0.98 / 1.54 / 1.80 / 2.12x bf16 SDPA at 1 x 32K / 1 x 128K / 8 x 32K / 8 x 128K (the Triton loop: 0.18-0.26x
and 0.37-0.44x), bound by the shared-memory pipe (random codes: about 3.5-way bank conflicts a load).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .decode import mask_kind
from .gluon_splits import query_indices, softmax_step, store_warp_splits

D_MODEL = 128            # the head_dim this kernel is written for
BOOK_BYTES = 256 * D_MODEL * 2     # one codebook: 256 centroids of D / C groups x C channels, fp16


def _code_address(reg: str, byte: int, c: int, word: str, base: str) -> str:
    """PTX putting the shared address of the centroid that byte ``byte`` of ``word`` names in ``reg``: the byte times
    2C (a centroid's bytes) plus ``base``, the address of that byte's group's codebook."""
    shift = 8 * byte - {2: 2, 4: 3, 8: 4}[c]
    op = f"shl.b32 {reg}, {word}, {-shift};" if shift < 0 else f"shr.u32 {reg}, {word}, {shift};"
    return f"{op}\nand.b32 {reg}, {reg}, {255 * 2 * c:#x};\nadd.u32 {reg}, {reg}, {base};\n"


def key_asm(c: int) -> str:
    """One word (4 codes of consecutive channel groups; ``$2C``, given twice: pack 2) and the shared address of its
    first group's codebook (``$2C + 3``, given twice) -> the 4 centroids' channel pairs, output i * C/2 + q holding
    channels 2q, 2q + 1 of byte i's centroid. A group's codebook is 256 centroids of C fp16: 512 C bytes."""
    lines, half = [], c // 2
    for i in range(4):
        lines.append(_code_address("a", i, c, f"${2 * c}", f"${2 * c + 3}"))
        lines += [f"ld.shared.b32 ${i * half + q}, [a+{i * 512 * c + 4 * q}];\n" for q in range(half)]
    return "{\n.reg .b32 a;\n" + "".join(lines) + "}"


def value_bytes(c: int) -> int:
    """Codes in one value unit (the int32 word, or the int16 half at C = 8, that one lane loads a token)."""
    return 2 if c == 8 else 4


def value_asm(c: int) -> str:
    """Two tokens' value units (a: ``$n``, b: ``$n + 1``, pack 2) and the shared address of the unit's first group's
    codebook (``$n + 3``) -> output (i * C/2 + q) * 2 + h holding channel 2q + h of byte i's centroid, token a's in
    the low half and b's in the high half (n = the output count, value_bytes(c) * C)."""
    half = c // 2
    n = value_bytes(c) * c
    lines = []
    for i in range(value_bytes(c)):
        lines.append(_code_address("a", i, c, f"${n}", f"${n + 3}"))
        lines.append(_code_address("b", i, c, f"${n + 1}", f"${n + 3}"))
        for q in range(half):
            off = i * 512 * c + 4 * q
            o = (i * half + q) * 2
            lines.append(f"ld.shared.b32 x, [a+{off}];\nld.shared.b32 y, [b+{off}];\n"
                         f"prmt.b32 ${o}, x, y, 0x5410;\nprmt.b32 ${o + 1}, x, y, 0x7632;\n")
    return "{\n.reg .b32 a, b, x, y;\n" + "".join(lines) + "}"


_K_ASM_2 = gl.constexpr(key_asm(2))
_K_ASM_4 = gl.constexpr(key_asm(4))
_K_ASM_8 = gl.constexpr(key_asm(8))
_V_ASM_2 = gl.constexpr(value_asm(2))
_V_ASM_4 = gl.constexpr(value_asm(4))
_V_ASM_8 = gl.constexpr(value_asm(8))
_SMEM_ASM = gl.constexpr("mov.u32 $0, global_smem;")
# the CTA barrier: gl.thread_barrier in Triton 3.6 (the GPU's), gl.barrier from 3.7 on
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _join4(o0, o1, o2, o3):
    return gl.join(gl.join(o0, o1), gl.join(o2, o3))


@gluon.jit
def _join8(o):
    return gl.join(_join4(o[0], o[1], o[2], o[3]), _join4(o[4], o[5], o[6], o[7]))


@gluon.jit
def _join16(o):
    return gl.join(gl.join(_join4(o[0], o[1], o[2], o[3]), _join4(o[4], o[5], o[6], o[7])),
                   gl.join(_join4(o[8], o[9], o[10], o[11]), _join4(o[12], o[13], o[14], o[15])))


@gluon.jit
def _key_operand(kw, kb, W: gl.constexpr, C: gl.constexpr):
    """Key words (W, 32 tokens, 32 / C words) int32 and their codebook addresses (1, 1, 32 / C) -> the key operand
    (W, 32 tokens, 128 k) fp16, k = 8p + 2t + e holding channel 32t + 2p + e."""
    x = gl.join(kw, kw)
    a = gl.join(kb, kb)
    if C == 2:
        o = gl.inline_asm_elementwise(_K_ASM_2, "=r," * 4 + "r,r,r,r", [x, a], dtype=(gl.float16,) * 4,
                                      is_pure=True, pack=2)
        y = gl.reshape(_join4(o[0], o[1], o[2], o[3]), [W, 32, 4, 4, 2, 2, 2])    # (w, n, t, wl, e, f0, f1)
        y = gl.permute(y, [0, 1, 3, 6, 5, 2, 4])
    elif C == 4:
        o = gl.inline_asm_elementwise(_K_ASM_4, "=r," * 8 + "r,r,r,r", [x, a], dtype=(gl.float16,) * 8,
                                      is_pure=True, pack=2)
        y = gl.reshape(_join8(o), [W, 32, 4, 2, 2, 2, 2, 2])                   # (w, n, t, wl, e, f0, f1, f2)
        y = gl.permute(y, [0, 1, 3, 7, 6, 5, 2, 4])
    else:
        o = gl.inline_asm_elementwise(_K_ASM_8, "=r," * 16 + "r,r,r,r", [x, a], dtype=(gl.float16,) * 16,
                                      is_pure=True, pack=2)
        y = _join16(o)                                                          # (w, n, t, e, f0, f1, f2, f3)
        y = gl.permute(y, [0, 1, 7, 6, 5, 4, 2, 3])
    return gl.reshape(y, [W, 32, 128])


@gluon.jit
def _value_operand(vw, vb, W: gl.constexpr, C: gl.constexpr):
    """Value units (W, 32 tokens, NU) int32 and their codebook addresses (the same shape and layout) -> the value
    operand (W, 128 m, 32 tokens) fp16, row m = 16 mt + 8 mh + g holding channel 16 g + 2 mt + mh."""
    NU: gl.constexpr = vw.shape[2]
    wab = gl.permute(gl.reshape(vw, [W, 16, 2, NU]), [0, 1, 3, 2])           # (w, pair, unit, e)
    a = gl.permute(gl.reshape(vb, [W, 16, 2, NU]), [0, 1, 3, 2])
    if C == 2:
        o = gl.inline_asm_elementwise(_V_ASM_2, "=r," * 8 + "r,r,r,r", [wab, a], dtype=(gl.float16,) * 8,
                                      is_pure=True, pack=2)
        y = gl.reshape(_join8(o), [W, 16, 8, 2, 2, 2, 2, 2])                  # (w, pp, g, wl, e, f0, f1, f2)
        y = gl.permute(y, [0, 3, 7, 6, 5, 2, 1, 4])
    elif C == 4:
        o = gl.inline_asm_elementwise(_V_ASM_4, "=r," * 16 + "r,r,r,r", [wab, a], dtype=(gl.float16,) * 16,
                                      is_pure=True, pack=2)
        y = _join16(o)                                                          # (w, pp, g, e, f0, f1, f2, f3)
        y = gl.permute(y, [0, 7, 6, 5, 4, 2, 1, 3])
    else:
        o = gl.inline_asm_elementwise(_V_ASM_8, "=r," * 16 + "r,r,r,r", [wab, a], dtype=(gl.float16,) * 16,
                                      is_pure=True, pack=2)
        y = _join16(o)                                                          # (w, pp, g, e, f0, f1, f2, f3)
        y = gl.permute(y, [0, 7, 6, 5, 4, 2, 1, 3])
    return gl.reshape(y, [W, 128, 32])


@gluon.jit
def _code_loads(kc, vc, pk, hi_k, ck, pv, hi_v, cv, NKW: gl.constexpr, NU: gl.constexpr, vp_layout: gl.constexpr):
    """One tile's codes: key words (W, 32, NKW) and value units (W, 32, NU) as int32, zero past each warp's span."""
    kw = gl.load(kc + pk * NKW + ck, mask=pk < hi_k, other=0)
    vw = gl.load(vc + pv * NU + cv, mask=pv < hi_v, other=0).to(gl.int32)
    return kw, gl.convert_layout(vw, vp_layout, assert_trivial=True)


@gluon.jit
def _codebook_gluon_main_kernel(Q, KC, KB, VC, VB, LEN, ACC, M, L, MASK, stride_qb, stride_qh, n_splits, chunk,
                                steps, qk_scale, mask_w, H: gl.constexpr, R: gl.constexpr, C: gl.constexpr,
                                NC: gl.constexpr, SINK: gl.constexpr, RESIDUAL: gl.constexpr,
                                BOOK_PER_HEAD: gl.constexpr, HAS_MASK: gl.constexpr, W: gl.constexpr,
                                PREFETCH: gl.constexpr,
                                mma: gl.constexpr, kw_layout: gl.constexpr, vw_layout: gl.constexpr,
                                vp_layout: gl.constexpr, fill_layout: gl.constexpr):
    """Program program_id(0) of (batch, kv head) program_id(1): its warp w takes the code positions
    [s + (pid * W + w) * chunk, + chunk) (``steps`` tiles of 32) and writes workspace split pid * W + w of n_splits
    (rows < R). HAS_MASK (:func:`.decode.mask_kind`): MASK (B, 1, mask_w) added to the scores (1: float32, 2: bool,
    False hides); positions past its width are unmasked. PREFETCH: each tile's code loads are issued a step ahead."""
    D: gl.constexpr = 128
    GP: gl.constexpr = D // C                  # code bytes a token
    NKW: gl.constexpr = GP // 4                # key words a token
    V16: gl.constexpr = C == 8                 # value units: 2-byte halves at C = 8, words otherwise
    NU: gl.constexpr = GP // 2 if V16 else GP // 4
    UB: gl.constexpr = 2 if V16 else 4         # codes a value unit (value_bytes)
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)

    pid = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    head = bh % H
    length = gl.minimum(gl.load(LEN).to(gl.int32), NC + SINK + RESIDUAL)
    s0 = gl.minimum(length, SINK)
    n_end = gl.maximum(length - RESIDUAL, s0)

    # ---- both codebooks into shared memory (K: bytes [0, BOOK), V: [BOOK, 2 BOOK)), then a barrier
    smem = gl.allocate_shared_memory(gl.int32, [256, 128], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    book = (head if BOOK_PER_HEAD else 0) * (D * 128)              # int32 words a codebook: 256 * D / 2
    fr = gl.arange(0, 32, layout=gl.SliceLayout(1, fill_layout))
    fc = gl.arange(0, 128, layout=gl.SliceLayout(0, fill_layout))
    fill = fr[:, None] * 128 + fc[None, :]
    kb32 = KB.to(gl.pointer_type(gl.int32)) + book
    vb32 = VB.to(gl.pointer_type(gl.int32)) + book
    for r in gl.static_range(0, 128, 32):
        smem.slice(r, 32).store(gl.load(kb32 + r * 128 + fill))
        smem.slice(128 + r, 32).store(gl.load(vb32 + r * 128 + fill))
    _cta_barrier()

    # ---- per-warp spans; the warp is dimension 0 of every tensor
    L_K3: gl.constexpr = kw_layout
    wk = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, L_K3)))[:, None, None]
    nk = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L_K3)))[None, :, None]
    ck = gl.arange(0, NKW, layout=gl.SliceLayout(0, gl.SliceLayout(1, L_K3)))[None, None, :]
    wv = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, vw_layout)))[:, None, None]
    nv = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, vw_layout)))[None, :, None]
    cv = gl.arange(0, NU, layout=gl.SliceLayout(0, gl.SliceLayout(1, vw_layout)))[None, None, :]
    base = gl.inline_asm_elementwise(_SMEM_ASM, "=r,r", [ck], dtype=gl.int32, is_pure=True, pack=1)
    kaddr = base + ck * (4 * 512 * C)                                    # word j: groups 4j..4j+3
    vaddr = gl.inline_asm_elementwise(_SMEM_ASM, "=r,r", [cv], dtype=gl.int32, is_pure=True, pack=1) \
        + (2 * 128 * 256) + cv * (UB * 512 * C) + nv * 0 + wv * 0
    vaddr = gl.convert_layout(vaddr, vp_layout, assert_trivial=True)
    lo_k = s0 + (pid * W + wk) * chunk
    hi_k = gl.minimum(lo_k + chunk, n_end)
    lo_v = s0 + (pid * W + wv) * chunk
    hi_v = gl.minimum(lo_v + chunk, n_end)
    bh64 = bh.to(gl.int64)
    kc = KC.to(gl.pointer_type(gl.int32)) + bh64 * NC * NKW - SINK * NKW
    if V16:
        vc = VC.to(gl.pointer_type(gl.int16)) + bh64 * NC * NU - SINK * NU
    else:
        vc = VC.to(gl.pointer_type(gl.int32)) + bh64 * NC * NU - SINK * NU

    # q^T (W, 128 k, 8 rows): k = 8p + 2t + e is channel 32t + 2p + e; scores come out (W, 32 tokens, 8 rows)
    qk, qn, qw = query_indices(W, D, b_op)
    qch = ((qk >> 1) & 3) * 32 + (qk >> 3) * 2 + (qk & 1)
    q_ptr = Q + b * stride_qb + (head * R + qn) * stride_qh + qch + qw * 0
    qt = gl.load(q_ptr, mask=qn < R, other=0.0).to(gl.float16)

    L_S: gl.constexpr = gl.SliceLayout(2, mma)
    tok = gl.arange(0, 32, layout=gl.SliceLayout(0, L_S))[None, :]
    ws = gl.arange(0, W, layout=gl.SliceLayout(1, L_S))[:, None]
    lo_s = s0 + (pid * W + ws) * chunk
    hi_s = gl.minimum(lo_s + chunk, n_end)
    m_i = gl.full([W, 8], float("-inf"), gl.float32, layout=gl.SliceLayout(1, mma))
    l_i = gl.zeros([W, 8], gl.float32, layout=gl.SliceLayout(1, mma))
    o = gl.zeros([W, 128, 8], gl.float32, layout=mma)
    if PREFETCH:
        kw, vw = _code_loads(kc, vc, lo_k + nk, hi_k, ck, lo_v + nv, hi_v, cv, NKW, NU, vp_layout)
    for step in range(0, steps):
        if PREFETCH:       # the next tile's codes are in flight while this one computes
            kw_n, vw_n = _code_loads(kc, vc, lo_k + (step + 1) * 32 + nk, hi_k, ck, lo_v + (step + 1) * 32 + nv,
                                     hi_v, cv, NKW, NU, vp_layout)
        else:
            kw, vw = _code_loads(kc, vc, lo_k + step * 32 + nk, hi_k, ck, lo_v + step * 32 + nv, hi_v, cv, NKW, NU,
                                 vp_layout)
        kop = gl.convert_layout(_key_operand(kw, kaddr, W, C), a_op, assert_trivial=True)
        s = mma_v2(kop, qt, gl.zeros([W, 32, 8], gl.float32, layout=mma)) * qk_scale
        pos = lo_s + step * 32 + tok                                        # (W, 32)
        p, alpha, m_i, l_i = softmax_step(s, pos, hi_s, m_i, l_i, MASK, b, mask_w, HAS_MASK)
        pt = gl.convert_layout(p.to(gl.float16), b_op)                      # (W, 32 tokens, 8 rows)
        vop = gl.convert_layout(_value_operand(vw, vaddr, W, C), a_op, assert_trivial=True)
        o = mma_v2(vop, pt, o * alpha[:, None, :])
        if PREFETCH:
            kw, vw = kw_n, vw_n

    store_warp_splits(ACC, M, L, o, m_i, l_i, bh, pid, n_splits, R, W, mma)


def layouts(warps: int, c: int) -> dict:
    """The kernel's constexpr layouts for ``warps`` warps a program and C channels a code."""
    wb = [[1 << i, 0, 0] for i in range(warps.bit_length() - 1)]
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1, 1], instr_shape=[1, 16, 8])
    nw = 8 // c                                   # key words a lane: tokens g + 8j, words nw t .. nw t + nw - 1
    kw = gl.BlockedLayout([1, 1, nw], [1, 8, 4], [warps, 1, 1], [2, 1, 0])
    # value units: lane (g, t) holds units nwl g .. of tokens 2t + e + 8 kh + 16 ks
    nwl = 2 if c == 2 else 1
    nu = 8 * nwl
    lanes = [[0, 2, 0], [0, 4, 0], [0, 0, nwl], [0, 0, 2 * nwl], [0, 0, 4 * nwl]]
    unit = [[0, 0, 1]] if nwl == 2 else []
    # loaded with a token's units in adjacent registers (one vector load), then renamed so that the two tokens of a
    # pair are adjacent (the pack-2 elements of the unpacking assembly)
    vw = gl.DistributedLinearLayout(reg_bases=unit + [[0, 1, 0], [0, 8, 0], [0, 16, 0]], lane_bases=lanes,
                                    warp_bases=wb, block_bases=[], shape=[warps, 32, nu])
    vp = gl.DistributedLinearLayout(reg_bases=[[0, 1, 0]] + unit + [[0, 8, 0], [0, 16, 0]], lane_bases=lanes,
                                    warp_bases=wb, block_bases=[], shape=[warps, 32, nu])
    fill = gl.BlockedLayout([1, 4], [1, 32], [warps, 1], [1, 0])
    return dict(mma=mma, kw_layout=kw, vw_layout=vw, vp_layout=vp, fill_layout=fill)


def applies(q: torch.Tensor, k_codes: torch.Tensor, k_codebook: torch.Tensor, v_codebook: torch.Tensor,
            rows: int) -> bool:
    """Whether this kernel can run the main programs of a :func:`.codebook.codebook_attention` call: a CUDA device,
    head_dim 128, 8-bit codes over 2, 4 or 8 channels, contiguous fp16 codebooks, one new token, ``rows`` (query
    heads per kv head) 1-8, fp16 or bf16 queries."""
    b, hq, t, d = q.shape
    c = k_codebook.shape[-1]
    return (q.is_cuda and d == D_MODEL and t == 1 and c in (2, 4, 8) and k_codes.shape[3] == d // c
            and 1 <= rows <= 8 and q.dtype in (torch.float16, torch.bfloat16) and q.stride(3) == 1
            and k_codebook.dtype == torch.float16 and v_codebook.dtype == torch.float16
            and k_codebook.is_contiguous() and v_codebook.is_contiguous() and k_codes.is_contiguous())


@torch.library.custom_op("kvpass::codebook_gluon_main", mutates_args=("acc", "m", "l"))
def codebook_gluon_main(q: torch.Tensor, k_codes: torch.Tensor, k_codebook: torch.Tensor, v_codes: torch.Tensor,
                        v_codebook: torch.Tensor, length: torch.Tensor, acc: torch.Tensor, m: torch.Tensor,
                        l: torch.Tensor, attn_mask: torch.Tensor | None, rows: int, programs: int, chunk: int,
                        sink: int, residual: int, qk_scale: float, warps: int, prefetch: bool) -> None:
    """Write splits [0, programs * warps) of the workspace (acc (B*H, S, R, 128), m, l (B*H, S, R) float32) for a
    codebook cache (:mod:`kvpass.methods._vq`: codes (B, H, NC, 128 / C) uint8, codebooks (Hc, 128 / C, 256, C)
    fp16) holding ``length`` (0-d int64) tokens: warp split s takes the code positions [sink + s * chunk, + chunk)
    below the window. q (B, Hq, 1, 128) fp16/bf16, ``rows`` query heads per kv head; ``attn_mask``: None or a
    :func:`.decode.kernel_mask` (B, 1, W); ``qk_scale`` includes log2(e); ``prefetch``: issue each tile's code loads
    a step ahead (registers held over the loop). An opaque op (Gluon kernels are not
    traced by Inductor), so a compiled graph keeps it as one call."""
    b = q.shape[0]
    h, nc = k_codes.shape[1], k_codes.shape[2]
    c = k_codebook.shape[-1]
    if programs:
        _codebook_gluon_main_kernel[(programs, b * h)](
            q, k_codes, k_codebook, v_codes, v_codebook, length, acc, m, l, m if attn_mask is None else attn_mask,
            q.stride(0), q.stride(1), acc.shape[1], chunk, -(-chunk // 32), qk_scale,
            0 if attn_mask is None else attn_mask.shape[-1], H=h, R=rows, C=c, NC=nc, SINK=sink, RESIDUAL=residual,
            BOOK_PER_HEAD=k_codebook.shape[0] > 1, HAS_MASK=mask_kind(attn_mask), W=warps, PREFETCH=prefetch,
            num_warps=warps,
            **layouts(warps, c))


@codebook_gluon_main.register_fake
def _(q, k_codes, k_codebook, v_codes, v_codebook, length, acc, m, l, attn_mask, rows, programs, chunk, sink,
      residual, qk_scale, warps, prefetch) -> None:
    return None
