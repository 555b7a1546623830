"""CUDA-graph decoding (kvpass.graphs): the device flags, the memoryless static cache, and — on a GPU —
a captured decode step that decodes the same tokens as the eager one."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import kvpass
from kvpass.errors import CapacityError, KVPassError, NonFiniteError
from kvpass.methods import scheme_class
from kvpass.graphs import (NONFINITE, OVERFLOW, POSITION, REDO, DecodeGraph, flag, greedy_generate, raise_flags,
                           static_cache)
from kvpass.perplexity import cache_argument

CUDA = torch.cuda.is_available()


def _tiny_llama(dtype=torch.float32, device="cpu"):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _greedy(model, ids, steps, cache=None):
    """Greedy tokens after the prompt: with ``cache`` a static cache driven by cache_position, else the
    model's default (dynamic) cache."""
    arg = cache_argument(model)
    n = ids.shape[1]
    with torch.no_grad():
        kw = {arg: cache, "cache_position": torch.arange(n, device=ids.device)} if cache is not None else {}
        out = model(input_ids=ids, use_cache=True, **kw)
        tok, toks = out.logits[:, -1:].argmax(-1), []
        for i in range(steps):
            toks.append(tok)
            kw = ({arg: cache, "cache_position": torch.tensor([n + i], device=ids.device)} if cache is not None
                  else {arg: out.past_key_values})
            out = model(input_ids=tok, use_cache=True, **kw)
            tok = out.logits[:, -1:].argmax(-1)
    return torch.cat(toks, 1)


@pytest.mark.parametrize("code,error", [(NONFINITE, NonFiniteError), (OVERFLOW, CapacityError),
                                        (POSITION, KVPassError), (REDO, KVPassError)])
def test_flags_raise_their_error_once(code, error):
    device = torch.device("cpu")
    raise_flags(device)                                   # nothing set: no error
    flag(torch.tensor(False), code)
    raise_flags(device)
    flag(torch.tensor(True), code)
    with pytest.raises(error, match="CUDA-graph decode step"):
        raise_flags(device)
    raise_flags(device)                                   # cleared by the raise


def test_a_redo_flag_is_returned_to_a_caller_that_redoes_and_errors_rank_before_it():
    device = torch.device("cpu")
    flag(torch.tensor(True), REDO)
    assert raise_flags(device, redo_ok=True) is True
    assert raise_flags(device, redo_ok=True) is False      # cleared
    flag(torch.tensor(True), REDO)
    flag(torch.tensor(True), NONFINITE)
    with pytest.raises(NonFiniteError):
        raise_flags(device, redo_ok=True)



def test_static_cache_holds_no_memory_and_decodes_the_same_tokens():
    base = _tiny_llama()
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(1))
    want = _greedy(kvpass.compile(copy.deepcopy(base), "kivi", bits=4, backend="eager", capacity=64), ids, 6)
    model = kvpass.compile(copy.deepcopy(base), "kivi", bits=4, backend="eager", capacity=64)
    cache = static_cache(model, 2, 60)
    assert all(layer.keys.shape == (2, 2, 60, 64) and layer.keys.untyped_storage().nbytes() == 4
               for layer in cache.layers)
    assert torch.equal(_greedy(model, ids, 6, cache), want)


def test_greedy_generate_gives_transformers_generate_tokens():
    """kvpass.graphs.greedy_generate (static cache; on the CPU each step eagerly) against transformers'
    generate on a kvpass-compiled copy of the same model."""
    base = _tiny_llama()
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(4))
    want = kvpass.compile(copy.deepcopy(base), "kivi", bits=4, backend="eager", capacity=40).generate(
        ids, max_new_tokens=7, do_sample=False, attention_mask=torch.ones_like(ids))
    got = greedy_generate(kvpass.compile(copy.deepcopy(base), "kivi", bits=4, backend="eager", capacity=40), ids, 7)
    assert got.shape == (2, 30) and torch.equal(got, want)
    with pytest.raises(KVPassError, match="max_new_tokens"):
        greedy_generate(kvpass.compile(copy.deepcopy(base), "kivi", backend="eager", capacity=40), ids, 0)


