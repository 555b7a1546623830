"""``kvpass.export``: the rewritten prefill and decode steps of a compiled model, as files another runtime runs.

A compiled model keeps its compressed cache in buffers it owns and feeds them to the graphs behind its
back. Export makes that state explicit. The model's forward (no cache of its own: ``use_cache=False``,
positions given) is captured with torch.export, every attention site is rewritten by the same pattern
library and rewrite as ``kvpass.compile`` uses, and the result is wrapped in two functional steps:

    prefill(input_ids (1, T) int64)            -> (logits (1, 1, V), *state)       T dynamic, 2..capacity-1
    decode(input_ids (1, 1) int64, *state)     -> (logits (1, 1, V), *state')

``state`` is, per attention layer in order, that layer's cache buffers (the scheme's layout, sorted by
name, sized for ``capacity`` tokens) then its length (0-d int64): the tokens held, which is also the
position of the next token (ONNX codebook schemes take prompts of at least ``sink + 1`` tokens: their decode
translation appends past the sink). Prefill makes a fresh cache (zeros, codebooks as constants), so a runner needs
no knowledge of the layout: it feeds decode's outputs back as its inputs. Logits are the last position's.

``format="pt2"`` saves ``prefill.pt2`` and ``decode.pt2`` (``torch.export.save``); the ``kvpass::attention``
op stays in them by name (functionalized), so loading needs ``import kvpass``. ``format="onnx"`` replaces the
op by its ONNX translation for the scheme (:mod:`kvpass.onnx_ops`) and saves ``prefill.onnx`` and
``decode.onnx``, which onnxruntime runs alone (:mod:`kvpass.onnx_generate`). Both write ``kvpass_export.json``
(the scheme, capacity, state names, shapes and dtypes).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os

import torch
from torch import nn

from .errors import KVPassError
from .methods import CacheShape
from .ops import scheme_spec

FORMATS = ("pt2", "onnx")
MANIFEST = "kvpass_export.json"
ATTENTION = torch.ops.kvpass.attention.default


class ExportError(KVPassError):
    """A model, scheme or attention site kvpass cannot export; the message names the op and the scheme.
    Raised before any file is written."""


def export(model: nn.Module, output_dir: str, format: str = "pt2", *, capacity: int | None = None,
           check: bool = True) -> dict:
    """Write the prefill and decode steps of ``model`` (returned by :func:`kvpass.compile`) to ``output_dir``.

    format: "pt2" (``prefill.pt2``/``decode.pt2``, torch.export programs keeping ``kvpass::attention``) or
    "onnx" (``prefill.onnx``/``decode.onnx``, standard ONNX ops; onnxruntime runs them).
    capacity: tokens the exported cache holds (default: the compiled model's capacity); the prompt plus the
    generated tokens must fit. Smaller is faster for ONNX, whose steps pass the whole cache in and out.
    check: ONNX only: run ``onnx.checker`` on both files.
    Batch 1; the model's dtype. Returns the manifest written to ``kvpass_export.json``. Raises
    :class:`ExportError` (naming the op and scheme) for what cannot be exported, before writing anything.
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    plan = plan_export(model, capacity, format)
    steps = {mode: build_step(model, plan, mode, format) for mode in ("prefill", "decode")}
    if format == "pt2":        # every program is made before the first file is written: no half exports
        programs = {mode: export_program(step, mode, plan) for mode, step in steps.items()}
    else:
        from .onnx_ops import onnx_program
        programs = {mode: onnx_program(step, mode, plan) for mode, step in steps.items()}
    os.makedirs(output_dir, exist_ok=True)
    files = {}
    for mode, program in programs.items():
        path = os.path.join(output_dir, f"{mode}.{format}")
        if format == "pt2":
            torch.export.save(program, path)
        else:
            program.save(path)
            if check:
                import onnx
                onnx.checker.check_model(path, full_check=True)
        files[mode] = os.path.basename(path)
    manifest = dict(plan.manifest(), format=format, files=files)
    with open(os.path.join(output_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


@dataclasses.dataclass
class ExportPlan:
    """What the exported steps hold: the scheme as the graphs name it, the cache capacity and geometry."""

    scheme: object            # the compiled model's scheme (a codebook scheme without its calibration object)
    capacity: int
    dtype: torch.dtype
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    original: object = None   # the compiled scheme itself (allocates the fresh cache, codebooks included)

    def shape(self, layer: int) -> CacheShape:
        return CacheShape(1, self.kv_heads, self.head_dim, self.capacity, self.dtype, layer)

    def spec(self, layer: int) -> str:
        return scheme_spec(self.scheme, layer, self.capacity)

    def names(self) -> list[str]:
        """State names in the order of the steps' inputs/outputs."""
        out = []
        for i in range(self.layers):
            out += [f"layer{i}.{n}" for n in sorted(self.scheme.full_layout(self.shape(i)))] + [f"layer{i}.length"]
        return out

    def manifest(self) -> dict:
        specs = []
        for i in range(self.layers):
            layout = self.scheme.full_layout(self.shape(i))
            specs += [dict(name=f"layer{i}.{n}", shape=list(layout[n].shape), dtype=str(layout[n].dtype))
                      for n in sorted(layout)]
            specs.append(dict(name=f"layer{i}.length", shape=[], dtype="torch.int64"))
        return dict(scheme=self.scheme.describe(), method=self.scheme.name, capacity=self.capacity,
                    dtype=str(self.dtype), layers=self.layers, vocab=self.vocab, batch=1, state=specs,
                    inputs={"prefill": ["input_ids"], "decode": ["input_ids"] + [s["name"] for s in specs]},
                    outputs=["logits"] + [s["name"] for s in specs])


def plan_export(model: nn.Module, capacity: int | None, format: str) -> ExportPlan:
    """Check that ``model`` can be exported in ``format`` and fix the exported cache; raises ExportError."""
    st = getattr(model, "_kvpass", None)
    if st is None:
        raise ExportError("kvpass.export takes a model returned by kvpass.compile")
    scheme = st.manager.scheme
    op = "kvpass::attention"
    if scheme.policy:
        raise ExportError(f"{op} with the {scheme.name!r} head policy cannot be exported yet (its per-head "
                          f"split lives in Python objects); compile with heads='full' to export")
    options = scheme.options()
    if "calibration" in options and hasattr(scheme, "vq_bits"):
        # codebook schemes read only their codebooks, which travel in the cache buffers
        scheme = dataclasses.replace(scheme, calibration=None)
    elif any(v is not None and not isinstance(v, (bool, int, float, str, torch.dtype)) for v in options.values()):
        raise ExportError(f"{op} with {scheme.name}: its calibration is a Python object the exported op would "
                          f"need at run time; exporting {scheme.name} is not supported")
    if format == "onnx":
        from .onnx_ops import check_onnx_scheme
        check_onnx_scheme(scheme)
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None) if config is not None else None
    if window and getattr(config, "use_sliding_window", True) is not False:
        raise ExportError(f"{op}: sliding-window attention (window {window}) is not exportable yet: the exported "
                          f"decode step would attend over the whole cache")
    from .calibration import config_geometry
    geo = config_geometry(model)
    p = next(model.parameters())
    cap = int(capacity or st.manager.capacity)
    plan = ExportPlan(scheme, cap, p.dtype, int(geo["num_layers"]), geo["kv_heads"], geo["head_dim"],
                      int(geo["vocab_size"]), st.manager.scheme)
    for i in range(plan.layers):
        try:
            plan.original.check_shape(plan.shape(i))       # (a codebook scheme checks its calibration fits)
        except KVPassError as e:
            raise ExportError(f"{op} with {scheme.name}: {e}") from e
    return plan


class _Forward(nn.Module):
    """The model's own forward (not the compiled one), without a cache: positions are inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters

    def forward(self, input_ids, position_ids):
        kw = {"logits_to_keep": 1} if self.keep else {}
        out = type(self.model).forward(self.model, input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                       **kw)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1:]


def rewritten_graph(model: nn.Module, plan: ExportPlan, mode: str) -> torch.fx.GraphModule:
    """The model's forward captured by torch.export and rewritten: a GraphModule taking
    (input_ids, position_ids, *state, start) — state as in the module docstring, start the 0-d int64 position
    of the first token — and returning (logits,), every attention a ``kvpass::attention`` call."""
    from .patterns import find_sites
    from .rewrite import rewrite_site
    t = 8 if mode == "prefill" else 1
    ids = torch.zeros(1, t, dtype=torch.long, device=next(model.parameters()).device)
    pos = torch.arange(t, device=ids.device)[None]
    dyn = None
    if mode == "prefill":
        dim = torch.export.Dim("T", min=2, max=plan.capacity - 1)
        dyn = ({1: dim}, {1: dim})
    with torch.no_grad():
        ep = torch.export.export(_Forward(model), (ids, pos), dynamic_shapes=dyn, strict=False)
    gm = ep.module()
    graph = gm.graph
    sites = find_sites(graph)
    bad = [s for s in sites if s.problem]
    if bad or len(sites) != plan.layers:
        why = "; ".join(f"{s.module}: {s.problem}" for s in bad) or f"found {len(sites)} of {plan.layers} layers"
        raise ExportError(f"kvpass::attention cannot replace every attention of the exported {mode} graph ({why})")
    for i, s in enumerate(sorted(sites, key=lambda s: s.layer if s.layer is not None else 0)):
        rewrite_site(graph, s, plan.spec(i), len(plan.scheme.full_layout(plan.shape(i))), tag=f"l{i}",
                     pre_rope=plan.scheme.key_space == "pre_rope")
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        start = graph.placeholder("kvpass_start")
    for node in graph.nodes:
        if node.target is ATTENTION:
            args = list(node.args)
            old = args[5]
            args[5] = start
            if mode == "decode":
                args[6] = None           # the model's mask covers its one new token only: the op masks the cache
            node.args = tuple(args)
            if not old.users:
                graph.erase_node(old)
    graph._codegen = torch.fx.graph.CodeGen()
    graph.eliminate_dead_code()
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


def fresh_state(plan: ExportPlan, device="cpu") -> list[torch.Tensor]:
    """A new, empty cache in the steps' state order (zeros; codebooks filled by the scheme)."""
    out = []
    for i in range(plan.layers):
        st = plan_scheme_allocate(plan, i, device)
        out += [st.buffers[n] for n in sorted(st.buffers)] + [st.length_tensor]
    return out


def plan_scheme_allocate(plan: ExportPlan, layer: int, device):
    """The compiled scheme's fresh state for ``layer`` (the calibrated scheme fills its codebooks)."""
    return plan.original.allocate(plan.shape(layer), device)


class Step(nn.Module):
    """One exported step around a rewritten graph: ``prefill`` (fresh cache) or ``decode`` (cache in/out).
    See the module docstring for the signatures."""

    def __init__(self, gm: torch.fx.GraphModule, plan: ExportPlan, mode: str):
        super().__init__()
        self.gm, self.mode, self.n = gm, mode, len(plan.names())
        self.shapes = []
        init = fresh_state(plan)
        for j, t in enumerate(init):
            if t.dim() and bool(t.any()):
                self.register_buffer(f"init{j}", t.clone())
                self.shapes.append(None)
            else:
                self.shapes.append((tuple(t.shape), t.dtype))
        self.length_index = next(j for j, name in enumerate(plan.names()) if name.endswith(".length"))

    def _fresh(self, device) -> list[torch.Tensor]:
        return [getattr(self, f"init{j}").clone() if s is None else torch.zeros(s[0], dtype=s[1], device=device)
                for j, s in enumerate(self.shapes)]

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor):
        if self.mode == "prefill":
            state = self._fresh(input_ids.device)
            start = torch.zeros((), dtype=torch.long, device=input_ids.device)
        else:
            state = [s.clone() for s in state]
            start = state[self.length_index].clone()
        t = input_ids.shape[1]
        pos = (start + torch.arange(t, device=input_ids.device)).unsqueeze(0)
        logits = self.gm(input_ids, pos, *state, start)[0]
        return (logits, *state)


def build_step(model: nn.Module, plan: ExportPlan, mode: str, format: str) -> Step:
    """The :class:`Step` of ``mode`` ("prefill" / "decode"); for ONNX its attention calls are the scheme's
    functional translation."""
    gm = rewritten_graph(model, plan, mode)
    if format == "onnx":
        from .onnx_ops import functionalize
        functionalize(gm, plan, mode)
    return Step(gm, plan, mode).eval()


def example_inputs(plan: ExportPlan, mode: str, tokens: int = 8) -> tuple:
    """Example arguments of a step: ``tokens`` prompt ids for prefill, one id and a fresh cache for decode."""
    if mode == "prefill":
        return (torch.zeros(1, tokens, dtype=torch.long),)
    return (torch.zeros(1, 1, dtype=torch.long), *fresh_state(plan))


def export_program(step: Step, mode: str, plan: ExportPlan) -> torch.export.ExportedProgram:
    """torch.export of a step: prefill with a dynamic prompt length (2..capacity-1), decode static."""
    args = example_inputs(plan, mode)
    dyn = None
    if mode == "prefill":
        dyn = ({1: torch.export.Dim("T", min=2, max=plan.capacity - 1)},)
    with torch.no_grad():
        return torch.export.export(step, args, dynamic_shapes=dyn, strict=False)


def load_pt2(directory: str) -> tuple[nn.Module, nn.Module]:
    """The (prefill, decode) modules of a ``format="pt2"`` export (``torch.export.load(...).module()``)."""
    with open(os.path.join(directory, MANIFEST)) as f:
        files = json.load(f)["files"]
    return tuple(torch.export.load(os.path.join(directory, files[m])).module() for m in ("prefill", "decode"))


@torch.no_grad()
def pt2_generate(directory: str, input_ids: torch.Tensor, max_new_tokens: int, *, return_logits: bool = False):
    """Greedy decoding from a ``format="pt2"`` export: input_ids (1, T) int64 -> (1, max_new_tokens) int64
    tokens (and, with ``return_logits``, their logits (1, max_new_tokens, vocab)). Needs ``import kvpass``
    (the programs call ``kvpass::attention``)."""
    prefill, decode = load_pt2(directory)
    logits, *state = prefill(input_ids)
    tokens, seen = [logits[:, -1].argmax(-1, keepdim=True)], [logits[:, -1]]
    for _ in range(max_new_tokens - 1):
        logits, *state = decode(tokens[-1], *state)
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
        seen.append(logits[:, -1])
    out = torch.cat(tokens, dim=1)
    return (out, torch.stack(seen, dim=1)) if return_logits else out


@torch.no_grad()
def reference_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int):
    """What the exports must reproduce: greedy decoding by the kvpass-compiled ``model`` itself (PyTorch, its
    own compressed cache). Returns (tokens (1, max_new_tokens) int64, logits (1, max_new_tokens, vocab))."""
    from .perplexity import _returned_cache, cache_argument
    arg = cache_argument(model)
    out = model(input_ids=input_ids, use_cache=True)
    cache = _returned_cache(out)
    seen = [out.logits[:, -1]]
    tokens = [seen[-1].argmax(-1, keepdim=True)]
    for _ in range(max_new_tokens - 1):
        out = model(input_ids=tokens[-1], **{arg: cache}, use_cache=True)
        cache = _returned_cache(out)
        seen.append(out.logits[:, -1])
        tokens.append(seen[-1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1), torch.stack(seen, dim=1)
