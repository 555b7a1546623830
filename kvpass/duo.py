"""DuoAttention's gates (Xiao et al., 2024): which KV heads need the whole context (retrieval heads) and which
do with the attention sink and the recent tokens (streaming heads), found by optimization.

One gate alpha in [0, 1] per (layer, KV head). While the gates are optimized, every attention call of the
model returns alpha * full + (1 - alpha) * streaming attention, where streaming attention sees only the
first ``sink`` keys and the ``recent`` keys up to the query (:func:`mixed_attention`, registered with
transformers' attention interface); the model's weights stay frozen. The loss is the mean squared distance
of the final hidden states to the full model's on the positions that predict the passkey answer
(:mod:`kvpass.passkey` prompts with the answer appended) plus ``l1`` x mean |alpha|, so a gate falls unless
full attention matters for the answer. :func:`retrieval_heads` then binarizes the gates to a target fraction
of retrieval heads. ``kvpass.calibrate(model, "duo", ...)`` runs it all and returns a
:class:`~kvpass.calibration.Calibration` (gates per layer, sink/recent sizes, the model's fingerprint).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import KVPassError

ATTENTION_NAME = "kvpass_duo"
# gates kvpass ships, by model name (bench/duo_gates.py made them)
SHIPPED_GATES = {"smollm2": Path(__file__).resolve().parent / "gates" / "smollm2-duo"}
_ACTIVE: dict = {}          # the gates, sink and recent of the optimization running now


def streaming_mask(queries: int, keys: int, sink: int, recent: int, device=None) -> torch.Tensor:
    """(queries, keys) bool: the last ``queries`` positions each see the first ``sink`` keys and the keys
    at most ``recent - 1`` positions back (itself included), never a later key."""
    qpos = torch.arange(keys - queries, keys, device=device)[:, None]
    kpos = torch.arange(keys, device=device)[None, :]
    return (kpos <= qpos) & ((kpos < sink) | (qpos - kpos < recent))


def mixed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: query (B, Hq, T, D), key/value (B, Hkv, S, D) ->
    ((B, T, Hq, D), None) = gate * full + (1 - gate) * streaming attention, with the gate of
    ``module.layer_idx``'s KV head (its query heads share it)."""
    gates = _ACTIVE["gates"][module.layer_idx]
    hq, hkv, t, s = query.shape[1], key.shape[1], query.shape[2], key.shape[2]
    rep = hq // hkv
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    full = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
    stream = streaming_mask(t, s, _ACTIVE["sink"], _ACTIVE["recent"], query.device)
    if attention_mask is not None:        # the model's padding: bool (True = attend) or additive
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        keep = keep[..., :s]
        full, stream = full & keep, stream & keep
    out_full = F.scaled_dot_product_attention(query, k, v, attn_mask=full, scale=scaling)
    out_stream = F.scaled_dot_product_attention(query, k, v, attn_mask=stream, scale=scaling)
    g = gates.repeat_interleave(rep).to(query.dtype)[None, :, None, None]
    return (g * out_full + (1 - g) * out_stream).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def gated(model, gates: torch.Tensor, sink: int, recent: int):
    """Within the block, ``model``'s attention is :func:`mixed_attention` with ``gates`` (layers, kv heads)."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, mixed_attention)
    before = model.config._attn_implementation
    _ACTIVE.update(gates=gates, sink=sink, recent=recent)
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
        _ACTIVE.clear()


def optimize_gates(model, examples: list[tuple[torch.Tensor, int]], *, sink: int, recent: int, steps: int,
                   lr: float = 0.02, l1: float = 0.05, progress: bool = False) -> tuple[torch.Tensor, list[float]]:
    """Gates (layers, kv heads) float32 in [0, 1] for ``model`` (weights frozen, restored after).

    examples: (ids (T,) int64 = prompt + answer, answer_len); the hidden states of the positions that
    predict the answer tokens are matched to the full model's. ``steps`` Adam steps, one example each, in
    turn. Returns the gates and the loss of every step.
    """
    if steps < 1 or sink < 0 or recent < 1:
        raise KVPassError(f"steps and recent must be >= 1 and sink >= 0, got {steps}, {recent}, {sink}")
    from .calibration import config_geometry
    device = next(model.parameters()).device
    geo = config_geometry(model)
    layers, kv_heads = geo["num_layers"], geo["kv_heads"]
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    targets = []
    with torch.no_grad():
        for ids, n in examples:
            h = model(input_ids=ids[None].to(device), output_hidden_states=True, use_cache=False).hidden_states[-1]
            targets.append(h[0, -n - 1:-1].float())
    gates = torch.ones(layers, kv_heads, device=device, requires_grad=True)
    opt = torch.optim.Adam([gates], lr=lr)
    losses = []
    rounds = range(steps)
    if progress:
        from tqdm import tqdm
        rounds = tqdm(rounds, desc="duo gates", unit="step")
    try:
        with gated(model, gates, sink, recent):
            for step in rounds:
                (ids, n), want = examples[step % len(examples)], targets[step % len(examples)]
                h = model(input_ids=ids[None].to(device), output_hidden_states=True,
                          use_cache=False).hidden_states[-1][0, -n - 1:-1].float()
                loss = F.mse_loss(h, want) + l1 * gates.abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    gates.clamp_(0.0, 1.0)
                losses.append(float(loss.detach()))
    finally:
        for p, g in zip(model.parameters(), frozen):
            p.requires_grad_(g)
    return gates.detach().float().cpu(), losses


def retrieval_heads(gates: torch.Tensor, ratio: float) -> torch.Tensor:
    """(layers, kv heads) bool: the ``ratio`` fraction of heads (rounded, at least one) with the highest
    gates are retrieval heads, the others streaming. Raises :class:`KVPassError` for a ratio outside (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise KVPassError(f"the retrieval-head ratio must be in (0, 1], got {ratio!r}")
    flat = gates.flatten()
    n = max(1, round(ratio * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.argsort(descending=True, stable=True)[:n]] = True
    return keep.reshape(gates.shape)


def calibrate_duo(model, *, tokenizer=None, data=None, lengths=(1024,), depths=(0.1, 0.3, 0.5, 0.7, 0.9),
                  per_cell: int = 1, sink: int = 64, recent: int = 256, steps: int = 100, lr: float = 0.02,
                  l1: float = 0.05, seed: int = 0, progress: bool = True, texts: list[str] | None = None):
    """The gate optimization as a :class:`Calibration` (method "duo"): ``data`` — a list of
    :class:`~kvpass.passkey.PasskeySample` — or passkey prompts of ``lengths`` x ``depths`` made with
    ``tokenizer`` from ``texts`` (default: the calibration speeches; ``per_cell`` per length and depth).
    Options recorded: sink, recent; tensors: ``layers.<i>.gates``."""
    from .calibration import Calibration, model_fingerprint
    from .passkey import passkey_samples
    if data is None:
        if tokenizer is None:
            raise KVPassError("duo calibration needs passkey samples (data=...) or a tokenizer to make them")
        if texts is None:
            from .data import calib_texts
            # haystacks from the calibration speeches: the passkey evaluation draws its own from the held-out ones
            texts = calib_texts()
        data = passkey_samples(tokenizer, list(lengths), list(depths), per_cell=per_cell, texts=texts, seed=seed)
    examples = [(torch.cat([s.ids, s.answer]), len(s.answer)) for s in data]
    gates, losses = optimize_gates(model, examples, sink=sink, recent=recent, steps=steps, lr=lr, l1=l1,
                                   progress=progress)
    return Calibration(method="duo", options={"sink": sink, "recent": recent}, model=model_fingerprint(model),
                       tensors={f"layers.{i}.gates": g.contiguous() for i, g in enumerate(gates)},
                       meta={"steps": steps, "lr": lr, "l1": l1, "samples": len(examples),
                             "lengths": sorted({s.length for s in data}), "final_loss": losses[-1],
                             "first_loss": losses[0], "loss_finite": all(math.isfinite(x) for x in losses)})


def resolve_gates(gates):
    """A duo Calibration from itself, a shipped model name (``SHIPPED_GATES``) or a directory."""
    from .calibration import Calibration
    if isinstance(gates, Calibration):
        return gates
    if isinstance(gates, str) and gates in SHIPPED_GATES:
        path = SHIPPED_GATES[gates]
        if not path.is_dir():
            raise KVPassError(f"kvpass ships no duo gates for {gates} in this installation ({path} is missing)")
        return Calibration.load(path)
    return Calibration.load(gates)


def run_duo_calibration(output, *, lengths=(1024,), per_cell: int = 2, steps: int = 100, sink: int = 64,
                        recent: int = 256, lr: float = 0.02, l1: float = 0.05, model="smollm2", tokenizer=None,
                        text: str = "speeches", device: str = "cpu", dtype: str = "float32"):
    """``kvpass calibrate duo``: optimize the gates of ``model`` — ``smollm2``, a checkpoint directory (loaded
    on ``device`` in ``dtype``, with its tokenizer) or a loaded model with its ``tokenizer`` — on passkey
    prompts whose haystacks come from ``text`` (the built-in speeches before 2010, a file or a folder), save
    them to the directory ``output``, print their summary and the retrieval heads at ratio 0.5. Returns the
    :class:`~kvpass.calibration.Calibration`."""
    from .toolkit import check_model_name, load_model, load_texts
    if steps < 1 or sink < 0 or recent < 1 or per_cell < 1 or not lengths or min(lengths) < 64:
        raise KVPassError(f"steps, recent and samples must be >= 1, sink >= 0 and lengths >= 64 tokens; got "
                          f"steps={steps}, recent={recent}, samples={per_cell}, sink={sink}, lengths={list(lengths)}")
    if isinstance(model, str):
        check_model_name(model)
        texts = load_texts(text, "calib")
        loaded = load_model(model, device, dtype)
        model, tokenizer = loaded.model, loaded.require_tokenizer()
    else:
        texts = None if text == "speeches" else load_texts(text, "calib")
    gates = calibrate_duo(model, tokenizer=tokenizer, lengths=lengths, per_cell=per_cell, sink=sink,
                          recent=recent, steps=steps, lr=lr, l1=l1, texts=texts)
    path = gates.save(output)
    table = torch.stack([gates.layer(i)["gates"] for i in gates.layers()])
    keep = retrieval_heads(table, 0.5)
    print(gates.summary())
    print("retrieval heads at ratio 0.5 (layer: heads): " + "; ".join(
        f"{i}: {','.join(str(h) for h in row.nonzero().flatten().tolist()) or '-'}" for i, row in enumerate(keep)))
    print(f"saved to {path}")
    return gates