def test_static_cache_and_decode_graph_refuse_an_uncompiled_or_cpu_model():
    base = _tiny_llama()
    with pytest.raises(KVPassError, match="kvpass.compile"):
        static_cache(base, 1, 16)
    with pytest.raises(KVPassError, match="kvpass.compile"):
        DecodeGraph(base, None, 1)
    model = kvpass.compile(base, "kivi", backend="eager", capacity=32)
    with pytest.raises(KVPassError, match="CUDA"):
        DecodeGraph(model, static_cache(model, 1, 16), 1)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method,opts,backend", [
    ("kivi", dict(bits=2, group_size=32, residual=32), "eager"),
    ("kivi", dict(bits=2, group_size=32, residual=32), "inductor"),
    ("int8", {}, "eager"),
    ("fp8", {}, "eager"),
    ("million", dict(bits=4, residual=32), "eager"),
    ("cq", dict(channels=4, residual=32), "eager"),
    ("kvquant", dict(bits=4), "eager"),
    ("fp16", {}, "eager"),                                    # dense attention at the device length
    ("fp16", dict(heads="streaming", sink=16, recent=64), "eager"),
    ("fp16", dict(heads="duo", sink=16, recent=64), "eager"),
    ("kivi", dict(bits=2, group_size=32, residual=32, heads="duo", sink=16, recent=64), "inductor")])
def test_decode_graph_replays_the_eager_tokens(method, opts, backend, monkeypatch):
    # two compiled copies of one architecture recompile transformers' shared forward wrapper more often than
    # Dynamo's default limit of 8 allows (past it Dynamo runs the model uncompiled)
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    monkeypatch.setenv("KVPASS_KERNELS", "all")          # any kernel not yet verified on a GPU, too
    base = _tiny_llama(torch.float16, "cuda")
    ids = torch.randint(0, 128, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    if scheme_class(method).needs_calibration:
        calib = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(2)).cuda()
        opts = dict(opts, calibration=kvpass.calibrate(base, method, calib, progress=False, **opts))
    if opts.get("heads") == "duo":          # one retrieval and one streaming KV head per layer
        from kvpass.calibration import Calibration, model_fingerprint
        opts = dict(opts, duo=Calibration(method="duo", options={}, model=model_fingerprint(base),
                                          tensors={f"layers.{i}.gates": torch.tensor([0.9, 0.1]) for i in range(2)}))
    opts = dict(opts, backend=backend, capacity=312)
    want = _greedy(kvpass.compile(copy.deepcopy(base), method, **opts), ids, 12, None)
    model = kvpass.compile(copy.deepcopy(base), method, **opts)
    cache = static_cache(model, 2, 360)
    arg = cache_argument(model)
    with torch.no_grad():
        out = model(input_ids=ids, **{arg: cache}, cache_position=torch.arange(300, device="cuda"), use_cache=True)
    step = DecodeGraph(model, cache, 2, warmup=2)
    tok, toks = out.logits[:, -1:].argmax(-1), []
    for i in range(12):
        toks.append(tok)
        tok = step.step(tok, 300 + i).argmax(-1)
    assert step.graph is not None
    assert torch.equal(torch.cat(toks, 1), want)
    if opts.get("heads") == "streaming":    # a ring has no capacity to overflow
        return
    with pytest.raises(CapacityError, match="CUDA-graph"):  # the 313th token overflows: flagged, raised
        step.step(tok, 312)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_an_fp8_scale_growth_inside_a_replay_is_redone_eagerly():
    """Scales cut 64x between two replays make the next step's tokens need larger ones: the replay raises
    REDO, DecodeGraph rewinds and runs the step eagerly (growing and re-encoding), and every token equals
    the same model decoded without a graph, scales cut alike."""
    torch._dynamo.reset()
    base = _tiny_llama(torch.float16, "cuda")
    ids = torch.randint(0, 128, (1, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    runs = []
    for _ in range(2):
        model = kvpass.compile(copy.deepcopy(base), "fp8", backend="eager", capacity=64)
        cache = static_cache(model, 1, 64)
        with torch.no_grad():
            out = model(input_ids=ids, **{cache_argument(model): cache}, cache_position=torch.arange(40, device="cuda"),
                        use_cache=True)
        runs.append((model, cache, out.logits[:, -1:].argmax(-1)))
    (eager, eager_cache, tok_e), (graphed, graph_cache, tok_g) = runs
    step = DecodeGraph(graphed, graph_cache, 1, warmup=1)
    for i in range(6):
        if i == 3:                                   # steps 1 and 2 replayed the graph
            for model in (eager, graphed):
                for st in model._kvpass.manager.states.values():
                    st["k_scale"].div_(64)
                    st["v_scale"].div_(64)
        with torch.no_grad():
            tok_e = eager(input_ids=tok_e, **{cache_argument(eager): eager_cache},
                          cache_position=torch.tensor([40 + i], device="cuda"), use_cache=True).logits.argmax(-1)
        tok_g = step.step(tok_g, 40 + i).argmax(-1)
        assert torch.equal(tok_e, tok_g), i
    assert step.graph is not None
    for a, b in zip(eager._kvpass.manager.states.values(), graphed._kvpass.manager.states.values()):
        assert a.length == b.length == 46
        assert torch.equal(a["k_scale"], b["k_scale"])


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_capture_without_kernels_is_a_clear_error():
    base = _tiny_llama(torch.float16, "cuda")
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2)).cuda()
    model = kvpass.compile(base, "qaq", backend="eager", capacity=64,       # its widths are planned on the host
                           calibration=kvpass.calibrate(base, "qaq", calib, progress=False))
    cache = static_cache(model, 1, 48)
    ids = torch.randint(0, 128, (1, 20), device="cuda")
    with torch.no_grad():
        model(input_ids=ids, **{cache_argument(model): cache}, cache_position=torch.arange(20, device="cuda"),
              use_cache=True)
    step = DecodeGraph(model, cache, 1, warmup=1)
    step.step(ids[:, :1], 20)
    with pytest.raises(KVPassError, match="CUDA graph"):
        step.step(ids[:, :1], 21)


