"""kvpass.compile end to end on tiny models: the rewrite fires, fp16 reproduces the model, compressed
schemes generate from a genuinely compressed cache."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvpass
from kvpass.errors import CapacityError, KVPassError

from .toy_models import ToyGPT, greedy


def tiny_llama(impl="sdpa", layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def generate(model, ids, mask, n=6):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)



def padded_batch():
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0           # left padding
    return ids, mask


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fp16_passthrough_reproduces_generate(impl):
    ref = tiny_llama(impl)
    ids, mask = padded_batch()
    want = generate(ref, ids, mask)
    model = kvpass.compile(copy.deepcopy(ref), "fp16", backend="eager", capacity=64)
    got = generate(model, ids, mask)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    rows = model._kvpass.records
    assert len(rows) == 2 and all(r.rewritten for r in rows.values())
    assert {r.pattern for r in rows.values()} == ({"sdpa"} if impl == "sdpa" else {"matmul-softmax"})


def test_kivi_generates_from_a_compressed_cache():
    ref = tiny_llama()
    ids, mask = padded_batch()
    model = kvpass.compile(copy.deepcopy(ref), "kivi", bits=2, group_size=8, residual=8, backend="eager",
                           capacity=64)
    out = generate(model, ids, mask, n=8)
    assert out.sequences.shape == (2, 17)
    states = model._kvpass.manager.states
    assert len(states) == 2
    for st in states.values():
        assert st.length == 16                      # 9 prompt + 7 fed back (the 8th is never fed)
        assert st.scheme.name == "kivi" and st["k_codes"].dtype == torch.uint8
        assert st["k_codes"].shape[2] == 56         # (64 - 8) // 8 * 8 quantized key slots
        kd, vd = st.scheme.decode(st)
        assert kd.shape == (2, 2, 16, 16)


def test_compressed_cache_really_replaces_the_dense_one():
    """No dense copy of the cache survives: the model's own cache holds one-element placeholders."""
    ref = tiny_llama()
    model = kvpass.compile(copy.deepcopy(ref), "kivi", bits=2, group_size=8, residual=8, backend="eager",
                           capacity=64)
    ids = torch.randint(1, 128, (1, 20))
    out = model(ids, use_cache=True)
    for layer in out.past_key_values.layers:
        assert layer.keys.shape == (1, 2, 20, 16)
        assert layer.keys.untyped_storage().nbytes() <= 8 and layer.values.untyped_storage().nbytes() <= 8
    scheme = model._kvpass.manager.scheme
    per_layer = sum(b.nbytes for b in scheme.full_layout(kvpass.CacheShape(1, 2, 16, 64, torch.float32)).values())
    assert model._kvpass.manager.nbytes == 2 * per_layer      # only the compressed buffers exist
    dense = 2 * 2 * 64 * 16 * 4 * 2                           # K+V, 2 kv heads, 64 tokens, fp32, 2 layers
    assert per_layer * 2 < dense * 0.35


@pytest.mark.parametrize("einsum", [False, True])
def test_hand_written_model_with_cat_cache(einsum):
    torch.manual_seed(0)
    ref = ToyGPT(einsum=einsum).eval()
    idx = torch.randint(0, 97, (2, 11))
    want, want_logits = greedy(ref, idx, 6)
    model = kvpass.compile(copy.deepcopy(ref), "fp16", backend="eager", capacity=32)
    got, got_logits = greedy(model, idx, 6)
    assert torch.equal(got, want)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    rows = model._kvpass.records
    assert len(rows) == 2 and all(r.kv_source == "concat" and r.gqa == "repeat_interleave" for r in rows.values())
    assert {r.pattern for r in rows.values()} == {"einsum" if einsum else "matmul-softmax"}


def test_inductor_backend_matches_eager(monkeypatch):
    """Same tokens and logits as the eager backend; and every layer of a forward reads one mask tensor
    (Inductor would otherwise materialize the index-built mask once per layer)."""
    import kvpass.ops
    ref = tiny_llama(layers=2)
    ids, mask = padded_batch()
    want = generate(kvpass.compile(copy.deepcopy(ref), "kivi", group_size=8, residual=8, backend="eager",
                                   capacity=32), ids, mask, n=4)
    torch._dynamo.reset()
    seen = []
    align = kvpass.ops._align_mask
    monkeypatch.setattr(kvpass.ops, "_align_mask", lambda m, *a: seen.append(m) or align(m, *a))
    got = generate(kvpass.compile(copy.deepcopy(ref), "kivi", group_size=8, residual=8, backend="inductor",
                                  capacity=32), ids, mask, n=4)
    assert len(seen) == 2 * 4                                   # 2 layers x (prefill + 3 decode steps)
    assert all(seen[i] is seen[i + 1] for i in range(0, len(seen), 2))
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.lin(x), dim=0) @ self.lin.weight   # softmax @ matrix, not attention


