"""``kvpass demo``: SmolLM2 on one State of the Union address, fp16 cache vs a compressed scheme (sim mode).

Prints cache bytes and bits per element at the evaluated length, perplexity (sim mode) and its change
against fp16 on the same tokens, then the committed reference table (bench/results/quality_reference.json).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .errors import KVPassError

REFERENCE = Path("bench") / "results" / "quality_reference.json"
SIM_NOTE = ("Perplexity here is the fast *sim* mode: the whole text is cached in one prefill and every "
            "query attends over the final compressed cache (pessimistic: in real decoding the newest "
            "tokens would still sit in the full-precision window). Generation through the real "
            "compressed cache arrives with kvpass.compile (a later issue).")


def find_reference() -> Path | None:
    """The committed bench/results/quality_reference.json of the source checkout kvpass runs from
    (searched from the package folder upwards, then from the working directory), or None."""
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for start in starts:
        for folder in (start, *start.parents):
            if (folder / REFERENCE).is_file():
                return folder / REFERENCE
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


def run_demo(method: str = "kivi", options: dict | None = None, tokens: int = 1024, year: int | None = None,
             console: Console | None = None) -> list[dict]:
    """Run the demo and print it. method/options: the compressed scheme (``get_scheme(method,
    **options)``); tokens: evaluated length (one window of the speech, from its start); year: which
    2010+ speech (default the most recent). returns: the two result rows (fp16, method)."""
    from .data import speeches
    from .methods import get_scheme
    from .models import load_smollm2
    from .simulate import perplexity

    console = console or Console()
    scheme = get_scheme(method, **(options or {}))         # bad method/options fail before the model loads
    if not isinstance(tokens, int) or tokens < 2:
        raise KVPassError(f"--tokens must be an integer >= 2, got {tokens!r}")
    pool = speeches("eval")
    if year is not None:
        pool = [s for s in pool if s.year == year]
        if not pool:
            raise KVPassError(f"no 2010+ speech from {year}; years: "
                              f"{', '.join(str(s.year) for s in speeches('eval'))}")
    speech = pool[-1]
    with console.status("Loading SmolLM2-135M-Instruct (the first run dequantizes the GGUF: ~20 s)..."):
        t0 = time.perf_counter()
        model, tokenizer = load_smollm2()
        console.print(f"Loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s")
    ids = tokenizer(speech.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] < tokens:
        raise KVPassError(f"the {speech.year} speech has only {ids.shape[1]} tokens; use --tokens <= {ids.shape[1]}")
    ids = ids[:, :tokens]
    console.print(f"Text: {speech.year} State of the Union ({speech.president}), first {tokens} tokens. "
                  f"Cache dtype fp16, model fp32.")
    rows = []
    for s in (get_scheme("fp16"), scheme):
        with console.status(f"Sim perplexity with the {s.describe()} cache..."):
            r = perplexity(model, ids, s, cache_dtype=torch.float16)
        rows.append(r)
    base = rows[0]["ppl"]
    for r, s in zip(rows, (get_scheme("fp16"), scheme)):
        r.update(label=scheme_label(s.name, s.options()), fp16_ppl=base, delta_pct=100 * (r["ppl"] / base - 1))
    table = quality_table(rows, f"SmolLM2-135M-Instruct, {tokens} tokens, all 30 layers (sim mode)")
    console.print(table)
    saved = rows[0]["cache_bytes"] / rows[1]["cache_bytes"]
    console.print(f"{scheme.describe()} keeps the K/V of these {tokens} tokens in "
                  f"{_fmt_bytes(rows[1]['cache_bytes'])} instead of {_fmt_bytes(rows[0]['cache_bytes'])} "
                  f"({saved:.2f}x smaller).")
    console.print(f"[yellow]{SIM_NOTE}[/yellow]")
    print_reference(console)
    return rows


def print_reference(console: Console) -> None:
    """Print the committed reference quality table, or say that it was not found."""
    path = find_reference()
    if path is None:
        console.print(f"No committed reference table found ({REFERENCE} is only in a source checkout).")
        return
    try:
        data = json.loads(path.read_text())
        rows, meta = data["rows"], data["meta"]
    except (OSError, ValueError, KeyError) as e:
        console.print(f"Could not read {path}: {e}")
        return
    shapes = meta.get("shapes", {})
    title = (f"Reference ({path}): {shapes.get('windows', '?')} windows x {shapes.get('window', '?')} tokens of "
             f"2010+ speeches, commit {str(meta.get('git_commit', '?'))[:10]}")
    console.print(quality_table(rows, title))
