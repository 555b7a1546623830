"""The shared scheme matrix: every registered scheme (and each of its test variants) is checked for
round-trip error within its analytic bound, exact bits accounting, attention equal to dense attention over
its decoded cache, and clear errors on bad input. A new scheme joins by being registered."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpass.attention import dense_attention
from kvpass.errors import CapacityError, NonFiniteError, ShapeError
from kvpass.methods import CacheShape, scheme_class

from .conftest import make, rotary_for, scheme_cases

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [16, 32, 64]


def kv_like(b, h, n, d, dtype, outliers=True):
    """Keys/values with the structure of real ones: per-channel offsets, a few outlier channels."""
    k = torch.randn(b, h, n, d) + torch.randn(1, h, 1, d) * 2
    v = torch.randn(b, h, n, d)
    if outliers:
        k[..., 1] *= 8
        v[..., :, -1] += 4
    return k.to(dtype), v.to(dtype)


def fill(scheme, shape, k, v, chunks):
    state = scheme.allocate(shape)
    start, rotary = 0, rotary_for(scheme, shape.head_dim)
    for c in chunks:
        scheme.append(state, k[:, :, start:start + c], v[:, :, start:start + c], rotary=rotary)
        start += c
    return state


def chunking(draw, total):
    chunks, left = [], total
    while left:
        c = draw(st.sampled_from([1, 1, 2, 3, 7, 16, 33, left]))
        c = min(c, left)
        chunks.append(c)
        left -= c
    return chunks


@pytest.mark.parametrize("name,opts", scheme_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_round_trip_within_bound(name, opts, dtype, data):
    b, h = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    d = data.draw(st.sampled_from(HEAD_DIMS))
    scheme = make(name, opts, h, d)
    capacity = data.draw(st.integers(1, 90))
    length = data.draw(st.integers(1, capacity))
    chunks = chunking(data.draw, length)
    shape = CacheShape(b, h, d, capacity, dtype)
    k, v = kv_like(b, h, length, d, dtype)
    state = fill(scheme, shape, k, v, chunks)
    assert state.length == length
    kd, vd = scheme.decode_raw(state)
    assert kd.shape == k.shape and vd.shape == v.shape and kd.dtype == dtype and vd.dtype == dtype
    kb, vb = scheme.error_bound(k, v)
    k_err, v_err = (kd.float() - k.float()).abs(), (vd.float() - v.float()).abs()
    assert (k_err <= kb).all(), f"key error {(k_err - kb).max():.3g} above bound, chunks {chunks}"
    assert (v_err <= vb).all(), f"value error {(v_err - vb).max():.3g} above bound, chunks {chunks}"


@pytest.mark.parametrize("name,opts", scheme_cases())
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_chunking_does_not_change_the_cache(name, opts, data):
    scheme = make(name, opts, 2, 32)
    if not scheme.chunking_invariant:
        pytest.skip(f"{name} documents that its cache depends on how tokens arrive")
    length = data.draw(st.integers(1, 80))
    shape = CacheShape(2, 2, 32, 80, torch.float16)
    k, v = kv_like(2, 2, length, 32, torch.float16)
    one_shot = scheme.decode(fill(scheme, shape, k, v, [length]))
    chunked = scheme.decode(fill(scheme, shape, k, v, chunking(data.draw, length)))
    assert torch.equal(one_shot[0], chunked[0]) and torch.equal(one_shot[1], chunked[1])


@pytest.mark.parametrize("name,opts", scheme_cases())
@pytest.mark.parametrize("capacity", [1, 17, 64, 200])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_bits_per_element_equals_allocated_bytes(name, opts, capacity, dtype):
    scheme = make(name, opts, 3, 32)
    shape = CacheShape(2, 3, 32, capacity, dtype)
    state = scheme.allocate(shape)
    layout = scheme.full_layout(shape)
    assert set(state.buffers) == set(layout)
    for key, spec in layout.items():
        assert tuple(state[key].shape) == spec.shape and state[key].dtype == spec.dtype, key
    measured = sum(t.numel() * t.element_size() for n, t in state.buffers.items()
                   if not layout[n].host) * 8 / shape.elements
    assert scheme.bits_per_element(shape) == pytest.approx(measured, rel=1e-12)
    assert state.nbytes * 8 / shape.elements == pytest.approx(measured, rel=1e-12)


@pytest.mark.parametrize("name,opts", scheme_cases())
@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("tq", [1, 5])
@pytest.mark.parametrize("variant", ["plain", "softcap", "window", "mask"])
def test_attend_equals_dense_attention_over_decoded_cache(name, opts, gqa, tq, variant):
    scheme = make(name, opts, 2, 32)
    b, hkv, d, length = 2, 2, 32, 61
    shape = CacheShape(b, hkv, d, 70, torch.float32)
    k, v = kv_like(b, hkv, length, d, torch.float32)
    state = fill(scheme, shape, k, v, [40, 1, 20])
    q = torch.randn(b, hkv * gqa, tq, d)
    kw = {}
    if variant == "softcap":
        kw["softcap"] = 5.0
    elif variant == "window":
        kw["sliding_window"] = 23
    elif variant == "mask":   # left padding: the first tokens of sequence 0 are padding
        keep = torch.ones(b, 1, 1, length, dtype=torch.bool)
        keep[0, ..., :9] = False
        kw["attn_mask"] = keep
    got = scheme.attend(state, q, scale=0.3, **kw)
    want = dense_attention(q, *scheme.decode(state), scale=0.3, **kw)
    assert got.shape == (b, hkv * gqa, tq, d) and got.dtype == q.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,opts", scheme_cases())
def test_compressed_schemes_store_less_than_fp16(name, opts):
    scheme = scheme_class(name)(**opts)      # the layout needs no calibration
    bits = scheme.bits_per_element(CacheShape(1, 8, 128, 32768, torch.float16))
    if name == "fp16":
        assert bits == 16
    else:
        assert bits < 9, f"{scheme.describe()} keeps {bits:.2f} bits per element"


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,opts", scheme_cases())
def test_bad_appends_raise_and_leave_the_cache_untouched(name, opts):
    scheme = make(name, opts, 2, 32)
    shape = CacheShape(2, 2, 32, 20, torch.float16)
    state = scheme.allocate(shape)
    k, v = kv_like(2, 2, 12, 32, torch.float16)
    rot = rotary_for(scheme, 32)
    scheme.append(state, k, v, rotary=rot)
    before = {n: t.clone() for n, t in state.buffers.items()}

    good = kv_like(2, 2, 1, 32, torch.float16)
    cases = [
        (ShapeError, "dtype", (good[0].float(), good[1].float())),
        (ShapeError, "head_dim=32", (good[0][..., :16], good[1][..., :16])),
        (ShapeError, "kv_heads=2", (torch.cat([good[0]] * 2, 1), torch.cat([good[1]] * 2, 1))),
        (ShapeError, "batch=2", (good[0][:1], good[1][:1])),
        (ShapeError, "got \\(1, 32\\)", (good[0][0, 0], good[1][0, 0])),
        (ShapeError, "keys have 1 tokens but values 2", (good[0], torch.cat([good[1]] * 2, 2))),
        (NonFiniteError, "keys contain NaN", (_poison(good[0], float("nan")), good[1])),
        (NonFiniteError, "values contain NaN or inf", (good[0], _poison(good[1], float("-inf")))),
        (CapacityError, "capacity of 20", kv_like(2, 2, 9, 32, torch.float16)),
    ]
    for err, msg, (bk, bv) in cases:
        with pytest.raises(err, match=msg):
            scheme.append(state, bk, bv, rotary=rot)
        assert state.length == 12
    for n, t in state.buffers.items():
        assert torch.equal(t, before[n]), f"a refused append modified {n}"
    scheme.append(state, *kv_like(2, 2, 8, 32, torch.float16), rotary=rot)   # exactly to capacity is fine
    assert state.length == 20


def _poison(x, value):
    x = x.clone()
    x[1, 0, 0, 5] = value
    return x


@pytest.mark.parametrize("name,opts", scheme_cases())
@pytest.mark.parametrize("field,value", [("batch", 0), ("capacity", 0), ("head_dim", 0)])
def test_empty_geometry_rejected(name, opts, field, value):
    args = dict(batch=1, kv_heads=1, head_dim=32, capacity=4, dtype=torch.float16)
    args[field] = value
    with pytest.raises(ShapeError, match=field):
        make(name, opts, 1, 32).allocate(CacheShape(**args))


@pytest.mark.parametrize("name,opts", scheme_cases())
def test_integer_cache_dtype_rejected(name, opts):
    with pytest.raises(ShapeError, match="dtype"):
        make(name, opts, 1, 32).allocate(CacheShape(1, 1, 32, 4, torch.int32))
