import math

import pytest
import torch
import torch.nn.functional as F

from kvpass import get_scheme
from kvpass.errors import KVPassError, ShapeError
from kvpass.models import tiny_llama
from kvpass.simulate import SIM_ATTENTION, perplexity, simulate

KIVI_SMALL = dict(group_size=8, residual=16)     # tiny_llama has head_dim 16


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture
def ids():
    return torch.randint(3, 128, (2, 80))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits


def test_fp16_passthrough_reproduces_model(model, ids):
    ref = logits(model, ids)
    with simulate(model, get_scheme("fp16")) as rec:
        assert model.config._attn_implementation == SIM_ATTENTION
        out = logits(model, ids)
    assert model.config._attn_implementation == "sdpa"             # restored
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [c.layer for c in rec.calls] == [0, 1]
    c = rec.calls[0]
    assert (c.batch, c.kv_heads, c.head_dim, c.tokens) == (2, 2, 16, 80)
    assert rec.bits_per_elem == 32.0 and rec.nbytes == rec.dense_nbytes == 2 * 2 * 2 * 80 * 16 * 4 * 2


def test_fp16_cache_dtype(model, ids):
    ref = logits(model, ids)
    with simulate(model, "fp16", cache_dtype=torch.float16) as rec:
        out = logits(model, ids)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)
    assert rec.bits_per_elem == 16.0


def test_kivi_changes_logits_but_stays_close(model, ids):
    ref = logits(model, ids)
    for bits, max_kl in ((2, 0.05), (4, 0.005)):
        with simulate(model, get_scheme("kivi", bits=bits, **KIVI_SMALL)) as rec:
            out = logits(model, ids)
        assert (out - ref).abs().max() > 1e-4                     # the cache really is compressed
        kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
        assert kl < max_kl, (bits, kl)
        assert 8 * rec.nbytes / rec.elements == rec.bits_per_elem < 32


def test_kivi_window_keeps_the_last_tokens_close(model):
    # With a residual window as long as the sequence nothing is quantized: identical to fp16.
    x = torch.randint(3, 128, (1, 32))
    with simulate(model, get_scheme("kivi", bits=2, group_size=8, residual=32)):
        out = logits(model, x)
    torch.testing.assert_close(out, logits(model, x), atol=1e-5, rtol=1e-5)


def test_left_padding(model, ids):
    mask = torch.ones_like(ids)
    mask[0, :13] = 0                                               # left-padded first row
    ref = logits(model, ids, attention_mask=mask)
    with simulate(model, "fp16"):
        out = logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(out[0, 13:], ref[0, 13:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
    # the mask is really applied: without it the padded row differs
    with simulate(model, "fp16"):
        unmasked = logits(model, ids)
    assert (unmasked[0, 13:] - ref[0, 13:]).abs().max() > 1e-3
    with simulate(model, get_scheme("kivi", **KIVI_SMALL)):
        out = logits(model, ids, attention_mask=mask)
    assert torch.isfinite(out[0, 13:]).all() and torch.isfinite(out[1]).all()


def test_generate_with_decode_steps(model):
    # transformers' cache hands over Tq=1 queries against L keys: queries are the last positions.
    x = torch.randint(3, 128, (1, 20))
    with torch.no_grad():
        ref = model.generate(x, max_new_tokens=5, do_sample=False)
        with simulate(model, "fp16"):
            out = model.generate(x, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)


def test_restored_on_error_and_no_nesting(model, ids):
    with pytest.raises(ShapeError, match="group_size"):
        with simulate(model, get_scheme("kivi")):                 # group 32 does not divide head_dim 16
            logits(model, ids)
    assert model.config._attn_implementation == "sdpa"
    with simulate(model, "fp16"):
        with pytest.raises(KVPassError, match="already"):
            with simulate(model, "fp16"):
                pass
    with pytest.raises(KVPassError):
        with simulate(torch.nn.Linear(2, 2), "fp16"):
            pass


def test_perplexity(model, ids):
    plain = perplexity(model, ids)
    lg = logits(model, ids)
    nll = F.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert plain["tokens"] == 2 * 79 and plain["mode"] == "plain"
    assert math.isclose(plain["nll"], nll.item(), rel_tol=1e-5) and math.isclose(plain["ppl"], math.exp(nll), rel_tol=1e-5)
    done = []
    sim = perplexity(model, ids, get_scheme("fp16"), batch_size=1, progress=done.append)
    assert done == [1, 1] and sim["mode"] == "sim" and sim["method"] == "fp16"
    assert math.isclose(sim["ppl"], plain["ppl"], rel_tol=1e-5)
    assert sim["bits_per_elem"] == 32.0 and sim["cache_bytes"] == sim["dense_cache_bytes"]
    kivi = perplexity(model, ids, get_scheme("kivi", **KIVI_SMALL), batch_size=2, cache_dtype=torch.float16)
    assert kivi["cache_bytes"] < kivi["dense_cache_bytes"] and kivi["bits_per_elem"] < 16
    assert kivi["options"]["scale_dtype"] == "float16"
    assert abs(kivi["ppl"] / plain["ppl"] - 1) < 0.1


@pytest.mark.parametrize("bad", [torch.zeros(2, 5), torch.zeros(5, dtype=torch.long),
                                 torch.zeros(2, 1, dtype=torch.long), torch.full((1, 4), 500)])
def test_perplexity_bad_input(model, bad):
    with pytest.raises(ShapeError):
        perplexity(model, bad)


def test_perplexity_bad_options(model, ids):
    with pytest.raises(KVPassError):
        perplexity(model, ids, batch_size=0)
    with pytest.raises(KVPassError):
        perplexity(model, ids, "fp16", cache_dtype=torch.int8)



def test_pre_rope_scheme_in_sim_mode_gets_the_keys_before_rope(model, ids):
    """KVQuant caches keys before RoPE: sim mode un-rotates the model's post-RoPE keys with the model's own
    inv_freq, so what the scheme is handed is exactly k_proj's output, and the logits stay close at 8 bits."""
    import kvpass
    cal = kvpass.calibrate(model, "kvquant", data=torch.randint(3, 128, (4, 64)), bits=8, outliers=0.0,
                           progress=False)
    scheme = get_scheme("kvquant", bits=8, outliers=0.0, calibration=cal)
    handed, projected = [], []
    append = scheme.append
    object.__setattr__(scheme, "append", lambda state, k, v, rotary=None: (handed.append(k), append(state, k, v, rotary)))
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, o: projected.append(o))
    try:
        with simulate(model, scheme) as rec:
            sim = logits(model, ids)
    finally:
        hook.remove()
    b, t = ids.shape
    raw = projected[0].view(b, t, 2, 16).transpose(1, 2)           # (B, Hkv, T, D) before RoPE
    torch.testing.assert_close(handed[0], raw, atol=1e-4, rtol=1e-4)
    assert (sim - logits(model, ids)).abs().max() < 0.02
    assert 8 < rec.bits_per_elem < 12          # 8-bit codes + scales, sink and rotary of a short cache
