"""The one-launch device checks of a CUDA-graph decode step (kvpass/codegen/guard.py): NaN/inf in the new
keys and values, a cache past its capacity, a position other than the cache's length. The kernel runs under
the Triton interpreter on the CPU (``make test`` sets TRITON_INTERPRET=1) and for real on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

import kvpass
from kvpass.errors import CapacityError, KVPassError, NonFiniteError
from kvpass.codegen.guard import guard_append, guard_position
from kvpass.graphs import (NONFINITE, OVERFLOW, POSITION, device_status, flag_new_tokens, flag_position,
                           raise_flags)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _flags() -> list[int]:
    return device_status(torch.device(DEVICE)).tolist()


def _check_new(length: int, k: torch.Tensor, v: torch.Tensor, capacity: int | None) -> None:
    """The kernel on DEVICE (under the interpreter on the CPU), as flag_new_tokens launches it on CUDA."""
    guard_append(device_status(torch.device(DEVICE)), torch.tensor(length, device=DEVICE), k, v,
                 2 ** 62 if capacity is None else capacity, (NONFINITE, OVERFLOW))


def _check_position(length: int, start: int) -> None:
    guard_position(device_status(torch.device(DEVICE)), torch.tensor(length, device=DEVICE),
                   torch.tensor([start], device=DEVICE), POSITION)


@pytest.fixture(autouse=True)
def _clear_flags():
    device_status(torch.device(DEVICE)).zero_()
    yield
    device_status(torch.device(DEVICE)).zero_()


@pytest.mark.parametrize("shape", [(2, 3, 1, 37), (1, 8, 1, 128), (3, 2, 5, 64)])   # 222 / 1024 / 1920 elements
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["k-last", "v-first"])
def test_nan_or_inf_anywhere_in_the_new_tokens_is_flagged_and_nothing_else(shape, dtype, bad, where):
    """A NaN or +-inf in the last element of k (past the first block where there are several) or the first
    of v sets NONFINITE only; finite tokens, however large, set nothing."""
    k = torch.randn(shape, dtype=dtype, device=DEVICE)
    v = torch.randn(shape, dtype=dtype, device=DEVICE)
    k.view(-1)[0] = torch.finfo(dtype).max          # the largest finite value is no error
    if bad is not None:
        (k.view(-1)[-1:] if where == "k-last" else v.view(-1)[:1]).fill_(bad)
    _check_new(5, k, v, capacity=100)
    want = [0] * len(_flags())
    want[NONFINITE] = int(bad is not None)
    assert _flags() == want


@pytest.mark.parametrize("length,new,capacity,overflow", [(90, 10, 100, False), (91, 10, 100, True),
                                                          (0, 1, 1, False), (1, 1, 1, True), (99, 3, 100, True)])
def test_an_append_past_the_capacity_is_flagged(length, new, capacity, overflow):
    """OVERFLOW is set exactly when the cache's length plus the new tokens passes its capacity."""
    k = torch.randn(2, 2, new, 16, device=DEVICE)
    _check_new(length, k, k.clone(), capacity)
    assert _flags()[OVERFLOW] == int(overflow) and _flags()[NONFINITE] == 0
    if overflow:
        with pytest.raises(CapacityError, match="capacity"):
            raise_flags(torch.device(DEVICE))
    assert sum(_flags()) == 0


def test_a_ring_cannot_overflow():
    """A streaming ring's check (capacity None) flags NaN but never an overflow, however long it ran."""
    k = torch.randn(1, 2, 1, 8, device=DEVICE)
    _check_new(2 ** 40, k, k, None)
    assert sum(_flags()) == 0
    k[0, 1, 0, 3] = float("nan")
    _check_new(2 ** 40, k, k, None)
    with pytest.raises(NonFiniteError):
        raise_flags(torch.device(DEVICE))


@pytest.mark.parametrize("start,length,wrong", [(7, 7, False), (8, 7, True), (0, 1, True), (2 ** 33, 2 ** 33, False)])
def test_a_position_other_than_the_cache_length_is_flagged(start, length, wrong):
    """POSITION is set exactly when the model's position is not the cache's length (int64 values included)."""
    _check_position(length, start)
    assert _flags()[POSITION] == int(wrong) and _flags()[NONFINITE] == _flags()[OVERFLOW] == 0
    if wrong:
        with pytest.raises(KVPassError, match="position"):
            raise_flags(torch.device(DEVICE))


@pytest.mark.parametrize("bad,length,start,want", [(False, 9, 9, []), (True, 9, 9, [NONFINITE]),
                                                  (False, 20, 20, [OVERFLOW]), (True, 20, 21, [NONFINITE, OVERFLOW,
                                                                                             POSITION])])
def test_the_checks_flag_the_same_on_any_device(bad, length, start, want):
    """flag_new_tokens / flag_position (the kernel on CUDA, torch ops on the CPU, where tests drive captured
    paths) set the same flags as the kernel, on a cache of capacity 20 taking 2 tokens."""
    k = torch.randn(1, 2, 2, 8, device=DEVICE)
    if bad:
        k[0, 0, 1, 7] = float("inf")
    for device in {DEVICE, "cpu"}:
        status = device_status(torch.device(device))
        status.zero_()
        flag_new_tokens(torch.tensor(length, device=device), k.to(device), k.to(device), 20)
        flag_position(torch.tensor(length, device=device), torch.tensor([start], device=device))
        assert [i for i, x in enumerate(status.tolist()) if x] == sorted(want), device
        status.zero_()


def test_cuda_without_an_index_finds_the_flags_of_the_current_device():
    """raise_flags(torch.device("cuda")) must see what a kernel on "cuda:0" flagged."""
    if DEVICE != "cuda":
        pytest.skip("needs a GPU")
    device_status(torch.device("cuda", torch.cuda.current_device()))[NONFINITE] = 1
    with pytest.raises(NonFiniteError):
        raise_flags(torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records a CUDA graph")
def test_nan_fed_to_a_captured_append_raises_after_the_replay():
    """A KIVI append recorded in a CUDA graph, replayed with NaN in its static input: the replay writes on,
    and raise_flags turns the device flag into NonFiniteError."""
    scheme = kvpass.get_scheme("kivi", bits=2)
    state = scheme.allocate(kvpass.CacheShape(1, 2, 64, 400, torch.float16), device="cuda")
    scheme.append(state, torch.randn(1, 2, 200, 64, dtype=torch.float16, device="cuda"),
                  torch.randn(1, 2, 200, 64, dtype=torch.float16, device="cuda"))
    k = torch.randn(1, 2, 1, 64, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        scheme.append(state, k, v)
    graph.replay()
    torch.cuda.synchronize()
    assert not raise_flags(torch.device("cuda"))
    v[0, 1, 0, 5] = float("nan")
    graph.replay()
    with pytest.raises(NonFiniteError, match="CUDA-graph"):
        raise_flags(torch.device("cuda"))
