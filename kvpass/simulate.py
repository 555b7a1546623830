"""Simulated ("sim") mode: run a transformers model with every layer's K/V passed through a scheme's cache.

:func:`simulate` swaps the model's attention for one that, in each layer and each forward, allocates the
scheme's real compressed cache for the whole sequence, appends all keys and values (post-RoPE) as one
prefill, and attends over that compressed state with ``scheme.attend``. It is one full forward per
sequence, so it is fast enough for sweeps.

What each query sees, and so how sim numbers relate to real decoding (label them "sim" all the same):
  * schemes with a full-precision window that say where it lies (:meth:`Scheme.exact_spans`: KIVI's
    residual, CQ/MILLION's sink and window) and whose codes do not depend on how appends were chunked get,
    per query, exactly what token-by-token decoding from the first token would give it: the keys and
    values inside its own window exact, older ones as the cache compressed them (the final state's codes
    are the codes every earlier step had). That is the honest decode mode with a one-token prompt;
  * every other scheme — no window (int8, KVQuant: its sink is exact in the final state too), codes that
    depend on the chunking (fp8's scale growth, QAQ's widths), or keys cached before RoPE — has every query
    attend over the final compressed state. Where a window exists that is pessimistic: early queries see
    keys quantized only because *later* tokens pushed them out of the window.
The honest mode (prefill, then token by token through the real cache of a ``kvpass.compile``d model) is
:func:`kvpass.perplexity.decode_perplexity`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .attention import windowed_attention
from .errors import KVPassError, ShapeError
from .methods import CacheShape, Scheme, get_scheme

SIM_ATTENTION = "kvpass_sim"
_ATTR = "_kvpass_sim_recorder"


@dataclass(frozen=True)
class SimCall:
    """One attention call in sim mode: the cache it built and what that cache cost."""

    layer: int
    batch: int
    kv_heads: int
    head_dim: int
    tokens: int                 # cached tokens (the cache capacity: exactly the sequence length)
    dtype: torch.dtype          # cache dtype (what a dense cache would store)
    nbytes: int                 # bytes of every buffer of the compressed state
    bits_per_elem: float        # scheme.bits_per_element(state.shape)

    @property
    def elements(self) -> int:
        """K plus V elements represented."""
        return 2 * self.batch * self.kv_heads * self.tokens * self.head_dim

    @property
    def dense_nbytes(self) -> int:
        """Bytes the same K/V take uncompressed in the cache dtype."""
        return self.elements * torch.empty((), dtype=self.dtype).element_size()


class SimRecorder:
    """Collects a :class:`SimCall` per attention call made inside :func:`simulate`.

    ``scheme`` is the scheme applied; ``cache_dtype`` the dtype K/V are cast to before caching (None:
    the model's K/V dtype). Totals cover every call since the last :meth:`clear`.
    """

    def __init__(self, scheme: Scheme, cache_dtype: torch.dtype | None, rotary=None):
        self.scheme = scheme
        self.cache_dtype = cache_dtype
        self.rotary = rotary            # the model's RoPE (kvpass.rotary.Rotary), for pre-RoPE schemes
        self.calls: list[SimCall] = []

    def clear(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()

    @property
    def nbytes(self) -> int:
        """Compressed-cache bytes summed over the recorded calls."""
        return sum(c.nbytes for c in self.calls)

    @property
    def dense_nbytes(self) -> int:
        """Uncompressed bytes of the same K/V in the cache dtype, summed over the recorded calls."""
        return sum(c.dense_nbytes for c in self.calls)

    @property
    def elements(self) -> int:
        """K plus V elements summed over the recorded calls."""
        return sum(c.elements for c in self.calls)

    @property
    def bits_per_elem(self) -> float:
        """Stored bits per K/V element over the recorded calls (every buffer byte counted)."""
        if not self.calls:
            raise KVPassError("no attention call was recorded: run the model inside simulate() first")
        return 8 * self.nbytes / self.elements

    def _record(self, state, layer: int) -> None:
        s = state.shape
        self.calls.append(SimCall(layer, s.batch, s.kv_heads, s.head_dim, s.capacity, s.dtype, state.nbytes,
                                  self.scheme.bits_per_element(s)))


def _sim_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function (same convention as ``sdpa_attention_forward``).

    query (B, Hq, Tq, D); key, value (B, Hkv, L, D) post-RoPE, Tq <= L (queries are the last Tq positions);
    attention_mask None or broadcastable to (B, 1, Tq, >=L), bool (True = keep) or additive float.
    returns: (output (B, Tq, Hq, D) in query.dtype, None) — no attention weights.
    """
    rec: SimRecorder | None = getattr(module, _ATTR, None)
    if rec is None:
        raise KVPassError(f"the {SIM_ATTENTION!r} attention only runs inside kvpass.simulate(model, scheme)")
    if dropout:
        raise KVPassError("sim mode is for inference: put the model in eval mode (attention dropout is on)")
    for name in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise KVPassError(f"sim mode does not support attention with {name!r} (layer "
                              f"{getattr(module, 'layer_idx', '?')}); it would be silently ignored")
    if key.shape != value.shape or key.dim() != 4 or query.dim() != 4:
        raise ShapeError(f"sim mode needs key/value of one shape (B, Hkv, L, D) and a 4-D query; got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    b, hkv, length, d = key.shape
    dtype = rec.cache_dtype or key.dtype
    layer = getattr(module, "layer_idx", None) or 0
    scheme = rec.scheme
    state = scheme.allocate(CacheShape(b, hkv, d, length, dtype, layer=layer), key.device)
    if scheme.key_space == "pre_rope":
        # sim mode sees keys after RoPE at positions 0..L-1 (one whole sequence, use_cache=False): undo the
        # rotation (angle -p * inv_freq, scale 1/s) so the scheme stores pre-RoPE keys and re-applies RoPE
        from .rotary import apply_rotary
        rot = rec.rotary
        raw = apply_rotary(key.float(), -torch.arange(length, device=key.device), rot.inv_freq.to(key.device),
                           1.0 / rot.scale)
        scheme.append(state, raw.to(dtype), value.to(dtype), rotary=rot)
    else:
        scheme.append(state, key.to(dtype), value.to(dtype))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    kw = dict(scale=scaling, causal=bool(causal), attn_mask=_convert_mask(attention_mask, b, query.shape[2], length),
              sliding_window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"))
    windows = _query_windows(scheme, query.shape[2], length, key.device)
    if windows is None:
        out = scheme.attend(state, query, **kw)
    else:
        k_comp, v_comp = scheme.decode(state)
        out = windowed_attention(query, key.to(dtype), value.to(dtype), k_comp, v_comp, *windows, **kw)
    rec._record(state, layer)
    return out.transpose(1, 2).contiguous(), None


def _query_windows(scheme: Scheme, queries: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(k_exact, v_exact) (queries, length) bool: which keys / values each of the last ``queries`` positions
    sees exactly when the tokens are decoded one at a time (:meth:`Scheme.exact_spans` of the cache holding
    the tokens up to the query); None where the final state serves every query (see the module docstring)."""
    if scheme.key_space == "pre_rope" or not scheme.chunking_invariant or scheme.exact_spans(length) is None:
        return None
    spans = torch.tensor([scheme.exact_spans(t + 1) for t in range(length - queries, length)], device=device)
    sink, k_from, v_from = spans.unbind(1)
    pos = torch.arange(length, device=device)
    in_sink = pos < sink[:, None]
    return in_sink | (pos >= k_from[:, None]), in_sink | (pos >= v_from[:, None])


def _convert_mask(mask: torch.Tensor | None, batch: int, tq: int, length: int) -> torch.Tensor | None:
    """A transformers mask -> what ``Scheme.attend`` takes: None, or a 4-D bool (True = keep) / additive
    float mask broadcastable to (B, Hq, Tq, L). 2-D (B, L) padding masks (1 = token) are accepted too."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise KVPassError(f"sim mode cannot use a {type(mask).__name__} attention mask (e.g. flex BlockMask)")
    if mask.dim() == 2:                       # (B, L) padding mask: 1 = real token
        mask = mask.bool()[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[-1] < length or mask.shape[0] not in (1, batch) \
            or mask.shape[-2] not in (1, tq):
        raise ShapeError(f"attention mask {tuple(mask.shape)} is not broadcastable to (batch={batch}, heads, "
                         f"queries={tq}, keys={length})")
    return mask[..., :length]      # static caches hand over masks wider than the keys seen


@contextmanager
def simulate(model: torch.nn.Module, scheme: Scheme | str,
             cache_dtype: torch.dtype | None = None) -> Iterator[SimRecorder]:
    """Run ``model`` (a transformers model using the AttentionInterface, e.g. Llama) in sim mode.

    Inside the ``with`` block every attention layer caches its K/V in ``scheme``'s real compressed state
    (cast to ``cache_dtype`` first, default: the model's dtype) and attends over it; see the module
    docstring for what each query sees. The original attention implementation is restored on exit.
    Padding masks (left padding) are honoured; run with ``use_cache=False`` to skip transformers' cache.

    yields: a :class:`SimRecorder` with one :class:`SimCall` per layer per forward (cache bytes, bits).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if isinstance(scheme, str):
        scheme = get_scheme(scheme)
    if not isinstance(scheme, Scheme):
        raise KVPassError(f"scheme must be a kvpass Scheme or a method name, got {type(scheme).__name__}")
    rotary = _model_rotary(model, scheme) if scheme.key_space == "pre_rope" else None
    if cache_dtype is not None and cache_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KVPassError(f"cache_dtype must be torch.float32, float16 or bfloat16, got {cache_dtype!r}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise KVPassError(f"simulate() needs a transformers PreTrainedModel, got {type(model).__name__}")
    original = config._attn_implementation
    if original == SIM_ATTENTION:
        raise KVPassError("this model is already running inside simulate()")
    if not model._can_set_attn_implementation():
        raise KVPassError(f"{type(model).__name__} does not dispatch attention through transformers' "
                          "AttentionInterface, so sim mode cannot reach its K/V")
    AttentionInterface.register(SIM_ATTENTION, _sim_attention)
    AttentionMaskInterface.register(SIM_ATTENTION, sdpa_mask)   # bool masks, None for plain causal
    recorder = SimRecorder(scheme, cache_dtype, rotary)
    modules = list(model.modules())
    for m in modules:
        setattr(m, _ATTR, recorder)
    try:
        model.set_attn_implementation(SIM_ATTENTION)
        if config._attn_implementation != SIM_ATTENTION:
            raise KVPassError(f"{type(model).__name__} refused the {SIM_ATTENTION!r} attention implementation")
        yield recorder
    finally:
        model.set_attn_implementation(original)
        for m in modules:
            if _ATTR in m.__dict__:
                delattr(m, _ATTR)


def _model_rotary(model: torch.nn.Module, scheme: Scheme):
    """The model's rotary embedding as a :class:`kvpass.rotary.Rotary` (a module holding ``inv_freq`` and
    ``attention_scaling``, as transformers' ``*RotaryEmbedding``), for a scheme caching keys before RoPE.
    Raises :class:`KVPassError` when the model has none or several different ones (sim mode assumes one
    RoPE for every layer; the graph pass handles the rest)."""
    from .rotary import Rotary
    found = {}
    for name, m in model.named_modules():
        freq = getattr(m, "inv_freq", None)
        if isinstance(freq, torch.Tensor) and freq.dim() == 1:
            found[name] = Rotary(freq.detach().float().cpu(), float(getattr(m, "attention_scaling", 1.0) or 1.0))
    distinct = {(tuple(r.inv_freq.tolist()), r.scale) for r in found.values()}
    if len(distinct) != 1:
        raise KVPassError(f"sim mode cannot run {scheme.name} (it caches keys before RoPE) on this model: "
                          f"{'no' if not found else 'more than one'} rotary embedding (inv_freq) found; use "
                          f"the decode mode")
    return next(iter(found.values()))


def perplexity(model: torch.nn.Module, input_ids: torch.Tensor, scheme: Scheme | str | None = None,
               batch_size: int = 1, cache_dtype: torch.dtype | None = None,
               progress: Callable[[int], object] | None = None) -> dict:
    """Perplexity of ``model`` on windows of tokens, in sim mode when ``scheme`` is given.

    input_ids: LongTensor (n, T), T >= 2: each row is one independent window; every token after the first
    of each window is predicted (teacher forcing), n * (T - 1) predictions in all.
    scheme: None runs the plain model; else a :class:`Scheme` (or method name) applied via :func:`simulate`.
    cache_dtype: dtype K/V are cached in (default the model's); batch_size: windows per forward.
    progress: called with the number of windows finished after each batch (e.g. ``tqdm.update``).
    returns: dict with ``ppl`` (exp of the mean NLL), ``nll`` (mean, nats), ``tokens`` (predictions),
    ``windows``, ``window``, ``mode`` ("plain" or "sim"); for a scheme also ``method``, ``options``,
    ``bits_per_elem`` (at capacity T, every buffer counted), ``cache_bytes`` (compressed K/V of one window
    over all layers) and ``dense_cache_bytes`` (the same uncompressed in the cache dtype).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.dim() != 2:
        raise ShapeError(f"input_ids must be a LongTensor (n_windows, window), got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    n, length = input_ids.shape
    if n < 1 or length < 2:
        raise ShapeError(f"need at least one window of >= 2 tokens, got {tuple(input_ids.shape)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise KVPassError(f"batch_size must be a positive int, got {batch_size!r}")
    vocab = model.get_input_embeddings().num_embeddings
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ShapeError(f"token ids must lie in [0, {vocab}) for this model")
    if model.training:
        raise KVPassError("put the model in eval mode (model.eval()) before measuring perplexity")
    device = next(model.parameters()).device

    def run() -> float:
        total = 0.0
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                ids = input_ids[i:i + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
                if not torch.isfinite(nll):
                    raise KVPassError(f"non-finite loss on windows {i}..{i + len(ids) - 1}")
                total += float(nll)
                if progress is not None:
                    progress(len(ids))
        return total

    tokens = n * (length - 1)
    result: dict = {"mode": "plain" if scheme is None else "sim", "windows": n, "window": length,
                    "tokens": tokens}
    if scheme is None:
        total = run()
    else:
        with simulate(model, scheme, cache_dtype) as rec:
            total = run()
        result.update(method=rec.scheme.name, options=_jsonable(rec.scheme.options()),
                      bits_per_elem=rec.bits_per_elem, cache_bytes=rec.nbytes // n,
                      dense_cache_bytes=rec.dense_nbytes // n)
    result["nll"] = total / tokens
    result["ppl"] = math.exp(result["nll"])
    return result


def _jsonable(options: dict) -> dict:
    return {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in options.items()}
