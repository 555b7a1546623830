"""Sequence-parallel caches (kvpass.distributed) on the CPU: 2 and 4 gloo processes against one process.

The ranks are spawned once per world size (torch.multiprocessing, a free port) and run every case; the
tests read their results. Two comparisons:
- *exact slicing* (schemes whose stored tokens do not depend on their neighbours: fp16, int8, KIVI/CQ/
  MILLION with ``residual=0, sink=0``, KVQuant with ``sink=0``; blocks a multiple of KIVI's group): the
  ranks together must give the one-process outputs, to float32 rounding of the merge order (1e-5);
- *every scheme and variant*: the merged output of the last decode step must equal dense attention over
  the union of what the ranks hold (their decoded slices placed at their global positions), to 1e-5 —
  the merge is exact whatever each rank's windows, sinks and scales keep.
duo over a sliced KIVI-2 (the streaming ring replicated) equals duo on one process (1e-5). Model level:
tiny Llama models compiled with ``parallel="sequence"`` (duo + KIVI-2 on 2 ranks, KIVI-2 on 4; a
left-padded batch, a 24-token prompt, a 6-token chunk, 10 decode steps) give the one-process logits (1e-4)
and the same greedy tokens, and kvpass.report describes the rank's slice. Errors: more ranks than blocks,
QAQ, heads="streaming", an unknown mode, a block that splits KIVI's groups.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import kvpass
from kvpass.attention import dense_attention
from kvpass.calibration import Calibration, model_fingerprint
from kvpass.distributed import SequenceParallel, sequence_parallel
from kvpass.errors import KVPassError, OptionError, ShapeError
from kvpass.methods import methods, scheme_class
from kvpass.perplexity import cache_argument

from .conftest import make, rotary_for

TOL = 1e-5
BLOCK = 16
STEPS = (30, 1, 1, 5, 1, 1, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)   # prompt, chunks, decode steps


# -- spawning ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
    except Exception:               # noqa: BLE001 — carried to the parent, which fails the test with it
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def spawn(world: int, fn, *args, tmp_path) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; returns each rank's result."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        if isinstance(res, dict) and "error" in res:
            pytest.fail(f"rank {r} failed:\n{res['error']}")
    return results


# -- scheme level --------------------------------------------------------------------------------------
def _cases(world: int = 2):
    """(name, options) of every scheme that runs sliced and each of its test variants (on 4 ranks: its first
    variant, which keeps the 4-process spawn on the 2-core CI machine affordable), plus exact-slicing
    variants of the windowed and sink-keeping schemes."""
    keep = None if world <= 2 else 1
    cases = [(n, o) for n in methods() if n != "qaq" for o in scheme_class(n).test_variants[:keep]]
    cases += [("kivi", dict(bits=2, group_size=8, residual=0)), ("kvquant", dict(bits=3, sink=0)),
              ("million", dict(bits=4, residual=0, sink=0, codebook="layer")),
              ("cq", dict(channels=4, code_bits=8, residual=0, sink=0))]
    return cases


def exact_slicing(name: str, opts: dict) -> bool:
    """Whether the ranks' caches are the one-process cache cut in slices (see kvpass.distributed)."""
    scheme = make(name, opts, 2, 32)
    return name != "fp8" and getattr(scheme, "residual", 0) == 0 and getattr(scheme, "sink", 0) == 0


