"""Collect per-layer attention activations (and their Fisher information) from any model the graph pass
understands — no per-model code.

:func:`collect_activations` compiles ``model.forward`` with a capture backend: every attention site
``kvpass.patterns.find_sites`` can rewrite gets *taps* on its query, new keys/values and (with RoPE) the
keys before rotary. The graph then runs eagerly, so the LM loss can be backpropagated and each tap also
receives the gradient at its tensor. Calibrated schemes (KVQuant, QAQ, CQ, MILLION) fit their codebooks,
scales and thresholds on the returned :class:`Activations`.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .errors import KVPassError

KV_TAPS = ("k", "v", "k_pre")      # taps whose gradient is recorded (Fisher information)


@dataclass
class LayerActivations:
    """What one attention layer saw on the calibration tokens, N tokens in token-major order.

    k, v: (N, Hkv, D) float32 — new keys after RoPE (as the cache stores them) and values.
    k_pre: (N, Hkv, D) float32 keys before rotary embedding, or None if the site has no RoPE kvpass sees.
    k_fisher, v_fisher, k_pre_fisher: like k, v, k_pre — squared gradient of the LM loss w.r.t. each
    element (diagonal Fisher information), or None when collected with ``fisher=False`` (or no k_pre).
    q_norm: (N, Hq) float32 L2 norm of each query head vector (post-RoPE; RoPE keeps norms).
    positions: (N,) int64 token position in its sequence; rows: (N,) int64 the sequence (input row).
    module: the attention module's path ("model.layers.3.self_attn", "" if unknown); rope: "rotate_half",
    "partial" or "none".
    """

    k: torch.Tensor
    v: torch.Tensor
    k_pre: torch.Tensor | None
    k_fisher: torch.Tensor | None
    v_fisher: torch.Tensor | None
    k_pre_fisher: torch.Tensor | None
    q_norm: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    module: str = ""
    rope: str = "none"

    @property
    def tokens(self) -> int:
        return self.k.shape[0]


@dataclass
class Activations:
    """Activations of every attention layer (``layers``: layer number -> :class:`LayerActivations`).

    model: :func:`kvpass.calibration.model_fingerprint` of the model; sequences / seq_len: the input's
    (n, T); sink: leading positions of each sequence left out (attention sinks); max_tokens / seed: the
    subsampling (the same token subset for every layer); fisher: whether gradients were collected;
    loss: mean next-token cross-entropy over the input (a sanity number); meta: the same as a JSON-able
    dict (:meth:`describe`), ready for a calibration's meta.
    """

    layers: dict[int, LayerActivations]
    model: dict
    sequences: int
    seq_len: int
    sink: int
    max_tokens: int
    seed: int
    fisher: bool
    loss: float
    meta: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """JSON-able summary to store in a calibration's meta."""
        n = next(iter(self.layers.values())).tokens if self.layers else 0
        return {"sequences": self.sequences, "seq_len": self.seq_len, "sink": self.sink, "tokens": n,
                "max_tokens": self.max_tokens, "seed": self.seed, "fisher": self.fisher,
                "loss": round(self.loss, 4)}


