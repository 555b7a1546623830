"""``kvpass sweep``: methods x bits on one model, the quality/memory Pareto table, and the method advisor.

Every configuration is scored on the same token windows in the fast simulated mode
(:func:`kvpass.simulate.perplexity`: each layer's K/V go through the scheme's real compressed buffers in one
prefill; windowed schemes give each query the window it has when every token is decoded, the others attend
over the final state) or in the honest decode mode (:func:`kvpass.perplexity.decode_perplexity` through ``kvpass.compile``). Calibrated
methods are fitted from one activation capture of the calibration text shared by all of them. A row's memory
is ``bits_per_elem_at_context``: every buffer byte of the scheme's cache for the model's geometry at
``context`` tokens (windows and codebooks amortized there), which is what the frontier and the advisor use.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from .errors import KVPassError, OptionError
from .toolkit import NOMINAL_BITS, method_label, method_options, needs_calibration

# the methods x bits a plain ``kvpass sweep`` runs (bits None: the method's only width)
DEFAULT_BITS = {"fp16": [None], "int8": [None], "fp8": [None], "kivi": [2, 4], "kvquant": [2, 3, 4],
                "qaq": [4], "cq": [1, 2], "million": [2, 4]}
MEMORY_CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


@dataclass(frozen=True)
class Config:
    """One point of the sweep: ``method`` with ``options`` (bits translated), shown as ``label``."""

    method: str
    bits: int | None
    options: dict
    label: str


def sweep_configs(methods: list[str] | None = None, bits: list[int] | None = None,
                  options: dict | None = None) -> list[Config]:
    """The configurations of a sweep, fp16 first (the reference every delta is taken against).

    methods: names (default: every registered scheme); bits: widths for the methods that have a bits knob
    (default: :data:`DEFAULT_BITS`); fp16/int8/fp8 run once at their own width. options: extra scheme
    options applied to every method that has them. Unknown methods and bits out of a method's range raise
    (before any model loads).
    """
    import dataclasses

    from .methods import scheme_class
    names = list(methods) if methods else list(DEFAULT_BITS)
    for m in names:
        scheme_class(m)                                  # UnknownMethodError lists the known ones
    if "fp16" not in names:
        names.insert(0, "fp16")
    configs, seen = [], set()
    for m in ["fp16"] + [n for n in names if n != "fp16"]:
        widths = [None] if m in NOMINAL_BITS else (bits or DEFAULT_BITS.get(m, [None]))
        for b in widths:
            fields = {f.name for f in dataclasses.fields(scheme_class(m))}
            extra = {k: v for k, v in (options or {}).items() if k in fields}
            opts = method_options(m, b, extra)
            label = method_label(m, opts)
            if label not in seen:
                seen.add(label)
                configs.append(Config(m, b if b is not None else NOMINAL_BITS.get(m), opts, label))
    return configs


def model_bits(scheme, model, context: int, dtype: torch.dtype) -> float:
    """Bits per K/V element of ``scheme`` over all layers of ``model`` (its config's KV heads and head
    dim) for one sequence of ``context`` tokens cached in ``dtype``: every buffer byte counted."""
    from .methods import CacheShape
    cfg = model.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = cfg.num_hidden_layers
    return sum(scheme.bits_per_element(CacheShape(1, kv, hd, context, dtype, layer=i))
               for i in range(layers)) / layers


def kv_elements_per_token(model) -> int:
    """K plus V elements one token adds to the cache over all layers."""
    cfg = model.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * kv * hd * cfg.num_hidden_layers


def run_sweep(model, tokenizer, configs: list[Config], texts: list[str], *, calib_texts: list[str] | None = None,
              mode: str = "sim", windows: int = 4, window: int = 512, prefill: int | None = None,
              context: int | None = None, cache_dtype: torch.dtype = torch.float16, calib_sequences: int = 16,
              calib_len: int = 512, progress: bool = True, model_name: str = "") -> list[dict]:
    """Score every configuration on the same windows; returns one BENCHMARKS.md "ppl" row per config.

    model/tokenizer: a transformers causal LM in eval mode and its tokenizer; texts: evaluation texts
    (cut into ``windows`` windows of ``window`` tokens spread over them); calib_texts: the calibration
    text for calibrated methods (16 x 512 tokens by default). mode: "sim" (one forward per window, K/V cached
    in ``cache_dtype``) or "decode" (``prefill`` prompt tokens, default window // 2, then one token at a
    time through ``kvpass.compile``'s real cache, in the model dtype). context: the length the memory
    figures are computed at (default: the model's max_position_embeddings, at most 131072).
    Row fields: label, method, bits, options, ppl, fp16_ppl, delta_pct, bits_per_elem (measured at the
    window), bits_per_elem_at_context, context, bytes_per_token_at_context, memory (bytes of one sequence's
    cache at each of :data:`MEMORY_CONTEXTS`), seconds.
    """
    from tqdm import tqdm

    from .data import token_windows
    from .methods import get_scheme
    from .simulate import perplexity

    if mode not in ("sim", "decode"):
        raise OptionError(f"--mode must be sim or decode, got {mode!r}")
    ids = token_windows(tokenizer, texts, window, windows, spread=True)
    if context is None:
        context = min(int(getattr(model.config, "max_position_embeddings", 8192) or 8192), 131072)
    prefill = window // 2 if prefill is None else prefill
    fits = _calibrations(model, tokenizer, configs, calib_texts, calib_sequences, calib_len, progress)
    rows, fp16_ppl = [], None
    per_config = windows if mode == "sim" else windows * (window - prefill)
    bar = tqdm(total=per_config * len(configs), unit="win" if mode == "sim" else "tok", desc="sweep",
               disable=not progress, dynamic_ncols=True)
    try:
        for c in configs:
            bar.set_description(f"sweep {c.label}")
            started = time.perf_counter()
            opts = dict(c.options)
            if c.label in fits:
                opts["calibration"] = fits[c.label]
            scheme = get_scheme(c.method, **opts)
            if mode == "sim":
                r = perplexity(model, ids, scheme, cache_dtype=cache_dtype, progress=bar.update)
            else:
                r = _decode_ppl(model, ids, c.method, opts, prefill, bar.update)
            dtype = cache_dtype if mode == "sim" else next(model.parameters()).dtype
            at_ctx = model_bits(scheme, model, context, dtype)
            per_tok = kv_elements_per_token(model)
            if c.method == "fp16":
                fp16_ppl = r["ppl"]
            rows.append({
                "bench": "ppl", "mode": mode, "model": model_name, "method": c.method, "bits": c.bits,
                "heads": "full", "label": c.label, "options": {k: v for k, v in r.get("options", c.options).items()
                                                               if k != "calibration"},
                "calibrated": c.label in fits, "ppl": r["ppl"], "nll": r["nll"], "fp16_ppl": fp16_ppl,
                "delta_pct": 100 * (r["ppl"] / fp16_ppl - 1), "bits_per_elem": r["bits_per_elem"],
                "bits_per_elem_at_context": at_ctx, "context": context,
                "bytes_per_token_at_context": at_ctx * per_tok / 8, "tokens": r["tokens"],
                "cache_dtype": str(dtype).replace("torch.", ""),
                "memory": {str(n): round(model_bits(scheme, model, n, dtype) * per_tok * n / 8)
                           for n in MEMORY_CONTEXTS},
                "seconds": round(time.perf_counter() - started, 1)})
    finally:
        bar.close()
    frontier = {r["label"] for r in pareto_front(rows)}
    for r in rows:
        r["pareto"] = r["label"] in frontier
    return rows


def _calibrations(model, tokenizer, configs, calib_texts, sequences, seq_len, progress) -> dict:
    """Fit every calibrated config from one (Fisher-weighted) activation capture of the calibration text."""
    todo = [c for c in configs if needs_calibration(c.method)]
    if not todo:
        return {}
    from .calibration import Calibration, model_fingerprint
    from .capture import collect_activations
    from .data import calib_texts as builtin_calib, token_windows
    from .methods import scheme_class
    ids = token_windows(tokenizer, calib_texts or builtin_calib(), seq_len, sequences, spread=True)
    device = next(model.parameters()).device
    acts = collect_activations(model, ids.to(device), fisher=True, max_tokens=4096, progress=progress)
    out = {}
    from tqdm import tqdm
    for c in tqdm(todo, desc="fit calibrations", disable=not progress):
        cls = scheme_class(c.method)
        tensors = cls.fit(acts, **c.options)
        out[c.label] = Calibration(c.method, dict(c.options), model_fingerprint(model),
                                   {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                   {"data": getattr(acts, "meta", {})})
    return out


def _decode_ppl(model, ids, method, opts, prefill, update) -> dict:
    from .compiler import compile as kvpass_compile
    from .perplexity import decode_perplexity
    from .report import report
    torch._dynamo.reset()
    compiled = kvpass_compile(copy.deepcopy(model), method, backend="eager", capacity=ids.shape[1], **opts)
    r = decode_perplexity(compiled, ids, prefill, progress=update)
    rep = report(compiled)
    r.update(bits_per_elem=rep.bits_per_element, options=rep.options)
    return r


# -- the frontier and the advisor -------------------------------------------------------------------
def pareto_front(rows: list[dict], x: str = "bits_per_elem_at_context", y: str = "delta_pct") -> list[dict]:
    """The rows no other row beats on both memory (``x``) and quality loss (``y``), sorted by ``x``."""
    front = []
    for r in rows:
        dominated = any(o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for o in rows)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r[x], r[y]))


def parse_percent(text: str | float) -> float:
    """``"2%"`` or ``"2"`` -> 2.0 (percent); negative or non-numbers are an OptionError."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1] if raw.endswith("%") else raw)
    except ValueError:
        raise OptionError(f"--max-ppl-increase must be a percentage such as 2% or 0.5, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise OptionError(f"--max-ppl-increase must be >= 0%, got {text!r}")
    return value


def advise(rows: list[dict], budget_bits: float | None = None, max_ppl_increase: float | None = None) -> dict:
    """Pick a scheme from measured sweep rows.

    budget_bits: the lowest perplexity among rows within that many bits/elem (at the sweep's context);
    max_ppl_increase: percent; the fewest bits/elem among rows whose perplexity rises at most that much
    (ties: lower perplexity). Both given: the budget filters, the increase then picks the fewest bits.
    returns: {"criterion", "choice" (the row, or None), "reason"} — a one-sentence reason either way.
    """
    if budget_bits is None and max_ppl_increase is None:
        raise OptionError("give --budget-bits or --max-ppl-increase to get a recommendation")
    x = "bits_per_elem_at_context"
    pool = list(rows)
    crit = []
    if budget_bits is not None:
        pool = [r for r in pool if r[x] <= budget_bits + 1e-9]
        crit.append(f"<= {budget_bits:g} bits/elem")
    if max_ppl_increase is not None:
        pool = [r for r in pool if r["delta_pct"] <= max_ppl_increase + 1e-9]
        crit.append(f"perplexity +{max_ppl_increase:g}% at most")
    criterion = " and ".join(crit)
    if not pool:
        best = min(rows, key=lambda r: r[x])
        return {"criterion": criterion, "choice": None,
                "reason": f"no measured scheme meets {criterion}; the smallest cache measured is {best['label']} "
                          f"at {best[x]:.2f} bits/elem ({best['delta_pct']:+.2f}% perplexity)"}
    if max_ppl_increase is not None:
        choice = min(pool, key=lambda r: (r[x], r["ppl"]))
    else:
        choice = min(pool, key=lambda r: (r["ppl"], r[x]))
    ctx = choice.get("context")
    reason = (f"{choice['label']} ({_options_text(choice)}): {choice[x]:.2f} bits/elem at {ctx} tokens "
              f"({16 / choice[x]:.1f}x smaller than fp16), perplexity {choice['ppl']:.3f} "
              f"({choice['delta_pct']:+.2f}% vs fp16, {choice['mode']} mode)")
    if choice.get("method") in ("kivi", "cq", "million"):
        reason += (f"; {choice['method']} keeps the newest tokens in full precision, which covers more of a short "
                   f"evaluation window than of {ctx} tokens: confirm the pick and its neighbours with --mode decode "
                   f"on windows as long as your contexts")
    return {"criterion": criterion, "choice": choice, "reason": reason}


def _options_text(row: dict) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in (row.get("options") or {}).items())
    return f"--method {row['method']}" + (f" --bits {row['bits']}" if row.get("bits") is not None
                                           and row["method"] not in NOMINAL_BITS else "") + (
        f"; {opts}" if opts else "")


def check_sweep_args(windows: int, window: int, prefill: int | None, mode: str) -> None:
    """Bad sizes fail before the model loads."""
    if windows < 1:
        raise KVPassError(f"--windows must be >= 1, got {windows}")
    if window < 8:
        raise KVPassError(f"--window must be >= 8 tokens, got {window}")
    if mode not in ("sim", "decode"):
        raise OptionError(f"--mode must be sim or decode, got {mode!r}")
    if prefill is not None and not 1 <= prefill < window:
        raise KVPassError(f"--prefill must lie in [1, {window - 1}] for --window {window}, got {prefill}")


def markdown_table(result: dict) -> str:
    """The Pareto table of a ``kvpass sweep`` JSON result as markdown (the README's table):
    ``python -m kvpass.sweep bench/results/sweep_smollm2.json``."""
    rows = sorted(result["rows"], key=lambda r: r["bits_per_elem_at_context"])
    ctx = rows[0]["context"]
    lines = [f"| method | bits/elem at {ctx // 1024}K | bytes/token at {ctx // 1024}K | bits/elem measured "
             f"({rows[0]['tokens'] // max(result['meta']['shapes']['windows'], 1) + 1} tokens) | ppl ({rows[0]['mode']}) "
             f"| Δ vs fp16 | frontier |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['bits_per_elem_at_context']:.2f} | {r['bytes_per_token_at_context']:,.0f} | "
                     f"{r['bits_per_elem']:.2f} | {r['ppl']:.3f} | {r['delta_pct']:+.2f}% | "
                     f"{'★' if r.get('pareto') else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys
    for name in sys.argv[1:]:
        with open(name) as f:
            data = json.load(f)
        print(markdown_table(data))
        if data.get("advice"):
            print(f"\nadvice ({data['advice']['criterion']}): {data['advice']['reason']}")
