"""What the ``kvpass`` subcommands ``report``, ``calibrate METHOD``, ``eval ppl``, ``eval generate``,
``bench``, ``sweep`` and ``export`` do once their arguments are parsed (:mod:`kvpass.cli`).

Each ``run_*`` function checks its arguments before loading anything (a bad method, bits out of range, a
missing file fail in a moment), shows a progress bar or spinner for long steps, prints a table, writes
its result as JSON (``{"meta": {...}, "rows": [...]}`` as in shared/BENCHMARKS.md) when ``output`` is given,
and returns the result dict. Bad input raises a :class:`kvpass.KVPassError`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .errors import KVPassError, OptionError
from .toolkit import (check_model_name, load_model, load_texts, method_label, method_options, needs_calibration,
                      parse_device, parse_dtype, provenance, write_json)


def _console(quiet: bool = False) -> Console:
    import sys
    return Console(quiet=quiet, width=None if sys.stdout.isatty() else 140)


def _compiled(loaded, method: str, options: dict, calibration, capacity: int, heads: str = "full",
              policy: dict | None = None):
    """``kvpass.compile`` on a copy of the loaded model (eager backend), calibration checked."""
    from .compiler import compile as kvpass_compile
    opts = dict(options)
    if calibration is not None:
        opts["calibration"] = calibration
    elif needs_calibration(method):
        raise KVPassError(f"{method} needs a calibration: run 'kvpass calibrate {method} --model ... --output DIR' "
                          f"and pass --calibration DIR")
    policy = dict(policy or {})
    if heads == "duo":
        from .duo import resolve_gates
        policy["duo"] = resolve_gates(policy.get("duo", "smollm2"))
    torch._dynamo.reset()
    return kvpass_compile(copy.deepcopy(loaded.model), method, backend="eager", capacity=capacity, heads=heads,
                          **opts, **policy)


def _check_calibration_dir(calibration: str | None) -> None:
    if calibration is not None and not Path(calibration).exists():
        raise KVPassError(f"no calibration at {calibration}: not a directory")


# -- report ------------------------------------------------------------------------------------------
def run_report(model: str, method: str, bits, options: dict, *, calibration=None, context: int = 4096,
               heads: str = "full", policy: dict | None = None, device: str = "cpu", dtype: str = "float32",
               output=None, quiet: bool = False) -> dict:
    """``kvpass report``: compile ``model`` with ``method`` for a cache of ``context`` tokens, run an 8-token
    prompt so every site is found and every buffer allocated, and report what kvpass found (one row per
    attention site: pattern, heads, past-K/V source, GQA, RoPE, mask, rewritten), the buffer layout of one
    layer (name, shape, dtype, bytes), bytes per token and bits per element (every byte counted)."""
    from .compiler import check_head_policy
    from .report import report
    opts = method_options(method, bits, options)
    check_head_policy(method, heads, dict(policy or {}))
    check_model_name(model)
    _check_calibration_dir(calibration)
    if context < 16:
        raise KVPassError(f"--context must be >= 16 tokens, got {context}")
    console = _console(quiet)
    loaded = load_model(model, device, dtype, status=console)
    compiled = _compiled(loaded, method, opts, calibration, context, heads, policy)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    ids = torch.arange(3, 11, device=next(compiled.parameters()).device)[None] % vocab
    with torch.no_grad():
        compiled(input_ids=ids, use_cache=True)
    rep = report(compiled)
    manager = compiled._kvpass.manager
    layout = []
    if manager.states:
        key, state = next(iter(manager.states.items()))
        for name, buf in state.buffers.items():
            layout.append({"buffer": name, "shape": list(buf.shape), "dtype": str(buf.dtype).replace("torch.", ""),
                           "bytes": buf.numel() * buf.element_size(), "device": buf.device.type})
    result = {"meta": provenance(), "model": loaded.name, "method": method, "label": method_label(method, opts),
              "heads": heads, "context": context, "report": rep.to_dict(), "layout_first_site": layout,
              "rows": [{"bench": "report", "model": loaded.name, "method": method, "label": method_label(method, opts),
                        "heads": heads, "context": context, "sites_found": rep.sites_found,
                        "sites_rewritten": rep.sites_rewritten, "bits_per_elem": rep.bits_per_element,
                        "bytes_per_token": rep.bytes_per_token, "cache_bytes": rep.cache_bytes,
                        "dense_bytes": rep.dense_bytes}]}
    console.print(str(rep))
    table = Table(title="buffers of one attention site (the other sites hold the same)", title_justify="left")
    for col in ("buffer", "shape", "dtype", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for b in layout:
        table.add_row(b["buffer"], "x".join(map(str, b["shape"])), b["dtype"], f"{b['bytes']:,}")
    console.print(table)
    write_json(output, result)
    return result


# -- calibrate ---------------------------------------------------------------------------------------
def run_calibrate(method: str, output: str, *, model: str = "smollm2", text: str = "speeches", bits=None,
                  options: dict | None = None, sequences: int = 16, seq_len: int = 512, device: str = "cpu",
                  dtype: str = "float32", quiet: bool = False) -> dict:
    """``kvpass calibrate METHOD``: fit ``method``'s calibration on ``model`` from ``text`` (the built-in
    speeches use their pre-2010 calibration split) — ``sequences`` windows of ``seq_len`` tokens, Fisher
    information where the method uses it — and save it to the directory ``output`` (safetensors + JSON,
    recording the model). Writes ``output/summary.json`` too and returns it."""
    from .fit import calibrate
    if not needs_calibration(method):
        from .fit import _calibrated
        raise KVPassError(f"{method} needs no calibration; calibrated methods: {', '.join(_calibrated())}, duo")
    opts = method_options(method, bits, options)
    if sequences < 1 or seq_len < 8:
        raise KVPassError(f"--sequences must be >= 1 and --seq-len >= 8, got {sequences} and {seq_len}")
    check_model_name(model)
    texts = load_texts(text, "calib")
    console = _console(quiet)
    loaded = load_model(model, device, dtype, status=console)
    cal = calibrate(loaded.model, method, data=texts, tokenizer=loaded.require_tokenizer(), sequences=sequences,
                    seq_len=seq_len, progress=not quiet, **opts)
    folder = cal.save(output)
    summary = {"meta": provenance(), "model": loaded.name, "method": method, "options": cal.options,
               "label": method_label(method, opts), "output": str(folder), "fingerprint": cal.model,
               "tensors": len(cal.tensors), "text": text, "sequences": sequences, "seq_len": seq_len}
    write_json(Path(folder) / "summary.json", summary)
    console.print(f"Saved the {method} calibration of {loaded.name} to {folder} ({len(cal.tensors)} tensors). "
                  f"Use it: kvpass eval ppl --model {model} --method {method} --calibration {folder}")
    return summary


# -- eval ppl ------------------------------------------------------------------------------------------
def run_eval_ppl(model: str, method: str, bits, options: dict, *, mode: str = "sim", text: str = "speeches",
                 windows: int = 4, window: int = 512, prefill: int | None = None, calibration=None,
                 heads: str = "full", policy: dict | None = None, device: str = "cpu", dtype: str = "float32",
                 output=None, quiet: bool = False) -> dict:
    """``kvpass eval ppl``: perplexity with an fp16 cache and with ``method`` on the same ``windows`` x
    ``window`` tokens of ``text``. mode "sim" (fast: one forward per window through the scheme's real
    buffers, K/V cached in fp16; see :mod:`kvpass.simulate` for what each query sees) or "decode" (honest: ``prefill`` prompt tokens, default half
    the window, then one token at a time through ``kvpass.compile``'s real cache). Rows follow
    BENCHMARKS.md's "ppl" format (delta_pct against this run's fp16 row)."""
    from .compiler import check_head_policy
    from .sweep import check_sweep_args
    opts = method_options(method, bits, options)
    check_sweep_args(windows, window, prefill, mode)
    check_head_policy(method, heads, dict(policy or {}))
    if mode == "sim" and heads != "full":
        raise KVPassError("head policies run in --mode decode (sim mode simulates one scheme on every head)")
    check_model_name(model)
    _check_calibration_dir(calibration)
    if calibration is None and needs_calibration(method):
        raise KVPassError(f"{method} needs a calibration: run 'kvpass calibrate {method} --model {model} --output "
                          f"DIR' and pass --calibration DIR")
    texts = load_texts(text, "eval")
    console = _console(quiet)
    loaded = load_model(model, device, dtype, status=console)
    from .data import token_windows
    ids = token_windows(loaded.require_tokenizer(), texts, window, windows, spread=True)
    prefill = window // 2 if prefill is None else prefill
    shown = dict(opts)
    if calibration is not None:
        from .fit import load_calibration
        shown = {**load_calibration(calibration).options, **opts}
    setups = [("fp16", "fp16", {}, "full", {}), (method_label(method, shown) + ("" if heads == "full" else f"+{heads}"),
                                                 method, opts, heads, policy or {})]
    rows = []
    for label, m, o, h, pol in setups:
        if mode == "sim":
            from .fit import load_calibration
            from .methods import get_scheme
            from .simulate import perplexity
            so = dict(o)
            if m == method and calibration is not None:
                cal = load_calibration(calibration)
                cal.check(loaded.model, method)
                from .fit import resolve_calibration
                so = resolve_calibration(loaded.model, method, cal, so)
            from tqdm import tqdm
            with tqdm(total=windows, desc=f"{label}: sim ppl", unit="win", disable=quiet) as bar:
                r = perplexity(loaded.model, ids, get_scheme(m, **so), cache_dtype=torch.float16,
                               progress=bar.update)
        else:
            from .perplexity import decode_perplexity
            from .report import report
            compiled = _compiled(loaded, m, o, calibration if m == method else None, window, h, pol)
            r = decode_perplexity(compiled, ids, prefill, progress=not quiet, desc=f"{label}: decode ppl")
            rep = report(compiled)
            r.update(bits_per_elem=rep.bits_per_element, options=rep.options)
            del compiled
        rows.append({"bench": "ppl", "mode": mode, "model": loaded.name, "method": m, "label": label,
                     "bits": shown.get("bits", bits) if m == method else 16, "heads": h,
                     "options": {k: v for k, v in (r.get("options") or {}).items() if k != "calibration"},
                     "ppl": r["ppl"], "nll": r["nll"], "bits_per_elem": r["bits_per_elem"], "tokens": r["tokens"]})
    for r in rows:
        r["fp16_ppl"] = rows[0]["ppl"]
        r["delta_pct"] = 100 * (r["ppl"] / rows[0]["ppl"] - 1)
    result = {"meta": {**provenance(), "model": loaded.name, "text": text,
                       "shapes": {"windows": windows, "window": window, "prefill": prefill if mode == "decode" else None},
                       "mode": mode}, "rows": rows}
    from .demo import quality_table
    console.print(quality_table(rows, f"{loaded.name}: perplexity, {mode} mode, {windows} x {window} tokens"))
    write_json(output, result)
    return result


# -- eval generate -----------------------------------------------------------------------------------
def run_eval_generate(model: str, method: str, bits, options: dict, *, prompt: str | None = None,
                      text: str = "speeches", prompt_tokens: int = 128, new_tokens: int = 32, calibration=None,
                      heads: str = "full", policy: dict | None = None, device: str = "cpu",
                      dtype: str = "float32", output=None, quiet: bool = False) -> dict:
    """``kvpass eval generate``: greedy continuations of one prompt with an fp16 cache and with ``method``,
    side by side, and how many generated tokens agree position by position. The prompt is ``prompt`` or
    the first ``prompt_tokens`` tokens of ``text``."""
    from .compiler import check_head_policy
    from .demo import greedy
    opts = method_options(method, bits, options)
    check_head_policy(method, heads, dict(policy or {}))
    if new_tokens < 1 or prompt_tokens < 1:
        raise KVPassError(f"--new-tokens and --prompt-tokens must be >= 1, got {new_tokens} and {prompt_tokens}")
    check_model_name(model)
    _check_calibration_dir(calibration)
    texts = None if prompt is not None else load_texts(text, "eval")
    console = _console(quiet)
    loaded = load_model(model, device, dtype, status=console)
    tok = loaded.require_tokenizer()
    if prompt is not None:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 1:
            raise KVPassError("--prompt is empty")
    else:
        from .data import token_stream
        stream = token_stream(tok, texts[-1:])[:prompt_tokens]
        ids = torch.tensor([stream], dtype=torch.long)
    ids = ids.to(next(loaded.model.parameters()).device)
    capacity = ids.shape[1] + new_tokens + 1
    rows = []
    for label, m, o, h, pol, cal in (("fp16", "fp16", {}, "full", {}, None),
                                     (method_label(method, opts), method, opts, heads, policy, calibration)):
        compiled = _compiled(loaded, m, o, cal, capacity, h, pol)
        out = greedy(compiled, ids, new_tokens, desc=f"{label}: generate")
        rows.append({"bench": "generate", "model": loaded.name, "method": m, "label": label, "heads": h,
                     "ids": out[0].tolist(), "text": tok.decode(out[0])})
        del compiled
    same = sum(a == b for a, b in zip(rows[0]["ids"], rows[1]["ids"]))
    for r in rows:
        r["same_as_fp16"] = sum(a == b for a, b in zip(rows[0]["ids"], r["ids"]))
    table = Table(title=f"{loaded.name}: greedy continuation of a {ids.shape[1]}-token prompt", show_lines=True,
                  title_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("text", overflow="fold")
    table.add_row("prompt (end)", "…" + tok.decode(ids[0, -40:]).replace("\n", " "))
    for r in rows:
        table.add_row(r["label"], r["text"].replace("\n", " "))
    console.print(table)
    console.print(f"{same} of {new_tokens} generated tokens are the same (position by position).")
    result = {"meta": {**provenance(), "model": loaded.name, "prompt_tokens": ids.shape[1], "new_tokens": new_tokens},
              "prompt": tok.decode(ids[0]), "rows": rows}
    write_json(output, result)
    return result


# -- sweep -------------------------------------------------------------------------------------------
def run_sweep_command(model: str, methods: list[str] | None, bits: list[int] | None, options: dict, *,
                      mode: str = "sim", text: str = "speeches", windows: int = 4, window: int = 512,
                      prefill: int | None = None, context: int | None = None, calib_sequences: int = 16,
                      calib_len: int = 512, budget_bits: float | None = None, max_ppl_increase=None,
                      device: str = "cpu", dtype: str = "float32", output=None, plot=None,
                      quiet: bool = False) -> dict:
    """``kvpass sweep``: every method x bits on one model (:func:`kvpass.sweep.run_sweep`), the Pareto table
    (bits/elem at ``context`` vs Δ perplexity), an advice when ``budget_bits`` / ``max_ppl_increase`` are
    given (:func:`kvpass.sweep.advise`), JSON to ``output`` and, with ``plot`` (a .png path), the Pareto
    plot there and the memory-vs-context plot beside it (``*_memory.png``)."""
    from .sweep import advise, check_sweep_args, parse_percent, run_sweep, sweep_configs
    configs = sweep_configs(methods, bits, options)
    check_sweep_args(windows, window, prefill, mode)
    increase = parse_percent(max_ppl_increase) if max_ppl_increase is not None else None
    if budget_bits is not None and not 0 < budget_bits <= 32:
        raise OptionError(f"--budget-bits must lie in (0, 32], got {budget_bits}")
    if context is not None and context < 16:
        raise KVPassError(f"--context must be >= 16 tokens, got {context}")
    if calib_sequences < 1 or calib_len < 8:
        raise KVPassError("--calib-sequences must be >= 1 and --calib-len >= 8")
    if plot is not None and not str(plot).endswith(".png"):
        raise KVPassError(f"--plot takes a .png path, got {plot}")
    check_model_name(model)
    texts = load_texts(text, "eval")
    calib = None if text == "speeches" else load_texts(text, "eval")
    started = provenance()             # the commit whose code runs: taken now, not after a long run
    console = _console(quiet)
    loaded = load_model(model, device, dtype, status=console)
    rows = run_sweep(loaded.model, loaded.require_tokenizer(), configs, texts, calib_texts=calib, mode=mode,
                     windows=windows, window=window, prefill=prefill, context=context, progress=not quiet,
                     calib_sequences=calib_sequences, calib_len=calib_len, model_name=loaded.name)
    advice = None
    if budget_bits is not None or increase is not None:
        advice = advise(rows, budget_bits, increase)
    meta = {**started, "model": loaded.name, "mode": mode, "text": text,
            "shapes": {"windows": windows, "window": window, "prefill": prefill if mode == "decode" else None,
                       "context": rows[0]["context"], "calibration": [calib_sequences, calib_len]},
            "note": "delta_pct against this run's fp16 row on the same tokens; bits_per_elem measured on the "
                    "real buffers at the evaluated window, bits_per_elem_at_context for one sequence of "
                    "`context` tokens (what the frontier and advice use)."
                    + (" sim mode: KIVI, CQ and MILLION give each query the full-precision window it has when "
                       "every token is decoded one at a time (the decode mode with a one-token prompt); the "
                       "other schemes attend over the final compressed cache." if mode == "sim" else "")}
    result = {"meta": meta, "rows": rows, "advice": _advice_json(advice)}
    console.print(sweep_table(rows, f"{loaded.name}: methods x bits, {mode} mode, {windows} x {window} tokens"))
    if advice is not None:
        console.print(("Recommended: " if advice["choice"] else "") + advice["reason"])
    write_json(output, result)
    if plot is not None:
        from .plots import memory_plot, pareto_plot
        pareto_plot(rows, plot, title=f"{loaded.name}: quality vs cache size ({mode} ppl, {windows}x{window} tokens)")
        memory_plot(rows, str(plot)[:-4] + "_memory.png", title=f"{loaded.name}: KV cache of one sequence")
        console.print(f"Wrote {plot} and {str(plot)[:-4]}_memory.png")
    return result


def _advice_json(advice: dict | None) -> dict | None:
    if advice is None:
        return None
    choice = advice["choice"]
    return {"criterion": advice["criterion"], "reason": advice["reason"],
            "label": choice["label"] if choice else None, "method": choice["method"] if choice else None,
            "bits": choice["bits"] if choice else None, "options": choice["options"] if choice else None}


def sweep_table(rows: list[dict], title: str) -> Table:
    """The Pareto table: one line per configuration, frontier members starred."""
    ctx = rows[0]["context"] if rows else "?"
    table = Table(title=title, title_justify="left",
                  caption="* on the Pareto frontier (no other setting has both fewer bits and lower perplexity)",
                  caption_justify="left")
    for col in ("method", "bits/el measured", f"bits/el @{ctx}", "B/token", "ppl", "Δ ppl", "frontier"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in sorted(rows, key=lambda r: r["bits_per_elem_at_context"]):
        table.add_row(r["label"], f"{r['bits_per_elem']:.2f}", f"{r['bits_per_elem_at_context']:.2f}",
                      f"{r['bytes_per_token_at_context']:,.0f}", f"{r['ppl']:.3f}", f"{r['delta_pct']:+.2f}%",
                      "*" if r.get("pareto") else "")
    return table


# -- export --------------------------------------------------------------------------------------------
def run_export(model: str, method: str, bits, options: dict, *, output: str, format: str = "pt2",
               calibration=None, device: str = "cpu", dtype: str = "float32", capacity: int = 512,
               quiet: bool = False) -> dict:
    """``kvpass export``: compile ``model`` with ``method`` for a cache of ``capacity`` tokens and write it to
    ``output`` with ``kvpass.export.export(model, output, format=format)`` ("pt2" or "onnx"). Returns the
    model, method, format, output directory and the files written."""
    opts = method_options(method, bits, options)
    if format not in ("pt2", "onnx"):
        raise OptionError(f"--format must be pt2 or onnx, got {format!r}")
    try:
        from .export import export
    except ImportError as e:
        raise KVPassError(f"export is not available in this kvpass build (kvpass.export: {e})") from None
    check_model_name(model)
    _check_calibration_dir(calibration)
    if calibration is None and needs_calibration(method):
        raise KVPassError(f"{method} needs a calibration: pass --calibration DIR from 'kvpass calibrate {method}'")
    console = _console(quiet)
    loaded = load_model(model, device, dtype, status=console)
    import kvpass
    target = copy.deepcopy(loaded.model)
    if calibration is not None:
        opts["calibration"] = calibration
    if capacity < 3:
        raise OptionError(f"--capacity must be at least 3 tokens, got {capacity}")
    compiled = kvpass.compile(target, method, capacity=capacity, **opts)
    with console.status(f"Exporting ({format}) to {output}..."):
        manifest = export(compiled, output, format=format)
    console.print(f"Exported {loaded.name} with {method_label(method, opts)} to {output}")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return {"model": loaded.name, "method": method, "format": format, "output": str(output), "capacity": capacity,
            "files": files}


__all__ = ["run_report", "run_calibrate", "run_eval_ppl", "run_eval_generate", "run_sweep_command", "run_export",
           "sweep_table", "parse_device", "parse_dtype"]
