"""Sequence-parallel serving: one sequence's compressed KV cache spread over the ranks of torch.distributed.

``kvpass.compile(model, method, ..., parallel="sequence")`` run on every rank (``torchrun --nproc-per-node
N``, after ``torch.distributed.init_process_group``) gives each rank the whole model (weights replicated)
and an equal share of every layer's cache: the context is cut into blocks of ``block`` tokens dealt round
robin, block j on rank j % N, so a rank's cache is ~1/N of the context and the ranks stay balanced as
decoding appends. Every rank runs the same forward on the same tokens; at each attention call

- a fresh prompt attends over its own full-precision keys and values, as on one process (no
  communication), and each rank then compresses only its blocks of it;
- later calls (decode steps, later prompt chunks) store the new tokens on the ranks owning their blocks,
  each rank attends the queries over its own slice — its scheme's reference ``attend`` with
  ``return_lse=True``, so every scheme serves as it is — and the partial results (output, log-sum-exp)
  of all ranks are all-gathered (one ``torch.distributed.all_gather_into_tensor`` of B x Hq x T x (D+1)
  floats per layer) and merged by log-sum-exp: :func:`kvpass.attention.merge_partials`, the algebra of the
  split-K decode kernels, across ranks.

Causality over slices uses the tokens' global positions: a rank's key at global position p is visible to
a query at position t iff p <= t (and the model's mask allows it), whatever rank holds it. Pre-RoPE
schemes rotate a slice's keys by their global positions (``KVState.positions``).

Why sequence and not head (tensor) parallelism: a Llama-3-8B layer has 8 KV heads, so head-parallelism
stops at 8 ranks, gives a rank a share of the cache only as even as its heads (DuoAttention's retrieval
heads are not spread evenly) and must shard the projections; slicing tokens gives every rank an equal
share of any cache for any rank count, needs no change to the weights, and moves only the new token's
partial output per layer. See docs/design.md.

What each rank stores is the scheme's cache of its own tokens, so schemes whose storage depends on a
token's neighbours differ slightly from the one-process cache: each rank keeps its own newest ``residual``
tokens exact (KIVI, CQ, MILLION: more exact tokens, never fewer), its own first ``sink`` tokens exact, and
fp8 chooses its scale per rank. With ``residual=0`` and ``sink=0`` (and ``block`` a multiple of KIVI's
group) the ranks' caches are exactly the one-process cache cut in slices (tests/test_distributed.py).
QAQ is refused: its bit widths follow each token's attention weight over the whole context and the
context length, which a slice does not see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from .attention import merge_partials, prompt_attention
from .errors import KVPassError, OptionError, ShapeError
from .graphs import capturing
from .methods import register
from .methods.base import BufferSpec, CacheShape, KVState, Scheme

PARALLEL_MODES = ("sequence",)
UNSUPPORTED = {"qaq": "QAQ plans each token's bit width from its attention weight over the whole context and "
                      "from the context length, which one rank's slice does not see"}


def world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (None: the default process group); (0, 1) when torch.distributed is
    not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


@register
@dataclass
class SequenceParallel(Scheme):
    """``inner``'s cache sliced over the ranks of torch.distributed in blocks of ``block`` tokens (block j on
    rank j % world). A state's shape is the whole sequence's (capacity = all ranks' tokens); its buffers are
    ``inner``'s for this rank's slice (``local_shape``), its length the sequence's."""

    name = "sequence_parallel"
    wrapper: ClassVar[bool] = True      # not a method of its own: kvpass.methods() leaves it out
    inner: Scheme | None = None
    block: int = 128
    group: object = None                 # a torch.distributed process group; None: the default one

    def validate(self) -> None:
        if self.inner is None or not isinstance(self.inner, Scheme):
            raise OptionError("sequence_parallel needs the scheme whose cache it slices (inner=...)")
        if self.inner.policy or isinstance(self.inner, SequenceParallel):
            raise OptionError(f"sequence_parallel slices a compression scheme's cache, not the {self.inner.name} "
                              f"policy: compile with heads='duo' to run duo's retrieval heads sliced")
        if self.inner.name in UNSUPPORTED:
            raise KVPassError(f"{self.inner.name} cannot run sequence-parallel: {UNSUPPORTED[self.inner.name]}; "
                              f"run it on one process")
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise OptionError(f"sequence_parallel: block must be a positive integer, got {self.block!r}")
        g = getattr(self.inner, "group_size", 1)
        if self.inner.name == "kivi" and self.block % g:
            raise OptionError(f"sequence_parallel: block ({self.block}) must be a multiple of kivi's group_size "
                              f"({g}) so that key groups never straddle two ranks")
        self.rank, self.world = world(self.group)
        if self.rank < 0:
            raise KVPassError("sequence_parallel: this process is not a member of the given process group")
        self._positions: dict = {}

    # -- which tokens live here ---------------------------------------------------------------
    @property
    def key_space(self) -> str:          # append() receives what the inner scheme caches
        return self.inner.key_space

    def local_length(self, length: int) -> int:
        """Tokens of positions [0, length) that this rank holds."""
        span = self.block * self.world
        full, rest = divmod(length, span)
        return full * self.block + min(max(rest - self.rank * self.block, 0), self.block)

    def local_capacity(self, capacity: int) -> int:
        """The most tokens this rank holds for a sequence of ``capacity`` tokens."""
        return self.local_length(capacity)

    def global_positions(self, first: int, end: int, device) -> torch.Tensor:
        """Global positions (int64) of this rank's local tokens [first, end)."""
        i = torch.arange(first, end, device=device)
        return (i // self.block * self.world + self.rank) * self.block + i % self.block

    def owned(self, start: int, end: int) -> list[tuple[int, int]]:
        """The runs [a, b) of offsets from ``start`` of the positions in [start, end) this rank holds, in
        order (host arithmetic: no device sync)."""
        runs, p = [], start
        while p < end:
            stop = min((p // self.block + 1) * self.block, end)
            if (p // self.block) % self.world == self.rank:
                runs.append((p - start, stop - start))
            p = stop
        return runs

    def local_shape(self, shape: CacheShape) -> CacheShape:
        """The inner scheme's geometry for this rank's slice of a ``shape`` cache."""
        blocks = math.ceil(shape.capacity / self.block)
        if blocks < self.world:
            raise ShapeError(f"sequence-parallel: a capacity of {shape.capacity} tokens is {blocks} block(s) of "
                             f"{self.block}, fewer than the {self.world} ranks; raise the capacity or lower block")
        return CacheShape(shape.batch, shape.kv_heads, shape.head_dim, self.local_capacity(shape.capacity),
                          shape.dtype, shape.layer)

    # -- layout: the inner scheme's, for the slice ----------------------------------------------
    def check_shape(self, shape: CacheShape) -> None:
        self.inner.check_shape(self.local_shape(shape))

    def layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        return self.inner.full_layout(self.local_shape(shape))

    def full_layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        return self.layout(shape)         # the inner scheme's RoPE buffers are already in its layout

    def bits_per_element(self, shape: CacheShape) -> float:
        """Bits per element of this rank's slice (every rank's is within one block of the others')."""
        return self.inner.bits_per_element(self.local_shape(shape))

    def options(self) -> dict:
        return {"inner": self.inner, "block": self.block, "group": self.group}

    def describe(self) -> str:
        return f"{self.inner.describe()} sliced over {self.world} ranks (rank {self.rank}, block={self.block})"

    def __repr__(self) -> str:
        return self.describe()

    def local(self, state: KVState) -> KVState:
        """This rank's slice of ``state`` as an ``inner`` state (same buffers; its own length tensor, computed
        on the device from the sequence's — no host sync; its tokens' global positions in ``positions``)."""
        shape = self.local_shape(state.shape)
        span = self.block * self.world
        length = state.length_tensor
        held = length // span * self.block + (length % span - self.rank * self.block).clamp(0, self.block)
        part = KVState(self.inner, shape, state.buffers, state.device, length_tensor=held)
        key = (shape.capacity, str(state.device))
        if key not in self._positions:
            self._positions[key] = self.global_positions(0, shape.capacity, state.device)
        part.positions = self._positions[key]
        return part

    def initialize(self, state: KVState) -> None:
        self.inner.initialize(self.local(state))

    def decode(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's tokens only, (B, Hkv, local length, D); their positions: :meth:`global_positions`."""
        return self.inner.decode(self.local(state))

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise KVPassError("a sequence-parallel cache's error bound is its inner scheme's on each rank's tokens")

    # -- storing and attending ------------------------------------------------------------------
    def append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, rotary=None, length: int | None = None) -> None:
        """Store the sequence's next tokens k, v (B, Hkv, T, D) — every rank passes the same ones — keeping
        those of this rank's blocks; the sequence's length advances by T on every rank. ``length``: the
        sequence's length before the append if known on the host."""
        if capturing(k):
            raise KVPassError("sequence-parallel decoding has no CUDA-graph path yet (its merge is a collective "
                              "outside the kernels); run it eagerly")
        self.check_input(state, k, v)
        start = state.length if length is None else length
        runs = self.owned(start, start + k.shape[2])
        if runs:
            take = (lambda x: x[:, :, runs[0][0]:runs[0][1]]) if len(runs) == 1 else \
                (lambda x: torch.cat([x[:, :, a:b] for a, b in runs], dim=2))
            self.inner.append(self.local(state), take(k), take(v), rotary=rotary)
        state.length_tensor += k.shape[2]

    def step(self, state: KVState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_pre: torch.Tensor | None,
             rotary=None, fresh: bool, scale: float | None, causal: bool, attn_mask: torch.Tensor | None,
             softcap: float | None) -> torch.Tensor:
        """:meth:`Scheme.step` over the sliced cache: q (B, Hq, T, D), new k, v (B, Hkv, T, D), the same on
        every rank. A fresh prompt attends over its own k, v (no communication) and each rank keeps its
        blocks; otherwise the new tokens are stored where they belong and the ranks' partial attentions are
        merged (one all-gather). Returns (B, Hq, T, D) in q.dtype, equal on every rank."""
        kw = dict(scale=scale, causal=causal, attn_mask=attn_mask, softcap=softcap)
        cached_k = k_pre if k_pre is not None else k
        if fresh:
            out = prompt_attention(q, k, v, **kw)
            self.append(state, cached_k, v, rotary=rotary, length=0)
            return out
        start = state.length
        self.append(state, cached_k, v, rotary=rotary, length=start)
        out, lse = self.partial(state, q, start, **kw)
        return gather_merge(out, lse, self.group).to(q.dtype)

    def partial(self, state: KVState, q: torch.Tensor, start: int, *, scale: float | None, causal: bool,
                attn_mask: torch.Tensor | None, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the attention of q (B, Hq, T, D) at global positions [start, start + T) over
        the keys it holds: (out (B, Hq, T, D) float32, lse (B, Hq, T) float32; -inf and zeros where it holds
        no visible key). ``attn_mask`` covers global positions from 0."""
        t = q.shape[2]
        part = self.local(state)
        n = self.local_length(start + t)
        if n == 0:
            b, hq, _, d = q.shape
            return (q.new_zeros(b, hq, t, d, dtype=torch.float32),
                    q.new_full((b, hq, t), float("-inf"), dtype=torch.float32))
        if t == 1 and attn_mask is None:     # a decode step: the query comes after every key it could see
            from .codegen import try_attend_lse      # imports triton: only once a cache is attended
            got = try_attend_lse(self.inner, part, q, scale=scale, causal=False, softcap=softcap, length=n)
            if got is not None:
                return got
            return self.inner.attend(part, q, scale=scale, causal=False, softcap=softcap, return_lse=True)
        pos = part.positions[:n]
        keep = pos[None, :] <= torch.arange(start, start + t, device=q.device)[:, None] if causal else \
            torch.ones(t, n, dtype=torch.bool, device=q.device)
        mask = keep
        if attn_mask is not None:
            given = attn_mask.index_select(-1, pos)
            mask = (given & keep) if given.dtype == torch.bool else given.float().masked_fill(~keep, float("-inf"))
        return self.inner.attend(part, q, scale=scale, causal=False, attn_mask=mask, softcap=softcap,
                                 return_lse=True)


def sliced(scheme: Scheme) -> SequenceParallel | None:
    """The :class:`SequenceParallel` part of ``scheme`` (itself, or a head policy's inner scheme), if any."""
    for s in (scheme, getattr(scheme, "inner", None)):
        if isinstance(s, SequenceParallel):
            return s
    return None


def ranks_of(scheme: Scheme) -> int:
    """Over how many ranks ``scheme``'s caches are sliced (1: not sliced)."""
    sp = sliced(scheme)
    return 1 if sp is None else sp.world


def held_shape(state: KVState) -> CacheShape:
    """The geometry of what ``state`` holds on this rank: its shape, or a sliced cache's local shape (a duo
    cache's retrieval part decides)."""
    sp = sliced(state.scheme)
    return state.shape if sp is None else sp.local_shape(state.shape)


def gather_merge(out: torch.Tensor, lse: torch.Tensor, group=None) -> torch.Tensor:
    """Merge every rank's partial attention into the attention over all ranks' keys.

    out: (B, Hq, T, D) float32 normalized over this rank's keys; lse: (B, Hq, T) float32 (-inf: none).
    One all-gather of (out, lse) packed as (B, Hq, T, D + 1); returns (B, Hq, T, D) float32, the same on
    every rank (each merges the gathered parts in rank order)."""
    n = world(group)[1]
    if n == 1:
        return out
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1).contiguous()
    every = packed.new_empty((n * packed.shape[0],) + packed.shape[1:])     # ranks stacked along dim 0
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor   # renamed in torch 2.13
    gather(every, packed, group=group)
    return merge_partials([(p[..., :-1], p[..., -1]) for p in every.chunk(n, dim=0)])


def check_parallel(method: str, heads: str, parallel: str) -> None:
    """Raise KVPassError, before anything is built, for a parallel mode kvpass lacks, a method that cannot
    be sliced (QAQ) or heads="streaming" (a constant-size window: nothing to slice)."""
    if parallel not in PARALLEL_MODES:
        raise KVPassError(f"parallel must be one of {PARALLEL_MODES} (or None), got {parallel!r}")
    if method in UNSUPPORTED:
        raise KVPassError(f"{method} cannot run sequence-parallel: {UNSUPPORTED[method]}; run it on one process")
    if heads == "streaming":
        raise KVPassError("heads='streaming' keeps a constant-size window per head: nothing to slice over ranks "
                          "(parallel=); run it on one process")


def sequence_parallel(scheme: Scheme, parallel: str, block: int | None = None,
                      capacity: int | None = None) -> SequenceParallel:
    """``scheme`` sliced over the ranks of the default process group (``parallel="sequence"``), blocks of
    ``block`` tokens (default 128).

    Raises KVPassError for another mode or a scheme that cannot be sliced (QAQ, a head policy), OptionError
    for a bad block, ShapeError when ``capacity`` (tokens per sequence) is fewer blocks than ranks."""
    if parallel not in PARALLEL_MODES:
        raise KVPassError(f"parallel must be one of {PARALLEL_MODES} (or None), got {parallel!r}")
    if scheme.policy:
        raise KVPassError(f"parallel='sequence' slices a compression scheme; heads={scheme.name!r} keeps a "
                          f"constant-size window per head, nothing to slice: run it on one process")
    sp = SequenceParallel(inner=scheme, block=128 if block is None else block)
    if capacity is not None:
        sp.local_shape(CacheShape(1, 1, 1, capacity))
    return sp
