"""Bit packing of small integer codes into uint8 bytes.

Codes of ``bits`` bits (1..16) are packed along the last dimension as a little-endian bit stream: code
``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream and bit ``j`` of the stream is bit ``j % 8``
of byte ``j // 8``. For 1, 2, 4 and 8 bits this is the usual "code i in the low bits first" layout
(byte = c0 | c1 << bits | ...); for 3, 5, 6 and 7 bits eight codes share ``bits`` bytes. Kernels that
read packed codes rely on exactly this layout.
"""

from __future__ import annotations

import torch

from .errors import ShapeError


def packed_size(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits; ``n * bits`` must be a multiple of 8."""
    _check_bits(bits)
    if (n * bits) % 8:
        raise ShapeError(f"cannot pack {n} codes of {bits} bits into whole bytes: "
                         f"{n}*{bits} is not a multiple of 8")
    return n * bits // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dimension.

    codes: (..., N) any integer dtype, values in [0, 2**bits) (bits 1..16); N*bits must be a multiple of 8.
    returns: (..., N*bits/8) uint8.
    """
    n = codes.shape[-1]
    nbytes = packed_size(n, bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ShapeError(f"pack_bits expects integer codes, got {codes.dtype}")
    c = codes.to(torch.int32)
    if bits == 8:
        return c.to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = (c.unsqueeze(-1) >> shifts) & 1                      # (..., N, bits)
    stream = stream.reshape(*codes.shape[:-1], nbytes, 8)
    weights = torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream << weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    packed: (..., N*bits/8) uint8.  returns: (..., N) codes (N = bytes*8/bits unless ``n``), uint8 for
    bits <= 8, int32 above.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ShapeError(f"unpack_bits expects uint8, got {packed.dtype}")
    total = packed.shape[-1] * 8 // bits
    n = total if n is None else n
    if bits == 8:
        return packed[..., :n]
    weights = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = (packed.to(torch.int32).unsqueeze(-1) >> weights) & 1   # (..., bytes, 8)
    stream = stream.reshape(*packed.shape[:-1], total, bits)
    shifts = torch.arange(bits, device=packed.device, dtype=torch.int32)
    codes = (stream << shifts).sum(-1)
    return (codes.to(torch.uint8) if bits <= 8 else codes)[..., :n]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ShapeError(f"bits must be an integer in 1..16, got {bits!r}")


PLANAR_BITS = (1, 2, 4, 8)


def pack_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last dimension in *planar* order, the layout the decode kernels read.

    For ``bits`` in 1, 2, 4, 8 with P = 8 / bits codes per byte and N codes in N / P bytes: byte ``j`` holds
    codes ``j, j + N/P, j + 2N/P, ...``, code ``i * N/P + j`` in bits ``[i*bits, (i+1)*bits)``. One shift and
    mask of a run of bytes thus gives a run of consecutive channels, with no shuffle between registers.
    Other widths fall back to :func:`pack_bits`.
    codes: (..., N) integer in [0, 2**bits); returns (..., N*bits/8) uint8.
    """
    if bits not in PLANAR_BITS:
        return pack_bits(codes, bits)
    n = codes.shape[-1]
    nbytes = packed_size(n, bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ShapeError(f"pack_planar expects integer codes, got {codes.dtype}")
    slots = codes.to(torch.int32).reshape(*codes.shape[:-1], 8 // bits, nbytes)
    shifts = (torch.arange(8 // bits, device=codes.device, dtype=torch.int32) * bits)[:, None]
    return (slots << shifts).sum(-2).to(torch.uint8)


def unpack_planar(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_planar`: (..., B) uint8 -> (..., N) uint8 codes (N = B*8/bits unless ``n``)."""
    if bits not in PLANAR_BITS:
        return unpack_bits(packed, bits, n)
    if packed.dtype != torch.uint8:
        raise ShapeError(f"unpack_planar expects uint8, got {packed.dtype}")
    total = packed.shape[-1] * 8 // bits
    shifts = (torch.arange(8 // bits, device=packed.device, dtype=torch.int32) * bits)[:, None]
    codes = (packed.to(torch.int32).unsqueeze(-2) >> shifts) & (2 ** bits - 1)     # (..., P, B)
    codes = codes.reshape(*packed.shape[:-1], total).to(torch.uint8)
    return codes if n is None else codes[..., :n]
