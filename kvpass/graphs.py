"""CUDA-graph decoding: record one decode step of a kvpass-compiled model and replay it.

A decode step with a static cache (transformers' ``StaticCache``: fixed batch, fixed mask width) has the
same shapes every time, so its kernels can be recorded once as a CUDA graph and replayed with no Python,
no launch overhead and no host synchronisation. While a graph is being captured kvpass never reads a
cache's length on the host: kernels read it on the device, launches are planned for the cache's capacity,
and the checks eager mode makes on the host (NaN/inf in the new keys, a cache overflowing its capacity, a
position that is not the cache's length) instead set flags in a small device status tensor, which
:class:`DecodeGraph` reads after every replay (with the logits, so no extra synchronisation) and turns
into the same errors. Schemes with a Triton decode kernel and an append that needs no host value can be
captured (KIVI, int8, fp8, MILLION, CQ, KVQuant), and fp16 (dense attention over its buffers, the positions
past the device length hidden), and the head policies over any of them (a streaming ring stores and attends
at the device length); QAQ plans on the host and raises a clear error at capture, as does any step that
would append inside a scheme's attention sink. A step that needs a path only eager mode has and can be
repeated — an fp8 head whose scale must grow, re-encoding its cached tokens — raises the REDO flag instead:
the replay wrote nothing the eager step will not write again, so :class:`DecodeGraph` moves every layer's
length back one token and runs that step eagerly.
"""

from __future__ import annotations

import torch

from .errors import CapacityError, KVPassError, NonFiniteError

NONFINITE, OVERFLOW, POSITION, EAGER_ONLY, REDO = 0, 1, 2, 3, 4
_MESSAGES = {NONFINITE: (NonFiniteError, "new keys or values contained NaN or inf (or overflowed their scales)"),
             OVERFLOW: (CapacityError, "a decode step appended past the cache's capacity"),
             POSITION: (KVPassError, "the model continued at a position other than the cache's length"),
             EAGER_ONLY: (KVPassError, "a step needed a path only eager mode takes (an append inside the "
                                       "attention sink: prefill more tokens than the sink before capturing)"),
             REDO: (KVPassError, "a step must be re-run eagerly (an fp8 scale has to grow and re-encode the "
                                 "cached tokens); DecodeGraph does that, a hand-made capture must too")}
_STATUS: dict[torch.device, torch.Tensor] = {}


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s device is recording a CUDA graph on the current stream (host values then must not be
    read: they would be frozen into the graph)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def device_status(device: torch.device) -> torch.Tensor:
    """The (5,) int32 flags of ``device``: NaN/inf seen, capacity overflowed, position mismatched, an
    eager-only path needed, the step to be re-run eagerly."""
    device = _indexed(device)
    if device not in _STATUS:
        _STATUS[device] = torch.zeros(len(_MESSAGES), dtype=torch.int32, device=device)
    return _STATUS[device]


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index: "cuda" and "cuda:0" must find the same flags."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def flag(condition: torch.Tensor, code: int) -> None:
    """Raise flag ``code`` on the device where the 0-d bool ``condition`` holds (no host sync)."""
    device_status(condition.device)[code:code + 1].bitwise_or_(condition.reshape(1).to(torch.int32))


def flag_new_tokens(length: torch.Tensor, k: torch.Tensor, v: torch.Tensor, capacity: int | None) -> None:
    """Flag NONFINITE if the new keys or values k, v (B, H, T, D) hold NaN or inf, and OVERFLOW if the 0-d
    int64 ``length`` plus T passes ``capacity`` (None: a ring, which cannot overflow). On CUDA one kernel
    launch (:mod:`kvpass.codegen.guard`); elsewhere (tests drive captured paths on the CPU) torch ops."""
    if k.is_cuda:
        from .codegen.guard import guard_append       # imports triton
        guard_append(device_status(k.device), length, k, v, 2 ** 62 if capacity is None else capacity,
                     (NONFINITE, OVERFLOW))
        return
    flag(~(torch.isfinite(k).all() & torch.isfinite(v).all()), NONFINITE)
    if capacity is not None:
        flag(length + k.shape[2] > capacity, OVERFLOW)


def flag_position(length: torch.Tensor, start: torch.Tensor) -> None:
    """Flag POSITION if the model's position ``start`` (one int64 element) is not the cache's 0-d int64
    ``length``; on CUDA one kernel launch, elsewhere torch ops."""
    if length.is_cuda:
        from .codegen.guard import guard_position
        guard_position(device_status(length.device), length, start, POSITION)
        return
    flag(start.reshape(()) != length, POSITION)


def raise_flags(device: torch.device, redo_ok: bool = False) -> bool:
    """Raise the error of the first flag set on ``device`` (and clear them); nothing if none is set. With
    ``redo_ok`` a lone REDO flag is no error: it is cleared and True returned (the caller re-runs the step
    eagerly)."""
    st = _STATUS.get(_indexed(device))
    if st is None:
        return False
    flags = st.tolist()
    for code, value in enumerate(flags):
        if value and not (code == REDO and redo_ok):
            st.zero_()
            cls, text = _MESSAGES[code]
            raise cls(f"{text} (detected inside a CUDA-graph decode step; the cache is no longer valid)")
    if flags[REDO]:
        st.zero_()
        return True
    return False