def test_model_without_attention_gets_a_clear_error():
    model = kvpass.compile(NoAttention(), "kivi", backend="eager")
    with pytest.warns(UserWarning, match="not an attention form kvpass recognizes"):
        with pytest.raises(KVPassError, match="found no attention.*1 softmax.*Attention-like but unrecognized"):
            model(torch.randn(4, 8))


class KeysReused(torch.nn.Module):
    """Attention whose keys also feed something else (as multi-head latent attention reuses its keys)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(b, t, 32) + k.mean()


def test_a_site_that_cannot_be_rewritten_is_a_kvpass_error_naming_it():
    """Raised inside the torch.compile backend, it reaches the user as KVPassError (not Dynamo's
    BackendCompilerFailed); strict=False leaves the site as it is."""
    torch.manual_seed(0)
    ref, x = KeysReused(), torch.randn(1, 5, 32)
    model = kvpass.compile(copy.deepcopy(ref), "kivi", backend="eager", capacity=16)
    with pytest.raises(KVPassError, match=r"(?s)cannot rewrite 1 attention site.*k is also used by mean"):
        model(x)
    torch._dynamo.reset()
    lenient = kvpass.compile(copy.deepcopy(ref), "kivi", backend="eager", capacity=16, strict=False)
    with pytest.warns(UserWarning, match="leaving .* uncompressed"):
        torch.testing.assert_close(lenient(x), ref(x))


def test_capacity_overflow_is_an_error():
    model = kvpass.compile(tiny_llama(layers=1), "fp16", backend="eager", capacity=8)
    with pytest.raises(CapacityError, match="capacity of 8"):
        model(torch.randint(1, 128, (1, 12)))


def test_unknown_method_and_policy():
    with pytest.raises(KVPassError, match="unknown method"):
        kvpass.compile(tiny_llama(layers=1), "kiwi")
    with pytest.raises(KVPassError, match="heads='duo'"):
        kvpass.compile(tiny_llama(layers=1), "kivi", heads="duo")


def test_report_rows_and_bytes():
    model = kvpass.compile(tiny_llama(), "kivi", bits=2, group_size=8, residual=8, backend="eager", capacity=64)
    before = kvpass.report(model)
    assert before.sites_found == 0 and before.bits_per_element is None
    model(torch.randint(1, 128, (2, 5)))
    rep = kvpass.report(model)
    assert rep.sites_found == rep.sites_rewritten == 2
    assert [r["layer"] for r in rep.rows] == [0, 1]
    assert rep.rows[0]["key"] == "model.layers.0.self_attn" and rep.rows[0]["kv_heads"] == 2
    states = model._kvpass.manager.states.values()
    assert rep.cache_bytes == sum(st.nbytes for st in states)
    assert rep.dense_bytes == 2 * 2 * 2 * 64 * 16 * 4 * 2     # layers x K,V x batch x tokens x dim x fp32 x heads
    assert rep.bits_per_element == pytest.approx(8 * rep.cache_bytes / (rep.dense_bytes / 4))
    d = rep.to_dict()
    assert d["sites_rewritten"] == 2 and d["method"] == "kivi" and len(d["rows"]) == 2
    text = str(rep)
    assert "model.layers.1.self_attn" in text and "bits/elem" in text


def test_report_needs_a_compiled_model():
    with pytest.raises(KVPassError, match="not compiled by kvpass"):
        kvpass.report(tiny_llama(layers=1))


@pytest.mark.parametrize("method", ["fp16", "kivi"])
def test_static_cache_generate(method):
    """transformers' StaticCache writes with index_copy_ into preallocated buffers; kvpass reads the
    position from cache_position, drops the writes and attends over its own cache."""
    ref = tiny_llama()
    ids, mask = padded_batch()
    opts = {"group_size": 8, "residual": 8} if method == "kivi" else {}
    model = kvpass.compile(copy.deepcopy(ref), method, backend="eager", capacity=64, **opts)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, cache_implementation="static")
    rows = kvpass.report(model).rows
    assert all(r["kv_source"] == "static" and r["rewritten"] for r in rows)
    assert all(st.length == 13 for st in model._kvpass.manager.states.values())
    if method == "fp16":
        want = generate(ref, ids, mask, n=5)
        assert torch.equal(got.sequences, want.sequences)


SCHEME_CASES = [("fp16", {}), ("int8", {}), ("fp8", {}), ("kivi", {"bits": 2, "group_size": 8, "residual": 8}),
                ("kivi", {"bits": 4, "group_size": 8, "residual": 0})]


@pytest.mark.parametrize("method,opts", SCHEME_CASES, ids=lambda x: str(x))
def test_generate_logits_equal_the_reference_scheme(method, opts):
    """Compiled generate == transformers' own loop with the scheme applied by a reference attention."""
    from .reference_decode import reference_decode

    ref = tiny_llama()
    ids, mask = padded_batch()
    scheme = kvpass.get_scheme(method, **opts)
    with reference_decode(ref, scheme, capacity=64):
        want = generate(ref, ids, mask, n=12)
    model = kvpass.compile(copy.deepcopy(tiny_llama()), method, backend="eager", capacity=64, **opts)
    got = generate(model, ids, mask, n=12)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
