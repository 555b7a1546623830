"""The graph pass on every architecture of the issue (tiny random-weight configs): every attention layer
is found and rewritten, fp16 passthrough reproduces generate() exactly, KIVI generates from a compressed
cache whose logits follow the reference scheme."""

import copy

import pytest
import torch

import transformers as tf

import kvpass
from kvpass.errors import KVPassError

from .architectures import COMMON, cases, tiny_model



def run_generate(model, n=5):
    torch.manual_seed(1)
    ids = torch.randint(1, 128, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize("name,impl", cases())
def test_fp16_passthrough_is_exact(name, impl):
    ref = tiny_model(name, impl)
    want = run_generate(ref)
    model = kvpass.compile(copy.deepcopy(ref), "fp16", backend="eager", capacity=64)
    got = run_generate(model)
    records = model._kvpass.records
    assert len(records) == ref.config.num_hidden_layers and all(r.rewritten for r in records.values())
    assert sorted(r.layer for r in records.values()) == list(range(ref.config.num_hidden_layers))
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# one attention implementation per architecture for the compressed schemes (gemma2 and gpt-oss: eager only)
COMPRESSED = [c for c in cases() if c[1] == "sdpa" or c[0] in ("gemma2", "gpt_oss")]


# every third architecture, and gpt-oss (sinks) whether or not it falls among them
KIVI_CASES = list(dict.fromkeys(COMPRESSED[::3] + [("gpt_oss", "eager")]))


@pytest.mark.parametrize("name,impl", KIVI_CASES)
def test_kivi_generates(name, impl):
    ref = tiny_model(name, impl)
    model = kvpass.compile(copy.deepcopy(ref), "kivi", bits=4, group_size=4, residual=4, backend="eager",
                           capacity=64)
    got = run_generate(model)
    want = run_generate(ref)
    assert got.sequences.shape == want.sequences.shape
    states = model._kvpass.manager.states
    assert len(states) == ref.config.num_hidden_layers
    assert all(st.length == 15 and st.scheme.name == "kivi" for st in states.values())
    # 4-bit KIVI stays close to the model on random weights (prefill logits are exact: the prompt is
    # attended in full precision before it is compressed)
    torch.testing.assert_close(got.logits[0], want.logits[0], rtol=1e-4, atol=1e-4)
    drift = max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits))
    assert 0 < drift < 0.5


CALIBRATED = [("kvquant", {"bits": 4}), ("million", {"bits": 4, "residual": 4}),
              ("cq", {"channels": 4, "code_bits": 6, "residual": 4}), ("kvquant", {"bits": 2, "outliers": 0.0}),
              ("qaq", {"budget_bits": 8})]


@pytest.mark.parametrize("i,case", [(i, c) for i, c in enumerate(COMPRESSED) if c not in KIVI_CASES])
def test_calibrated_schemes_run_everywhere(i, case):
    """Each architecture test_kivi_generates leaves out (KIVI_CASES generate with KIVI) with one
    calibrated scheme (cycling through all of them): calibrate on the tiny model's own activations, compile,
    generate from the compressed cache. Every architecture thus decodes from one compressed cache."""
    name, impl = case
    method, opts = CALIBRATED[i % len(CALIBRATED)]
    ref = tiny_model(name, impl)
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    cal = kvpass.calibrate(ref, method, ids, progress=False, max_tokens=256, **opts)
    model = kvpass.compile(copy.deepcopy(ref), method, calibration=cal, backend="eager", capacity=64)
    out = run_generate(model)
    assert torch.isfinite(torch.stack(out.logits)).all()
    rows = kvpass.report(model).rows
    assert len(rows) == ref.config.num_hidden_layers and all(r["rewritten"] for r in rows)
    assert all(st.length == 15 for st in model._kvpass.manager.states.values())


UNSUPPORTED = {   # attention forms kvpass does not compress: the error must say which layer and why
    "deepseek_v3": (tf.DeepseekV3Config, dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                              n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                              first_k_dense_replace=2),
                    r"(?s)cannot rewrite 2 attention site.*model\.layers\.0\.self_attn: key_states is also used"),
    "bloom": (tf.BloomConfig, dict(n_layer=2, n_head=4),                        # ALiBi over (B*H, T, D) bmm
              r"found no attention in this model.*2 softmax, 2 bmm, 2 baddbmm"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_attention_is_a_clear_error(name):
    cls, overrides, message = UNSUPPORTED[name]
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cls(**{**COMMON, **overrides})).eval()
    model.set_attn_implementation("sdpa")
    model = kvpass.compile(model, "kivi", backend="eager", capacity=64)
    with pytest.raises(KVPassError, match=message):
        run_generate(model)
