"""QAQ's specific behaviour: widths that follow attention (values) and range (keys), re-quantization from
the host copy, the variable-length arena (compaction, budget exhaustion), its calibration, and the
scheme through kvpass.calibrate + kvpass.compile. The shared matrix (tests/test_schemes.py) covers the
error bound, bits accounting and attend == dense attention over decode."""

import copy
import math

import pytest
import torch

import kvpass
from kvpass.errors import CapacityError, KVPassError, OptionError, ShapeError
from kvpass.methods import CacheShape, get_scheme

from .architectures import tiny_model
from .conftest import TensorCalibration, synthetic_activations
from .reference_decode import reference_decode

B, H, D = 1, 2, 32


def qaq(kv_heads=H, q_norm2=64.0, **opts):
    cal = TensorCalibration({"layers.0.q_norm2": torch.full((kv_heads,), float(q_norm2))})
    return get_scheme("qaq", calibration=cal, **opts)


def tokens(n, b=B, h=H, d=D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, n, d, generator=g) + torch.randn(1, h, 1, d, generator=g)
    v = torch.randn(b, h, n, d, generator=g)
    return k.to(dtype), v.to(dtype)


def query_at(k, pos, strength=20.0, hq=H):
    """A single query (B, Hq, 1, D) whose attention goes (almost) entirely to token ``pos``."""
    kv = k[:, :, pos].float()
    q = strength * kv / kv.norm(dim=-1, keepdim=True) * math.sqrt(k.shape[-1])
    return q.repeat_interleave(hq // k.shape[1], dim=1)[:, :, None]


def widths(state, tag):
    return state[f"{tag}_bits"][:, :state.length].long()


# -- options, calibration, layout ------------------------------------------------------------------------
@pytest.mark.parametrize("opts,msg", [
    ({"key_error": 0}, "key_error must be a positive finite number"),
    ({"value_error": -1.0}, "value_error must be a positive"),
    ({"value_error": float("inf")}, "value_error"),
    ({"min_bits": 0}, "min_bits must be an integer in 1..8"),
    ({"max_bits": 9}, "max_bits must be an integer in 1..8"),
    ({"min_bits": 4, "max_bits": 3}, "max_bits \\(3\\) must be >= min_bits \\(4\\)"),
    ({"budget_bits": 0}, "budget_bits"),
    ({"budget_bits": "4"}, "budget_bits"),
    ({"outliers": 0.5}, "outliers must be a fraction"),
    ({"history": 0}, "history must be an integer in 1..255"),
])
def test_bad_options(opts, msg):
    with pytest.raises(OptionError, match=msg):
        get_scheme("qaq", **opts)


def test_calibration_is_required_and_checked():
    with pytest.raises(KVPassError, match="qaq needs a calibration"):
        get_scheme("qaq").allocate(CacheShape(1, 2, 32, 8, torch.float32))
    with pytest.raises(ShapeError, match="q_norm2 is \\(2,\\), this cache needs \\(3,\\)"):
        qaq(kv_heads=2).allocate(CacheShape(1, 3, 32, 8, torch.float32))
    with pytest.raises(ShapeError, match="multiple of 8"):
        qaq(kv_heads=1).allocate(CacheShape(1, 1, 4, 8, torch.float32))


def test_fit_takes_the_90th_percentile_of_squared_query_norms_per_kv_group():
    acts = synthetic_activations(2, 16, n=100)
    layer = acts.layers[0]
    layer.q_norm = torch.arange(1, 401, dtype=torch.float32).reshape(100, 4).sqrt()     # 4 query heads, GQA 2
    got = get_scheme("qaq").fit(acts)["layers.0.q_norm2"]
    q2 = layer.q_norm ** 2
    for h in range(2):
        group = q2[:, 2 * h:2 * h + 2].reshape(-1)
        torch.testing.assert_close(got[h], torch.quantile(group, 0.9))
    with pytest.raises(ShapeError, match="not a multiple of 2 KV heads"):
        layer.q_norm = torch.ones(100, 3)
        get_scheme("qaq").fit(acts)


def test_host_copy_lives_on_the_cpu_and_is_not_counted():
    scheme = qaq()
    shape = CacheShape(2, H, D, 40, torch.float16)
    layout = scheme.full_layout(shape)
    assert {n for n, s in layout.items() if s.host} == {"k_host", "v_host"}
    state = scheme.allocate(shape, device="meta")          # device buffers on another device
    assert state["k_host"].device.type == "cpu" and state["v_host"].device.type == "cpu"
    assert state["arena"].device.type == "meta"
    assert state.host_nbytes == 2 * 2 * H * 40 * D * 2
    device_bytes = sum(s.nbytes for s in layout.values() if not s.host)
    assert scheme.bits_per_element(shape) == pytest.approx(device_bytes * 8 / shape.elements)
    # the arena is budget_bits per element; the rest is per-token metadata
    assert layout["arena"].shape == (2, 2 * 40 * H * D * 4 // 8)
    state = scheme.allocate(shape)
    k, v = tokens(7, b=2, dtype=torch.float16)
    scheme.append(state, k, v)
    assert torch.equal(state["k_host"][:, :, :7], k) and torch.equal(state["v_host"][:, :, :7], v)


# -- widths ----------------------------------------------------------------------------------------------
def test_width_formulas():
    scheme = qaq(key_error=0.1, value_error=0.05)
    t = 10
    k_plan = torch.tensor([[0.0, 5.0, 15.0, 1000.0]])
    v_plan = torch.tensor([[4.0, 4.0, 4.0, 4.0]])
    hist = torch.tensor([[[0.0] * 5, [0.01, 0.2, 0.0, 0.0, 0.0], [0.5] * 5, [0.5] * 5]], dtype=torch.float16)
    hist_n = torch.tensor([[5, 5, 5, 4]], dtype=torch.uint8)
    wk, wv = scheme.wanted_widths(t, k_plan, v_plan, hist, hist_n)
    sigma_k = math.sqrt(math.log(t ** 3 / (t - 1) * 0.1 ** 2 + 1))
    want_k = [min(8, max(2, math.ceil(math.log2(p / (2 * math.sqrt(3) * sigma_k) + 1)))) for p in k_plan[0].tolist()]
    assert wk[0].tolist() == want_k == [2, 2, 3, 8]
    for j, a in ((1, 0.2), (2, 0.5)):     # predicted attention = max of the history
        ratio = 4.0 * math.sqrt(t) * float(torch.tensor(a, dtype=torch.float16)) / (2 * math.sqrt(3) * 0.05)
        assert wv[0, j] == min(8, max(2, math.ceil(math.log2(ratio + 1))))
    assert wv[0, 0] == 2                  # never attended: min_bits
    assert wv[0, 3] == 8                  # history not full yet: max_bits
    # one token cached: T - 1 = 0, the key budget is unbounded
    wk1, _ = scheme.wanted_widths(1, k_plan[:, :1] + 50, v_plan[:, :1], hist[:, :1], hist_n[:, :1])
    assert wk1.tolist() == [[2]]


def test_value_widths_follow_attention():
    scheme = qaq(value_error=0.05, key_error=1.0)
    state = scheme.allocate(CacheShape(B, H, D, 64, torch.float32))
    k, v = tokens(40)
    scheme.append(state, k[:, :, :20], v[:, :, :20])
    assert (widths(state, "v") == 8).all()            # no history yet: full bits
    hot = 3
    for i in range(20, 27):                           # attend (mostly to token 3), then append
        scheme.attend(state, query_at(k[:, :, :state.length], hot))
        scheme.append(state, k[:, :, i:i + 1], v[:, :, i:i + 1])
    wv = widths(state, "v")[0]
    cold = [t for t in range(20) if t != hot]
    assert wv[hot] >= 6
    assert (wv[cold] == 2).all()                      # got no attention: min_bits
    assert (wv[-scheme.history:] == 8).all()          # the newest tokens have no full history yet
    assert wv[hot] > wv[cold].max()


def test_key_widths_follow_the_range_not_the_attention():
    scheme = qaq(key_error=0.01, q_norm2=400.0)
    state = scheme.allocate(CacheShape(B, H, D, 32, torch.float32))
    k, v = tokens(16)
    k[:, :, 4] *= 0.02            # a narrow key
    k[:, :, 9] *= 20.0            # a wide one
    scheme.append(state, k, v)
    wk = widths(state, "k")[0]
    assert wk[9] == 8 and wk[4] == 2 and 2 < wk.median() < 8
    before = wk.clone()
    for _ in range(3):
        scheme.attend(state, query_at(k, 4))
    scheme.append(state, *tokens(1, seed=1))
    after = widths(state, "k")[0, :16]
    assert (after <= before).all()    # T grew (looser key budget); attention played no part
    assert after[9] == 8 and after[4] == 2


def test_requantization_upward_restores_accuracy_from_the_host_copy():
    scheme = qaq(history=1, value_error=0.05)
    state = scheme.allocate(CacheShape(B, H, D, 32, torch.float32))
    k, v = tokens(20)
    target = 5
    scheme.append(state, k[:, :, :18], v[:, :, :18])
    scheme.attend(state, query_at(k[:, :, :18], 17))          # token 5 gets ~nothing
    scheme.append(state, k[:, :, 18:19], v[:, :, 18:19])
    assert widths(state, "v")[0, target] == 2
    low = (scheme.decode(state)[1][:, :, target] - v[:, :, target]).abs().max()
    scheme.attend(state, query_at(k[:, :, :19], target))     # now it gets ~all of it
    scheme.append(state, k[:, :, 19:20], v[:, :, 19:20])
    w = int(widths(state, "v")[0, target])
    assert w >= 6
    got = scheme.decode(state)[1][:, :, target]
    err = (got - v[:, :, target]).abs()
    assert err.max() < low / 8
    # the codes come from the exact values, not from the 2-bit ones: within half a step of width w
    span = v[:, :, target].amax(-1) - v[:, :, target].amin(-1)
    assert (err.amax(-1) <= span / (2 ** w - 1) / 2 * 1.01 + 1e-6).all()


def test_attend_records_statistics_and_changes_nothing_else():
    scheme = qaq(history=3)
    state = scheme.allocate(CacheShape(2, H, D, 16, torch.float32))
    k, v = tokens(10, b=2)
    scheme.append(state, k, v)
    before = {n: t.clone() for n, t in state.buffers.items()}
    dec = scheme.decode(state)
    q = torch.randn(2, 2 * H, 3, D)
    out = scheme.attend(state, q, scale=0.2)
    assert torch.equal(scheme.decode(state)[0], dec[0]) and torch.equal(scheme.decode(state)[1], dec[1])
    changed = {n for n in state.buffers if not torch.equal(state[n], before[n])}
    assert changed == {"attn_hist", "hist_n"}
    assert (state["hist_n"][:, :10] == 1).all() and (state["hist_n"][:, 10:] == 0).all()
    # the recorded weight is the max over query heads and queries of the softmax weights
    probs = torch.softmax(torch.einsum("bhgtd,bhld->bhgtl", q.reshape(2, H, 2, 3, D), dec[0].float()) * 0.2
                          + torch.triu(torch.full((3, 10), float("-inf")), diagonal=8), -1)
    want = probs.amax(dim=(1, 2, 3)).to(torch.float16)
    torch.testing.assert_close(state["attn_hist"][:, :10, -1], want, rtol=1e-3, atol=1e-6)
    assert out.shape == q.shape


# -- the arena -------------------------------------------------------------------------------------------
def _churn(scheme, shape, steps, seed=0):
    """Append with attends in between, moving the attention around so widths go up and down. Yields
    the state after each append, with the decode before and after it."""
    state = scheme.allocate(shape)
    k, v = tokens(shape.capacity, b=shape.batch, h=shape.kv_heads, d=shape.head_dim, seed=seed)
    first = shape.capacity - steps
    scheme.append(state, k[:, :, :first], v[:, :, :first])
    g = torch.Generator().manual_seed(seed)
    for i in range(first, first + steps):
        hot = int(torch.randint(0, i, (1,), generator=g))
        scheme.attend(state, query_at(k[:, :, :i], hot, hq=shape.kv_heads))
        before = scheme.decode(state), {t: widths(state, t).clone() for t in "kv"}
        scheme.append(state, k[:, :, i:i + 1], v[:, :, i:i + 1])
        yield state, before, (k[:, :, :i + 1], v[:, :, :i + 1])


def test_compaction_moves_records_and_keeps_decode_identical():
    scheme = qaq(history=1, budget_bits=4)
    shape = CacheShape(2, H, D, 40, torch.float32)
    budget = scheme.budget_bytes(shape)
    unit = H * D // 8
    saw_compaction = False
    for state, ((k0, v0), w0), (k, v) in _churn(scheme, shape, 16):
        assert (state["arena_used"] <= budget).all()
        kd, vd = scheme.decode(state)
        # tokens whose width did not change decode to exactly the same values, wherever their record is now
        for tag, old, new, n in (("k", k0, kd, k0.shape[2]), ("v", v0, vd, v0.shape[2])):
            same = widths(state, tag)[:, :n] == w0[tag]
            for b in range(2):
                assert torch.equal(new[b, :, :n][:, same[b]], old[b][:, same[b]])
        kb, vb = scheme.error_bound(k, v)
        assert ((kd - k).abs() <= kb).all() and ((vd - v).abs() <= vb).all()
        saw_compaction |= bool(state["compactions"].sum())
    assert saw_compaction
    # compacting by hand: only live records remain, decode unchanged
    garbage = state["arena_used"].clone()
    dec = scheme.decode(state)
    scheme.compact(state)
    live = (widths(state, "k").sum(1) + widths(state, "v").sum(1)) * unit
    assert torch.equal(state["arena_used"], live) and (live <= garbage).all()
    assert torch.equal(scheme.decode(state)[0], dec[0]) and torch.equal(scheme.decode(state)[1], dec[1])


def test_budget_exhaustion_degrades_widths_instead_of_failing():
    scheme = qaq(budget_bits=3)           # a prompt's values want 8 bits (no history): they cannot all have it
    shape = CacheShape(2, H, D, 48, torch.float32)
    state = scheme.allocate(shape)
    k, v = tokens(48, b=2)
    scheme.append(state, k[:, :, :40], v[:, :, :40])
    assert (state["budget_limited"] > 0).all()
    wk, wv = widths(state, "k"), widths(state, "v")
    assert (wk + wv).sum(1).max() * H * D // 8 <= scheme.budget_bytes(shape)
    assert wv.max() < 8 and wv.min() >= 2
    for i in range(40, 48):                       # keeps going to full capacity
        scheme.attend(state, query_at(k[:, :, :i], 0))
        scheme.append(state, k[:, :, i:i + 1], v[:, :, i:i + 1])
    kb, vb = scheme.error_bound(k, v)
    kd, vd = scheme.decode(state)
    assert ((kd - k).abs() <= kb).all() and ((vd - v).abs() <= vb).all()
    assert (state["arena_used"] <= scheme.budget_bytes(shape)).all()


def test_a_budget_below_min_bits_raises_capacity_error_and_leaves_the_cache_alone():
    scheme = qaq(budget_bits=1.5, min_bits=2)
    state = scheme.allocate(CacheShape(1, H, D, 32, torch.float32))
    k, v = tokens(32)
    scheme.append(state, k[:, :, :20], v[:, :, :20])      # 20 tokens at 2 bits fit 1.5 x 32
    before = {n: t.clone() for n, t in state.buffers.items()}
    with pytest.raises(CapacityError, match="min_bits=2.*budget_bits=1.5 is too small"):
        scheme.append(state, k[:, :, 20:], v[:, :, 20:])
    assert state.length == 20
    for n, t in state.buffers.items():
        assert torch.equal(t, before[n]), n


def test_a_new_sequence_resets_the_arena():
    scheme = qaq()
    state = scheme.allocate(CacheShape(1, H, D, 32, torch.float32))
    k, v = tokens(30)
    scheme.append(state, k, v)
    scheme.attend(state, query_at(k, 3))
    scheme.append(state, *tokens(1, seed=3))            # some garbage, a history, counters
    state.length_tensor.zero_()                         # what the graph pass does at position 0
    k2, v2 = tokens(20, seed=4)
    scheme.append(state, k2, v2)
    fresh = scheme.allocate(state.shape)
    scheme.append(fresh, k2, v2)
    for name in ("arena_used", "budget_limited", "compactions"):
        assert torch.equal(state[name], fresh[name]), name
    assert (state["hist_n"][:, :20] == 0).all()
    assert torch.equal(scheme.decode(state)[0], scheme.decode(fresh)[0])
    assert torch.equal(scheme.decode(state)[1], scheme.decode(fresh)[1])


# -- what it reaches -------------------------------------------------------------------------------------
def test_average_bits_reports_plausible_numbers():
    scheme = qaq(history=2, key_error=0.05, value_error=0.05)
    shape = CacheShape(2, H, D, 64, torch.float32)
    *_, (state, _, _) = _churn(scheme, shape, 16)
    r = scheme.average_bits(state)
    print("qaq average bits (tests):", {k: round(x, 3) if isinstance(x, float) else x for k, x in r.items()})
    assert r["tokens"] == 64
    assert 2 <= r["k_bits"] <= 8 and 2 <= r["v_bits"] <= 8
    assert r["code_bits"] == pytest.approx((r["k_bits"] + r["v_bits"]) / 2)
    assert r["arena_bits"] >= r["code_bits"] - 1e-9
    assert r["stored_bits"] > r["code_bits"]
    assert r["allocated_bits"] == scheme.bits_per_element(shape)
    assert r["host_bytes"] == state.host_nbytes
    # most tokens got ~no attention and have small ranges: close to min_bits on average
    assert r["v_bits"] < 4 and r["k_bits"] < 4
    empty = scheme.average_bits(scheme.allocate(shape))
    assert empty["tokens"] == 0 and empty["code_bits"] == 0


# -- through the whole pipeline --------------------------------------------------------------------------
@pytest.fixture
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_calibrate_and_compile_generate(_reset_dynamo):
    ref = tiny_model("llama", "sdpa")
    ids = torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(5))
    cal = kvpass.calibrate(ref, "qaq", ids, progress=False, history=2)
    assert cal.layers() == [0, 1] and cal.layer(0)["q_norm2"].shape == (2,)
    model = kvpass.compile(copy.deepcopy(ref), "qaq", calibration=cal, backend="eager", capacity=64)
    prompt = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0

    def run(m):
        return m.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)

    got = run(model)
    assert got.sequences.shape == (2, 21)
    assert all(torch.isfinite(x).all() for x in got.logits)
    assert all(r["rewritten"] for r in kvpass.report(model).rows)
    states = list(model._kvpass.manager.states.values())
    assert len(states) == 2
    for st in states:
        r = st.scheme.average_bits(st)
        assert r["tokens"] == 20 and 2 <= r["k_bits"] <= 8 and 2 <= r["v_bits"] <= 8
        assert (st["hist_n"][:, :18] == 2).all()          # attends recorded the history
        assert st["k_host"].device.type == "cpu"
    # the same scheme applied by an independent reference loop gives the same generation
    scheme = kvpass.get_scheme("qaq", calibration=cal, history=2)
    with reference_decode(ref, scheme, capacity=64):
        want = run(ref)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
