"""The calibrated schemes through the whole pipeline on tiny models: kvpass.calibrate captures the
model's activations through the graph pass, fits the scheme, and kvpass.compile serves it."""

import copy

import pytest
import torch

import kvpass
from kvpass.errors import KVPassError

from .architectures import tiny_model
from .reference_decode import reference_decode



def calib_ids(n=4, t=32):
    return torch.randint(1, 128, (n, t), generator=torch.Generator().manual_seed(5))


def run(model, n=8):
    ids = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize("arch", ["llama", "phi", "gpt2"])    # full RoPE, partial RoPE, no RoPE
def test_kvquant_reapplies_rope_exactly(arch):
    """At 8 bits the quantization error is tiny, so any mistake in the pre-RoPE path (wrong rotation,
    wrong positions, wrong channels) would show as a large logit error."""
    ref = tiny_model(arch, "sdpa")
    cal = kvpass.calibrate(ref, "kvquant", calib_ids(), bits=8, outliers=0.05, progress=False)
    model = kvpass.compile(copy.deepcopy(ref), "kvquant", calibration=cal, backend="eager", capacity=64)
    got, want = run(model), run(ref)
    rows = kvpass.report(model).rows
    assert all(r["rewritten"] for r in rows) and {r["rope"] for r in rows} == \
        {"llama": {"rotate_half"}, "phi": {"partial"}, "gpt2": {"none"}}[arch]
    assert torch.equal(got.sequences, want.sequences)
    drift = max((a - b).abs().max().item() for a, b in zip(got.logits[1:], want.logits[1:]))
    assert 0 < drift < 5e-3


@pytest.mark.parametrize("arch", ["llama", "phi"])    # full RoPE, partial RoPE
@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
def test_the_attention_op_tells_kvquant_how_many_channels_rope_rotates(arch, captured, monkeypatch):
    """The kvpass::attention op rebuilds its cache state every call; the rotated channel count (which picks
    KVQuant's full-rotary Gluon loop on the GPU) must reach the decode steps' attention on the host — also on
    the path a CUDA-graph capture takes, which appends without storing the rotary parameters again (taken here
    on the CPU by reporting every decode step as captured)."""
    import kvpass.codegen
    from kvpass import ops
    from kvpass.methods import base
    from kvpass.methods.kvquant import KVQuant
    ref = tiny_model(arch, "sdpa")
    cal = kvpass.calibrate(ref, "kvquant", calib_ids(), bits=3, progress=False)
    model = kvpass.compile(copy.deepcopy(ref), "kvquant", calibration=cal, backend="eager", capacity=64)
    seen, real = [], KVQuant.attend

    def spy(self, state, q, **kw):
        seen.append((state.rotary_dims, state.shape.head_dim))
        return real(self, state, q, **kw)
    if captured:       # the captured step's append (no rotary stored) and its kernel call (here: the reference)
        decode = lambda x: x.shape[2] == 1                                                    # noqa: E731
        monkeypatch.setattr(ops, "capturing", decode)
        monkeypatch.setattr(base, "capturing", decode)
        monkeypatch.setattr(kvpass.codegen, "try_attend", lambda scheme, state, q, softcap=None, **kw:
                            spy(scheme, state, q, **kw))
    else:
        monkeypatch.setattr(KVQuant, "attend", spy)
    run(model, n=3)
    assert seen, "no decode step attended over the cache"
    head_dim = seen[0][1]
    dims = {d for d, _ in seen}
    assert len(dims) == 1 and None not in dims
    assert dims == {head_dim} if arch == "llama" else 0 < dims.pop() < head_dim


@pytest.mark.parametrize("method,opts", [("million", {"bits": 4, "residual": 4}),
                                         ("cq", {"channels": 4, "code_bits": 6, "residual": 0})])
def test_codebook_schemes_match_the_reference(method, opts):
    ref = tiny_model("llama", "sdpa")
    cal = kvpass.calibrate(ref, method, calib_ids(), progress=False, **opts)
    model = kvpass.compile(copy.deepcopy(ref), method, calibration=cal, backend="eager", capacity=64)
    got = run(model)
    scheme = kvpass.get_scheme(method, calibration=cal, **opts)
    with reference_decode(ref, scheme, capacity=64):
        want = run(ref)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    states = model._kvpass.manager.states.values()
    assert all(st["k_codes"].dtype == torch.uint8 for st in states)


def test_calibration_round_trips_through_disk_and_refuses_other_models(tmp_path):
    ref = tiny_model("llama", "sdpa")
    cal = kvpass.calibrate(ref, "kvquant", calib_ids(), bits=3, progress=False)
    cal.save(tmp_path / "cal")
    loaded = kvpass.Calibration.load(tmp_path / "cal")
    assert loaded.options["bits"] == 3 and loaded.layers() == [0, 1]
    assert loaded.meta["fisher"] is True                    # KVQuant's levels are Fisher-weighted by default
    model = kvpass.compile(copy.deepcopy(ref), "kvquant", calibration=tmp_path / "cal", backend="eager",
                           capacity=64)
    assert model._kvpass.manager.scheme.bits == 3          # options come from the calibration
    run(model, n=3)
    other = tiny_model("qwen2", "sdpa")
    with pytest.raises(kvpass.CalibrationMismatchError, match="Qwen2ForCausalLM|architecture"):
        kvpass.compile(other, "kvquant", calibration=loaded)
    with pytest.raises(kvpass.CalibrationMismatchError, match="bits=3"):
        kvpass.compile(copy.deepcopy(ref), "kvquant", bits=2, calibration=loaded)
    with pytest.raises(kvpass.CalibrationMismatchError, match="not one for 'cq'"):
        kvpass.compile(copy.deepcopy(ref), "cq", calibration=loaded)


def test_calibrated_method_without_calibration_is_an_error():
    with pytest.raises(KVPassError, match="million needs a calibration"):
        kvpass.compile(tiny_model("llama", "sdpa"), "million", backend="eager", capacity=64)


def test_uncalibrated_method_refuses_calibrate():
    with pytest.raises(KVPassError, match="kivi needs no calibration"):
        kvpass.calibrate(tiny_model("llama", "sdpa"), "kivi", calib_ids())