def collect_activations(model: torch.nn.Module, input_ids: torch.Tensor, *, fisher: bool = True,
                        max_tokens: int = 4096, sink: int = 1, batch_size: int = 1, progress: bool = True,
                        seed: int = 0) -> Activations:
    """Run ``model`` on ``input_ids`` and record every attention layer's q / k / v (and Fisher information).

    model: a causal LM whose forward takes the token ids as its first argument and returns logits
    (a tensor, a tuple starting with them, or an output with ``.logits``); its parameters are frozen
    during the run and restored after, and it runs in eval mode.
    input_ids: LongTensor (n, T), T >= 2, on the model's device.
    fisher: also backpropagate the LM loss — the sum of next-token cross-entropies of every row (a sum,
    not a mean, so that values do not depend on batching or length) — and record squared gradients.
    max_tokens: at most this many tokens are kept per layer, a uniform random subset (seeded by ``seed``,
    the same tokens for every layer) of the n * (T - sink) candidates.
    sink: the first ``sink`` positions of every sequence are excluded (KVQuant keeps the attention sink
    in full precision and out of calibration).
    batch_size: rows per forward/backward pass.
    returns: :class:`Activations`. Raises KVPassError if the model has no attention kvpass can rewrite
    or some layers ran outside the captured graphs.
    """
    from .calibration import model_fingerprint

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise KVPassError(f"input_ids must be a LongTensor (n, T), got "
                          f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
    n, t = input_ids.shape
    if t < 2 or n < 1:
        raise KVPassError(f"input_ids must hold at least one sequence of 2 tokens, got {(n, t)}")
    for name, value, lo in (("max_tokens", max_tokens, 1), ("sink", sink, 0), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise KVPassError(f"{name} must be an int >= {lo}, got {value!r}")
    if sink >= t:
        raise KVPassError(f"sink={sink} leaves no tokens of sequences of length {t}")
    if getattr(model, "_kvpass", None) is not None:
        raise KVPassError("this model is already compiled by kvpass (its attention is rewritten); collect "
                          "calibration activations from the uncompiled model")
    rec = _Recorder(fisher, _select(n, t, sink, max_tokens, seed), t)
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    grads = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    total_loss, total_count = 0.0, 0
    torch._dynamo.reset()
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        model.eval()
        forward = torch.compile(model.forward, backend=_CaptureBackend(rec), dynamic=False)
        bar = _progress(range(0, n, batch_size), progress)
        for start in bar:
            ids = input_ids[start:start + batch_size]
            rec.begin(start, ids.shape[0])
            with torch.enable_grad() if fisher else torch.no_grad():
                logits = _logits(forward(ids, **kwargs))
                if not rec.data:
                    raise _no_attention(rec)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
                if fisher:
                    if not loss.requires_grad:
                        raise KVPassError("the loss does not depend on the tapped keys/values: no gradient "
                                          "reaches the attention (is the model's forward detached?)")
                    loss.backward()
            rec.end()
            total_loss += float(loss.detach())
            total_count += ids.shape[0] * (t - 1)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total_loss / total_count:.3f}")
    finally:
        torch._dynamo.reset()
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(was_training)
    layers = rec.result()
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(expected, int) and len(layers) < expected:
        raise KVPassError(f"captured {len(layers)} of {expected} attention layers (found: "
                          f"{sorted(layers)}); the others ran outside the captured graphs (graph breaks?) or "
                          f"could not be rewritten: {'; '.join(rec.problems) or 'no site found'}")
    acts = Activations(layers, model_fingerprint(model), n, t, sink, max_tokens, seed, fisher,
                       total_loss / max(1, total_count))
    acts.meta.update(acts.describe())
    return acts


def _no_attention(rec: "_Recorder") -> KVPassError:
    return KVPassError("kvpass found no attention it can rewrite in this model: "
                       + ("; ".join(rec.problems) or "no attention site in the captured graphs"))


# -- the backend ------------------------------------------------------------------------------------

class _CaptureBackend:
    """torch.compile backend: tap every rewritable site of each graph, run the graph eagerly."""

    def __init__(self, recorder: "_Recorder"):
        self.rec = recorder

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from .compiler import copy_graph_module
        from .patterns import find_sites

        gm = copy_graph_module(gm)          # Dynamo still owns the graph it handed us
        graph = gm.graph
        for site in find_sites(graph):
            where = site.module or site.node.name
            if site.problem is not None:
                self.rec.problems.append(f"{where}: {site.problem}")
                warnings.warn(f"kvpass capture: skipping {where}: {site.problem}")
                continue
            uid = self.rec.new_site(site.layer, site.module, site.rope)
            taps = [("q", site.q), ("k", site.k_new), ("v", site.v_new)]
            if site.k_pre_rope is not None:
                taps.append(("k_pre", site.k_pre_rope))
            for name, node in taps:
                _insert_tap(graph, node, self.rec.tap, uid, name)
        graph.lint()
        gm.recompile()
        return gm.forward


def _insert_tap(graph: torch.fx.Graph, node: Node, fn, uid: int, name: str) -> None:
    """Put ``fn(node, uid, name)`` right after ``node`` and make every other user read its output."""
    with graph.inserting_after(node):
        tap = graph.call_function(fn, (node, uid, name))
    tap.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val", "nn_module_stack")})
    node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)


# -- recording --------------------------------------------------------------------------------------

