"""The Triton decode-attention kernels against their PyTorch references, run by the Triton interpreter on
the CPU (``make test`` sets TRITON_INTERPRET=1; without it these tests are skipped on a CPU machine).

Tolerances: float32 caches 2e-5 absolute (the kernels and the references do the same float32 arithmetic in
another order); float16 caches 3e-3 (the kernels round dequantized keys/values and the softmax weights to
the cache dtype before the tensor-core dots, as flash attention does). bfloat16 is checked on the GPU by
bench/decode_attention.py (the interpreter does not emulate bfloat16 dots).
"""

from __future__ import annotations

import os

import pytest
import torch

from kvpass import CacheShape, get_scheme
from kvpass.errors import ShapeError

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}

# (batch, q heads, kv heads, head_dim, cached tokens, new tokens, kivi options)
KIVI_CASES = [
    (1, 4, 1, 64, 300, 1, dict(bits=2, group_size=32, residual=64)),       # GQA 4, past several groups
    (2, 8, 1, 64, 77, 1, dict(bits=2, group_size=32, residual=32)),        # GQA 8, batch 2, odd length
    (2, 2, 2, 32, 171, 3, dict(bits=4, group_size=16, residual=16)),       # GQA 1, 3 new tokens (causal)
    (1, 4, 2, 64, 40, 1, dict(bits=2, group_size=32, residual=0)),         # no window
    (1, 4, 2, 64, 20, 1, dict(bits=2, group_size=16, residual=32)),        # everything still in the window
    (1, 4, 1, 64, 128, 1, dict(bits=2, group_size=32, residual=32)),       # length exactly at a flush
    (2, 6, 2, 128, 97, 1, dict(bits=1, group_size=32, residual=32)),       # 1 bit, head_dim 128
    (1, 2, 1, 32, 90, 1, dict(bits=8, group_size=16, residual=16)),        # 8 bits
    (1, 2, 1, 64, 2100, 1, dict(bits=2, group_size=16, residual=16)),      # several blocks per program
    (1, 4, 1, 128, 3000, 1, dict(bits=4, group_size=32, residual=32)),     # (online-softmax rescaling)
    (2, 8, 2, 128, 1333, 1, dict(bits=2, group_size=32, residual=128)),    # the defaults at Llama's head_dim
]


def _filled(scheme, b, hkv, d, length, t, dtype, extra=5):
    """A state of ``length`` tokens: a prefill of length - t, then the t new tokens (as the op appends);
    pre-RoPE schemes get RoPE parameters."""
    from tests.conftest import rotary_for
    rotary = rotary_for(scheme, d)
    state = scheme.allocate(CacheShape(b, hkv, d, length + extra, dtype), DEVICE)
    k = torch.randn(b, hkv, length, d, dtype=dtype, device=DEVICE)
    v = torch.randn(b, hkv, length, d, dtype=dtype, device=DEVICE)
    if length > t:
        scheme.append(state, k[:, :, :length - t], v[:, :, :length - t], rotary=rotary)
    scheme.append(state, k[:, :, length - t:], v[:, :, length - t:], rotary=rotary)
    return state


def _assert_kernel_matches_reference(scheme, b, hq, hkv, d, length, t, dtype):
    """Fill a cache of ``length`` tokens (the last t appended as a step) and compare kernel_attend with
    scheme.attend for t new queries: same shape and dtype, within the dtype's tolerance."""
    from kvpass.codegen import kernel_attend
    state = _filled(scheme, b, hkv, d, length, t, dtype)
    q = torch.randn(b, hq, t, d, dtype=dtype, device=DEVICE)
    out = kernel_attend(scheme, state, q)
    ref = scheme.attend(state, q)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert (out.float() - ref.float()).abs().max().item() < TOL[dtype]


MAIN_LOOPS = {"reshape": dict(main="reshape"),     # group loop's options; it runs where head_dim * bits / 8 <= G
              "group": dict(main="group", group=dict(words=False, fold=False, magic=False)),
              "group-words": dict(main="group", group=dict(words=True, fold=False, magic=False)),
              "group-words-fold-magic": dict(main="group", group=dict(words=True, fold=True, magic=True)),
              "group-words-pairs": dict(main="group", group=dict(words=True, fold=False, magic=False, pairs=True,
                                                                     adjacent=False))}


