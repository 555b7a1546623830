"""DuoAttention gates (kvpass.duo) on a tiny random Llama: the mixed attention at gates 1 and 0, the
optimization, the binarization and the calibration artifact."""

from __future__ import annotations

import pytest
import torch
import transformers

import kvpass
from kvpass.calibration import Calibration, CalibrationMismatchError
from kvpass.duo import gated, optimize_gates, retrieval_heads, streaming_mask
from kvpass.errors import KVPassError


def _llama(layers=2, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]


def test_streaming_mask_keeps_the_sink_and_the_recent_keys():
    m = streaming_mask(3, 10, sink=2, recent=3)
    assert m.tolist()[0] == [True, True, False, False, False, True, True, True, False, False]   # query at 7
    assert m.tolist()[2] == [True, True] + [False] * 5 + [True] * 3                          # query at 9


def test_gates_one_give_the_model_and_gates_zero_give_streaming_attention():
    model = _llama()
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    full = _hidden(model, ids)
    with gated(model, torch.ones(2, 2), sink=4, recent=8):
        assert (_hidden(model, ids) - full).abs().max() < 1e-5
    with gated(model, torch.zeros(2, 2), sink=4, recent=8):
        zero = _hidden(model, ids)
    with gated(model, torch.zeros(2, 2), sink=0, recent=40):            # a window over everything = full
        assert (_hidden(model, ids) - full).abs().max() < 1e-5
    assert (zero - full).abs().max() > 1e-3                               # streaming differs at 40 tokens
    assert (_hidden(model, ids) - full).abs().max() < 1e-6                # the model's own attention is back
    half = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with gated(model, half, sink=4, recent=8):
        mixed = _hidden(model, ids)
    assert (mixed - full).abs().max() > 1e-4 and (mixed - zero).abs().max() > 1e-4


def test_optimization_lowers_the_loss_and_keeps_gates_in_range():
    model = _llama()
    gen = torch.Generator().manual_seed(2)
    examples = [(torch.randint(0, 96, (48,), generator=gen), 3) for _ in range(3)]
    gates, losses = optimize_gates(model, examples, sink=2, recent=6, steps=30, lr=0.05, l1=0.05)
    assert gates.shape == (2, 2) and gates.dtype == torch.float32
    assert gates.min() >= 0 and gates.max() <= 1 and (gates < 1).any()
    assert losses[-1] < losses[0]
    assert all(p.requires_grad for p in model.parameters())              # the weights unfrozen again
    # with a window over every key, streaming = full: only the L1 term acts and every gate falls to 0
    free, _ = optimize_gates(model, examples, sink=0, recent=64, steps=40, lr=0.05, l1=0.1)
    assert free.max() < 0.05


def test_retrieval_heads_take_the_highest_gates():
    gates = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    assert retrieval_heads(gates, 0.5).tolist() == [[True, False, False], [False, True, True]]
    assert retrieval_heads(gates, 1.0).all() and retrieval_heads(gates, 0.01).sum() == 1
    for bad in (0, 1.5, -0.2, True):
        with pytest.raises(KVPassError, match=r"\(0, 1\]"):
            retrieval_heads(gates, bad)


def test_calibrate_duo_makes_an_artifact_for_this_model_only(tmp_path):
    from kvpass.passkey import PasskeySample
    model = _llama()
    gen = torch.Generator().manual_seed(3)
    data = [PasskeySample(torch.randint(0, 96, (40,), generator=gen), torch.randint(0, 96, (2,), generator=gen),
                          "12", 0.5, 10) for _ in range(2)]
    cal = kvpass.calibrate(model, "duo", data, sink=2, recent=8, steps=5, progress=False)
    assert cal.method == "duo" and cal.options == {"sink": 2, "recent": 8}
    assert sorted(cal.tensors) == ["layers.0.gates", "layers.1.gates"] and cal.layer(1)["gates"].shape == (2,)
    back = Calibration.load(cal.save(tmp_path / "duo"))
    assert torch.equal(back.tensors["layers.0.gates"], cal.tensors["layers.0.gates"])
    back.check(model, "duo")
    with pytest.raises(CalibrationMismatchError):
        back.check(_llama(layers=3), "duo")
    with pytest.raises(KVPassError, match="tokenizer"):
        kvpass.calibrate(model, "duo", None, progress=False)