def _scheme_worker(rank, world, cases):
    out = {}
    for name, opts in cases:
        torch.manual_seed(0)
        inner = make(name, opts, 2, 32)
        sp = SequenceParallel(inner=inner, block=BLOCK)
        shape = kvpass.CacheShape(2, 2, 32, 128, torch.float32)
        one, sliced = inner.allocate(shape), sp.allocate(shape)
        rot = rotary_for(inner, 32)
        g = torch.Generator().manual_seed(1)
        n = sum(STEPS)
        q, k, v = (torch.randn(2, h, n, 32, generator=g) for h in (4, 2, 2))
        k[..., 1] *= 4
        pos, diff = 0, 0.0
        for t in STEPS:
            s = slice(pos, pos + t)
            kw = dict(k_pre=k[:, :, s] if rot else None, rotary=rot, fresh=pos == 0, scale=None, causal=True,
                      attn_mask=None, softcap=None)
            want = inner.step(one, q[:, :, s], k[:, :, s], v[:, :, s], **kw)
            got = sp.step(sliced, q[:, :, s], k[:, :, s], v[:, :, s], **kw)
            diff = max(diff, (want - got).abs().max().item())
            pos += t
        # the union of the slices, at their global positions
        k_loc, v_loc = sp.decode(sliced)
        held = sp.local(sliced).length
        parts = [None] * world
        dist.all_gather_object(parts, (sp.global_positions(0, held, "cpu"), k_loc, v_loc))
        positions = torch.cat([p for p, _, _ in parts])
        order = positions.argsort()
        k_all = torch.cat([x for _, x, _ in parts], 2)[:, :, order]
        v_all = torch.cat([x for _, _, x in parts], 2)[:, :, order]
        union = dense_attention(q[:, :, -1:], k_all, v_all)
        result = {"vs_one_process": diff, "vs_union": (union - got).abs().max().item(),
                  "positions": sorted(positions.tolist()) == list(range(n)), "held": held}
        if (name, opts) == ("kivi", dict(bits=2, group_size=8, residual=0)):
            result["masked"] = _masked_chunk(inner, sp, shape)
        out[(name, tuple(sorted(opts.items())))] = result
    return out


def _masked_chunk(inner, sp, shape) -> float:
    """A prompt, a 21-token chunk straddling ranks and one decode step, with a padding mask (bool, row 1
    hides its first 3 positions): the largest difference to one process."""
    one, sliced = inner.allocate(shape), sp.allocate(shape)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 42, 32, generator=g) for h in (4, 2, 2))
    mask = torch.ones(2, 1, 1, 42, dtype=torch.bool)
    mask[1, ..., :3] = False
    diff, pos = 0.0, 0
    for t in (20, 21, 1):
        s = slice(pos, pos + t)
        kw = dict(k_pre=None, rotary=None, fresh=pos == 0, scale=None, causal=True, softcap=None,
                  attn_mask=mask[..., :pos + t].expand(2, 1, t, pos + t))
        want = inner.step(one, q[:, :, s], k[:, :, s], v[:, :, s], **kw)
        got = sp.step(sliced, q[:, :, s], k[:, :, s], v[:, :, s], **kw)
        diff = max(diff, (want - got).abs().max().item())
        pos += t
    return diff


MODELS_PER_WORLD = {2: ("duo+kivi-2",), 4: ("kivi-2",)}
_RUNS: dict = {}                   # world size -> every rank's results


def _worker(rank, world, scheme_cases, model_cases):
    return {"schemes": _scheme_worker(rank, world, scheme_cases), "duo": _duo_worker(rank, world),
            "models": _model_worker(rank, world, model_cases), "too_few_blocks": _too_few_blocks(rank, world)}


def _duo_worker(rank, world) -> float:
    """duo over a sliced KIVI-2 (residual 0) against duo over KIVI-2 on one process, layer 0 (one retrieval
    head, one streaming head; the streaming ring replicated): the largest output difference over the steps."""
    gates, inner = _gates(_llama()), kvpass.get_scheme("kivi", bits=2, group_size=8, residual=0)
    one = kvpass.get_scheme("duo", inner=inner, gates=gates)
    sliced = kvpass.get_scheme("duo", inner=SequenceParallel(inner=inner, block=BLOCK), gates=gates)
    shape = kvpass.CacheShape(2, 2, 32, 128, torch.float32, layer=0)
    a, b = one.allocate(shape), sliced.allocate(shape)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, sum(STEPS), 32, generator=g) for h in (4, 2, 2))
    pos, diff = 0, 0.0
    for t in STEPS:
        s = slice(pos, pos + t)
        kw = dict(k_pre=None, rotary=None, fresh=pos == 0, scale=None, causal=True, attn_mask=None, softcap=None)
        want = one.step(a, q[:, :, s], k[:, :, s], v[:, :, s], **kw)
        got = sliced.step(b, q[:, :, s], k[:, :, s], v[:, :, s], **kw)
        diff = max(diff, (want - got).abs().max().item())
        pos += t
    assert b.length == pos and sliced.parts(b)[0].scheme.local(sliced.parts(b)[0]).length < pos
    return diff


