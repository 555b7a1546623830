"""The scheme interface every compressed-KV method implements.

A *scheme* is a small configuration object (one dataclass per method file). It describes the buffers a
layer's compressed cache keeps (:meth:`Scheme.layout`), fills them (:meth:`Scheme.append`), reads them
back (:meth:`Scheme.decode`) and attends over them (:meth:`Scheme.attend`). The data itself lives in a
:class:`KVState`: real tensors, preallocated for the cache's capacity when the state is created, so that
memory saved is memory never allocated.

The interface is shaped for all of shared/METHODS.md:
- ``key_space`` says whether ``append`` receives keys after RoPE (KIVI, MILLION, ...) or before it
  (KVQuant); the graph pass hands over the matching tensor and, for pre-RoPE schemes, the rotary
  tables to ``attend``.
- Codebooks, outlier stores, per-token bit widths and attention statistics are just more named buffers
  in the layout; calibrated schemes receive their calibration (per layer) at construction.
- ``bits_per_element`` is computed from the layout's bytes, the same bytes ``allocate`` allocates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention import dense_attention, dense_attention_lse, prompt_attention
from ..errors import CapacityError, KVPassError, NonFiniteError, OptionError, ShapeError
from ..graphs import capturing, flag_new_tokens
from ..rotary import Rotary, apply_rotary

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CacheShape:
    """Geometry of one layer's cache: K and V are each (batch, kv_heads, capacity, head_dim) of
    ``dtype`` when dense. ``layer`` lets calibrated schemes pick that layer's parameters."""

    batch: int
    kv_heads: int
    head_dim: int
    capacity: int
    dtype: torch.dtype = torch.float16
    layer: int = 0

    @property
    def elements(self) -> int:
        """Number of K plus V elements the cache represents at full capacity."""
        return 2 * self.batch * self.kv_heads * self.capacity * self.head_dim