def rewind(model, tokens: int, cache=None) -> None:
    """Move every kvpass cache of ``model`` (from :func:`kvpass.compile`) back ``tokens`` positions, on the
    device: what a step that must be redone appended is then overwritten by the redo. ``cache``: the
    transformers cache the step ran with; its layers' device position counters (a StaticCache's
    ``cumulative_length``, from which the model computes where new tokens go — a replay advances it) move
    back too, else the redo would continue one position past the kvpass caches."""
    for state in model._kvpass.manager.states.values():
        state.length_tensor -= tokens
    for layer in getattr(cache, "layers", None) or ():
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.sub_(tokens)


class DecodeGraph:
    """Greedy-decoding step of a kvpass-compiled model, replayed from a CUDA graph.

    ``model``: returned by :func:`kvpass.compile` (CUDA, a scheme with Triton kernels); ``cache``: the
    transformers cache object the prompt was prefilled into — a ``StaticCache``, whose decode step keeps
    its shapes; ``batch``: sequences per step. The first ``warmup`` calls run eagerly (compiling the decode
    graph and its kernels, and decoding those real tokens); the next call records the graph, and every
    later call replays it.

    ``step(tokens, position)``: tokens (batch, 1) int64 at cache position ``position`` (int) ->
    logits (batch, 1, vocab) in the model's dtype: a static buffer that the next call overwrites.
    """

    def __init__(self, model, cache, batch: int, warmup: int = 2):
        from .perplexity import cache_argument
        if getattr(model, "_kvpass", None) is None:
            raise KVPassError("DecodeGraph takes a model returned by kvpass.compile")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise KVPassError(f"CUDA graphs need a CUDA model, this one is on {device}")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.cache_arg = cache_argument(model)
        device_status(device)                  # made before any capture, outside the graph's memory pool
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.calls = 0

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, **{self.cache_arg: self.cache}, cache_position=self.position,
                         use_cache=True)
        return out.logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """One decode step (see the class docstring)."""
        if tuple(tokens.shape) != tuple(self.ids.shape):
            raise KVPassError(f"DecodeGraph was made for tokens of shape {tuple(self.ids.shape)}, "
                              f"got {tuple(tokens.shape)}")
        self.ids.copy_(tokens)
        self.position.fill_(position)
        self.calls += 1
        if self.calls <= self.warmup:          # eager: compiles, and decodes these tokens for real
            return self._eager()
        if self.graph is None:                 # recording runs nothing: replay right after
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
        self.graph.replay()
        if raise_flags(self.ids.device, redo_ok=True):
            rewind(self.model, self.ids.shape[1], self.cache)
            return self._eager()
        return self.logits

    def _eager(self) -> torch.Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        return logits


def static_cache(model, batch: int, max_len: int):
    """A transformers ``StaticCache`` for a kvpass-compiled ``model`` whose K/V tensors hold no memory.

    The compiled graphs never write or read the model's own cache (kvpass's buffers hold the tokens), so
    each layer's keys and values are a one-element tensor expanded to (batch, kv_heads, max_len, head_dim):
    the model's bookkeeping (positions, masks of a fixed width — what a CUDA graph needs) works, and the
    fp16 cache it would have allocated is never allocated. Use it with :class:`DecodeGraph`."""
    import transformers
    if getattr(model, "_kvpass", None) is None:
        raise KVPassError("static_cache is for models returned by kvpass.compile (an uncompiled model would "
                          "write its tokens into these memoryless tensors)")
    from .calibration import config_geometry
    geo = config_geometry(model)
    heads, head_dim = geo["kv_heads"], geo["head_dim"]
    p = next(model.parameters())
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
    for layer in cache.layers:
        probe = torch.zeros(batch, heads, 1, head_dim, dtype=p.dtype, device=p.device)
        width = layer.max_cache_len
        layer.max_cache_len = 1               # let transformers set the layer up without the full tensors
        layer.lazy_initialization(probe, probe)
        layer.max_cache_len = width
        layer.keys = probe.new_zeros(()).expand(batch, heads, width, head_dim)
        layer.values = probe.new_zeros(()).expand(batch, heads, width, head_dim)
    return cache


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, warmup: int = 2) -> torch.Tensor:
    """Greedy decoding of a kvpass-compiled ``model`` from ``input_ids`` (B, T) int64: the prompt is
    prefilled into a :func:`static_cache`, then each new token comes from one decode step — replayed from
    a CUDA graph (:class:`DecodeGraph`) on CUDA, run eagerly elsewhere. Returns (B, T + max_new_tokens)."""
    from .perplexity import cache_argument
    if max_new_tokens < 1:
        raise KVPassError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b, n = input_ids.shape
    cache = static_cache(model, b, n + max_new_tokens)
    arg = cache_argument(model)
    out = model(input_ids=input_ids, **{arg: cache}, use_cache=True, logits_to_keep=1,
                cache_position=torch.arange(n, device=input_ids.device))
    tokens = [out.logits[:, -1:].argmax(-1)]
    if input_ids.is_cuda:
        graph = DecodeGraph(model, cache, b, warmup=warmup)
        step = lambda tok, pos: graph.step(tok, pos)        # noqa: E731
    else:
        step = lambda tok, pos: model(input_ids=tok, **{arg: cache}, use_cache=True,   # noqa: E731
                                      cache_position=torch.tensor([pos], device=tok.device)).logits
    for i in range(max_new_tokens - 1):
        tokens.append(step(tokens[-1], n + i)[:, -1:].argmax(-1))
    return torch.cat([input_ids] + tokens, dim=1)