def ranks(world: int, tmp_path_factory) -> list:
    """Every rank's results of one spawn of ``world`` gloo processes (spawned once per module: starting the
    processes and compiling the models is most of this file's time on the shared CPU)."""
    if world not in _RUNS:
        _RUNS[world] = spawn(world, _worker, _cases(world), MODELS_PER_WORLD[world],
                             tmp_path=tmp_path_factory.mktemp(f"world{world}"))
    return _RUNS[world]


@pytest.mark.parametrize("world", [2, 4])
def test_every_scheme_sliced_over_ranks_merges_exactly(world, tmp_path_factory):
    cases = _cases(world)
    results = [r["schemes"] for r in ranks(world, tmp_path_factory)]
    for name, opts in cases:
        key = (name, tuple(sorted(opts.items())))
        rows = [r[key] for r in results]
        for r in rows:
            assert r["positions"], f"{name} {opts}: the ranks' slices do not partition the context"
            assert r["vs_union"] < TOL, f"{name} {opts}: merged output differs from attention over the union " \
                                        f"of the slices by {r['vs_union']:.2e}"
            if exact_slicing(name, opts):
                assert r["vs_one_process"] < TOL, f"{name} {opts}: differs from one process by " \
                                                  f"{r['vs_one_process']:.2e}"
        held = [r["held"] for r in rows]
        assert sum(held) == sum(STEPS) and max(held) - min(held) <= BLOCK      # balanced to a block
        if "masked" in rows[0]:
            assert all(r["masked"] < TOL for r in rows), [r["masked"] for r in rows]
    # the windowed variants really differ (each rank keeps its own newest tokens exact): the test can tell
    windowed = (("kivi", tuple(sorted(dict(bits=2, group_size=8, residual=16).items()))))
    assert results[0][windowed]["vs_one_process"] > 1e-3


# -- model level ---------------------------------------------------------------------------------------
def _llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gates(model):
    table = torch.tensor([[0.9, 0.1], [0.2, 0.8]])                  # one retrieval head per layer
    return Calibration(method="duo", options={"sink": 4, "recent": 8}, model=model_fingerprint(model),
                       tensors={f"layers.{i}.gates": g.clone() for i, g in enumerate(table)})


MODEL_CASES = {
    "kivi-2": dict(method="kivi", bits=2, group_size=8, residual=0),
    "duo+kivi-2": dict(method="kivi", bits=2, group_size=8, residual=0, heads="duo"),
}
_ONE_PROCESS: dict = {}            # case -> the one-process logits, shared by the parametrizations


def _run_model(case: str, parallel: bool):
    """Teacher-forced logits (B, steps, vocab) of a tiny Llama compiled with ``case``: a left-padded batch of
    2, a 24-token prompt, a 6-token chunk, then 10 single tokens."""
    opts = dict(MODEL_CASES[case])
    method = opts.pop("method")
    if opts.get("heads") == "duo":
        opts["duo"] = _gates(_llama())
    if parallel:
        opts.update(parallel="sequence", block=8)
    model = kvpass.compile(_llama(), method, capacity=64, backend="eager", **opts)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0                                                   # row 1 left-padded
    arg, past, logits, pos = cache_argument(model), None, [], 0
    with torch.no_grad():
        for t in (24, 6) + (1,) * 10:
            kw = {arg: past} if past is not None else {}
            out = model(input_ids=ids[:, pos:pos + t], attention_mask=mask[:, :pos + t], use_cache=True, **kw)
            logits.append(out.logits[:, -1])
            past, pos = out.past_key_values, pos + t
    held = [st.scheme.local(st).length for st in model._kvpass.manager.states.values()
            if isinstance(st.scheme, SequenceParallel)] if parallel else []
    rep = kvpass.report(model)
    return torch.stack(logits, 1), held, (str(rep), rep.bits_per_element)


