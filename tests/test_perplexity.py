"""Honest decode perplexity (kvpass.perplexity): prefill, then token by token through the real cache."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import kvpass
from kvpass.errors import KVPassError, ShapeError
from kvpass.models import tiny_llama
from kvpass.perplexity import decode_perplexity

PREFILL = 8


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 128, (3, 24), generator=g)


def full_forward_ppl(model, ids, prefill):
    """Perplexity of the tokens ids[:, prefill:] from one full forward (no cache)."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    nll = F.cross_entropy(logits[:, prefill - 1:-1].flatten(0, 1).float(), ids[:, prefill:].flatten())
    return math.exp(float(nll))


def test_plain_and_compiled_fp16_equal_the_full_forward(ids):
    ref = tiny_llama()
    want = full_forward_ppl(ref, ids, PREFILL)
    plain = decode_perplexity(ref, ids, PREFILL, progress=False)
    assert plain["tokens"] == 3 * (24 - PREFILL) and plain["mode"] == "decode"
    assert plain["ppl"] == pytest.approx(want, rel=1e-4)
    assert plain["nll"] == pytest.approx(math.log(plain["ppl"]))

    model = kvpass.compile(copy.deepcopy(ref), "fp16", backend="eager", capacity=24)
    fp16 = decode_perplexity(model, ids, PREFILL, progress=False)
    assert fp16["ppl"] == pytest.approx(want, rel=1e-4)
    states = model._kvpass.manager.states
    assert len(states) == 2 and all(st.length == 23 for st in states.values())   # the last token is never fed


def test_compiled_kivi_differs_from_fp16(ids):
    ref = tiny_llama()
    fp16 = decode_perplexity(ref, ids, PREFILL, progress=False)["ppl"]
    model = kvpass.compile(copy.deepcopy(ref), "kivi", bits=2, group_size=8, residual=0, backend="eager",
                           capacity=24)
    kivi = decode_perplexity(model, ids, PREFILL, progress=False)
    assert math.isfinite(kivi["ppl"]) and kivi["ppl"] != pytest.approx(fp16, rel=1e-4)
    st = next(iter(model._kvpass.manager.states.values()))
    assert st.scheme.name == "kivi" and st.shape.batch == 3
    # each batch starts new sequences in the same compressed cache (reset, re-allocated for batch 1)
    again = decode_perplexity(model, ids, PREFILL, progress=False, batch_size=2)
    assert again["ppl"] == pytest.approx(kivi["ppl"], rel=1e-5)


def test_batches_and_progress(ids):
    model = tiny_llama()
    steps = []
    whole = decode_perplexity(model, ids, PREFILL, progress=False)
    split = decode_perplexity(model, ids, PREFILL, progress=steps.append, batch_size=2)
    assert split["ppl"] == pytest.approx(whole["ppl"], rel=1e-5)
    assert sum(steps) == split["tokens"] == whole["tokens"]
    assert decode_perplexity(model, ids[:1, :10], 9, progress=True)["tokens"] == 1   # tqdm bar, last token only


def test_bad_input():
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 10))
    with pytest.raises(KVPassError, match="prefill must be"):
        decode_perplexity(model, ids, 10, progress=False)
    with pytest.raises(KVPassError, match="prefill must be"):
        decode_perplexity(model, ids, 0, progress=False)
    with pytest.raises(ShapeError, match="LongTensor"):
        decode_perplexity(model, ids[0], 4, progress=False)
    with pytest.raises(ShapeError, match=r"\[0, 128\)"):
        decode_perplexity(model, ids + 200, 4, progress=False)
    with pytest.raises(KVPassError, match="batch_size"):
        decode_perplexity(model, ids, 4, progress=False, batch_size=0)
    model.train()
    with pytest.raises(KVPassError, match="eval mode"):
        decode_perplexity(model, ids, 4, progress=False)


@pytest.mark.parametrize("method,options", [
    ("kivi", dict(bits=2, group_size=8, residual=8)),
    ("million", dict(bits=2, residual=6)),
    ("cq", dict(channels=8, residual=5)),
])
def test_sim_mode_of_a_windowed_scheme_equals_decoding_every_token(method, options):
    """Sim mode gives each query the window it has when decoding (Scheme.exact_spans): the same perplexity
    as honest decoding through kvpass.compile with a one-token prompt, while attending over the final
    state alone (the old sim) scores differently."""
    from kvpass.simulate import perplexity
    ref = tiny_llama()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    if method == "kivi":
        extra = {}
    else:
        other = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(3))
        extra = {"calibration": kvpass.calibrate(ref, method, other, progress=False, **options)}
    scheme = kvpass.get_scheme(method, **options, **extra)
    model = kvpass.compile(copy.deepcopy(ref), method, backend="eager", capacity=40, **options, **extra)
    honest = decode_perplexity(model, ids, 1, progress=False)
    sim = perplexity(ref, ids, scheme)
    assert sim["tokens"] == honest["tokens"] == 2 * 39
    assert abs(sim["nll"] - honest["nll"]) < 1e-4 * abs(honest["nll"])
    no_window = type(scheme).exact_spans
    try:
        type(scheme).exact_spans = lambda self, n: None          # every query over the final state
        old = perplexity(ref, ids, scheme)
    finally:
        type(scheme).exact_spans = no_window
    assert abs(old["nll"] - honest["nll"]) > 1e-3
