import pytest
import torch

from kvpass.errors import ShapeError
from kvpass.packing import pack_bits, packed_size, unpack_bits


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("n", [8, 16, 24, 64, 136])
def test_round_trip_exact(bits, n):
    codes = torch.randint(0, 2 ** bits, (3, 5, n), dtype=torch.int32 if bits > 8 else torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_layout_low_bits_first():
    # 2-bit codes 1, 2, 3, 0 -> 0b00_11_10_01
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).item() == 0b00111001
    # 4-bit: low nibble is the first code
    assert pack_bits(torch.tensor([0xA, 0x3]), 4).item() == 0x3A
    # 3-bit: eight codes fill three bytes as one little-endian bit stream
    codes = torch.tensor([7, 0, 0, 0, 0, 0, 0, 1])
    assert pack_bits(codes, 3).tolist() == [0b00000111, 0, 0b00100000]


def test_packing_saves_the_bytes_it_claims():
    assert packed_size(64, 2) == 16 and packed_size(64, 3) == 24 and packed_size(64, 1) == 8


@pytest.mark.parametrize("bits,n", [(3, 12), (1, 7), (5, 4)])
def test_partial_bytes_rejected(bits, n):
    with pytest.raises(ShapeError, match="multiple of 8"):
        pack_bits(torch.zeros(n, dtype=torch.uint8), bits)


def test_ten_bit_codes():   # CQ's 8c10b
    codes = torch.tensor([1023, 0, 512, 1] * 2)
    assert pack_bits(codes, 10).shape == (10,)
    assert unpack_bits(pack_bits(codes, 10), 10).tolist() == codes.tolist()


@pytest.mark.parametrize("bits", [0, 17, 2.0])
def test_bits_out_of_range(bits):
    with pytest.raises(ShapeError, match="bits"):
        pack_bits(torch.zeros(8, dtype=torch.uint8), bits)


def test_float_codes_rejected():
    with pytest.raises(ShapeError, match="integer"):
        pack_bits(torch.zeros(8), 2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_planar_packing_round_trips_and_puts_slot_runs_in_order(bits):
    from kvpass.packing import pack_planar, unpack_planar
    n = 48 if bits == 3 else 64
    codes = torch.randint(0, 2 ** bits, (3, 5, n))
    packed = pack_planar(codes, bits)
    assert packed.shape == (3, 5, n * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_planar(packed, bits).long(), codes)
    if bits in (1, 2, 4):
        per = 8 // bits
        slot1 = (packed.long() >> bits) & (2 ** bits - 1)          # bit slot 1 of every byte
        assert torch.equal(slot1, codes[..., n // per: 2 * n // per])