def _model_worker(rank, world, cases):
    out = {}
    for c in cases:
        torch._dynamo.reset()          # each case compiles a fresh model: keep Dynamo under its recompile limit
        out[c] = _run_model(c, parallel=True)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_duo_over_a_sliced_scheme_equals_one_process(world, tmp_path_factory):
    diffs = [r["duo"] for r in ranks(world, tmp_path_factory)]
    assert max(diffs) < TOL, diffs


@pytest.mark.parametrize("world", [2, 4])
def test_compiled_model_sliced_over_ranks_equals_one_process(world, tmp_path_factory):
    """Every rank's logits equal the one-process model's (1e-4) with the same greedy tokens; each layer's
    40 tokens are spread over the ranks (fp16 and the other schemes: the scheme-level test above; each
    Dynamo compile costs ~10 s of the shared CPU per process, so the model matrix stays small)."""
    cases, want = MODELS_PER_WORLD[world], {}
    for c in cases:
        if c not in _ONE_PROCESS:
            torch._dynamo.reset()
            _ONE_PROCESS[c] = _run_model(c, parallel=False)[0]
        want[c] = _ONE_PROCESS[c]
    results = [r["models"] for r in ranks(world, tmp_path_factory)]
    for c in cases:
        for rank, res in enumerate(results):
            got, held, (text, bits) = res[c]
            assert f"on this rank (1 of {world}, sequence-parallel" in text, text
            assert 2 < bits < 32, bits              # this rank's bytes over the tokens it holds
            torch.testing.assert_close(got, want[c], atol=1e-4, rtol=1e-4, msg=lambda m: f"{c} rank {rank}: {m}")
            assert torch.equal(got.argmax(-1), want[c].argmax(-1)), f"{c} rank {rank}: greedy tokens differ"
        if c != "duo+kivi-2":          # each layer's 40 tokens are spread over the ranks in blocks of 8
            held = [res[c][1] for res in results]
            assert all(len(h) == 2 for h in held)
            assert [sum(h[i] for h in held) for i in range(2)] == [40, 40]
            assert max(held)[0] - min(held)[0] <= 8


# -- errors --------------------------------------------------------------------------------------------
def _too_few_blocks(rank, world):
    messages = []
    sp = SequenceParallel(inner=kvpass.get_scheme("fp16"), block=8)
    try:
        sp.allocate(kvpass.CacheShape(1, 2, 16, 8 * world - 8, torch.float32))     # a block short
    except ShapeError as e:
        messages.append(str(e))
    try:                                                 # kvpass.compile says so before anything runs
        kvpass.compile(_llama(), "fp16", parallel="sequence", block=8, capacity=8 * world - 8, backend="eager")
    except ShapeError as e:
        messages.append(str(e))
    return messages


def test_more_ranks_than_blocks_is_a_clear_error(tmp_path_factory):
    messages = [m for r in ranks(4, tmp_path_factory) for m in r["too_few_blocks"]]
    assert len(messages) == 8 and all("3 block(s) of 8, fewer than the 4 ranks" in m for m in messages), messages


def test_what_cannot_run_sliced_is_refused_before_anything_runs():
    with pytest.raises(KVPassError, match="qaq cannot run sequence-parallel"):
        kvpass.compile(_llama(), "qaq", parallel="sequence", backend="eager")
    with pytest.raises(KVPassError, match="parallel must be one of"):
        kvpass.compile(_llama(), "fp16", parallel="tensor", backend="eager")
    with pytest.raises(KVPassError, match="nothing to slice"):
        kvpass.compile(_llama(), "fp16", heads="streaming", parallel="sequence", backend="eager")
    with pytest.raises(OptionError, match="multiple of kivi's group_size"):
        kvpass.compile(_llama(), "kivi", group_size=32, parallel="sequence", block=48, backend="eager")
    with pytest.raises(OptionError, match="block must be a positive integer"):
        sequence_parallel(kvpass.get_scheme("fp16"), "sequence", block=0)
    with pytest.raises(KVPassError, match="not the streaming policy"):
        SequenceParallel(inner=kvpass.get_scheme("streaming"))
    assert "sequence_parallel" not in kvpass.methods()