@pytest.mark.parametrize("loop", list(MAIN_LOOPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,hq,hkv,d,length,t,opts", KIVI_CASES)
def test_kivi_kernel_matches_reference(b, hq, hkv, d, length, t, opts, dtype, loop, monkeypatch):
    """Every main loop (unpack by reshape / one dot per bit slot, with and without scale folding and the
    magic-number conversion) against the reference."""
    from kvpass.codegen import kivi
    monkeypatch.setitem(kivi.TUNING, "main", MAIN_LOOPS[loop]["main"])
    if "group" in MAIN_LOOPS[loop]:
        monkeypatch.setitem(kivi.TUNING, "group", {**kivi.TUNING["group"], **MAIN_LOOPS[loop]["group"]})
    _assert_kernel_matches_reference(get_scheme("kivi", **opts), b, hq, hkv, d, length, t, dtype)


@pytest.mark.parametrize("tail_programs", [2, 5])
@pytest.mark.parametrize("case", [0, 2, 3, 4, 10], ids=lambda i: f"case{i}")
def test_a_tail_spread_over_programs_matches_reference(case, tail_programs, monkeypatch):
    """The tail launch (fp16 window and leftover groups) with several programs per head, each taking every
    n-th block of positions: more programs than blocks (some get none), causal new tokens, no window."""
    from kvpass.codegen import kivi
    b, hq, hkv, d, length, t, opts = KIVI_CASES[case]
    monkeypatch.setitem(kivi.TUNING, "tail_programs", tail_programs)
    _assert_kernel_matches_reference(get_scheme("kivi", **opts), b, hq, hkv, d, length, t, torch.float16)


@pytest.mark.parametrize("case", [0, 2, 3, 4, 10], ids=lambda i: f"case{i}")
def test_adjacent_pairs_match_reference(case, monkeypatch):
    """The pairs loop taking bytes 0, 1 and 2, 3 of a word (channels 4w, 4w + 1 / 4w + 2, 4w + 3) with the
    scale and zero pairs loaded as 32-bit words (TUNING group "adjacent"): the channel order it rebuilds
    and the halves it unpacks give the reference output."""
    from kvpass.codegen import kivi
    b, hq, hkv, d, length, t, opts = KIVI_CASES[case]
    monkeypatch.setitem(kivi.TUNING, "main", "group")
    monkeypatch.setitem(kivi.TUNING, "group", {**kivi.TUNING["group"], "words": True, "fold": False,
                                               "magic": False, "pairs": True, "adjacent": True})
    _assert_kernel_matches_reference(get_scheme("kivi", **opts), b, hq, hkv, d, length, t, torch.float16)


@pytest.mark.parametrize("b,hq,hkv,d,length,t", [(1, 4, 1, 128, 3000, 1), (2, 8, 2, 64, 1500, 2)])
def test_many_splits_merge_like_one(b, hq, hkv, d, length, t, monkeypatch):
    """Dozens of split programs (a count that is no multiple of the merge's block of 16 splits) give the
    reference output: the merge weights every split, none twice."""
    from kvpass.codegen import kivi
    from kvpass.codegen.decode import plan_splits
    monkeypatch.setitem(kivi.TUNING, "group", {**kivi.TUNING["group"], "programs_per_sm": 64})
    monkeypatch.setitem(kivi.TUNING, "reshape", {**kivi.TUNING["reshape"], "programs_per_sm": 64})
    assert plan_splits(b * hkv, length - 128, hq // hkv, 32, torch.device("cpu"), 64).splits > 40
    _assert_kernel_matches_reference(get_scheme("kivi", bits=2), b, hq, hkv, d, length, t, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU: the interpreter's bf16 loads are wrong")
@pytest.mark.parametrize("b,hq,hkv,d,length,t,opts", KIVI_CASES[:3])
def test_kivi_pairs_under_bf16_cache_dequantize_in_the_scales_type(b, hq, hkv, d, length, t, opts, monkeypatch):
    """The pairs loop with a bf16 cache and fp16 scales dequantizes in fp16 (not rounding the scales to
    bf16): as close to the reference as the default loop."""
    from kvpass.codegen import kernel_attend, kivi
    scheme = get_scheme("kivi", **opts)
    state = _filled(scheme, b, hkv, d, length, t, torch.bfloat16)
    q = torch.randn(b, hq, t, d, dtype=torch.bfloat16, device=DEVICE)
    ref = scheme.attend(state, q).float()
    errors = {}
    for pairs in (False, True):
        monkeypatch.setitem(kivi.TUNING, "main", "group")
        monkeypatch.setitem(kivi.TUNING, "group", {**kivi.TUNING["group"], "words": True, "fold": False,
                                                   "pairs": pairs})
        errors[pairs] = (kernel_attend(scheme, state, q).float() - ref).abs().max().item()
    assert errors[True] < 3e-2 and errors[True] <= 1.5 * errors[False] + 1e-3


GLUON_ON_GPU = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                  reason="the Gluon kernel runs on a GPU only (Gluon has no interpreter)")


def _gluon_launches(monkeypatch, module: str = "kivi_gluon") -> list:
    """A list that gets one entry per launch of a Gluon main-loop kernel (KIVI-2's, or the codebook schemes' with
    module="codebook_gluon", KVQuant's with "kvquant_gluon")."""
    import importlib
    mod = importlib.import_module(f"kvpass.codegen.{module}")
    name = f"_{module}_main_kernel"
    calls = []
    real = getattr(mod, name)

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]
    monkeypatch.setattr(mod, name, Spy())
    return calls


def _assert_gluon_matches_reference(scheme, tuning: dict, module: str, b, hq, hkv, length, dtype, monkeypatch,
                                    **tune) -> None:
    """A head_dim-128 cache of ``length`` tokens through a Gluon main loop (``module``; its TUNING["gluon"] is
    ``tuning``, updated by ``tune``): it ran once, is within the dtype's tolerance of the reference and no further
    from it than the Triton loop it replaces."""
    from kvpass.codegen import kernel_attend
    state = _filled(scheme, b, hkv, 128, length, 1, dtype)
    q = torch.randn(b, hq, 1, 128, dtype=dtype, device=DEVICE)
    ref = scheme.attend(state, q).float()
    calls = _gluon_launches(monkeypatch, module)
    errors = {}
    for on in (False, True):
        monkeypatch.setitem(tuning, "gluon", {**tuning["gluon"], "on": on, **tune})
        errors[on] = (kernel_attend(scheme, state, q).float() - ref).abs().max().item()
    assert len(calls) == 1
    assert errors[True] < (3e-3 if dtype == torch.float16 else 3e-2), errors
    assert errors[True] <= 1.5 * errors[False] + 1e-3, errors


def _padding_mask_error(scheme, mask_kind: str) -> float:
    """Max |kernel - reference| of a head_dim-128 cache (2 x 2000 tokens, 16 query / 4 kv heads) under a padding
    mask shared by the heads, float or bool: batch 0 hides its first 70 positions, batch 1 a run in the middle."""
    from kvpass.codegen import kernel_attend
    b, hq, hkv, length = 2, 16, 4, 2000
    state = _filled(scheme, b, hkv, 128, length, 1, torch.float16)
    q = torch.randn(b, hq, 1, 128, dtype=torch.float16, device=DEVICE)
    keep = torch.ones(b, 1, 1, length, dtype=torch.bool, device=DEVICE)
    keep[0, ..., :70] = False
    keep[1, ..., 500:530] = False
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    out = kernel_attend(scheme, state, q, attn_mask=mask)
    return (out.float() - scheme.attend(state, q, attn_mask=mask).float()).abs().max().item()


def _graph_replay_errors(scheme) -> dict:
    """Max |kernel - reference| of the op a CUDA-graph capture launches (:func:`_captured_call`: planned for the
    capacity, length unknown on the host) for a 2 x 1000-token head_dim-128 cache: run eagerly, and captured then
    replayed after 300 more tokens."""
    from tests.conftest import rotary_for
    b, hq, hkv = 2, 16, 4
    state = _filled(scheme, b, hkv, 128, 1000, 1, torch.float16, extra=3000)
    q = torch.randn(b, hq, 1, 128, dtype=torch.float16, device=DEVICE)
    eager = _captured_call(scheme, state, q, None)
    errors = {"eager": (eager.float() - scheme.attend(state, q).float()).abs().max().item()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _captured_call(scheme, state, q, None)
    for _ in range(3):
        k = torch.randn(b, hkv, 100, 128, dtype=torch.float16, device=DEVICE)
        scheme.append(state, k, torch.randn_like(k), rotary=rotary_for(scheme, 128))
    graph.replay()
    errors["graph"] = (out.float() - scheme.attend(state, q).float()).abs().max().item()
    return errors


# (batch, q heads, kv heads, cached tokens): KIVI-2 at head_dim 128, group 32, window 128 (the Gluon main loop)
GLUON_CASES = [(1, 32, 8, 4133), (2, 8, 2, 1333), (2, 16, 2, 777), (1, 4, 4, 300), (3, 12, 4, 5000), (1, 8, 8, 161)]


@GLUON_ON_GPU
@pytest.mark.parametrize("prefetch", [0, 1, 2], ids=["", "prefetch", "prefetch-codes"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,hq,hkv,length", GLUON_CASES)
def test_kivi_gluon_main_loop_matches_reference(b, hq, hkv, length, dtype, prefetch, monkeypatch):
    """The Gluon main loop (GQA 1/3/4/8, odd lengths, batches) against the reference, and no further from it
    than the Triton main loop it replaces; it really ran (its op was called)."""
    from kvpass.codegen import kernel_attend, kivi
    scheme = get_scheme("kivi", bits=2, group_size=32, residual=128)
    state = _filled(scheme, b, hkv, 128, length, 1, dtype)
    q = torch.randn(b, hq, 1, 128, dtype=dtype, device=DEVICE)
    ref = scheme.attend(state, q).float()
    calls = _gluon_launches(monkeypatch)
    errors = {}
    for on in (False, True):
        monkeypatch.setitem(kivi.TUNING, "gluon", {**kivi.TUNING["gluon"], "on": on, "prefetch": prefetch})
        errors[on] = (kernel_attend(scheme, state, q).float() - ref).abs().max().item()
    assert len(calls) == (1 if length - 128 >= 32 else 0)
    assert errors[True] < (3e-3 if dtype == torch.float16 else 3e-2)
    assert errors[True] <= 1.5 * errors[False] + 1e-3


@GLUON_ON_GPU
@pytest.mark.parametrize("mask_kind", ["additive", "bool"])
def test_kivi_gluon_main_loop_takes_a_padding_mask(mask_kind, monkeypatch):
    """A padding mask shared by the heads (batch 0: its first 70 positions, whole programs' spans of them; batch
    1: a run in the middle), float or bool: the reference's output."""
    from kvpass.codegen import kivi
    monkeypatch.setitem(kivi.TUNING, "gluon", {**kivi.TUNING["gluon"], "on": True})
    calls = _gluon_launches(monkeypatch)
    assert _padding_mask_error(get_scheme("kivi", bits=2, group_size=32, residual=128), mask_kind) < 3e-3
    assert len(calls) == 1


@GLUON_ON_GPU
def test_kivi_gluon_main_loop_replays_in_a_cuda_graph(monkeypatch):
    """The Gluon main loop planned for the capacity (length unknown on the host, most programs past it), run once
    and captured in a CUDA graph replayed after 300 more tokens: the reference's output each time. (Compiled
    models reach it through the opaque ``kvpass::attention`` op, which tests/test_kernels.py's compiled-model test
    and bench/e2e_decode.py run.)"""
    from kvpass.codegen import kivi
    monkeypatch.setitem(kivi.TUNING, "gluon", {**kivi.TUNING["gluon"], "on": True})
    calls = _gluon_launches(monkeypatch)
    errors = _graph_replay_errors(get_scheme("kivi", bits=2, group_size=32, residual=128))
    assert max(errors.values()) < 3e-3, errors
    assert len(calls) == 2


@GLUON_ON_GPU
@pytest.mark.parametrize("b,hq,hkv,length,retrieval", [(2, 32, 8, 3000, [0, 3, 4, 6]), (1, 8, 4, 700, [2])])
def test_kivi_gluon_main_loop_serves_duo_retrieval_heads(b, hq, hkv, length, retrieval, monkeypatch):
    """A duo layer over KIVI-2 at head_dim 128: the retrieval heads' main programs run the Gluon loop (reading the
    query rows of their model kv heads), the rings go to the tail launch; DuoHeads.attend's output."""
    from kvpass.calibration import Calibration
    from kvpass.codegen import kernel_attend, kivi
    monkeypatch.setitem(kivi.TUNING, "gluon", {**kivi.TUNING["gluon"], "on": True, "duo_min_tokens": 0})
    gates = torch.tensor([1.0 if h in retrieval else 0.0 for h in range(hkv)])
    cal = Calibration(method="duo", options={"sink": 4, "recent": 64}, model={}, tensors={"layers.0.gates": gates})
    scheme = get_scheme("duo", inner=get_scheme("kivi", bits=2, group_size=32, residual=64), gates=cal,
                        ratio=len(retrieval) / hkv)
    state = _filled(scheme, b, hkv, 128, length, 1, torch.float16, extra=100)
    q = torch.randn(b, hq, 1, 128, dtype=torch.float16, device=DEVICE)
    calls = _gluon_launches(monkeypatch)
    out = kernel_attend(scheme, state, q)
    assert (out.float() - scheme.attend(state, q).float()).abs().max().item() < 3e-3
    assert len(calls) == 1


# (batch, q heads, kv heads, cached tokens, method, options): head_dim 128, codes over C = 2 (MILLION-4), 4
# (MILLION-2, CQ 4 channels) and 8 channels (CQ-1), per-layer / per-head / per-model codebooks
CODEBOOK_GLUON_CASES = [
    (1, 32, 8, 4133, "million", dict(bits=4, residual=128, sink=1)),
    (2, 8, 2, 1333, "million", dict(bits=2, residual=64, sink=1, codebook="head")),
    (3, 12, 4, 5000, "cq", dict(channels=8, code_bits=8, residual=128, sink=1)),
    (2, 16, 2, 777, "cq", dict(channels=4, code_bits=8, residual=32, sink=2)),
    (1, 4, 4, 300, "million", dict(bits=4, residual=0, sink=0)),
    (1, 8, 8, 161, "million", dict(bits=4, residual=16, sink=1, codebook="model")),
]


@GLUON_ON_GPU
@pytest.mark.parametrize("warps,prefetch", [(16, False), (8, True)], ids=["16-warps", "8-warps-prefetch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,hq,hkv,length,method,opts", CODEBOOK_GLUON_CASES)
def test_codebook_gluon_main_loop_matches_reference(b, hq, hkv, length, method, opts, dtype, warps, prefetch,
                                                    monkeypatch):
    """The codebook schemes' Gluon main loop (centroids gathered from shared memory) against the reference's
    lookup-table attention, no further from it than the Triton loop it replaces; it really ran."""
    from kvpass.codegen import codebook
    from tests.conftest import make
    _assert_gluon_matches_reference(make(method, opts, kv_heads=hkv, head_dim=128), codebook.TUNING, "codebook_gluon",
                                    b, hq, hkv, length, dtype, monkeypatch, warps=warps, prefetch=prefetch)


@GLUON_ON_GPU
@pytest.mark.parametrize("mask_kind", ["additive", "bool"])
def test_codebook_gluon_main_loop_takes_a_padding_mask(mask_kind, monkeypatch):
    """A padding mask shared by the heads (batch 0: its first 70 positions; batch 1: a run in the middle), float or
    bool, through the Gluon loop: the reference's output."""
    from kvpass.codegen import codebook
    from tests.conftest import make
    monkeypatch.setitem(codebook.TUNING, "gluon", {**codebook.TUNING["gluon"], "on": True})
    calls = _gluon_launches(monkeypatch, "codebook_gluon")
    assert _padding_mask_error(make("million", dict(bits=4, residual=64, sink=1), kv_heads=4, head_dim=128),
                               mask_kind) < 3e-3
    assert len(calls) == 1


@GLUON_ON_GPU
def test_codebook_gluon_main_loop_replays_in_a_cuda_graph(monkeypatch):
    """The codebook Gluon loop planned for the capacity (length unknown on the host), captured in a CUDA graph and
    replayed after 300 more tokens: the reference's output each time."""
    from kvpass.codegen import codebook
    from tests.conftest import make
    monkeypatch.setitem(codebook.TUNING, "gluon", {**codebook.TUNING["gluon"], "on": True})
    calls = _gluon_launches(monkeypatch, "codebook_gluon")
    errors = _graph_replay_errors(make("cq", dict(channels=8, code_bits=8, residual=32, sink=1), kv_heads=4,
                                       head_dim=128))
    assert max(errors.values()) < 3e-3, errors
    assert len(calls) == 2


# (batch, q heads, kv heads, cached tokens, options): KVQuant-3 at head_dim 128 (the Gluon main loop)
KVQUANT_GLUON_CASES = [
    (1, 32, 8, 4133, dict(bits=3)),
    (2, 8, 2, 1333, dict(bits=3, sink=4)),
    (3, 12, 4, 5000, dict(bits=3, outliers=0.005)),
    (2, 16, 2, 777, dict(bits=3, outliers=0.0, sink=0)),
    (1, 4, 4, 300, dict(bits=3)),
    (1, 8, 8, 161, dict(bits=3, sink=2)),
]


@GLUON_ON_GPU
@pytest.mark.parametrize("warps,prefetch", [(16, True), (8, False)], ids=["16-warps-prefetch", "8-warps"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,hq,hkv,length,opts", KVQUANT_GLUON_CASES)
def test_kvquant_gluon_main_loop_matches_reference(b, hq, hkv, length, opts, dtype, warps, prefetch, monkeypatch):
    """KVQuant's Gluon main loop (level pairs from shared memory, RoPE in half2, outliers patched in) against
    decode + RoPE + dense attention, no further from it than the Triton loop it replaces; it really ran."""
    from kvpass.codegen import kvquant
    from tests.conftest import make
    _assert_gluon_matches_reference(make("kvquant", opts, kv_heads=hkv, head_dim=128), kvquant.TUNING, "kvquant_gluon",
                                    b, hq, hkv, length, dtype, monkeypatch, warps=warps, prefetch=prefetch)


@GLUON_ON_GPU
@pytest.mark.parametrize("mask_kind", ["additive", "bool"])
def test_kvquant_gluon_main_loop_takes_a_padding_mask(mask_kind, monkeypatch):
    """A padding mask shared by the heads, float or bool, through KVQuant's Gluon loop: the reference's output."""
    from kvpass.codegen import kvquant
    from tests.conftest import make
    monkeypatch.setitem(kvquant.TUNING, "gluon", {**kvquant.TUNING["gluon"], "on": True})
    calls = _gluon_launches(monkeypatch, "kvquant_gluon")
    assert _padding_mask_error(make("kvquant", dict(bits=3), kv_heads=4, head_dim=128), mask_kind) < 3e-3
    assert len(calls) == 1


@GLUON_ON_GPU
def test_kvquant_with_more_than_two_outliers_a_token_keeps_the_triton_loop(monkeypatch):
    """5% outliers (7 a token at head_dim 128) are more than the Gluon loop patches in: the Triton loop runs, and
    matches the reference."""
    from kvpass.codegen import kernel_attend
    from tests.conftest import make
    scheme = make("kvquant", dict(bits=3, outliers=0.05), kv_heads=2, head_dim=128)
    state = _filled(scheme, 1, 2, 128, 500, 1, torch.float16)
    q = torch.randn(1, 8, 1, 128, dtype=torch.float16, device=DEVICE)
    calls = _gluon_launches(monkeypatch, "kvquant_gluon")
    assert (kernel_attend(scheme, state, q).float() - scheme.attend(state, q).float()).abs().max().item() < 3e-3
    assert calls == []


@GLUON_ON_GPU
def test_kvquant_gluon_main_loop_replays_in_a_cuda_graph(monkeypatch):
    """KVQuant's Gluon loop planned for the capacity (length unknown on the host), captured in a CUDA graph and
    replayed after 300 more tokens: the reference's output each time."""
    from kvpass.codegen import kvquant
    from tests.conftest import make
    monkeypatch.setitem(kvquant.TUNING, "gluon", {**kvquant.TUNING["gluon"], "on": True})
    calls = _gluon_launches(monkeypatch, "kvquant_gluon")
    errors = _graph_replay_errors(make("kvquant", dict(bits=3), kv_heads=4, head_dim=128))
    assert max(errors.values()) < 3e-3, errors
    assert len(calls) == 2


# (batch, q heads, kv heads, head_dim, cached tokens, new tokens)
SCALED_CASES = [(1, 4, 1, 64, 300, 1), (2, 8, 1, 64, 77, 1), (2, 2, 2, 32, 171, 3), (1, 4, 2, 128, 1, 1),
                (3, 8, 2, 128, 1000, 1), (1, 2, 1, 16, 65, 2)]


@pytest.mark.parametrize("method", ["int8", "fp8", "fp16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,hq,hkv,d,length,t", SCALED_CASES)
def test_scaled_kernel_matches_reference(b, hq, hkv, d, length, t, dtype, method):
    """int8 (scale per token), fp8 (scale per head) and the unscaled fp16 cache against the schemes'
    reference."""
    _assert_kernel_matches_reference(get_scheme(method), b, hq, hkv, d, length, t, dtype)


# (batch, q heads, kv heads, head_dim, cached tokens, new tokens, method, options)
CODEBOOK_CASES = [
    (1, 4, 1, 64, 300, 1, "million", dict(bits=4, residual=16, sink=1)),
    (2, 8, 2, 64, 77, 1, "million", dict(bits=2, residual=0, sink=0, codebook="head")),
    (2, 2, 2, 32, 171, 3, "million", dict(bits=4, residual=16, sink=2, codebook="model")),
    (1, 4, 2, 64, 20, 1, "million", dict(bits=4, residual=32, sink=1)),          # all in sink + window
    (1, 4, 1, 128, 1000, 1, "million", dict(bits=8, residual=32, sink=1)),       # c = 1
    (2, 6, 2, 64, 130, 1, "cq", dict(channels=8, code_bits=8, residual=16, sink=1)),
    (1, 4, 1, 32, 90, 2, "cq", dict(channels=4, code_bits=8, residual=0, sink=3)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,hq,hkv,d,length,t,method,opts", CODEBOOK_CASES)
def test_codebook_kernel_matches_reference(b, hq, hkv, d, length, t, method, opts, dtype):
    """MILLION / CQ (8-bit codes, gathered centroids) against the reference's lookup-table attention."""
    from tests.conftest import make
    _assert_kernel_matches_reference(make(method, opts, kv_heads=hkv, head_dim=d), b, hq, hkv, d, length, t, dtype)


# (batch, q heads, kv heads, head_dim, cached tokens, new tokens, options, rotated dims, rope scale)
KVQUANT_CASES = [
    (1, 4, 1, 64, 300, 1, dict(bits=3), 64, 1.0),                             # 3 bits: codes straddle bytes
    (2, 8, 2, 64, 77, 1, dict(bits=2, outliers=0.0, sink=0), 64, 1.0),        # dense, no sink
    (2, 2, 2, 32, 171, 3, dict(bits=4, outliers=0.05, sink=2), 32, 1.0),      # 2 outliers a token, causal
    (1, 4, 2, 64, 1, 1, dict(bits=3), 64, 1.0),                               # only the sink
    (1, 4, 1, 128, 1000, 1, dict(bits=3, sink=1), 96, 0.75),                  # partial rotary, scaled RoPE
    (1, 4, 1, 32, 200, 2, dict(bits=3, outliers=0.05), 24, 1.0),              # partial rotary, code by code
    (1, 8, 2, 128, 700, 1, dict(bits=3, sink=1), 128, 1.0),                   # Llama shape, many RoPE blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,hq,hkv,d,length,t,opts,dims,rscale", KVQUANT_CASES)
def test_kvquant_kernel_matches_reference(b, hq, hkv, d, length, t, opts, dims, rscale, dtype):
    """Non-uniform codes, outliers and RoPE applied in the kernel, against decode + RoPE + dense attention."""
    from kvpass.codegen import kernel_attend
    from kvpass.rotary import Rotary
    from tests.conftest import make
    scheme = make("kvquant", opts, kv_heads=hkv, head_dim=d)
    rotary = Rotary(1.0 / (10000 ** (torch.arange(0, dims, 2).float() / dims)), rscale)
    state = scheme.allocate(CacheShape(b, hkv, d, length + 5, dtype), DEVICE)
    k = torch.randn(b, hkv, length, d, dtype=dtype, device=DEVICE) * 2
    v = torch.randn(b, hkv, length, d, dtype=dtype, device=DEVICE)
    if length > t:
        scheme.append(state, k[:, :, :length - t], v[:, :, :length - t], rotary=rotary)
    scheme.append(state, k[:, :, length - t:], v[:, :, length - t:], rotary=rotary)
    q = torch.randn(b, hq, t, d, dtype=dtype, device=DEVICE)
    out = kernel_attend(scheme, state, q)
    ref = scheme.attend(state, q)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert (out.float() - ref.float()).abs().max().item() < TOL[dtype]


# (batch, q heads, kv heads, head_dim, cached tokens, new tokens, options)
QAQ_CASES = [
    (1, 4, 1, 64, 300, 1, {}),
    (2, 8, 2, 64, 77, 1, dict(key_error=0.02, value_error=0.02, budget_bits=8, history=2, outliers=0.0)),
    (2, 2, 2, 32, 171, 3, dict(min_bits=3, max_bits=6, budget_bits=3.5, outliers=0.05, history=1)),
    (1, 4, 2, 64, 90, 1, dict(min_bits=1, max_bits=4, budget_bits=1.5, key_error=0.1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,hq,hkv,d,length,t,opts", QAQ_CASES)
def test_qaq_kernel_matches_reference_and_records_the_same_weights(b, hq, hkv, d, length, t, opts, dtype):
    """Variable-width records (widths vary after a few decode steps) against the reference; the per-token
    attention weights the kernel records must equal the reference's."""
    from kvpass.codegen import kernel_attend
    from tests.conftest import make
    scheme = make("qaq", opts, kv_heads=hkv, head_dim=d)
    gen = torch.Generator().manual_seed(3)
    spread = torch.exp(2 * torch.randn(1, 1, length, 1, generator=gen))        # per-token key ranges vary
    k = (torch.randn(b, hkv, length, d, generator=gen) * spread).to(dtype)
    v = torch.randn(b, hkv, length, d, generator=gen).to(dtype)
    qs = [torch.randn(b, hq, t, d, generator=gen).to(dtype) for _ in range(4)]
    states = []
    for _ in range(2):                       # two identical caches: one for the kernel, one for the reference
        st = scheme.allocate(CacheShape(b, hkv, d, length + 5, dtype), DEVICE)
        first = length - t - 3
        scheme.append(st, k[:, :, :first].to(DEVICE), v[:, :, :first].to(DEVICE))
        for i in range(3):                   # decode steps with attention: histories fill, widths change
            scheme.append(st, k[:, :, first + i:first + i + 1].to(DEVICE), v[:, :, first + i:first + i + 1].to(DEVICE))
            scheme.attend(st, qs[i][:, :, :1].to(DEVICE))
        scheme.append(st, k[:, :, length - t:].to(DEVICE), v[:, :, length - t:].to(DEVICE))
        states.append(st)
    if not states[0]["budget_limited"].any():    # (a tight budget caps every record at one width)
        assert len(states[0]["k_bits"][:, :length].unique()) > 1
    q = qs[3].to(DEVICE)
    out = kernel_attend(scheme, states[0], q)
    ref = scheme.attend(states[1], q)
    assert (out.float() - ref.float()).abs().max().item() < TOL[dtype]
    assert torch.equal(states[0]["hist_n"], states[1]["hist_n"])
    hist_err = (states[0]["attn_hist"].float() - states[1]["attn_hist"].float()).abs().max().item()
    assert hist_err < (1e-6 if dtype == torch.float32 else 2e-3)


def _captured_call(scheme, state, q, mask):
    """What a CUDA-graph capture launches: the scheme's kernel op with the length unknown on the host (-1:
    a plan for the whole capacity) and the static cache's whole mask."""
    from kvpass.codegen import codebook, kivi, kvquant, scaled
    from kvpass.codegen.decode import kernel_mask
    b, _, t, d = q.shape
    mask, scale = kernel_mask(mask, b, t, None), d ** -0.5
    if scheme.name == "kvquant":
        names = ("k_codes", "v_codes", "v_center", "v_range", "k_out", "v_out", "k_out_idx", "v_out_idx", "k_sink",
                 "v_sink", "k_center", "k_range", "k_levels", "v_levels", "rope_inv_freq", "rope_meta")
        return kvquant.kvquant_attention(q, *(state[n] for n in names), state.length_tensor, mask, scheme.bits,
                                         scheme.sink, -1, scale, True, state.rotary_dims == d)
    if scheme.name == "kivi":
        return kivi.kivi_attention(q, *(state[n] for n in ("k_codes", "k_scale", "k_zero", "k_window", "v_codes",
                                                             "v_scale", "v_zero", "v_window")),
                                   state.length_tensor, mask, scheme.bits, scheme.group_size, scheme.residual, -1,
                                   scale, True)
    if scheme.name in ("int8", "fp8"):
        return scaled.scaled_attention(q, state["k_codes"], state["k_scale"], state["v_codes"], state["v_scale"],
                                       state.length_tensor, mask, -1, scale, True)
    if scheme.name == "fp16":
        return scaled.scaled_attention(q, state["k"], None, state["v"], None, state.length_tensor, mask, -1, scale,
                                       True)
    return codebook.codebook_attention(q, *(state[n] for n in ("k_codes", "k_codebook", "k_sink", "k_window",
                                                                "v_codes", "v_codebook", "v_sink", "v_window")),
                                       state.length_tensor, mask, scheme.sink, scheme.residual, -1, scale, True)


@pytest.mark.parametrize("method,opts,loop", [
    ("kivi", dict(bits=2, group_size=16, residual=16), "reshape"),
    ("kivi", dict(bits=2, group_size=16, residual=16), "group"),
    ("int8", {}, None), ("fp8", {}, None), ("fp16", {}, None), ("million", dict(bits=4, residual=16, sink=1), None)])
def test_captured_launch_plans_the_capacity_and_reads_a_static_mask(method, opts, loop, monkeypatch):
    """Most programs of the capacity plan lie past the length; the mask is wider than the length and hides
    position 40: the output must equal the reference with the mask cut to the length."""
    from kvpass.codegen import kivi
    from tests.conftest import make
    if loop:
        monkeypatch.setitem(kivi.TUNING, "main", loop)
    scheme = make(method, opts, kv_heads=2, head_dim=64)
    b, length, t, width = 2, 150, 1, 400
    state = _filled(scheme, b, 2, 64, length, t, torch.float32, extra=900)
    q = torch.randn(b, 4, t, 64, device=DEVICE)
    keep = torch.arange(width, device=DEVICE) < length
    keep[40] = False
    mask = keep.expand(b, 1, t, width)
    out = _captured_call(scheme, state, q, mask)
    assert (out - scheme.attend(state, q, attn_mask=mask[..., :length])).abs().max().item() < TOL[torch.float32]
    assert (out - scheme.attend(state, q)).abs().max().item() > 1e-4     # the hidden position mattered


def test_codebook_kernel_leaves_pre_rope_keys_and_other_code_widths_to_the_reference():
    from kvpass.codegen import codebook
    from tests.conftest import make
    q = torch.randn(1, 4, 1, 64, device=DEVICE)
    for opts in (dict(channels=8, code_bits=5, residual=0), dict(channels=2, code_bits=8, pre_rope=True)):
        assert not codebook.supports(make("cq", opts, kv_heads=2, head_dim=64), q, None, None, None)
    assert codebook.supports(make("cq", dict(channels=4), kv_heads=2, head_dim=64), q, None, None, None)


@pytest.mark.parametrize("method,opts,loop", [
    ("kivi", dict(bits=2, group_size=16, residual=16), "group"), ("kivi", dict(bits=2, group_size=16, residual=16),
                                                                  "reshape"),
    ("int8", {}, None), ("fp8", {}, None), ("fp16", {}, None), ("million", dict(bits=4, residual=16, sink=1), None),
    ("cq", dict(channels=4, residual=16), None), ("kvquant", dict(bits=3, sink=1), None), ("qaq", {}, None)])
@pytest.mark.parametrize("mask_kind", ["additive", "bool"])
@pytest.mark.parametrize("t", [1, 3])
def test_kernel_padding_mask(method, opts, loop, mask_kind, t, monkeypatch):
    """A left-padded batch: row 0 hides its first 7 positions, row 1 a compressed position (40) and one in
    the window; the kernel must hide exactly those (one new token reads the mask as one shared row, several
    read it per token)."""
    from kvpass.codegen import kernel_attend, kivi
    from tests.conftest import make
    if loop:
        monkeypatch.setitem(kivi.TUNING, "main", loop)
    scheme = make(method, opts, kv_heads=2, head_dim=64)
    b, length = 2, 150
    state = _filled(scheme, b, 2, 64, length, t, torch.float32)
    q = torch.randn(b, 4, t, 64, device=DEVICE)
    keep = torch.ones(b, 1, t, length, dtype=torch.bool, device=DEVICE)
    keep[0, ..., :7] = False
    keep[1, ..., 40] = False
    keep[1, ..., length - 9] = False
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    out = kernel_attend(scheme, state, q, attn_mask=mask)
    ref = scheme.attend(state, q, attn_mask=mask)
    unmasked = scheme.attend(state, q)
    assert (out - ref).abs().max().item() < TOL[torch.float32]
    assert (out[0] - unmasked[0]).abs().max().item() > 1e-3        # the mask changed row 0
    assert (out[1] - unmasked[1]).abs().max().item() > 1e-4        # and row 1


def test_kivi_kernel_scale_and_host_length():
    from kvpass.codegen import kernel_attend
    scheme = get_scheme("kivi", bits=4, group_size=16, residual=16)
    state = _filled(scheme, 1, 1, 32, 60, 1, torch.float32)
    q = torch.randn(1, 2, 1, 32, device=DEVICE)
    out = kernel_attend(scheme, state, q, scale=0.3, length=state.length)
    assert (out - scheme.attend(state, q, scale=0.3)).abs().max().item() < TOL[torch.float32]


@pytest.mark.parametrize("method,opts", [("kivi", dict(bits=2, group_size=16, residual=16)), ("int8", {}),
                                         ("million", dict(bits=4, residual=16)), ("kvquant", dict(bits=3)),
                                         ("qaq", {})])
def test_kernels_reject_dtype_device_and_uncovered_calls(method, opts):
    from kvpass.codegen import kernel_attend
    from tests.conftest import make, rotary_for
    scheme = make(method, opts, kv_heads=1, head_dim=64)
    state = scheme.allocate(CacheShape(1, 1, 64, 45, torch.float32), DEVICE)
    scheme.append(state, torch.randn(1, 1, 40, 64, device=DEVICE), torch.randn(1, 1, 40, 64, device=DEVICE),
                  rotary=rotary_for(scheme, 64))
    with pytest.raises(ShapeError, match="dtype"):
        kernel_attend(scheme, state, torch.randn(1, 2, 1, 64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ShapeError, match="query on meta"):
        kernel_attend(scheme, state, torch.randn(1, 2, 1, 64, device="meta"))
    with pytest.raises(ShapeError, match="not covered"):
        kernel_attend(scheme, state, torch.randn(1, 2, 1, 48, device=DEVICE))
    if method == "kivi":
        small_groups = get_scheme("kivi", bits=2, group_size=8, residual=8)
        with pytest.raises(ShapeError, match="not covered"):
            kernel_attend(small_groups, _filled(small_groups, 1, 1, 64, 40, 1, torch.float32),
                          torch.randn(1, 2, 1, 64, device=DEVICE))


def test_try_attend_covers_only_cuda_and_supported_options():
    """On CPU tensors the compiled model keeps the reference path; options the kernel lacks fall back."""
    from kvpass.codegen import kivi, try_attend
    scheme = get_scheme("kivi", bits=2, group_size=16, residual=16)
    state = _filled(scheme, 1, 1, 64, 40, 1, torch.float32)
    q = torch.randn(1, 2, 1, 64)
    if DEVICE == "cpu":
        assert try_attend(scheme, state, q) is None
    assert not kivi.supports(scheme, q, None, sliding_window=8, softcap=None)
    assert not kivi.supports(scheme, q, None, sliding_window=None, softcap=30.0)
    assert not kivi.supports(get_scheme("kivi", bits=3, group_size=16, residual=16), q, None, None, None)
    assert not kivi.supports(get_scheme("kivi", bits=2, group_size=8, residual=8), q, None, None, None)
    per_head_mask = torch.zeros(1, 2, 1, 40)
    assert not kivi.supports(scheme, q, per_head_mask, None, None)
    assert kivi.supports(scheme, q, torch.zeros(1, 1, 1, 40), None, None)


@pytest.mark.parametrize("length,splits_max", [(0, 0), (31, 1), (4096, 64)])
def test_split_plan_covers_every_position(length, splits_max):
    from kvpass.codegen.decode import plan_splits
    plan = plan_splits(8, length, 4, 32, torch.device("cpu"))
    assert plan.chunk % 32 == 0 and plan.rows_pad >= 16
    assert plan.splits * plan.chunk >= length and (plan.splits - 1) * plan.chunk < max(length, 1)
    assert plan.splits <= splits_max


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a GPU: the compiled model takes the kernel path only on CUDA")
def test_compiled_model_uses_the_kernel_on_cuda(monkeypatch):
    """A tiny Llama compiled with KIVI on the GPU generates the same tokens with the kernel as with the
    PyTorch reference (KVPASS_KERNELS=0), and the kernel really ran."""
    import copy

    import kvpass
    from kvpass.codegen import kivi
    from tests.architectures import tiny_model

    ref = tiny_model("llama", "sdpa").to("cuda", torch.float16)
    ids = torch.randint(0, 128, (2, 70), device="cuda")
    calls = []
    real = kivi.attend
    monkeypatch.setattr(kivi, "attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("KVPASS_KERNELS", flag)
        torch._dynamo.reset()
        model = kvpass.compile(copy.deepcopy(ref), "kivi", bits=2, group_size=16, residual=16, backend="eager",
                               capacity=96)
        outs[flag] = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        if flag == "1":
            assert len(calls) >= 2 * 11        # 2 layers x every decode step after the first token
    assert torch.equal(outs["1"].sequences, outs["0"].sequences)
    for a, b in zip(outs["1"].logits, outs["0"].logits):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a GPU: kernels apply only to CUDA tensors")
@pytest.mark.parametrize("method,opts", [("kivi", dict(bits=2, group_size=16, residual=16)), ("fp16", {})])
def test_a_query_longer_than_one_tile_takes_the_reference(method, opts, monkeypatch):
    """A chunk of prompt over a filled cache (4 query heads a KV head x 40 tokens = 160 rows) is left to the
    reference; a 3-token step (12 rows) runs in the kernel. Both equal the reference."""
    from kvpass.codegen import MAX_QUERY_ROWS, try_attend, try_attend_lse
    from tests.conftest import make
    monkeypatch.setenv("KVPASS_KERNELS", "all")
    scheme = make(method, opts, kv_heads=2, head_dim=64)
    state = _filled(scheme, 1, 2, 64, 300, 1, torch.float16)
    long_q = torch.randn(1, 8, 40, 64, dtype=torch.float16, device="cuda")
    assert 4 * 40 > MAX_QUERY_ROWS
    assert try_attend(scheme, state, long_q) is None and try_attend_lse(scheme, state, long_q) is None
    short_q = long_q[:, :, :3]
    out = try_attend(scheme, state, short_q)
    assert out is not None and (out.float() - scheme.attend(state, short_q).float()).abs().max().item() < 2e-2


# (kivi options, head_dim, the chunks appended one after another: prefills and decode steps)
APPEND_CASES = [
    (dict(bits=2, group_size=8, residual=16), 32, [37, 1, 1, 5, 1, 9]),
    (dict(bits=4, group_size=16, residual=16), 64, [5, 40, 1, 1]),
    (dict(bits=2, group_size=32, residual=0), 64, [70, 1, 33]),
    (dict(bits=8, group_size=16, residual=32), 32, [1] * 20 + [50]),
    (dict(bits=1, group_size=32, residual=32), 128, [3, 100]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("opts,d,chunks", APPEND_CASES)
def test_kivi_append_kernel_is_bit_exact(opts, d, chunks, dtype):
    """Every buffer (codes, fp16 scales/zeros, ring windows) equals the reference's, whatever the chunking."""
    from kvpass.codegen import kivi_append
    scheme = get_scheme("kivi", **opts)
    shape = CacheShape(2, 2, d, sum(chunks) + 3, dtype)
    ref, ker = scheme.allocate(shape, DEVICE), scheme.allocate(shape, DEVICE)
    assert kivi_append.supports(scheme, torch.empty(2, 2, 1, d))
    for n in chunks:
        k = torch.randn(2, 2, n, d, dtype=dtype, device=DEVICE) * 3
        v = torch.randn(2, 2, n, d, dtype=dtype, device=DEVICE)
        scheme._append(ref, k, v, ref.length)
        ref.length_tensor += n
        kivi_append.append(scheme, ker, k, v)
        ker.length_tensor += n
    for name in ref.buffers:
        assert torch.equal(ref[name], ker[name]), name


def test_a_mask_that_only_repeats_causality_is_recognised():
    """The prompt path drops a mask equal to the causal pattern (so SDPA can take flash), and only that one."""
    from kvpass.attention import _is_only
    keep = torch.ones(5, 7, dtype=torch.bool).tril(2)
    causal = keep.expand(2, 1, 5, 7)
    additive = torch.zeros(2, 1, 5, 7).masked_fill(~causal, float("-inf"))
    assert _is_only(causal, keep) and _is_only(additive, keep)
    padded = causal.clone()
    padded[1, 0, 3, 0] = False                   # one hidden key in one batch row
    assert not _is_only(padded, keep)
    assert not _is_only(additive.masked_fill(~padded, float("-inf")), keep)
    assert not _is_only(torch.ones(2, 1, 5, 7, dtype=torch.bool), keep)
    assert not _is_only(causal[..., :6], keep)   # another key count


def test_the_causal_verdict_is_remembered_per_mask_object_and_version(monkeypatch):
    """Every layer of a forward gets the same mask: it is read once. A write to it, or another mask object
    with the same contents' shape, is read again."""
    import kvpass.attention as attention
    from kvpass.attention import _causal_keep, _is_only_causal
    keep = _causal_keep(5, 7, torch.device("cpu"))
    assert torch.equal(keep, torch.ones(5, 7, dtype=torch.bool).tril(2))
    mask = keep.expand(2, 1, 5, 7).clone()
    assert _is_only_causal(mask, 5, 7)
    built = []
    monkeypatch.setattr(attention, "_causal_keep", lambda *a: built.append(a) or _causal_keep(*a))
    assert _is_only_causal(mask, 5, 7) and not built                 # remembered: no pattern built
    assert not _is_only_causal(mask, 4, 7) and built                 # another query count: read again
    assert _is_only_causal(mask, 5, 7)
    mask[1, 0, 3, 0] = False                     # in place: the version moves, the verdict must too
    assert not _is_only_causal(mask, 5, 7)
    other = keep.expand(2, 1, 5, 7).clone()
    assert _is_only_causal(other, 5, 7)
    other[1, 0, 3, 0] = False
    assert not _is_only_causal(other[:], 5, 7)   # a view of it: another object, read afresh
    with torch.inference_mode():
        fresh = keep.expand(2, 1, 5, 7).clone()
        assert _is_only_causal(fresh, 5, 7)
        fresh[0, 0, 0, 6] = True
        assert not _is_only_causal(fresh, 5, 7)


@pytest.mark.parametrize("causal_flag", [False, True])
def test_sdpa_arguments_keep_the_reference_meaning(causal_flag):
    """What the CUDA prompt path hands SDPA, evaluated by SDPA's math on the CPU, equals the reference; the
    spelled-out causal mask becomes is_causal with no mask (flash), a padding mask stays a mask."""
    from kvpass.attention import dense_attention
    from kvpass.attention import sdpa_arguments
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    tril = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    padded = tril.clone()
    padded[0, ..., :3] = False                   # batch row 0: the first 3 keys hidden, its first 3 queries see none
    for mask, flash in ((tril, True), (torch.zeros(2, 1, 9, 9).masked_fill(~tril, float("-inf")), True),
                        (padded, False), (None, False)):
        if mask is None and not causal_flag:
            continue
        m, is_causal, dead = sdpa_arguments(q, k, mask, causal_flag)
        assert (m is None and is_causal) == flash or mask is None
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal,
                                                               enable_gqa=True)
        if dead is not None:
            got = got.masked_fill(dead, 0.0)
        want = dense_attention(q, k, v, causal=causal_flag, attn_mask=mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the SDPA prompt path is taken on CUDA only")
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive", "causal"])
def test_prompt_attention_on_cuda_matches_the_reference(mask_kind):
    from kvpass.attention import dense_attention
    from kvpass.attention import prompt_attention
    q = torch.randn(2, 8, 37, 64, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(2, 2, 37, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    mask = None
    if mask_kind:
        keep = torch.ones(2, 1, 37, 37, dtype=torch.bool, device="cuda")
        if mask_kind == "causal":                # the mask transformers builds under torch.compile
            keep = keep.tril()
        else:
            keep[0, ..., :4] = False             # row 0's first queries see nothing (left padding)
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, device="cuda").masked_fill(
            ~keep, float("-inf"))
    kw = dict(scale=0.125, causal=mask_kind != "causal", attn_mask=mask, softcap=None)
    got = prompt_attention(q, k, v, **kw).float()
    want = dense_attention(q, k, v, **kw).float()
    assert (got - want).abs().max().item() < 1e-2


# (method, options, head_dim, chunks: prefills through the reference, single steps through the kernel)
CODEBOOK_APPEND_CASES = [
    ("million", dict(bits=4, residual=4, sink=2), 32, [1, 1, 1, 9, 1, 1, 3, 1, 1, 1]),   # sink filled by the kernel
    ("million", dict(bits=2, residual=0, codebook="head"), 64, [20, 1, 2, 1]),
    ("million", dict(bits=8, residual=8, sink=1), 32, [30, 1, 1, 16, 1]),                # c = 1
    ("cq", dict(channels=8, code_bits=8, residual=16, sink=1), 64, [40, 1, 1, 1, 4]),
]


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel-encode", "one-program"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("method,opts,d,chunks", CODEBOOK_APPEND_CASES)
def test_codebook_append_kernel_writes_the_reference_buffers(method, opts, d, chunks, dtype, parallel, monkeypatch):
    """Chunks of <= 16 tokens go through the kernel (sink, ring, nearest-centroid codes; the codes in a launch
    over channel groups where no new token pushes out another, else one program a head in order), longer ones
    through the reference on both caches; every buffer must match the reference-only cache's."""
    from kvpass.codegen import codebook_append
    from tests.conftest import make
    monkeypatch.setitem(codebook_append.TUNING, "parallel", parallel)
    scheme = make(method, opts, kv_heads=2, head_dim=d)
    shape = CacheShape(2, 2, d, sum(chunks) + 3, dtype)
    ref, ker = scheme.allocate(shape, DEVICE), scheme.allocate(shape, DEVICE)
    for n in chunks:
        k = torch.randn(2, 2, n, d, dtype=dtype, device=DEVICE) * 2
        v = torch.randn(2, 2, n, d, dtype=dtype, device=DEVICE)
        scheme._append(ref, k, v, ref.length)
        if codebook_append.supports(scheme, k):
            codebook_append.append(scheme, ker, k, v)
        else:
            scheme._append(ker, k, v, ker.length)
        for st in (ref, ker):
            st.length_tensor += n
    for name in ref.buffers:
        assert torch.equal(ref[name], ker[name]), name


DUO_INNER = {"kivi": dict(bits=2, group_size=32, residual=32), "int8": {}, "fp8": {}, "fp16": {}}


def _duo_kivi(hkv: int, sink: int, recent: int, retrieval: list[int], inner: str = "kivi"):
    """A one-layer duo scheme whose retrieval heads are ``retrieval``, held in ``inner`` (KIVI-2 by default)."""
    from kvpass.calibration import Calibration
    gates = torch.tensor([1.0 if h in retrieval else 0.0 for h in range(hkv)])
    cal = Calibration(method="duo", options={"sink": sink, "recent": recent}, model={},
                      tensors={"layers.0.gates": gates})
    return get_scheme("duo", inner=get_scheme(inner, **DUO_INNER[inner]), gates=cal, ratio=len(retrieval) / hkv)


DUO_CASES = [
    (2, 8, 4, 64, 300, 4, 32, [0, 2], False),       # the ring has wrapped many times; batch 2
    (1, 8, 4, 64, 23, 4, 32, [1], True),           # ring slots not yet written, a padding mask
    (1, 4, 4, 32, 150, 0, 20, [0, 1, 3], False),   # no sink, GQA 1, odd ring size
    (2, 16, 2, 64, 97, 8, 16, [1], True),          # GQA 8
]


@pytest.mark.parametrize("b,hq,hkv,d,length,sink,recent,retrieval,masked", DUO_CASES)
@pytest.mark.parametrize("tail_programs,rings", [(1, "main"), (3, "main"), (3, "tail")])
def test_duo_one_launch_kernel_matches_the_group_path(b, hq, hkv, d, length, sink, recent, retrieval, masked,
                                                     tail_programs, rings, monkeypatch):
    """kvpass::duo_kivi_attention (KIVI retrieval heads and the streaming heads' rings in one KIVI call)
    against DuoHeads.attend, which attends each head group on its own; with the tail launch spread over
    several programs per head too (each ring is still attended, and written, by one), and with the rings
    ahead of the main launch's programs (a cache short of one main block puts them in the tail) or in the
    tail."""
    from kvpass.codegen import kernel_attend, kivi
    monkeypatch.setitem(kivi.TUNING, "tail_programs", tail_programs)
    monkeypatch.setitem(kivi.TUNING, "rings", rings)
    scheme = _duo_kivi(hkv, sink, recent, retrieval)
    state = _filled(scheme, b, hkv, d, length, 1, torch.float16, extra=sink + recent)   # capacity >= the window
    q = torch.randn(b, hq, 1, d, dtype=torch.float16, device=DEVICE)
    mask = None
    if masked:       # the first 3 positions of batch 0 are padding
        mask = torch.zeros(b, 1, 1, length, device=DEVICE)
        mask[0, :, :, :3] = float("-inf")
    out = kernel_attend(scheme, state, q, attn_mask=mask)
    ref = scheme.attend(state, q, attn_mask=mask)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert (out.float() - ref.float()).abs().max().item() < TOL[torch.float16]


@pytest.mark.parametrize("inner", ["int8", "fp8", "fp16"])
@pytest.mark.parametrize("b,hq,hkv,d,length,sink,recent,retrieval,masked", DUO_CASES)
def test_duo_scaled_one_launch_matches_the_group_path(b, hq, hkv, d, length, sink, recent, retrieval, masked,
                                                      inner):
    """kvpass::duo_scaled_attention (int8 / fp8 / fp16 retrieval heads through the scaled kernel, reading the
    query rows of their model kv heads, the rings in a launch of their own, one merge) against
    DuoHeads.attend."""
    from kvpass.codegen import kernel_attend
    scheme = _duo_kivi(hkv, sink, recent, retrieval, inner)
    state = _filled(scheme, b, hkv, d, length, 1, torch.float16, extra=sink + recent)
    q = torch.randn(b, hq, 1, d, dtype=torch.float16, device=DEVICE)
    mask = None
    if masked:       # the first 3 positions of batch 0 are padding, as a bool mask (True: attend)
        mask = torch.ones(b, 1, 1, length, dtype=torch.bool, device=DEVICE)
        mask[0, :, :, :3] = False
    out = kernel_attend(scheme, state, q, attn_mask=mask)
    ref = scheme.attend(state, q, attn_mask=mask)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert (out.float() - ref.float()).abs().max().item() < TOL[torch.float16]


@pytest.mark.parametrize("inner", ["kivi", "fp16"])
def test_duo_rings_ride_ahead_of_the_split_programs(inner, monkeypatch):
    """The rings of a duo decode step take the first grid rows of the launch whose split programs run
    anyway (KIVI: the main launch, at a 16-slot tile; the tail launch is built without ring code, HS 0;
    int8/fp8/fp16: the one split launch), one program each, and the output still equals the group path."""
    from kvpass.codegen import kernel_attend, kivi, scaled
    module = kivi if inner == "kivi" else scaled
    launches = []
    real = module.wrap_triton

    def recording(fn):
        launcher = real(fn)

        class Grid:
            def __getitem__(self, grid):
                return lambda *a, **k: launches.append((grid, k)) or launcher[grid](*a, **k)
        return Grid()
    monkeypatch.setattr(module, "wrap_triton", recording)
    b, hkv, sink, recent = 2, 4, 4, 40
    scheme = _duo_kivi(hkv, sink, recent, [0, 2], inner)
    state = _filled(scheme, b, hkv, 64, 300, 1, torch.float16, extra=sink + recent)
    q = torch.randn(b, 8, 1, 64, dtype=torch.float16, device=DEVICE)
    out = kernel_attend(scheme, state, q)
    assert (out.float() - scheme.attend(state, q).float()).abs().max().item() < TOL[torch.float16]
    (grid, consts), rest = launches[0], launches[1:]
    splits = grid[0]
    rows = -(-b * 2 // splits)                   # B x 2 streaming heads, one program each
    assert splits > 1 and grid[1] == rows + b * 2 and consts["HS"] == 2
    assert consts["RING_N"] == (16 if inner == "kivi" else 32)
    if inner == "kivi":
        tail_grid, tail_consts = rest[0]
        assert tail_grid[1] == b * 2 and tail_consts["HS"] == 0 and tail_consts["TAIL"]


def test_kernel_mask_keeps_bool_masks_unless_asked_for_additive_ones():
    """Bool masks reach the kernels as they are (no float copy a layer) except where a kernel asks for an
    additive one (the scaled kernels): then True -> 0 and False -> -inf; either way cut to the length and
    expanded to (B, T, L)."""
    from kvpass.codegen.decode import kernel_mask, mask_kind
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    keep[1, ..., :3] = False
    kept = kernel_mask(keep, 2, 1, 8)
    assert kept.dtype == torch.bool and kept.shape == (2, 1, 8) and mask_kind(kept) == 2
    added = kernel_mask(keep, 2, 1, 8, additive=True)
    assert added.dtype == torch.float32 and mask_kind(added) == 1
    assert torch.equal(added[1, 0, :4], torch.tensor([float("-inf")] * 3 + [0.0])) and (added[0] == 0).all()
    assert torch.equal(kernel_mask(added[:, None], 2, 1, None), added)      # additive masks pass unchanged


@pytest.mark.skipif(DEVICE == "cpu", reason="needs the queries on another device than the mask")
def test_a_mask_on_another_device_is_refused_by_name():
    from kvpass.codegen import kernel_attend
    scheme = _duo_kivi(4, 4, 32, [0, 2])
    state = _filled(scheme, 1, 4, 64, 40, 1, torch.float16, extra=36)
    q = torch.randn(1, 8, 1, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="attn_mask is on cpu but the queries are on cuda"):
        kernel_attend(scheme, state, q, attn_mask=torch.zeros(1, 1, 1, 40))


def test_duo_one_launch_covers_kivi_and_scaled_caches_for_single_tokens(monkeypatch):
    """The one-launch paths take KIVI, int8, fp8 and fp16 retrieval heads (not the codebook schemes), one new
    token and half-precision queries; all have run on the H200, and an inner scheme listed as unverified is
    reported so (kernel_applies then leaves it to the group path unless KVPASS_KERNELS=all)."""
    from kvpass.codegen import duo
    scheme = _duo_kivi(4, 4, 32, [0, 2])
    q = torch.zeros(1, 8, 1, 64, dtype=torch.float16)
    assert duo.supports(scheme, q, None, None, None) and duo.verified(scheme)
    assert not duo.supports(scheme, torch.zeros(1, 8, 2, 64, dtype=torch.float16), None, None, None)
    assert not duo.supports(scheme, q.float(), None, None, None)
    for inner in ("int8", "fp8", "fp16"):
        scaled = get_scheme("duo", inner=get_scheme(inner), gates=scheme.gates, ratio=0.5)
        assert duo.supports(scaled, q, None, None, None) and duo.verified(scaled)
    monkeypatch.setattr(duo, "_UNVERIFIED_INNER", {"fp16"})
    assert not duo.verified(get_scheme("duo", inner=get_scheme("fp16"), gates=scheme.gates, ratio=0.5))
    assert duo.verified(scheme)
    million = get_scheme("duo", inner=get_scheme("million", bits=4), gates=scheme.gates, ratio=0.5)
    assert not duo.supports(million, q, None, None, None)


@pytest.mark.parametrize("inner", ["kivi", "fp16"])
@pytest.mark.parametrize("captured", [False, True], ids=["step", "captured_step"])
def test_duo_decode_steps_through_the_one_launch_kernel_equal_the_group_path(captured, inner, monkeypatch):
    """DuoHeads.step / captured_step taking the one-launch kernel (forced here, as the CPU takes no kernel)
    give the group path's outputs and buffers, step after step."""
    import kvpass.codegen as codegen
    scheme = _duo_kivi(4, 4, 16, [0, 3], inner)
    b, hq, hkv, d = 2, 8, 4, 64
    states = [_filled(scheme, b, hkv, d, 40, 1, torch.float16, extra=40) for _ in range(2)]
    states[1].buffers.update({n: t.clone() for n, t in states[0].buffers.items()})
    states[1].length_tensor.copy_(states[0].length_tensor)
    kw = dict(rotary=None, scale=None, causal=True, attn_mask=None, softcap=None)
    for _ in range(20):
        q = torch.randn(b, hq, 1, d, dtype=torch.float16, device=DEVICE)
        k, v = torch.randn(2, b, hkv, 1, d, dtype=torch.float16, device=DEVICE)
        outs = []
        for fused, state in zip((True, False), states):
            monkeypatch.setattr(type(scheme), "_one_launch", lambda self, *a, f=fused: f)
            monkeypatch.setattr(codegen, "try_attend", lambda s, st, qq, **o: codegen.kernel_attend(
                s, st, qq, scale=o["scale"], causal=o["causal"], attn_mask=o["attn_mask"]))
            if captured:
                outs.append(scheme.captured_step(state, q, k, v, **kw))
            else:
                outs.append(scheme.step(state, q, k, v, k_pre=None, fresh=False, **kw))
        assert (outs[0].float() - outs[1].float()).abs().max().item() < TOL[torch.float16]
        assert states[0].length == states[1].length
        for name, t in states[0].buffers.items():
            assert torch.equal(t, states[1].buffers[name]), name


@pytest.mark.parametrize("method,opts", [
    ("kivi", dict(bits=2, group_size=16, residual=16)), ("int8", {}), ("fp8", {}), ("fp16", {}),
    ("million", dict(bits=4, residual=8, sink=2)), ("cq", dict(channels=4, residual=8)),
    ("kvquant", dict(bits=3, sink=1)), ("kvquant", dict(bits=2, outliers=0.0, sink=0)),
])
@pytest.mark.parametrize("length,t", [(77, 1), (150, 1), (40, 3)])
def test_lse_kernels_return_the_reference_log_sum_exp(method, opts, length, t):
    """attend_lse of every kernel that has one (what a sequence-parallel rank merges) against
    Scheme.attend(return_lse=True): the part's normalized output and its natural-log log-sum-exp."""
    from kvpass.codegen import _LSE_KERNELS, _module
    from kvpass.rotary import Rotary
    from tests.conftest import make
    assert method in _LSE_KERNELS
    scheme = make(method, opts, kv_heads=2, head_dim=32)
    rotary = Rotary(1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32)), 1.0)
    state = scheme.allocate(CacheShape(1, 2, 32, 160, torch.float32), DEVICE)
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(1, 2, length, 32, generator=g).to(DEVICE) for _ in range(2))
    scheme.append(state, k, v, **({"rotary": rotary} if scheme.key_space == "pre_rope" else {}))
    q = torch.randn(1, 4, t, 32, generator=g).to(DEVICE)
    out, lse = _module(method).attend_lse(scheme, state, q)
    want_out, want_lse = scheme.attend(state, q, return_lse=True)
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == (1, 4, t)
    torch.testing.assert_close(out, want_out, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(lse, want_lse, atol=3e-5, rtol=3e-5)