class _Recorder:
    """Receives tap calls; keeps the selected tokens of each layer's tensors and their gradients."""

    def __init__(self, fisher: bool, selection: torch.Tensor, seq_len: int):
        self.fisher = fisher
        self.selection = selection               # sorted flat indices row * T + position
        self.seq_len = seq_len
        self.sites: list[tuple[int | None, str, str]] = []     # uid -> (layer, module, rope)
        self.problems: list[str] = []
        self.data: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.info: dict[int, tuple[str, str]] = {}
        self.index: dict[int, list[torch.Tensor]] = {}

    def new_site(self, layer: int | None, module: str, rope: str) -> int:
        self.sites.append((layer, module, rope))
        return len(self.sites) - 1

    def begin(self, row0: int, rows: int) -> None:
        t = self.seq_len
        sel = self.selection
        sel = sel[(sel >= row0 * t) & (sel < (row0 + rows) * t)]
        self.local = sel - row0 * t                # indices into this batch's (B*T) tokens
        self.global_ = sel
        self.order: list[int] = []                # uids in order of first appearance in this pass
        self.expected: list[tuple[int, str]] = []
        self.got_grad: set[tuple[int, str]] = set()

    def layer_of(self, uid: int) -> int:
        layer = self.sites[uid][0]
        if uid not in self.order:
            self.order.append(uid)
        return layer if layer is not None else self.order.index(uid)

    def tap(self, x: torch.Tensor, uid: int, name: str) -> torch.Tensor:
        """Called from the graph with q (B, Hq, T, D) or k/v/k_pre (B, Hkv, T, D)."""
        layer = self.layer_of(uid)
        _, module, rope = self.sites[uid]
        self.info.setdefault(layer, (module, rope))
        if name == "k":
            self.index.setdefault(layer, []).append(self.global_)
        store = self.data.setdefault(layer, {})
        with torch.no_grad():
            flat = self._tokens(x)
            if name == "q":
                store.setdefault("q_norm", []).append(flat.norm(dim=-1).cpu())
                return x
            store.setdefault(name, []).append(flat.cpu())
        if not self.fisher:
            return x
        y = x if x.requires_grad else x.detach().requires_grad_()
        self.expected.append((layer, name))

        def hook(grad: torch.Tensor) -> None:
            if (layer, name) not in self.got_grad:
                self.got_grad.add((layer, name))
                store.setdefault(f"{name}_fisher", []).append(self._tokens(grad).square().cpu())
        y.register_hook(hook)
        return y

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> the selected tokens' (n, H, D) float32, token-major."""
        b, h, t, d = x.shape
        flat = x.detach().float().transpose(1, 2).reshape(b * t, h, d)
        return flat[self.local.to(x.device)]

    def end(self) -> None:
        for layer, name in self.expected:           # no gradient reached it: the loss ignores it
            if (layer, name) not in self.got_grad:
                ref = self.data[layer][name][-1]
                self.data[layer].setdefault(f"{name}_fisher", []).append(torch.zeros_like(ref))

    def result(self) -> dict[int, LayerActivations]:
        out = {}
        t = self.seq_len
        for layer in sorted(self.data):
            d = {k: torch.cat(v) for k, v in self.data[layer].items()}
            idx = torch.cat(self.index[layer])
            module, rope = self.info[layer]
            out[layer] = LayerActivations(
                k=d["k"], v=d["v"], k_pre=d.get("k_pre"), k_fisher=d.get("k_fisher"),
                v_fisher=d.get("v_fisher"), k_pre_fisher=d.get("k_pre_fisher"), q_norm=d["q_norm"],
                positions=idx % t, rows=idx // t, module=module, rope=rope)
        return out


def _select(n: int, t: int, sink: int, max_tokens: int, seed: int) -> torch.Tensor:
    """Sorted flat indices (row * T + position) of the kept tokens: positions >= sink, at most
    max_tokens of them, chosen uniformly at random with ``seed``."""
    cand = (torch.arange(n).unsqueeze(1) * t + torch.arange(sink, t)).reshape(-1)
    if cand.numel() > max_tokens:
        gen = torch.Generator().manual_seed(seed)
        cand = cand[torch.randperm(cand.numel(), generator=gen)[:max_tokens]].sort().values
    return cand


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise KVPassError(f"cannot find the logits in the model's output ({type(out).__name__}); the forward "
                      f"must return logits, a tuple starting with them, or an object with .logits")


def _progress(it, enabled: bool):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc="calibration activations", unit="batch", total=len(it))


__all__ = ["Activations", "LayerActivations", "collect_activations"]
