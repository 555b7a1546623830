"""``kvpass demo``: SmolLM2 on one State of the Union address, through ``kvpass.compile``: an fp16 cache vs
a compressed one (KIVI-2 by default), side by side.

For each of the two caches the demo compiles SmolLM2 with ``kvpass.compile`` (the real compressed cache,
not a simulation) and prints: the cache's bytes and bits per element (``kvpass.report``), honest decode
perplexity (the speech's first ``prefill`` tokens as a prompt, then ``decode`` tokens fed one at a time
through the cache, :func:`kvpass.perplexity.decode_perplexity`) and a greedy continuation of the same
prompt. Then a summary of ``kvpass.report`` for the compressed model and the committed reference tables
(bench/results/quality_decode.json, with the sim-mode deltas of quality_reference.json beside them).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .errors import KVPassError

RESULTS = Path("bench") / "results"
REFERENCE = RESULTS / "quality_reference.json"          # sim mode
DECODE_REFERENCE = RESULTS / "quality_decode.json"      # honest decode mode
MODEL_CONTEXT = 8192
DTYPE_NOTE = ("The model runs in fp32 on the CPU and kvpass keeps K/V in the model dtype, so 'fp16' here "
              "holds fp32 K/V (lossless) and KIVI's full-precision window is fp32 too. 'fp16 model': the "
              "same scheme's bits/elem on an fp16/bf16 model (what a GPU run sees), at this length and at "
              "SmolLM2's 8K context.")


def find_reference(name: Path = REFERENCE) -> Path | None:
    """The committed result file ``name`` (e.g. bench/results/quality_reference.json) of the source checkout
    kvpass runs from (searched from the package folder upwards, then from the working directory), or None."""
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for start in starts:
        for folder in (start, *start.parents):
            if (folder / name).is_file():
                return folder / name
    return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def scheme_label(method: str, options: dict) -> str:
    """Short display name: ``kivi-2 g32 r128`` for kivi(bits=2, group_size=32, residual=128); dtype-valued
    options are left out."""
    label = f"{method}-{options['bits']}" if "bits" in options else method
    short = {"group_size": "g", "residual": "r"}
    extra = [f"{short.get(k, k + '=')}{v}" for k, v in options.items()
             if k != "bits" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " ".join([label, *extra])


def quality_table(rows: list[dict], title: str) -> Table:
    """A rich table of quality result rows (BENCHMARKS.md "ppl" rows: method, bits_per_elem, ppl, ...)."""
    tokens = sorted({r["tokens"] for r in rows if "tokens" in r})
    caption = f"perplexity over {', '.join(map(str, tokens))} predicted tokens" if tokens else None
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for col, just in (("method", "left"), ("mode", "left"), ("bits/el", "right"), ("KV bytes", "right"),
                      ("ppl", "right"), ("fp16 ppl", "right"), ("Δ ppl", "right")):
        table.add_column(col, justify=just, no_wrap=True)
    for r in rows:
        label = r.get("label") or scheme_label(r.get("method", "?"), r.get("options") or {})
        table.add_row(label, str(r.get("mode", "")),
                      f"{r['bits_per_elem']:.3f}" if r.get("bits_per_elem") is not None else "-",
                      _fmt_bytes(r["cache_bytes"]) if r.get("cache_bytes") is not None else "-",
                      f"{r['ppl']:.3f}", f"{r['fp16_ppl']:.3f}", f"{r['delta_pct']:+.2f}%")
    return table


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise KVPassError(f"--{name} must be an integer >= {low}, got {value!r}")


def greedy(model, prompt: torch.Tensor, new_tokens: int, desc: str = "generate") -> torch.Tensor:
    """Greedy continuation of ``prompt`` (1, T): ``new_tokens`` ids (1, new_tokens).

    The loop is what ``model.generate(do_sample=False)`` does, written out with the calling convention of
    :func:`kvpass.perplexity.decode_perplexity` (``input_ids``, ``use_cache``, the cache, ``logits_to_keep``)
    so that a kvpass-compiled model reuses the graphs the perplexity run compiled instead of tracing new
    ones for generate()'s extra inputs (which work too, at the cost of a few more compilations).
    """
    from tqdm import tqdm

    from .perplexity import _parameters, _returned_cache, cache_argument

    extra = {"logits_to_keep": 1} if "logits_to_keep" in _parameters(model.forward) else {}
    cache_arg = cache_argument(model)
    out_ids = []
    with torch.no_grad(), tqdm(total=new_tokens, unit="tok", desc=desc, dynamic_ncols=True) as bar:
        out = model(input_ids=prompt, use_cache=True, **extra)
        for i in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out_ids.append(nxt)
            bar.update(1)
            if i + 1 < new_tokens:
                out = model(input_ids=nxt, use_cache=True, **extra, **{cache_arg: _returned_cache(out)})
    return torch.cat(out_ids, dim=1)


def run_demo(method: str = "kivi", options: dict | None = None, prefill: int = 256, decode: int = 256,
             new_tokens: int = 40, year: int | None = None, console: Console | None = None,
             heads: str = "full", policy: dict | None = None) -> list[dict]:
    """Run the demo and print it.

    method/options: the compressed scheme (``get_scheme(method, **options)``, default KIVI-2);
    prefill: prompt tokens (the start of the speech); decode: tokens then scored one at a time (honest
    perplexity); new_tokens: greedy continuation of the prompt; year: which 2010+ speech (default the
    most recent); heads/policy: the compressed run's head policy (``kvpass.compile``'s ``heads`` and its
    options; heads="duo" takes the gates kvpass ships for SmolLM2 unless ``policy["duo"]`` names others).
    returns: the two result rows (fp16, method) with ppl, delta_pct, bits_per_elem,
    cache_bytes, continuation (text), ...
    """
    from .compiler import apply_head_policy, check_head_policy
    from .compiler import compile as kvpass_compile
    from .data import speeches
    from .duo import resolve_gates
    from .methods import CacheShape, get_scheme
    from .models import SMOLLM2_NAME, load_smollm2
    from .perplexity import decode_perplexity
    from .report import report

    console = console or Console()
    scheme = get_scheme(method, **(options or {}))         # bad method/options fail before the model loads
    policy = dict(policy or {})
    check_head_policy(method, heads, policy)
    if heads == "duo":
        policy["duo"] = resolve_gates(policy.get("duo", "smollm2"))
    _check_int("prefill", prefill, 1)
    _check_int("decode", decode, 1)
    _check_int("new-tokens", new_tokens, 1)
    pool = speeches("eval")
    if year is not None:
        pool = [s for s in pool if s.year == year]
        if not pool:
            raise KVPassError(f"no 2010+ speech from {year}; years: "
                              f"{', '.join(str(s.year) for s in speeches('eval'))}")
    speech = pool[-1]
    started = time.perf_counter()
    with console.status("Loading SmolLM2-135M-Instruct (the first run dequantizes the GGUF: ~20 s)..."):
        model, tokenizer = load_smollm2()
    console.print(f"Loaded {SMOLLM2_NAME} in {time.perf_counter() - started:.1f} s")
    t_work = time.perf_counter()
    ids = tokenizer(speech.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    window = prefill + decode
    if ids.shape[1] < window:
        raise KVPassError(f"the {speech.year} speech has only {ids.shape[1]} tokens; use --prefill + --decode "
                          f"<= {ids.shape[1]}")
    ids = ids[:, :window]
    capacity = max(window, prefill + new_tokens)
    cfg = model.config
    kv, hd, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    console.print(f"Text: {speech.year} State of the Union ({speech.president}). Prompt: its first {prefill} "
                  f"tokens; then {decode} tokens fed one at a time through the cache (honest decode "
                  f"perplexity) and a greedy continuation of {new_tokens} tokens from the same prompt. "
                  f"kvpass.compile(model, method, backend='eager', capacity={capacity}).")

    base = get_scheme("fp16")
    label = _short_label(scheme) + ("" if heads == "full" else f"+{heads}" + (
        f"-{policy.get('retrieval', 0.5):g}" if heads == "duo" else ""))
    served = apply_head_policy(model, scheme, heads, dict(policy), capacity)
    runs = [(_short_label(base), base, "full", {}, base), (label, scheme, heads, policy, served)]
    rows, reports = [], []
    for i, (label, s, run_heads, run_policy, served) in enumerate(runs):
        torch._dynamo.reset()
        target = copy.deepcopy(model) if i + 1 < len(runs) else model       # the last run takes the original
        compiled = kvpass_compile(target, s.name, backend="eager", capacity=capacity, heads=run_heads,
                                  **s.options(), **run_policy)
        r = decode_perplexity(compiled, ids, prefill, desc=f"{label}: compile + decode ppl")
        cont = greedy(compiled, ids[:, :prefill], new_tokens, desc=f"{label}: greedy generation")
        rep = report(compiled)
        reports.append(rep)
        fp16_bits = _model_bits(served, layers, CacheShape(1, kv, hd, capacity, torch.float16))
        r.update(label=label, method=s.name, heads=run_heads, options=rep.options, bits_per_elem=rep.bits_per_element,
                 cache_bytes=rep.cache_bytes // rep.batch, dense_cache_bytes=rep.dense_bytes // rep.batch,
                 bits_per_elem_fp16_model=fp16_bits,
                 bits_per_elem_fp16_model_8k=_model_bits(served, layers, CacheShape(1, kv, hd, MODEL_CONTEXT,
                                                                                    torch.float16)),
                 cache_bytes_fp16_model=round(fp16_bits * 2 * kv * hd * capacity * layers / 8),
                 continuation_ids=cont[0].tolist(), continuation=tokenizer.decode(cont[0]))
        rows.append(r)
        del compiled, target
    fp16_ppl = rows[0]["ppl"]
    for r in rows:
        r.update(fp16_ppl=fp16_ppl, delta_pct=100 * (r["ppl"] / fp16_ppl - 1))

    _print_results(console, rows, reports[-1], speech, tokenizer, ids, prefill, decode, capacity)
    print_reference(console)
    console.print(f"Demo work took {time.perf_counter() - t_work:.0f} s after loading the model "
                  f"({time.perf_counter() - started:.0f} s in all).")
    return rows


def _model_bits(scheme, layers: int, shape) -> float:
    """Bits per element of ``scheme`` over all ``layers`` of a model with ``shape``'s geometry (a head policy
    keeps a different number of full heads per layer)."""
    from dataclasses import replace
    return sum(scheme.bits_per_element(replace(shape, layer=i)) for i in range(layers)) / layers


def _print_results(console, rows, rep, speech, tokenizer, ids, prefill, decode, capacity) -> None:
    table = Table(title=f"SmolLM2-135M-Instruct via kvpass.compile, {speech.year} speech, honest decode: "
                        f"{prefill}-token prompt + {decode} tokens one at a time", title_justify="left")
    for col in ("cache", "bytes", "bits/el", "fp16 model", "… at 8K", "decode ppl", "Δ ppl"):
        table.add_column(col, justify="left" if col == "cache" else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["label"], _fmt_bytes(r["cache_bytes"]), f"{r['bits_per_elem']:.2f}",
                      f"{r['bits_per_elem_fp16_model']:.2f}", f"{r['bits_per_elem_fp16_model_8k']:.2f}",
                      f"{r['ppl']:.3f}", f"{r['delta_pct']:+.2f}%")
    console.print(table)
    console.print(f"[dim]bytes, bits/el: kvpass.report on this run (capacity {capacity} tokens, all 30 layers). "
                  f"{DTYPE_NOTE}[/dim]")
    a, b = rows
    console.print(f"{b['label']} keeps this cache in {_fmt_bytes(b['cache_bytes'])} instead of "
                  f"{_fmt_bytes(a['cache_bytes'])} ({a['cache_bytes'] / b['cache_bytes']:.2f}x smaller here; "
                  f"{a['bits_per_elem_fp16_model_8k'] / b['bits_per_elem_fp16_model_8k']:.2f}x against an "
                  f"fp16 cache at 8K) and its decode perplexity is {b['delta_pct']:+.2f}% from fp16's.")

    prompt_tail = tokenizer.decode(ids[0, max(0, prefill - 40):prefill])
    truth = tokenizer.decode(ids[0, prefill:prefill + len(a["continuation_ids"])])
    same = sum(x == y for x, y in zip(a["continuation_ids"], b["continuation_ids"]))
    gen = Table(title=f"Greedy continuation of the {prefill}-token prompt", title_justify="left",
                show_lines=True)
    gen.add_column("", no_wrap=True)
    gen.add_column("text", overflow="fold")
    gen.add_row("prompt (end)", "…" + _one_line(prompt_tail))
    gen.add_row("the speech", _one_line(truth))
    for r in rows:
        gen.add_row(r["label"], _one_line(r["continuation"]))
    console.print(gen)
    console.print(f"{same} of {len(a['continuation_ids'])} generated tokens are the same in both "
                  f"(position by position).")

    kinds = lambda key: ", ".join(sorted({str(r[key]) for r in rep.rows}))   # noqa: E731
    opts = ", ".join(f"{k}={v}" for k, v in rep.options.items())
    console.print(f"kvpass.report(model) for {rep.method}({opts}): {rep.sites_rewritten}/{rep.sites_found} "
                  f"attention sites rewritten (pattern {kinds('pattern')}; {rep.rows[0]['heads']} q / "
                  f"{rep.rows[0]['kv_heads']} kv heads, GQA {kinds('gqa')}; past K/V {kinds('kv_source')}); "
                  f"cache {rep.cache_bytes / 2**20:.2f} MiB for batch {rep.batch} x {rep.capacity} tokens vs "
                  f"{rep.dense_bytes / 2**20:.2f} MiB dense: {rep.bits_per_element:.3f} bits/elem. "
                  f"print(kvpass.report(model)) shows the per-layer table.")


def _short_label(scheme) -> str:
    """``kivi-2`` for kivi(bits=2, ...) with its default other options, else :func:`scheme_label`."""
    opts = scheme.options()
    try:
        defaults = type(scheme)().options()
    except Exception:      # a scheme without defaults for every option (e.g. a calibrated one)
        return scheme_label(scheme.name, opts)
    changed = {k: v for k, v in opts.items() if k != "bits" and v != defaults.get(k)}
    if changed:
        return scheme_label(scheme.name, opts)
    return f"{scheme.name}-{opts['bits']}" if "bits" in opts else scheme.name


def _one_line(text: str) -> str:
    return " ".join(text.split())


def print_reference(console: Console) -> None:
    """Print the committed honest-decode reference table (with the sim-mode deltas beside it when that file
    is there too), or say that it was not found."""
    path = find_reference(DECODE_REFERENCE)
    if path is None:
        console.print(f"No committed reference table found ({DECODE_REFERENCE} is only in a source checkout).")
        return
    try:
        data = json.loads(path.read_text())
        rows, meta = data["rows"], data["meta"]
    except (OSError, ValueError, KeyError) as e:
        console.print(f"Could not read {path}: {e}")
        return
    sim = {}
    sim_path = find_reference(REFERENCE)
    if sim_path is not None:
        try:
            sim = {r["label"]: r for r in json.loads(sim_path.read_text())["rows"] if "label" in r}
        except (OSError, ValueError, KeyError):
            sim = {}
    shapes = meta.get("shapes", {})
    table = Table(title=f"Reference ({DECODE_REFERENCE}, commit {str(meta.get('git_commit', '?'))[:10]}): "
                        f"{shapes.get('windows', '?')} windows x ({shapes.get('prefill', '?')} prompt + "
                        f"{shapes.get('decode', '?')} decoded) tokens of 2010+ speeches",
                  title_justify="left", caption=f"command: {meta.get('command', '?')}; sim: "
                  f"{REFERENCE.name} (each query with its own full-precision window)",
                  caption_justify="left")
    for col in ("cache", "bits/el fp16 model", "… at 8K", "decode ppl", "Δ ppl", "Δ ppl sim"):
        table.add_column(col, justify="left" if col == "cache" else "right", no_wrap=True)
    for r in rows:
        label = r.get("label") or scheme_label(r.get("method", "?"), r.get("options") or {})
        s = sim.get(label)
        table.add_row(label, f"{r['bits_per_elem_fp16_model']:.2f}" if "bits_per_elem_fp16_model" in r else "-",
                      f"{r['bits_per_elem_fp16_model_8k']:.2f}" if "bits_per_elem_fp16_model_8k" in r else "-",
                      f"{r['ppl']:.3f}", f"{r['delta_pct']:+.2f}%",
                      f"{s['delta_pct']:+.2f}%" if s else "-")
    console.print(table)