@pytest.mark.parametrize("method,opts", [
    ("kvquant", dict(bits=3)), ("kvquant", dict(bits=2, outliers=0.0, sink=0)),
    ("million", dict(bits=4, residual=4, sink=2)), ("million", dict(bits=2, residual=0, codebook="head")),
    ("cq", dict(channels=2, code_bits=4, residual=4, pre_rope=True)), ("int8", {}), ("fp8", {}), ("fp16", {})])
def test_device_start_appends_write_what_host_start_appends_write(method, opts):
    """The appends a captured step records (start = the length tensor, no host value) leave every buffer as
    the eager appends do, over single tokens and a 3-token step."""
    from tests.conftest import make, rotary_for
    scheme = make(method, opts, kv_heads=2, head_dim=32)
    rotary = rotary_for(scheme, 32)
    shape = kvpass.CacheShape(2, 2, 32, 40, torch.float32)
    host, device = scheme.allocate(shape), scheme.allocate(shape)
    k, v = torch.randn(2, 2, 30, 32), torch.randn(2, 2, 30, 32)
    for st in (host, device):
        scheme.append(st, k[:, :, :20], v[:, :, :20], rotary=rotary)
    for a, b in ((20, 21), (21, 22), (22, 25), (25, 26), (26, 30)):
        scheme.append(host, k[:, :, a:b], v[:, :, a:b], rotary=rotary)
        scheme._append(device, k[:, :, a:b], v[:, :, a:b], device.length_tensor)
        device.length_tensor += b - a
    for name in host.buffers:
        assert torch.equal(host[name], device[name]), name


@pytest.mark.parametrize("method,opts", [
    ("kvquant", dict(bits=3)), ("million", dict(bits=4, residual=4, sink=2)),
    ("million", dict(bits=2, residual=0, codebook="head")), ("int8", {}), ("fp8", {}), ("fp16", {})])
def test_a_device_start_append_past_the_capacity_stays_inside_the_buffers(method, opts):
    """A captured step past the capacity is flagged (OVERFLOW, raised after the replay); its writes must
    land inside the buffers meanwhile — an index past them is a device-side assert that kills the process."""
    from tests.conftest import make, rotary_for
    scheme = make(method, opts, kv_heads=2, head_dim=32)
    rotary = rotary_for(scheme, 32)
    state = scheme.allocate(kvpass.CacheShape(1, 2, 32, 24, torch.float32))
    scheme.append(state, torch.randn(1, 2, 24, 32), torch.randn(1, 2, 24, 32), rotary=rotary)
    before = {name: state[name].clone() for name in state.buffers}
    scheme._append(state, torch.randn(1, 2, 2, 32), torch.randn(1, 2, 2, 32), state.length_tensor)
    assert any(not torch.equal(before[n], state[n]) for n in state.buffers)   # it wrote (clamped), no IndexError


