"""Scheme-specific facts the shared matrix cannot state generically: KIVI's window semantics and bit
budget, int8/fp8 layouts, and the registry's errors for unknown methods and bad options."""

import pytest
import torch

import kvpass
from kvpass.errors import OptionError, ShapeError, UnknownMethodError
from kvpass.methods import CacheShape, get_scheme


def test_registry_lists_the_foundation_schemes():
    assert {"fp16", "int8", "fp8", "kivi"} <= set(kvpass.methods())


def test_unknown_method_names_the_known_ones():
    with pytest.raises(UnknownMethodError, match="unknown method 'kiwi'.*kivi"):
        get_scheme("kiwi")


def test_unknown_option_lists_the_options():
    with pytest.raises(OptionError, match="kivi has no option 'group'.*group_size"):
        get_scheme("kivi", group=32)


@pytest.mark.parametrize("opts,msg", [
    ({"bits": 0}, "bits must be an integer in 1..8"),
    ({"bits": 9}, "bits must be an integer in 1..8"),
    ({"bits": 2.5}, "bits must be an integer"),
    ({"bits": True}, "bits must be an integer"),
    ({"group_size": 0}, "group_size"),
    ({"residual": -1}, "residual"),
    ({"residual": 100, "group_size": 32}, "multiple of group_size"),
    ({"scale_dtype": torch.int8}, "scale_dtype"),
])
def test_kivi_bad_options(opts, msg):
    with pytest.raises(OptionError, match=msg):
        get_scheme("kivi", **opts)


def test_kivi_head_dim_not_divisible_by_group():
    with pytest.raises(ShapeError, match="head_dim 48 is not divisible by group_size 32"):
        get_scheme("kivi").allocate(CacheShape(1, 1, 48, 256, torch.float16))


@pytest.mark.parametrize("bits,approx", [(2, 3.06), (4, 5.05)])   # METHODS.md: ~3.05 at 2 bits, 32K
def test_kivi_bits_match_the_paper_budget(bits, approx):
    """bits + 2 x 16 / G for the quantized part, plus the full-precision windows amortized."""
    g, r, c, d = 32, 128, 32768, 128
    scheme = get_scheme("kivi", bits=bits)
    got = scheme.bits_per_element(CacheShape(1, 8, d, c, torch.float16))
    nk, nv = (c - r) // g * g, c - r
    quantized = (nk + nv) * (bits + 32 / g)
    windows = ((r + g - 1) + r) * 16
    assert got == pytest.approx((quantized + windows) / (2 * c))
    assert got == pytest.approx(approx, abs=0.005)


def test_kivi_window_keeps_recent_tokens_exact():
    scheme = get_scheme("kivi", bits=2, group_size=8, residual=16)
    state = scheme.allocate(CacheShape(1, 2, 32, 100, torch.float16))
    k, v = torch.randn(1, 2, 77, 32).half(), torch.randn(1, 2, 77, 32).half()
    for i in range(77):
        scheme.append(state, k[:, :, i:i + 1], v[:, :, i:i + 1])
    kd, vd = scheme.decode(state)
    nk, nv = scheme.quantized_keys(77), scheme.quantized_values(77)
    assert (nk, nv) == (56, 61)               # keys flush whole groups of 8 beyond the newest 16
    assert torch.equal(kd[:, :, nk:], k[:, :, nk:]) and torch.equal(vd[:, :, nv:], v[:, :, nv:])
    assert not torch.equal(kd[:, :, :nk], k[:, :, :nk]) and not torch.equal(vd[:, :, :nv], v[:, :, :nv])
    assert 16 <= 77 - nk <= 16 + 8 - 1


def test_kivi_keys_are_per_channel_values_per_token():
    """A key channel that is 100x larger than the rest must not hurt the other channels (per-channel
    scales), and a value token 100x larger must not hurt the other tokens (per-token scales)."""
    scheme = get_scheme("kivi", bits=2, group_size=8, residual=0)
    state = scheme.allocate(CacheShape(1, 1, 16, 64, torch.float32))
    k, v = torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 16)
    k[..., 3] *= 100
    v[:, :, 5] *= 100
    scheme.append(state, k, v)
    kd, vd = scheme.decode(state)
    others = [c for c in range(16) if c != 3]
    assert (kd - k)[..., others].abs().max() < 1.5
    assert (vd - v)[:, :, 6:].abs().max() < 1.5
    assert state["k_scale"].shape == (1, 1, 8, 16) and state["v_scale"].shape == (1, 1, 64, 2)


def test_kivi_window_lowers_attention_error():
    torch.manual_seed(1)
    q = torch.randn(1, 4, 1, 64)
    k, v = torch.randn(1, 1, 300, 64), torch.randn(1, 1, 300, 64)
    k[:, :, -40:] *= 3   # the recent tokens dominate attention, as they often do
    exact = kvpass.attention.dense_attention(q, k, v)
    errs = {}
    for r in (0, 128):
        s = get_scheme("kivi", bits=2, residual=r)
        st = s.allocate(CacheShape(1, 1, 64, 300, torch.float32))
        s.append(st, k, v)
        errs[r] = (s.attend(st, q) - exact).norm() / exact.norm()
    assert errs[128] < errs[0] / 2


def test_int8_layout_and_budget():
    scheme = get_scheme("int8")
    shape = CacheShape(1, 8, 128, 4096, torch.bfloat16)
    assert scheme.bits_per_element(shape) == pytest.approx(8 + 16 / 128)
    assert scheme.layout(shape)["k_codes"].dtype == torch.int8


def test_fp8_scale_grows_instead_of_saturating():
    scheme = get_scheme("fp8", headroom=2)
    state = scheme.allocate(CacheShape(1, 1, 16, 20, torch.float32))
    small = torch.randn(1, 1, 10, 16)
    scheme.append(state, small, small)
    scale_before = state["k_scale"].clone()
    big = torch.randn(1, 1, 1, 16) * 1e4
    scheme.append(state, big, big)
    assert (state["k_scale"] > scale_before).all()
    kd, _ = scheme.decode(state)
    torch.testing.assert_close(kd[:, :, -1], big[:, :, 0], rtol=0.07, atol=0.0)   # not clamped at 448*s
    torch.testing.assert_close(kd[:, :, :10], small, rtol=0.14, atol=1e4 * 2 / 448 * 2 ** -9 * 2)


def test_fp8_budget_is_eight_bits():
    bits = get_scheme("fp8").bits_per_element(CacheShape(1, 8, 128, 4096, torch.float16))
    assert 8 < bits < 8.001


def test_fp8_all_zero_head_then_values():
    scheme = get_scheme("fp8")
    state = scheme.allocate(CacheShape(1, 2, 8, 8, torch.float16))
    zeros = torch.zeros(1, 2, 4, 8, dtype=torch.float16)
    scheme.append(state, zeros, zeros)
    kd, vd = scheme.decode(state)
    assert torch.equal(kd, zeros) and torch.equal(vd, zeros)
    x = torch.randn(1, 2, 2, 8).half()
    scheme.append(state, x, x)
    kd, _ = scheme.decode(state)
    assert torch.isfinite(kd).all()
    torch.testing.assert_close(kd[:, :, 4:].float(), x.float(), rtol=0.07, atol=1e-3)


def test_nan_in_scores_is_not_hidden():
    q = torch.randn(1, 2, 1, 8)
    k, v = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    k[0, 0, 2, 3] = float("nan")
    assert torch.isnan(kvpass.attention.dense_attention(q, k, v)).all()
