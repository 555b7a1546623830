"""``kvpass.compile``: a torch.compile backend that rewrites every attention site to a compressed cache.

Capture is Dynamo's: each FX graph it hands the backend is canonicalized (``kvpass.patterns``), each
site rewritten (``kvpass.rewrite``), and the result compiled by the inner backend (Inductor by default;
``"eager"`` runs the rewritten graph as is). The compressed buffers are extra graph inputs, fetched from
the model's :class:`CacheManager` at every call, so prefill and decode graphs share one cache.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import KVPassError
from .methods import CacheShape, get_scheme
from .ops import scheme_spec
from .patterns import AttentionSite, describe_graph, find_sites, unmatched_softmax
from .patterns import module_path as _module_of
from .patterns.ops import fake, same_size, shape
from .rewrite import rewrite_site
from .runtime import CacheManager, SiteGeometry

INNER_BACKENDS = ("inductor", "eager", "aot_eager")
HEAD_POLICIES = ("full", "duo", "streaming")


@dataclass
class SiteRecord:
    """What the pass saw at one site (for :func:`kvpass.report`)."""

    key: str
    layer: int | None
    pattern: str
    heads: int
    kv_heads: int
    head_dim: int
    kv_source: str
    gqa: str
    rope: str
    mask: str
    rewritten: bool
    reason: str = ""


@dataclass
class CompiledState:
    """Everything kvpass attaches to a compiled model (``model._kvpass``)."""

    manager: CacheManager
    strict: bool
    inner: str
    expected_layers: int | None
    records: dict[str, SiteRecord] = field(default_factory=dict)
    census: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)     # attention-like softmax left alone
    graphs: int = 0


class KVPassBackend:
    """The torch.compile backend: find sites, rewrite them, compile with the inner backend."""

    def __init__(self, state: CompiledState):
        self.state = state

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list):
        st = self.state
        st.graphs += 1
        gm = copy_graph_module(gm)      # Dynamo still owns (and later reads) the graph it handed us
        sites = find_sites(gm.graph)
        pre_rope = st.manager.scheme.key_space == "pre_rope"
        for s in sites:
            if pre_rope and s.problem is None and s.rope != "none" and s.rope_inv_freq is None:
                s.fail(f"{st.manager.scheme.name} caches keys before RoPE, but the rotary frequencies of this "
                       f"site could not be traced in the graph")
        st.census.append(describe_graph(gm.graph))
        for n in unmatched_softmax(gm.graph, sites):
            where = _module_of(n) or n.name
            st.unmatched.append(where)
            warnings.warn(f"kvpass: a softmax in {where} feeds a matrix product but is not an attention form "
                          f"kvpass recognizes; it is left as is (its keys/values, if any, stay uncompressed)")
        bad = [s for s in sites if s.problem]
        for s in sites:
            self._record(s, len(st.records))
        if bad and st.strict:
            lines = "\n".join(f"  {s.module or s.node.name}: {s.problem}" for s in bad)
            raise KVPassError(f"kvpass cannot rewrite {len(bad)} attention site(s):\n{lines}\n"
                              f"(pass strict=False to leave them uncompressed and see them in kvpass.report)")
        for s in bad:
            warnings.warn(f"kvpass: leaving {s.module or s.node.name} uncompressed: {s.problem}")
        runtime_sites = []
        shared_masks: dict = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for s in (s for s in sites if not s.problem):
            key = self._key(s)
            geo = SiteGeometry(key, self._layer(s, key), s.kv_heads, s.head_dim, fake(s.k_new).dtype,
                               fake(s.k_new).device)
            st.manager.register(geo)
            shape_ = CacheShape(1, s.kv_heads, s.head_dim, st.manager.capacity, geo.dtype, geo.layer)
            n_buf = len(st.manager.scheme.full_layout(shape_))
            batch_src = _batch_source(shape(s.k_new)[0], placeholders, example_inputs)
            rewrite_site(gm.graph, s, scheme_spec(st.manager.scheme, geo.layer, st.manager.capacity),
                         n_buf, tag=str(len(runtime_sites)), pre_rope=pre_rope, shared_masks=shared_masks)
            runtime_sites.append((key, batch_src))
        gm.graph.lint()
        gm.recompile()
        manager = st.manager

        def extra_inputs(args) -> list:
            extra = []
            for key, src in runtime_sites:
                extra += manager.buffers(key, _resolve_batch(src, args))
            return extra

        compiled = _inner_compile(st.inner, gm, list(example_inputs) + extra_inputs(example_inputs))

        def run(*args):
            return compiled(*args, *extra_inputs(args))
        return run

    def _key(self, s: AttentionSite) -> str:
        return s.module or f"site{len(self.state.manager.sites)}"

    def _layer(self, s: AttentionSite, key: str) -> int:
        if s.layer is not None:
            return s.layer
        return list(self.state.manager.sites).index(key) if key in self.state.manager.sites else \
            len(self.state.manager.sites)

    def _record(self, s: AttentionSite, n: int) -> None:
        key = s.module or f"site{n}"
        self.state.records[key] = SiteRecord(
            key=key, layer=s.layer, pattern=s.pattern, heads=s.heads, kv_heads=s.kv_heads,
            head_dim=s.head_dim, kv_source=s.kv_source, gqa=s.gqa, rope=s.rope, mask=s.mask_form,
            rewritten=s.problem is None, reason=s.problem or "")


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule over a copy of gm's graph (node meta kept): backends must not edit Dynamo's own."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def _batch_source(batch, placeholders, example_inputs):
    """Where the batch size can be read at run time: a constant, or (input index, dim)."""
    if isinstance(batch, int):
        return batch
    for i, (ph, ex) in enumerate(zip(placeholders, example_inputs)):
        v = fake(ph)
        if isinstance(v, torch.Tensor):
            for d, size in enumerate(v.shape):
                if same_size(size, batch):
                    return (i, d)
        elif isinstance(v, torch.SymInt) and same_size(v, batch):
            return (i, None)
    raise KVPassError(f"cannot tell the batch size ({batch}) of an attention site from the graph inputs")


def _resolve_batch(src, args) -> int:
    if isinstance(src, int):
        return src
    i, d = src
    return int(args[i]) if d is None else int(args[i].shape[d])


def _inner_compile(inner: str, gm, example_inputs):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs)


def compile(model: nn.Module, method: str = "kivi", bits: int | None = None, *, heads: str = "full",
            capacity: int | None = None, strict: bool = True, backend: str = "inductor",
            dynamic: bool | None = True, parallel: str | None = None, **options) -> nn.Module:
    """Rewrite ``model``'s attention to keep its KV cache compressed with ``method``.

    model: any causal LM (transformers or plain nn.Module) whose forward Dynamo can capture.
    method / bits / options: the scheme (``kvpass.methods()``; ``bits`` is passed when given).
    calibration: for calibrated methods, a :class:`kvpass.Calibration` (or its directory) made for this
    model by :func:`kvpass.calibrate`; its options are the defaults, and conflicting ones are an error.
    heads: the head policy: "full" (every head keeps the whole context in ``method``), "duo" (DuoAttention:
    the retrieval heads named by the gates ``duo=`` — a duo calibration or its directory — keep the whole
    context in ``method``, the others only ``sink`` + ``recent`` tokens; ``retrieval=`` the fraction of
    retrieval heads, default 0.5) or "streaming" (StreamingLLM: every head keeps ``sink`` (64) + ``recent``
    (256) tokens at the model's dtype; ``method`` must be "fp16").
    capacity: tokens per sequence each cache is preallocated for (default: the model config's
    ``max_position_embeddings``, else 4096); appending beyond it raises CapacityError.
    strict: raise on an attention site that cannot be rewritten (else warn and leave it).
    backend: what compiles the rewritten graphs ("inductor", "aot_eager" or "eager").
    parallel: "sequence" slices every cache over the ranks of torch.distributed's default process group in
    blocks of ``block=`` (128) tokens, round robin; every rank compiles and runs the same model on the same
    inputs and gets the same outputs (:mod:`kvpass.distributed`). None: one process.
    Returns the same model, whose ``forward`` now runs the rewritten graphs; ``generate`` keeps working.
    """
    policy = {name: options.pop(name) for name in ("duo", "retrieval", "sink", "recent") if name in options}
    block = options.pop("block", None) if parallel is not None else None
    if parallel is not None:
        from .distributed import check_parallel
        check_parallel(method, heads, parallel)
    check_head_policy(method, heads, policy)
    if backend not in INNER_BACKENDS:
        raise KVPassError(f"backend must be one of {INNER_BACKENDS}, got {backend!r}")
    if bits is not None:
        options["bits"] = bits
    calibration = options.pop("calibration", None)
    if calibration is not None:
        from .fit import resolve_calibration
        options = resolve_calibration(model, method, calibration, options)
    scheme = get_scheme(method, **options)
    if scheme.needs_calibration and calibration is None:
        raise KVPassError(f"{method} needs a calibration made for this model: "
                          f"cal = kvpass.calibrate(model, {method!r}, ...); kvpass.compile(model, {method!r}, "
                          f"calibration=cal)")
    config = getattr(model, "config", None)
    if capacity is None:
        capacity = getattr(config, "max_position_embeddings", None) or 4096
    if parallel is not None:
        from .distributed import sequence_parallel
        scheme = sequence_parallel(scheme, parallel, block, int(capacity))
    scheme = apply_head_policy(model, scheme, heads, policy, int(capacity))
    if getattr(model, "_kvpass", None) is not None:
        raise KVPassError("this model is already compiled by kvpass; compile a fresh copy")
    expected = getattr(config, "num_hidden_layers", None)
    state = CompiledState(CacheManager(scheme, int(capacity)), strict, backend, expected)
    compiled_forward = torch.compile(model.forward, backend=KVPassBackend(state), dynamic=dynamic)

    @functools.wraps(model.forward)      # generate() inspects forward's signature (e.g. position_ids)
    def forward(*args, **kwargs):
        try:
            out = compiled_forward(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            # Dynamo wraps whatever the backend raises; a kvpass error (a site it cannot rewrite, say) is
            # the user's answer, so it surfaces as itself and can be caught as KVPassError
            if isinstance(e.inner_exception, KVPassError):
                raise e.inner_exception from None
            raise
        _check_coverage(state)
        return out

    model._kvpass = state
    model.forward = forward
    return model


def check_head_policy(method: str, heads: str, policy: dict) -> None:
    """Raise KVPassError for a head policy that cannot work whatever the model: an unknown policy or
    option, streaming heads with a compressing method, a retrieval ratio outside (0, 1]."""
    if heads not in HEAD_POLICIES:
        raise KVPassError(f"heads must be one of {HEAD_POLICIES}, got {heads!r}")
    allowed = {"full": set(), "duo": {"duo", "retrieval", "sink", "recent"}, "streaming": {"sink", "recent"}}[heads]
    extra = sorted(set(policy) - allowed)
    if extra:
        raise KVPassError(f"heads={heads!r} takes no option {', '.join(map(repr, extra))}")
    if heads == "streaming" and method != "fp16":
        raise KVPassError(f"heads='streaming' keeps each head's sink + recent tokens at the model's dtype; "
                          f"compressing that ring is not supported, so method must be 'fp16' (got {method!r}); "
                          f"for compressed retrieval heads use heads='duo'")
    if "retrieval" in policy:
        from .duo import retrieval_heads
        retrieval_heads(torch.ones(1), policy["retrieval"])


def apply_head_policy(model: nn.Module, scheme, heads: str, policy: dict, capacity: int):
    """``scheme`` under the head policy ``heads`` with its options ``policy`` (duo, retrieval, sink, recent);
    a streaming window larger than ``capacity`` is a ShapeError."""
    check_head_policy(scheme.name, heads, policy)
    if heads == "streaming":
        ring = get_scheme("streaming", **policy)
        ring.check_shape(CacheShape(1, 1, 1, capacity))
        return ring
    if heads == "duo":
        from .duo import resolve_gates
        gates = policy.pop("duo", None)
        if gates is None:
            raise KVPassError("heads='duo' needs the DuoAttention gates of this model: duo=kvpass.calibrate(model, "
                              "'duo', tokenizer=...), duo='path/to/gates', or duo='smollm2' (shipped)")
        gates = resolve_gates(gates)
        gates.check(model, "duo")
        duo = get_scheme("duo", inner=scheme, gates=gates, ratio=policy.pop("retrieval", 0.5), **policy)
        duo.ring.check_shape(CacheShape(1, 1, 1, capacity))
        return duo
    return scheme


def _check_coverage(state: CompiledState) -> None:
    """After a call: every attention layer must have been found (strict) — never a silent half-rewrite."""
    if not state.records:
        unknown = f" Attention-like but unrecognized: softmax in {', '.join(state.unmatched)}." \
            if state.unmatched else ""
        raise KVPassError("kvpass found no attention in this model. Its graphs contain: "
                          + "; ".join(state.census) + "." + unknown + " Known forms: "
                          "scaled_dot_product_attention, matmul/einsum/baddbmm -> softmax -> matmul over "
                          "(batch, heads, tokens, head_dim) tensors.")
    if state.strict and state.expected_layers and len(state.manager.sites) < state.expected_layers:
        found = sorted(state.manager.sites)
        raise KVPassError(f"kvpass rewrote {len(found)} of {state.expected_layers} attention layers "
                          f"(found: {', '.join(found)}); the others ran outside the captured graphs "
                          f"(graph breaks?) and would keep an uncompressed cache")
