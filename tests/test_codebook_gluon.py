"""The codebook schemes' Gluon main loop (kvpass.codegen.codebook_gluon) on a machine without a GPU: its centroid
gathers, run through a small PTX emulator against the codebook, and its sm_90 build with the installed Triton.
Gluon has no interpreter, so its outputs are checked against the reference on the GPU (tests/test_kernels.py, the
``codebook_gluon`` tests; bench/decode_attention.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.ptx_emulator import halves as _halves, run_ptx as _run_ptx

def _codebook(c: int, rng) -> np.ndarray:
    """A random (128 / C groups, 256 centroids, C) fp16 codebook and its shared-memory image as uint32 words."""
    book = rng.standard_normal((128 // c, 256, c)).astype(np.float16)
    return book, book.reshape(-1).view(np.uint32)


@pytest.mark.parametrize("c", [2, 4, 8])
def test_the_key_gather_reads_each_codes_centroid_pairs(c):
    """Key assembly: a word of 4 codes of groups 4j..4j+3 (base address of group 4j's codebook as its operand) gives,
    for byte i and pair q, channels 2q, 2q + 1 of that byte's centroid."""
    from kvpass.codegen import codebook_gluon
    rng = np.random.default_rng(c)
    book, shared = _codebook(c, rng)
    asm, n = codebook_gluon.key_asm(c), 2 * c
    for word_index in range(0, 32 // c):
        codes = rng.integers(0, 256, 4)
        word = int(sum(int(x) << (8 * i) for i, x in enumerate(codes)))
        base = 4 * word_index * 512 * c
        out = _run_ptx(asm, {n: word, n + 1: word, n + 2: base, n + 3: base}, shared)
        for i in range(4):
            for q in range(c // 2):
                got = _halves(out[i * (c // 2) + q])
                want = book[4 * word_index + i, codes[i], 2 * q:2 * q + 2]
                assert np.array_equal(np.array(got), want)


@pytest.mark.parametrize("c", [2, 4, 8])
def test_the_value_gather_pairs_two_tokens_channel_by_channel(c):
    """Value assembly: two tokens' units (4 codes, 2 at C = 8) give, for byte i, pair q and h, channel 2q + h of the
    byte's centroid with token a's value in the low half and token b's in the high half (the operand registers of
    V^T, whose k dimension is the tokens)."""
    from kvpass.codegen import codebook_gluon
    rng = np.random.default_rng(10 + c)
    book, shared = _codebook(c, rng)
    nbytes = codebook_gluon.value_bytes(c)
    asm, n = codebook_gluon.value_asm(c), nbytes * c
    for unit in range(0, 128 // c // nbytes):
        ca, cb = rng.integers(0, 256, nbytes), rng.integers(0, 256, nbytes)
        wa = int(sum(int(x) << (8 * i) for i, x in enumerate(ca)))
        wb = int(sum(int(x) << (8 * i) for i, x in enumerate(cb)))
        base = unit * nbytes * 512 * c
        out = _run_ptx(asm, {n: wa, n + 1: wb, n + 2: base, n + 3: base}, shared)
        for i in range(nbytes):
            group = unit * nbytes + i
            for q in range(c // 2):
                for h in range(2):
                    lo, hi = _halves(out[(i * (c // 2) + q) * 2 + h])
                    assert lo == book[group, ca[i], 2 * q + h] and hi == book[group, cb[i], 2 * q + h]


@pytest.mark.parametrize("c,has_mask,per_head,prefetch",
                         [(2, 0, False, True), (4, 1, True, False), (8, 2, False, False)])
def test_the_kernel_builds_for_sm90_with_only_the_codebooks_in_shared_memory(c, has_mask, per_head, prefetch):
    """The sm_90 build (no GPU needed): its shared memory is exactly the two 64 KB codebooks, so the assembly's
    ``global_smem`` base is theirs (no compiler scratch placed before them)."""
    from kvpass.codegen import codebook_gluon
    from tests.sm90_build import gluon_build
    pointers = {"Q": "*bf16", "KC": "*u8", "KB": "*fp16", "VC": "*u8", "VB": "*fp16", "LEN": "*i64", "ACC": "*fp32",
                "M": "*fp32", "L": "*fp32", "MASK": "*i1" if has_mask == 2 else "*fp32"}
    consts = (f"dict(H=8, R=4, C={c}, NC=4096, SINK=1, RESIDUAL=128, BOOK_PER_HEAD={per_head}, HAS_MASK={has_mask}, "
              f"W=8, PREFETCH={prefetch}, **mod.layouts(8, {c}))")
    built = gluon_build("kvpass.codegen.codebook_gluon", "_codebook_gluon_main_kernel", pointers, consts, 8,
                        {"qk_scale": "fp32"})
    assert built["shared"] == 2 * codebook_gluon.BOOK_BYTES
    assert built["ptx_global_smem"]


@pytest.mark.parametrize("batch_heads,coded,rows", [(8, 32768, 4), (64, 100, 8), (1, 5000, 1), (3, 31, 16)])
def test_the_plan_covers_every_code_position_in_one_wave(batch_heads, coded, rows):
    """The launch plan: its warps' spans (whole 32-token tiles, the last one partly used at most) cover every code
    position, the programs fit one wave of the SMs (a CPU device counts 4) unless one per cache is already more,
    and the tail launch gets the usual padded row count."""
    import math

    import torch

    from kvpass.codegen import codebook
    plan = codebook.gluon_plan(batch_heads, coded, rows, torch.device("cpu"))
    warps = codebook.TUNING["gluon"]["warps"]
    assert plan.chunk % 32 == 0 and plan.programs * warps * plan.chunk >= coded
    assert plan.chunk - 32 < math.ceil(coded / (plan.programs * warps))
    assert plan.programs == 1 or plan.programs * batch_heads <= 4 * codebook.TUNING["gluon"]["programs_per_sm"]
    assert plan.rows_pad == max(16, 1 << (rows - 1).bit_length())