@dataclass(frozen=True)
class BufferSpec:
    """One preallocated buffer of a cache layout. ``host`` buffers live in CPU memory whatever the
    cache's device (QAQ's full-precision copy); they are reported apart and not counted in bits/elem,
    which measure the accelerator memory the cache takes."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    host: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class KVState:
    """The compressed K/V of one attention layer: named buffers plus the number of tokens held.

    ``buffers`` are allocated once at the cache's capacity; ``length`` (a 0-d int64 tensor on the
    cache's device, so a captured decode step can read it without a host sync) counts tokens appended.
    """

    # Global positions (int64, per local index) of the tokens when the state is one rank's slice of a sequence
    # (kvpass.distributed); None: token i is at position i. Pre-RoPE schemes rotate keys by these.
    positions: torch.Tensor | None = None
    # Channels the RoPE of a pre-RoPE scheme rotates, known on the host (set by the append that stores the rotary
    # parameters, and by the kvpass::attention op, which rebuilds its state each call), so that kernels specialised
    # to full rotary can be chosen without reading the device; None: not known.
    rotary_dims: int | None = None

    def __init__(self, scheme: "Scheme", shape: CacheShape, buffers: dict[str, torch.Tensor],
                 device: torch.device, length_tensor: torch.Tensor | None = None):
        self.scheme = scheme
        self.shape = shape
        self.buffers = buffers
        self.length_tensor = (torch.zeros((), dtype=torch.int64, device=device)
                              if length_tensor is None else length_tensor)

    @property
    def length(self) -> int:
        """Tokens currently held (host value; the reference path reads it, kernels read the tensor)."""
        return int(self.length_tensor.item())

    @property
    def device(self) -> torch.device:
        return self.length_tensor.device

    @property
    def nbytes(self) -> int:
        """Bytes of every K/V data buffer on the cache's device (codes, scales, zeros, windows, outliers,
        codebooks); host-memory buffers are counted in :attr:`host_nbytes`."""
        return sum(t.numel() * t.element_size() for n, t in self.buffers.items() if n not in self.host_buffers)

    @property
    def host_nbytes(self) -> int:
        """Bytes of the buffers kept in host (CPU) memory."""
        return sum(self.buffers[n].numel() * self.buffers[n].element_size() for n in self.host_buffers)

    @property
    def host_buffers(self) -> set:
        return {n for n, spec in self.scheme.full_layout(self.shape).items() if spec.host}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.buffers[name]

    def __repr__(self) -> str:
        return (f"KVState({self.scheme.name}, length={self.length}/{self.shape.capacity}, "
                f"{self.nbytes} bytes, {self.scheme.bits_per_element(self.shape):.3f} b/elem)")


@dataclass
class Scheme:
    """Base class of a compressed-KV scheme. Subclasses are dataclasses whose fields are the options.

    Subclasses set ``name`` and implement ``layout``, ``_append``, ``decode`` and ``error_bound``; they
    may override ``attend`` with a path that does not decode (it must equal dense attention over
    ``decode``), and ``check_shape`` for geometry constraints.
    """

    name: ClassVar[str] = ""
    key_space: ClassVar[str] = "post_rope"        # or "pre_rope": append() gets keys before RoPE
    needs_calibration: ClassVar[bool] = False
    # True when the stored cache depends only on the tokens, not on how appends chunked them.
    chunking_invariant: ClassVar[bool] = True
    # Option sets the shared test matrix runs this scheme with (small groups/windows for tiny shapes).
    test_variants: ClassVar[tuple[dict, ...]] = ({},)
    # True when _append works from a device start (the length tensor) with no host reads, so a CUDA graph
    # can record it without an append kernel.
    capturable_append: ClassVar[bool] = False
    # True for head policies (duo, streaming): they split or bound what each head keeps and are listed by
    # kvpass.policies(), not by kvpass.methods() (the scheme matrix).
    policy: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    # -- to implement ------------------------------------------------------------------------
    def validate(self) -> None:
        """Check option values; raise :class:`OptionError` naming the bad one."""

    def check_shape(self, shape: CacheShape) -> None:
        """Raise :class:`ShapeError` if the scheme cannot store caches of this geometry."""

    def layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        """Every buffer the cache keeps for ``shape`` (name -> spec), sized for its full capacity."""
        raise NotImplementedError

    def _append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store tokens at positions [start, start + T) (already validated, capacity checked)."""
        raise NotImplementedError

    def decode(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (B, Hkv, length, D) keys and values as attention sees them (keys after RoPE), in the
        cache dtype, rebuilt from the buffers. Pre-RoPE schemes implement :meth:`decode_raw` instead."""
        if self.key_space != "pre_rope":
            raise NotImplementedError
        k, v = self.decode_raw(state)
        return rotate_cached_keys(state, k), v

    def exact_spans(self, length: int) -> tuple[int, int, int] | None:
        """With ``length`` tokens cached, which positions are stored exactly: (sink, k_from, v_from) — keys
        at positions < sink or >= k_from, values at positions < sink or >= v_from. None: the scheme keeps no
        full-precision window (every position as :meth:`decode` gives it). Sim mode uses it to give each
        query the window it would see when decoding."""
        return None

    def decode_raw(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values in the space they were appended in (keys before RoPE for pre-RoPE schemes)."""
        return self.decode(state)

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Element-wise bound on |decode - original| after appending k, v (B, Hkv, L, D) in any
        chunking, from the scheme's analytic error model. Returns float32 tensors shaped like k, v."""
        raise NotImplementedError

    # -- shared behaviour --------------------------------------------------------------------
    def options(self) -> dict:
        """The scheme's option values (the dataclass fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        opts = ", ".join(f"{k}={_short(v)}" for k, v in self.options().items())
        return f"{self.name}({opts})"

    def bits_per_element(self, shape: CacheShape) -> float:
        """Stored bits per K/V element at full capacity, counting every byte of every buffer."""
        return sum(b.nbytes for b in self.full_layout(shape).values() if not b.host) * 8 / shape.elements

    def full_layout(self, shape: CacheShape) -> dict[str, BufferSpec]:
        """:meth:`layout` plus the buffers the base class keeps for the scheme (RoPE parameters of
        pre-RoPE schemes)."""
        specs = dict(self.layout(shape))
        if self.key_space == "pre_rope":
            specs["rope_inv_freq"] = BufferSpec((shape.head_dim // 2,), torch.float32)
            specs["rope_meta"] = BufferSpec((2,), torch.float32)       # [scale, rotated dims]
        return specs

    def initialize(self, state: KVState) -> None:
        """Fill constant buffers after allocation (e.g. codebooks from the calibration)."""

    def allocate(self, shape: CacheShape, device: torch.device | str | None = None) -> KVState:
        """Allocate a zeroed, empty cache for ``shape`` on ``device``."""
        if shape.dtype not in FLOAT_DTYPES:
            raise ShapeError(f"cache dtype must be one of {FLOAT_DTYPES}, got {shape.dtype}")
        for field in ("batch", "kv_heads", "head_dim", "capacity"):
            if getattr(shape, field) < 1:
                raise ShapeError(f"cache {field} must be >= 1, got {getattr(shape, field)}")
        self.check_shape(shape)
        device = torch.device(device or "cpu")
        buffers = {name: torch.zeros(spec.shape, dtype=spec.dtype, device="cpu" if spec.host else device)
                   for name, spec in self.full_layout(shape).items()}
        state = KVState(self, shape, buffers, device)
        self.initialize(state)
        return state

    def append(self, state: KVState, k: torch.Tensor, v: torch.Tensor, rotary: Rotary | None = None) -> None:
        """Append T new tokens: k, v (B, Hkv, T, D) in the cache dtype (T >= 1; one for a decode step,
        many for a prefill). Pre-RoPE schemes get keys before RoPE and the model's ``rotary``.
        Raises on a shape/dtype mismatch, NaN/inf, a missing rotary, or overflowing the capacity."""
        self.check_input(state, k, v)
        if capturing(k):
            return self._append_captured(state, k, v, rotary)
        self.check_finite(state, k, v)
        start, new = state.length, k.shape[2]
        if start + new > state.shape.capacity:
            raise CapacityError(f"appending {new} tokens to a cache holding {start} exceeds its capacity "
                                f"of {state.shape.capacity} tokens (layer {state.shape.layer}); allocate a larger "
                                f"cache")
        if self.key_space == "pre_rope":
            _store_rotary(state, rotary, self.name)
        if not (k.is_cuda and _try_append_kernel(self, state, k, v)):
            self._append(state, k, v, start)
        state.length_tensor += new

    def check_input(self, state: KVState, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise :class:`ShapeError` unless k, v are (B, Hkv, T>=1, D) of the cache's geometry, dtype and
        device."""
        s = state.shape
        if k.dim() == 4 and v.dim() == 4 and v.shape[2] != k.shape[2]:
            raise ShapeError(f"keys have {k.shape[2]} tokens but values {v.shape[2]}")
        want = (s.batch, s.kv_heads, k.shape[2] if k.dim() == 4 else -1, s.head_dim)
        for name, t in (("keys", k), ("values", v)):
            if t.dim() != 4 or tuple(t.shape) != want or t.shape[2] < 1:
                raise ShapeError(f"{name} must be (batch={s.batch}, kv_heads={s.kv_heads}, tokens>=1, "
                                 f"head_dim={s.head_dim}), got {tuple(t.shape)}")
            if t.dtype != s.dtype:
                raise ShapeError(f"{name} dtype {t.dtype} does not match the cache dtype {s.dtype}")
            if t.device != state.device:
                raise ShapeError(f"{name} on {t.device}, cache on {state.device}")

    @staticmethod
    def check_finite(state: KVState, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise :class:`NonFiniteError` if k or v holds NaN or inf (a host sync: eager paths only)."""
        for name, t in (("keys", k), ("values", v)):
            if not torch.isfinite(t).all():
                raise NonFiniteError(f"{name} contain NaN or inf (layer {state.shape.layer}); refusing to cache "
                                     f"them")

    def _append_captured(self, state: KVState, k: torch.Tensor, v: torch.Tensor, rotary: Rotary | None) -> None:
        """:meth:`append` while a CUDA graph records: the same checks as device flags (read after each replay
        by :class:`kvpass.graphs.DecodeGraph`), the append kernel (or the scheme's append at device
        positions), the length advanced on the device."""
        new = k.shape[2]
        flag_new_tokens(state.length_tensor, k, v, state.shape.capacity)
        # (pre-RoPE schemes: the rotary parameters were stored by the eager prefill; copying them from the
        # host is not allowed while capturing)
        if not _try_append_kernel(self, state, k, v):
            if not self.capturable_append:
                raise KVPassError(f"{self.name} has no append kernel for this cache, so its decode step cannot "
                                  f"be captured in a CUDA graph; run it eagerly")
            self._append(state, k, v, state.length_tensor)
        state.length_tensor += new

    def step(self, state: KVState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_pre: torch.Tensor | None,
             rotary: Rotary | None, fresh: bool, scale: float | None, causal: bool,
             attn_mask: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
        """One attention call of a rewritten site: store the new k, v (B, Hkv, T, D) — ``k_pre``, the keys
        before RoPE, for pre-RoPE schemes — and attend q (B, Hq, T, D), the last T positions. ``fresh``: a
        new sequence (the cache was just emptied): the prompt attends over its own full-precision k, v, as
        every KV-quantization method does, and is then compressed. Later calls attend over the cache, through
        the scheme's kernel where one covers the call. ``attn_mask`` covers every held position.
        Returns (B, Hq, T, D) in q.dtype."""
        kw = dict(scale=scale, causal=causal, attn_mask=attn_mask, softcap=softcap)
        cached_k = k_pre if k_pre is not None else k
        if fresh:
            out = prompt_attention(q, k, v, **kw)
            self.append(state, cached_k, v, rotary=rotary)
            return out
        self.append(state, cached_k, v, rotary=rotary)
        from ..codegen import try_attend      # imports triton: only once a cache is attended
        out = try_attend(self, state, q, **kw)
        return out if out is not None else self.attend(state, q, **kw)

    def captured_step(self, state: KVState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      rotary: Rotary | None, scale: float | None, causal: bool, attn_mask: torch.Tensor | None,
                      softcap: float | None) -> torch.Tensor:
        """:meth:`step` of a decode step while a CUDA graph records (:mod:`kvpass.graphs`): no host reads.
        Appends k, v (B, Hkv, T, D) (pre-RoPE keys for pre-RoPE schemes) at the device length, then attends
        q (B, Hq, T, D) through the scheme's kernel, or :meth:`attend_captured` where none covers the call.
        ``attn_mask``: a static cache's mask, every position from 0. Returns (B, Hq, T, D) in q.dtype."""
        self.append(state, k, v, rotary=rotary)
        from ..codegen import try_attend
        kw = dict(scale=scale, causal=causal, attn_mask=attn_mask, softcap=softcap)
        out = try_attend(self, state, q, **kw)
        return out if out is not None else self.attend_captured(state, q, **kw)

    def attend_captured(self, state: KVState, q: torch.Tensor, *, scale: float | None, causal: bool,
                        attn_mask: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
        """Attention without a kernel and without host reads (see :meth:`captured_step`); schemes whose
        reference reads the length on the host have none."""
        raise KVPassError(f"{self.name}: no decode kernel covers this site (scheme options, head_dim, mask or "
                          f"soft-capping), so its decode step cannot be captured in a CUDA graph; run it eagerly")

    def attend(self, state: KVState, q: torch.Tensor, *, scale: float | None = None, causal: bool = True,
               attn_mask: torch.Tensor | None = None, sliding_window: int | None = None,
               softcap: float | None = None, return_lse: bool = False):
        """Attention of q (B, Hq, Tq, D) — the last Tq positions — over the cached tokens.
        The reference: dense attention over :meth:`decode`. Returns (B, Hq, Tq, D) in q.dtype; with
        ``return_lse`` the float32 pair (out, lse (B, Hq, Tq)) of the cache as one part of a larger key set
        (:func:`kvpass.attention.merge_partials`; sequence-parallel ranks merge theirs)."""
        k, v = self.decode(state)
        attend = dense_attention_lse if return_lse else dense_attention
        return attend(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask, sliding_window=sliding_window,
                      softcap=softcap)


def _try_append_kernel(scheme: "Scheme", state: KVState, k: torch.Tensor, v: torch.Tensor) -> bool:
    from ..codegen import try_append      # imports triton: only for GPU caches
    return try_append(scheme, state, k, v)


def append_rows(state: KVState, start: int | torch.Tensor, n: int, device) -> torch.Tensor:
    """(n,) int64 cache rows of n new tokens from ``start`` — a host int, or the length tensor itself while a
    CUDA graph records — kept inside the buffers: a captured step past the capacity is flagged (OVERFLOW) by
    the caller and must not write out of bounds meanwhile."""
    return (torch.arange(n, device=device) + start).clamp_(max=state.shape.capacity - 1)


def _store_rotary(state: KVState, rotary: Rotary | None, name: str) -> None:
    if rotary is None:
        raise ShapeError(f"{name} caches keys before RoPE: append() needs the model's rotary parameters")
    half = rotary.inv_freq.shape[-1]
    if 2 * half > state.shape.head_dim:
        raise ShapeError(f"rotary covers {2 * half} channels but head_dim is {state.shape.head_dim}")
    state["rope_inv_freq"].zero_()
    state["rope_inv_freq"][:half] = rotary.inv_freq.to(torch.float32)
    state["rope_meta"].copy_(torch.tensor([rotary.scale, 2 * half], dtype=torch.float32))
    state.rotary_dims = 2 * half


def rotate_cached_keys(state: KVState, k: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Apply the state's stored RoPE to pre-RoPE keys k (B, H, n, D) at positions first..first+n-1."""
    scale, dims = state["rope_meta"].tolist()
    positions = torch.arange(first, first + k.shape[2], device=k.device)
    if state.positions is not None:             # a sequence-parallel slice: its tokens' global positions
        positions = state.positions[positions]
    return apply_rotary(k, positions, state["rope_inv_freq"][: int(dims) // 2], scale)


def require_int(scheme: str, name: str, value, lo: int, hi: int | None = None, note: str = "") -> None:
    """Raise OptionError unless ``value`` is an int in [lo, hi]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise OptionError(f"{scheme}: {name} must be an integer in {rng}{note}, got {value!r}")


def require_dtype(scheme: str, name: str, value, allowed=FLOAT_DTYPES) -> None:
    if value not in allowed:
        raise OptionError(f"{scheme}: {name} must be one of {allowed}, got {value!r}")


def rounding_eps(dtype: torch.dtype) -> float:
    """Relative rounding error bound of storing a float32 value as ``dtype`` (one ulp, conservative)."""
    return torch.finfo(dtype).eps


def _short(v) -> str:
    return str(v).replace("torch.", "")
