"""A small PTX emulator for the inline assembly of the Gluon kernels (kvpass.codegen.*_gluon): the integer, byte
permute, predicate, half2 and shared-memory instructions they use, one lane at a time, so that CPU tests can check
the assembly's arithmetic against numpy. ``global_smem`` (the shared allocation's base) is address 0."""

from __future__ import annotations

import re

import numpy as np

MASK32 = 0xFFFFFFFF


def halves(word: int) -> tuple:
    """The two fp16 halves (low, high) of a 32-bit word."""
    return tuple(np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16))


def half2(lo, hi) -> int:
    """A 32-bit word holding fp16 ``lo`` in its low half and ``hi`` in its high half."""
    bits = np.array([lo, hi], dtype=np.float16).view(np.uint16)
    return int(bits[0]) | (int(bits[1]) << 16)


def _f16x2(op, *words: int) -> int:
    """Apply ``op`` to the low halves and to the high halves (float64 inputs, one rounding to fp16)."""
    parts = [[float(x) for x in halves(w)] for w in words]
    return half2(*(np.float16(op(*(p[i] for p in parts))) for i in range(2)))


def _prmt(x: int, y: int, sel: int) -> int:
    src = x | (y << 32)
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 7
        out |= ((src >> (8 * nib)) & 0xFF) << (8 * i)
    return out


def run_ptx(asm: str, operands: dict[int, int], shared: np.ndarray) -> dict[int, int]:
    """Execute ``asm`` with ``$i`` operand values ``operands`` (updated with the outputs and returned); ``shared``
    is the shared memory as uint32 words (byte address 4 * index)."""
    regs: dict[str, int] = {"global_smem": 0}
    preds: dict[str, bool] = {}

    def value(tok: str) -> int:
        tok = tok.strip()
        if tok.startswith("$"):
            return operands[int(tok[1:])]
        if tok in regs:
            return regs[tok]
        return int(tok, 0) & MASK32

    def assign(dst: str, v: int) -> None:
        dst = dst.strip()
        if dst.startswith("$"):
            operands[int(dst[1:])] = v & MASK32
        else:
            regs[dst] = v & MASK32

    def address(arg: str) -> int:
        base, off = re.match(r"\[(\w+)(?:\+(\d+))?\]", arg).groups()
        at = value(base) + int(off or 0)
        assert at % 4 == 0, at
        return at // 4

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}" or line.startswith(".reg"):
            continue
        guard = None
        if line.startswith("@"):
            guard, line = line.split(None, 1)
        op, rest = line.split(None, 1)
        args = [a.strip() for a in re.split(r",(?![^\[{]*[\]}])", rest)]
        if guard is not None and preds[guard.lstrip("@!")] == guard.startswith("@!"):
            continue
        if op == "ld.shared.b32":
            assign(args[0], int(shared[address(args[1])]))
        elif op == "ld.shared.v4.b32":
            at = address(args[1])
            for i, dst in enumerate(args[0].strip("{}").split(",")):
                assign(dst, int(shared[at + i]))
        elif op in ("mov.u32", "mov.b32"):
            assign(args[0], value(args[1]))
        elif op == "shl.b32":
            assign(args[0], value(args[1]) << value(args[2]))
        elif op == "shr.u32":
            assign(args[0], value(args[1]) >> value(args[2]))
        elif op == "shf.r.clamp.b32":
            assign(args[0], ((value(args[2]) << 32 | value(args[1])) >> min(value(args[3]), 32)))
        elif op == "and.b32":
            assign(args[0], value(args[1]) & value(args[2]))
        elif op == "add.u32":
            assign(args[0], value(args[1]) + value(args[2]))
        elif op == "sub.u32":
            assign(args[0], value(args[1]) - value(args[2]))
        elif op in ("setp.lt.u32", "setp.eq.u32"):
            a, b = value(args[1]), value(args[2])
            preds[args[0]] = a < b if op == "setp.lt.u32" else a == b
        elif op == "selp.b32":
            assign(args[0], value(args[1]) if preds[args[3]] else value(args[2]))
        elif op == "prmt.b32":
            assign(args[0], _prmt(value(args[1]), value(args[2]), value(args[3])))
        elif op == "fma.rn.f16x2":
            assign(args[0], _f16x2(lambda a, b, c: a * b + c, value(args[1]), value(args[2]), value(args[3])))
        elif op == "mul.rn.f16x2":
            assign(args[0], _f16x2(lambda a, b: a * b, value(args[1]), value(args[2])))
        elif op == "neg.f16x2":
            assign(args[0], value(args[1]) ^ 0x80008000)
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return operands
