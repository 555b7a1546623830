"""KVQuant's Gluon main loop (kvpass.codegen.kvquant_gluon) on a machine without a GPU: its key and value assembly,
run through the PTX emulator against numpy on a shared-memory image laid out as the kernel's table fill documents,
and its sm_90 build with the installed Triton. Gluon has no interpreter, so the kernel's outputs are checked against
the reference on the GPU (tests/test_kernels.py, the ``kvquant_gluon`` tests; bench/decode_attention.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.ptx_emulator import half2, halves, run_ptx


def _row_words(codes: np.ndarray) -> np.ndarray:
    """128 3-bit codes -> the 12 little-endian int32 words of their packed row (kvpass.packing's bit order)."""
    stream = 0
    for i, c in enumerate(codes):
        stream |= int(c) << (3 * i)
    return np.array([(stream >> (32 * w)) & 0xFFFFFFFF for w in range(12)], dtype=np.uint64)


def _shared_image(levels_k, levels_v, rng_, cen, theta) -> np.ndarray:
    """The tables the kernel fills, as uint32 words: level pairs of K and V for every lane, the trig rows of the 32
    token offsets and the ranges and centers of the 4 lane groups."""
    from kvpass.codegen import kvquant_gluon as kg
    words = np.zeros(kg.TABLE_ROWS * 8, dtype=np.uint32)
    for e in range(64):
        words[e * 32:(e + 1) * 32] = half2(levels_k[e & 7], levels_k[e >> 3])
        words[(kg.V_LUT // 4) + e * 32:(kg.V_LUT // 4) + (e + 1) * 32] = half2(levels_v[e & 7], levels_v[e >> 3])
    for n in range(32):
        for t in range(4):
            at = (kg.TRIG + (4 * n + t) * 64) // 4
            for j in range(8):
                i = 16 * t + 2 * j
                words[at + j] = half2(np.cos(n * theta[i]), np.cos(n * theta[i + 1]))
                words[at + 8 + j] = half2(np.sin(n * theta[i]), np.sin(n * theta[i + 1]))
    for t in range(4):
        at = (kg.RANGES + 128 * t) // 4
        for part, (table, high) in enumerate(((rng_, 0), (rng_, 64), (cen, 0), (cen, 64))):
            for j in range(8):
                ch = high + 16 * t + 2 * j
                words[at + 8 * part + j] = half2(table[ch], table[ch + 1])
    return words


def _rounded(x) -> float:
    return float(np.float16(x))


@pytest.mark.parametrize("outliers", [0, 1, 2])
def test_the_key_assembly_dequantizes_patches_outliers_and_rotates(outliers):
    """Key assembly on every lane group t (odd t: the code run starts mid-word): channels 16t + 2j + e and their
    partners 64 + 16t + 2j + e come out as level * range + center, the token's outliers exact on the lane that
    holds them, rotated by the token's offset n (half2 arithmetic, replayed here with the same roundings)."""
    from kvpass.codegen import kvquant_gluon as kg
    rng = np.random.default_rng(outliers)
    levels = np.sort(rng.uniform(-1, 1, 8)).astype(np.float16)
    rng_ = rng.uniform(0.5, 2, 128).astype(np.float16)
    cen = rng.uniform(-0.5, 0.5, 128).astype(np.float16)
    theta = 1.0 / 10000 ** (np.arange(64) / 64)
    shared = _shared_image(levels, levels[::-1].copy(), rng_, cen, theta)
    asm = kg.key_asm(outliers)
    for trial in range(6):
        codes = rng.integers(0, 8, 128)
        words = _row_words(codes)
        n, g = int(rng.integers(0, 32)), int(rng.integers(0, 8))
        # outlier channels: one in the low run of lane group trial % 4, one in a high run
        out_ch = [16 * (trial % 4) + int(rng.integers(0, 16)), 64 + int(rng.integers(0, 64))][:outliers]
        out_val = rng.uniform(-8, 8, 2).astype(np.float16)
        for t in range(4):
            a = (3 * t) >> 1
            ops = {16: words[a], 18: words[a + 1], 20: words[a + 6], 22: words[a + 7],
                   24: kg.TRIG + (4 * n + t) * 64, 26: (4 * g + t) * 4,
                   28: sum(c << (8 * s) for s, c in enumerate(out_ch)), 30: half2(out_val[0], out_val[1])}
            ops = {k: int(v) for k, v in ops.items()}
            ops.update({k + 1: v for k, v in ops.items()})
            out = run_ptx(asm, ops, shared)
            for j in range(8):
                for e in range(2):
                    lo_ch, hi_ch, i = 16 * t + 2 * j + e, 64 + 16 * t + 2 * j + e, 16 * t + 2 * j + e
                    k = {ch: _rounded(float(levels[codes[ch]]) * float(rng_[ch]) + float(cen[ch]))
                         for ch in (lo_ch, hi_ch)}
                    for s, ch in enumerate(out_ch):
                        if ch in k:
                            k[ch] = float(out_val[s])
                    c, sn = _rounded(np.cos(n * theta[i])), _rounded(np.sin(n * theta[i]))
                    want_lo = _rounded(k[lo_ch] * c - _rounded(k[hi_ch] * sn))
                    want_hi = _rounded(k[hi_ch] * c + _rounded(k[lo_ch] * sn))
                    assert float(halves(out[j])[e]) == want_lo, (t, j, e)
                    assert float(halves(out[8 + j])[e]) == want_hi, (t, j, e)


def test_the_value_assembly_pairs_two_tokens_levels_channel_by_channel():
    """Value assembly on every lane group g (odd g: the run starts mid-word): output 2j + e holds channel
    16g + 2j + e's level of token a (low half) and token b (high half), the operand registers of V^T."""
    from kvpass.codegen import kvquant_gluon as kg
    rng = np.random.default_rng(7)
    levels_v = np.sort(rng.uniform(-1, 1, 8)).astype(np.float16)
    shared = _shared_image(levels_v[::-1].copy(), levels_v, np.ones(128, np.float16), np.zeros(128, np.float16),
                           np.zeros(64))
    asm = kg.value_asm()
    for _ in range(3):
        ca, cb = rng.integers(0, 8, 128), rng.integers(0, 8, 128)
        wa, wb = _row_words(ca), _row_words(cb)
        for g in range(8):
            a = (3 * g) >> 1
            out = run_ptx(asm, {16: int(wa[a]), 17: int(wb[a]), 18: int(wa[a + 1]), 19: int(wb[a + 1]),
                                20: (4 * g + 1) * 4, 21: (4 * g + 1) * 4}, shared)
            for j in range(8):
                for e in range(2):
                    ch = 16 * g + 2 * j + e
                    assert halves(out[2 * j + e]) == (levels_v[ca[ch]], levels_v[cb[ch]])


@pytest.mark.parametrize("warps,outliers,has_mask,prefetch", [(8, 2, 0, False), (16, 1, 2, True), (4, 0, 1, False)])
def test_the_kernel_builds_for_sm90_with_only_its_tables_in_shared_memory(warps, outliers, has_mask, prefetch):
    """The sm_90 build (no GPU needed): its shared memory is exactly the one allocation the assembly addresses from
    ``global_smem`` (no compiler scratch placed before it)."""
    from kvpass.codegen import kvquant_gluon
    from tests.sm90_build import gluon_build
    pointers = {"Q": "*bf16", "KC": "*u8", "VC": "*u8", "VCEN": "*fp16", "VRNG": "*fp16", "KOUT": "*fp16",
                "VOUT": "*fp16", "KIDX": "*u8", "VIDX": "*u8", "KCEN": "*fp16", "KRNG": "*fp16", "KLEV": "*fp32",
                "VLEV": "*fp32", "FREQ": "*fp32", "META": "*fp32", "LEN": "*i64", "ACC": "*fp32", "M": "*fp32",
                "L": "*fp32", "MASK": "*i1" if has_mask == 2 else "*fp32"}
    consts = (f"dict(H=8, R=4, NC=4096, SINK=1, O={outliers}, HAS_MASK={has_mask}, W={warps}, PREFETCH={prefetch}, "
              f"**mod.layouts({warps}))")
    built = gluon_build("kvpass.codegen.kvquant_gluon", "_kvquant_gluon_main_kernel", pointers, consts, warps,
                        {"qk_scale": "fp32"})
    assert built["shared"] == kvquant_gluon.shared_bytes(warps)
    assert built["ptx_global_smem"]
