"""Passkey retrieval (a needle in a haystack) built from the shipped speeches, and its accuracy.

A sample is a prompt of exactly ``length`` tokens: an instruction, haystack text (consecutive tokens of the
speeches, from a seeded random place), the needle — "The pass key is 71432. Remember it. 71432 is the pass
key." — at a fraction ``depth`` of the haystack, more haystack, then the question "What is the pass key?
The pass key is". The answer is the key's tokens as the model should continue. A model retrieves the key
when its greedy continuation starts with exactly those tokens. This is the synthetic data DuoAttention
optimizes its gates on, and the evaluation of ``kvpass eval passkey``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .errors import KVPassError

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about it.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    """One prompt: ``ids`` (length,) int64, the expected continuation ``answer`` (n,) int64, the ``key``
    (digits), where the needle starts (``needle_at``, a token index) and the requested ``depth``."""

    ids: torch.Tensor
    answer: torch.Tensor
    key: str
    depth: float
    needle_at: int

    @property
    def length(self) -> int:
        return self.ids.shape[0]

    def __repr__(self) -> str:
        return (f"PasskeySample(length={self.length}, depth={self.depth}, key={self.key!r}, "
                f"needle_at={self.needle_at})")


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_samples(tokenizer, lengths, depths, per_cell: int = 1, *, texts: list[str] | None = None,
                    digits: int = 5, seed: int = 0) -> list[PasskeySample]:
    """``per_cell`` samples for every (length, depth): prompts of exactly ``length`` tokens, the needle at
    ``depth`` (0 = right after the instruction, 1 = just before the question) of the haystack.

    tokenizer: a HF tokenizer (called as ``tokenizer(text, add_special_tokens=False)``); texts: the haystack
    source (default: the held-out speeches, :func:`kvpass.data.speeches`); keys of ``digits`` digits and
    haystack offsets are drawn from ``seed``. Raises :class:`KVPassError` for a length too short to hold the
    instruction, needle and question, a depth outside [0, 1], or too little text.
    """
    from .data import speeches, token_stream
    depths = [float(d) for d in depths]
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise KVPassError(f"depths must lie in [0, 1], got {depths}")
    if per_cell < 1 or digits < 1:
        raise KVPassError(f"per_cell and digits must be >= 1, got {per_cell} and {digits}")
    if texts is None:
        texts = [s.text for s in speeches("eval")]
    stream = token_stream(tokenizer, texts)
    rng = random.Random(seed)
    head, question = _tokens(tokenizer, INSTRUCTION), _tokens(tokenizer, QUESTION)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                key = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(digits - 1))
                needle = _tokens(tokenizer, NEEDLE.format(key=key))
                fill = length - len(head) - len(needle) - len(question)
                if fill < 0:
                    raise KVPassError(f"a passkey prompt needs at least {length - fill} tokens for the "
                                      f"instruction, needle and question; length {length} is too short")
                if fill > len(stream):
                    raise KVPassError(f"the haystack text has {len(stream)} tokens, fewer than the {fill} a "
                                      f"{length}-token prompt needs")
                start = rng.randint(0, len(stream) - fill)
                hay = stream[start:start + fill]
                cut = round(depth * fill)
                ids = head + hay[:cut] + needle + hay[cut:] + question
                out.append(PasskeySample(torch.tensor(ids, dtype=torch.long),
                                         torch.tensor(_tokens(tokenizer, " " + key), dtype=torch.long),
                                         key, depth, len(head) + cut))
    return out


@torch.no_grad()
def retrieves(model, sample: PasskeySample, chunk: int | None = None) -> bool:
    """Whether ``model``'s greedy continuation of the sample's prompt starts with the answer tokens (the
    model's own cache across steps: plain transformers or kvpass-compiled). ``chunk``: feed the prompt
    ``chunk`` tokens at a time (chunked prefill: a streaming head then never attends the whole prompt)."""
    from .perplexity import _returned_cache, cache_argument
    device = next(model.parameters()).device
    arg = cache_argument(model)
    ids = sample.ids[None].to(device)
    step = ids.shape[1] if chunk is None else chunk
    with _no_duck_shapes():
        out = model(input_ids=ids[:, :step], use_cache=True)
        for start in range(step, ids.shape[1], step):
            out = model(input_ids=ids[:, start:start + step], use_cache=True, **{arg: _returned_cache(out)})
        for i, want in enumerate(sample.answer.tolist()):
            token = int(out.logits[0, -1].argmax())
            if token != want:
                return False
            if i + 1 < len(sample.answer):
                out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True,
                            **{arg: _returned_cache(out)})
    return True


def _no_duck_shapes():
    """Dynamo's shape symbols kept apart while a prompt is fed: by default sizes equal at a trace share a symbol
    (in a chunked prefill, the first cached chunk's length = the cache's length = its offset in the prompt), so
    a torch.compile'd model would trace its forward once more at the next chunk. Plain models: no effect."""
    import contextlib

    from torch.fx.experimental import _config
    return _config.patch(use_duck_shape=False) if hasattr(_config, "use_duck_shape") else contextlib.nullcontext()


def passkey_accuracy(model, samples: list[PasskeySample], progress: bool | str = False,
                     chunk: int | None = None) -> list[dict]:
    """Per (length, depth): {"length", "depth", "accuracy" (fraction retrieved), "samples"} in the samples'
    order of first appearance. ``progress``: a bar (labelled by the string, if one); ``chunk``: as in
    :func:`retrieves`."""
    cells: dict[tuple[int, float], list[bool]] = {}
    items = samples
    if progress:
        from tqdm import tqdm
        items = tqdm(samples, desc=progress if isinstance(progress, str) else "passkey", unit="prompt")
    for s in items:
        cells.setdefault((s.length, s.depth), []).append(retrieves(model, s, chunk))
    return [{"length": n, "depth": d, "accuracy": sum(hits) / len(hits), "samples": len(hits)}
            for (n, d), hits in cells.items()]


@dataclass(frozen=True)
class Setup:
    """One cache configuration of a passkey comparison: ``kvpass.compile(model, method, heads=heads,
    **options, **policy)`` shown as ``label``."""

    label: str
    method: str
    options: dict
    heads: str = "full"
    policy: dict | None = None


def evaluate_setups(model, samples: list[PasskeySample], setups: list[Setup], *, capacity: int,
                    chunk: int | None = None) -> list[dict]:
    """Passkey accuracy of each setup on the same ``samples``: a fresh copy of ``model`` compiled per setup
    (eager backend, ``capacity`` tokens). Rows {"setup", "method", "heads", "length", "depth", "accuracy",
    "samples"}."""
    import copy

    from .compiler import compile as kvpass_compile
    rows = []
    for st in setups:
        torch._dynamo.reset()
        compiled = kvpass_compile(copy.deepcopy(model), st.method, heads=st.heads, backend="eager",
                                  capacity=capacity, **st.options, **(st.policy or {}))
        for r in passkey_accuracy(compiled, samples, progress=st.label, chunk=chunk):
            rows.append({"setup": st.label, "method": st.method, "heads": st.heads, **r})
        del compiled
    return rows


def run_passkey_eval(method: str = "kivi", options: dict | None = None, lengths=(512, 1024),
                     depths=(0.1, 0.5, 0.9), samples: int = 2, seed: int = 0, calibration=None,
                     output=None, heads: str = "full", policy: dict | None = None,
                     chunk: int | None = None, model_name: str = "smollm2", device: str = "cpu",
                     dtype: str = "float32") -> list[dict]:
    """``kvpass eval passkey``: SmolLM2-135M-Instruct's passkey accuracy per (length, depth) with an fp16
    cache and with ``method`` (``options``; ``calibration`` — a Calibration or its directory — for the
    calibrated methods) under the head policy ``heads`` (``policy``: duo= gates or "smollm2" for the shipped
    ones, retrieval=, sink=, recent=), both through ``kvpass.compile`` on the same prompts, fed ``chunk``
    tokens at a time if given. ``model_name``: ``smollm2`` or a transformers checkpoint directory (with its
    tokenizer), loaded on ``device`` in ``dtype``. Prints a table, writes JSON to ``output`` if given, returns
    the rows (:func:`evaluate_setups`)."""
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from .methods import scheme_class
    from .toolkit import check_model_name, load_model

    options = dict(options or {})
    policy = dict(policy or {})
    scheme_class(method)(**options)                  # bad method/options fail before the model loads
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    if not lengths or min(lengths) < 64:
        raise KVPassError(f"lengths must be >= 64 tokens (the prompt's fixed text takes ~50), got {lengths}")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise KVPassError(f"depths must lie in [0, 1], got {depths}")
    if samples < 1:
        raise KVPassError(f"samples must be >= 1, got {samples}")
    if chunk is not None and chunk < 1:
        raise KVPassError(f"chunk must be >= 1 token, got {chunk}")
    from .compiler import check_head_policy
    check_head_policy(method, heads, policy)
    if heads == "duo":
        from .duo import resolve_gates
        policy["duo"] = resolve_gates(policy.get("duo", "smollm2"))
    check_model_name(model_name)
    console = Console()
    loaded = load_model(model_name, device, dtype, status=console)
    model, tokenizer, name = loaded.model, loaded.require_tokenizer(), loaded.name
    data = passkey_samples(tokenizer, lengths, depths, samples, seed=seed)
    label = "-".join([method] + [f"{k}{v}" for k, v in options.items()])
    if heads != "full":
        label += f"+{heads}" + "".join(f"-{k}{v}" for k, v in policy.items() if k != "duo")
    setups = [Setup("fp16", "fp16", {}),
              Setup(label, method, dict(options, **({"calibration": calibration} if calibration else {})),
                    heads, policy)]
    rows = evaluate_setups(model, data, setups, capacity=max(lengths) + 16, chunk=chunk)
    table = Table(title=f"passkey retrieval, {name} ({samples} prompt(s) per cell)")
    for col in ("setup", "length", "depth", "accuracy"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["setup"], str(r["length"]), f"{r['depth']:.2f}", f"{r['accuracy']:.2f}")
    console.print(table)
    if output is not None:
        Path(output).write_text(json.dumps({"model": name, "seed": seed, "chunk": chunk, "rows": rows},
                                           indent=2) + "\n")
    return rows
