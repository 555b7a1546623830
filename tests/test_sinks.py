"""Learned attention sinks (gpt-oss): the sigmoid(lse - sink) rescaling equals the model's softmax over the
scores and one sink column, the chunked prompt equals one pass, and what cannot serve sinks says so."""

import copy

import pytest
import torch
import torch.nn.functional as F

import kvpass
import kvpass.sinks as sinks_mod
from kvpass.attention import dense_attention_lse
from kvpass.errors import KVPassError
from kvpass.sinks import apply_sinks, prompt_attention_lse


def _softmax_with_sink_column(q, k, v, sinks, mask):
    """gpt-oss's eager form: cat([scores + mask, sink]), softmax, drop the sink column, @ v."""
    b, h, t, _ = q.shape
    scores = q @ k.transpose(2, 3) * q.shape[-1] ** -0.5 + mask
    combined = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(b, h, t, 1)], dim=-1)
    probs = F.softmax(combined - combined.amax(-1, keepdim=True), dim=-1)[..., :-1]
    return probs @ v


def test_rescaled_attention_equals_the_softmax_over_a_sink_column():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(3, generator=g, dtype=torch.float64) * 3
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.float64)
    mask[0, :, :, :2] = float("-inf")                 # left padding
    mask[1, :, 0, :] = float("-inf")                  # a row that sees nothing: all weight on the sink
    want = _softmax_with_sink_column(q, k, v, sinks, mask)
    out, lse = dense_attention_lse(q, k, v, causal=False, attn_mask=mask)
    got = apply_sinks(out, lse, sinks)
    torch.testing.assert_close(got.to(torch.float64), want.nan_to_num(0.0), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1, :, 0], torch.zeros_like(got[1, :, 0]))
    with pytest.raises(KVPassError, match="one logit per query head"):
        apply_sinks(out, lse, sinks[:2])


@pytest.mark.parametrize("mask_rows", [7, 1])
def test_prompt_in_chunks_equals_one_pass(monkeypatch, mask_rows):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 7, 8, generator=g)
    k, v = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    mask = torch.zeros(2, 1, mask_rows, 7)
    mask[0, ..., :3] = float("-inf")
    kw = dict(scale=0.3, causal=True, attn_mask=mask, softcap=None)
    whole = prompt_attention_lse(q, k, v, **kw)
    monkeypatch.setattr(sinks_mod, "PROMPT_SCORES", 2 * 4 * 3 * 7)      # blocks of 3 queries
    calls = []
    monkeypatch.setattr(sinks_mod, "dense_attention_lse", lambda q, *a, **kw: calls.append(q.shape[2]) or
                        dense_attention_lse(q, *a, **kw))
    chunked = prompt_attention_lse(q, k, v, **kw)
    assert calls == [3, 3, 1]
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


class SinkAttention(torch.nn.Module):
    """gpt-oss's eager attention form on a hand-written layer."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.sinks = torch.nn.Parameter(torch.randn(2) * 2)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)
        w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
        c = torch.cat([w, self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, -1)], dim=-1)
        c = c - c.max(dim=-1, keepdim=True).values
        return torch.matmul(F.softmax(c, dim=-1, dtype=c.dtype)[..., :-1], v)


def test_a_sink_site_is_found_and_rewritten():
    torch.manual_seed(0)
    ref, x = SinkAttention(), torch.randn(1, 5, 32)
    mask = torch.zeros(1, 1, 5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    model = kvpass.compile(copy.deepcopy(ref), "fp16", backend="eager", capacity=16)
    torch.testing.assert_close(model(x, mask), ref(x, mask))
    (record,) = model._kvpass.records.values()
    assert record.rewritten


def test_schemes_that_cannot_serve_sinks_say_so():
    from tests.conftest import make
    torch.manual_seed(0)
    ref, x = SinkAttention(), torch.randn(1, 5, 32)
    model = kvpass.compile(copy.deepcopy(ref), "fp16", heads="streaming", sink=2, recent=4, backend="eager",
                           capacity=16)
    with pytest.raises(KVPassError, match="plain schemes only"):
        model(x, torch.zeros(1, 1, 5, 5))
    with pytest.raises(KVPassError, match="qaq.*log-sum-exp"):
        sinks_mod._check_scheme(make("qaq", {"budget_bits": 8}))
