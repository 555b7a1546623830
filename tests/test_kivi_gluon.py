"""The Gluon KIVI-2 main loop (kvpass.codegen.kivi_gluon) on a machine without a GPU: its bit tricks, and that it
builds for sm_90 with the installed Triton without shared memory. Gluon has no interpreter, so its outputs are
checked against the reference on the GPU (tests/test_kernels.py, the ``gluon`` tests; bench/decode_attention.py).
"""

from __future__ import annotations

import numpy as np
import pytest


def test_each_bit_slot_masked_into_its_magic_is_the_magic_plus_the_code():
    """Slot i's 2 bits, left in place (bits 2i, 2i + 1) and OR-ed into the mantissa of 2^(10 - 2i), give the fp16
    2^(10 - 2i) + code exactly, for every byte; the kernel takes the magic off with -2^(10 - 2i) operands."""
    from kvpass.codegen import kivi_gluon
    byte = np.arange(256, dtype=np.uint16)
    for i, magic in enumerate(kivi_gluon._MAGIC):
        value = ((byte & (3 << (2 * i))) | magic).view(np.float16).astype(np.float64)
        assert np.array_equal(value - 2.0 ** (10 - 2 * i), (byte >> (2 * i)) & 3)


def test_the_unpacking_assembly_masks_each_slot_in_place_with_its_magic():
    """The word and pair assembly: one lop3 per pair with slot i's mask and magic, in both 16-bit halves."""
    from kvpass.codegen import kivi_gluon
    word = kivi_gluon._WORD_ASM.value
    for i, magic in enumerate(kivi_gluon._MAGIC):
        line = f"{0x00030003 << (2 * i):#x}, {magic * 0x10001:#x}, 0xea"
        assert word.count(line) == 2                       # bytes (0, 1) and (2, 3) of the word
        for j in range(4):
            assert kivi_gluon._pair_asm(j).count(line) == 1
    assert "sub" not in word                               # keys keep the magic: the score bias takes it off


@pytest.mark.parametrize("prefetch,has_mask,mapped", [(1, 0, False), (0, 1, True), (2, 2, False)])
def test_the_kernel_builds_for_sm90_without_shared_memory(prefetch, has_mask, mapped):
    """Every layout change in the kernel is asserted trivial, so its sm_90 build (no GPU needed) holds no shared
    memory: codes are unpacked in the registers the tensor cores read them from."""
    from tests.sm90_build import gluon_build
    pointers = {"Q": "*bf16", "KC": "*u8", "KS": "*fp16", "KZ": "*fp16", "VC": "*u8", "VS": "*fp16", "VZ": "*fp16",
                "LEN": "*i64", "ACC": "*fp32", "M": "*fp32", "L": "*fp32", "KV_MAP": "*i32",
                "MASK": "*i1" if has_mask == 2 else "*fp32"}
    consts = (f"dict(H=8, R=4, RESIDUAL=128, NK_CAP=4096, NV_CAP=4096, PREFETCH={prefetch}, MAPPED={mapped}, "
              f"HAS_MASK={has_mask})")
    built = gluon_build("kvpass.codegen.kivi_gluon", "_kivi_gluon_main_kernel", pointers, consts, 1,
                        {"qk_scale": "fp32"})
    assert built["shared"] == 0
    assert built["cubin_bytes"] > 0