@pytest.mark.parametrize("method,grow", [("fp8", True), ("duo-fp8", True), ("int8", False)])
def test_a_step_rewound_and_redone_eagerly_leaves_what_the_eager_step_leaves(method, grow):
    """What DecodeGraph does when a replay raises REDO: the device-start append (an fp8 token 50x past its
    head's scale flags it and writes clamped codes), the length moved back, the eager append of the same
    token — every buffer must equal a cache that only took the eager append (a duo layer's ring too; int8
    shows a scheme that never flags repeats a step as well). Only fp8 raises REDO; schemes whose window
    ring the new token overwrites before the leaving token is encoded (KIVI, MILLION, CQ) could not."""
    from kvpass.calibration import Calibration
    from kvpass.graphs import device_status
    from tests.conftest import make, rotary_for
    if method == "duo-fp8":
        gates = Calibration(method="duo", options={"sink": 4, "recent": 8}, model={},
                            tensors={"layers.0.gates": torch.tensor([1.0, 0.0])})
        scheme = kvpass.get_scheme("duo", inner=kvpass.get_scheme("fp8"), gates=gates, ratio=0.5)
    else:
        scheme = make(method, {}, kv_heads=2, head_dim=32)
    rotary = rotary_for(scheme, 32)
    shape = kvpass.CacheShape(1, 2, 32, 40, torch.float32)
    redone, eager = scheme.allocate(shape), scheme.allocate(shape)
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 1, 2, 21, 32, generator=g)
    k[:, :, 20] *= 50                             # the step's token: far past the prefill's scales
    for st in (redone, eager):
        scheme.append(st, k[:, :, :20], v[:, :, :20], rotary=rotary)
    device_status(torch.device("cpu")).zero_()
    if method == "duo-fp8":                       # DuoHeads.captured_step's appends: ring, then the inner scheme
        ret, stream = scheme.parts(redone)
        kr, ks, _, _ = scheme._indices(0, 2, 2, k.device)
        scheme.ring.store_at(stream, k[:, :, 20:].index_select(1, ks), v[:, :, 20:].index_select(1, ks))
        scheme.inner._append_captured(ret, k[:, :, 20:].index_select(1, kr), v[:, :, 20:].index_select(1, kr),
                                      rotary)
    else:
        scheme._append_captured(redone, k[:, :, 20:], v[:, :, 20:], rotary)
    assert raise_flags(torch.device("cpu"), redo_ok=True) is grow
    assert redone.length == 21
    redone.length_tensor -= 1                     # what graphs.rewind does to every layer
    scheme.append(redone, k[:, :, 20:], v[:, :, 20:], rotary=rotary)
    scheme.append(eager, k[:, :, 20:], v[:, :, 20:], rotary=rotary)
    for name in eager.buffers:
        assert torch.equal(eager[name], redone[name]), name
    assert redone.length == eager.length == 21


def test_rewind_moves_every_layer_of_a_compiled_model_back():
    from kvpass.graphs import rewind
    model = kvpass.compile(_tiny_llama(), "fp8", capacity=64, backend="eager")
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 9)), use_cache=True)
    states = list(model._kvpass.manager.states.values())
    assert len(states) == 2 and all(st.length == 9 for st in states)
    rewind(model, 1)
    assert all(st.length == 8 for st in states)


def test_a_rewound_static_cache_step_can_be_redone_at_the_same_position():
    """DecodeGraph's redo: a decode step, then the model and its StaticCache moved back one token, then the
    same step again — its logits equal the first run's. Without the cache's counter (transformers 5's
    StaticLayer.cumulative_length, advanced by every step) the redo continues one position too far."""
    from kvpass.graphs import rewind, static_cache
    model = kvpass.compile(_tiny_llama(), "fp8", capacity=64, backend="eager")
    cache = static_cache(model, 1, 32)
    arg = cache_argument(model)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(input_ids=ids, **{arg: cache}, cache_position=torch.arange(10), use_cache=True)
        step = lambda: model(input_ids=ids[:, :1], **{arg: cache}, cache_position=torch.tensor([10]),  # noqa: E731
                             use_cache=True).logits
        first = step()
        rewind(model, 1, cache)
        again = step()
    assert torch.equal(first, again)
    assert all(st.length == 11 for st in model._kvpass.manager.states.values())


def test_a_device_start_append_inside_the_sink_is_flagged():
    from tests.conftest import make
    scheme = make("million", dict(bits=4, residual=4, sink=2), kv_heads=2, head_dim=32)
    state = scheme.allocate(kvpass.CacheShape(1, 2, 32, 16, torch.float32))
    scheme._append(state, torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32), state.length_tensor)
    with pytest.raises(KVPassError, match="sink"):
        raise_flags(torch.device("cpu"))
