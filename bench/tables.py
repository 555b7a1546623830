"""Print the README's quality tables (markdown) from the committed result files, so every number in the
README comes from a JSON result: ``python bench/tables.py``."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def ppl_table(path: Path, bits_key: str = "bits_per_elem_fp16_model_8k") -> str:
    data = json.loads(path.read_text())
    lines = ["| method | ppl | Δ vs fp16 | bits/elem (fp16 model, 8K ctx) | bits/elem measured |",
             "| --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        delta = "—" if r.get("delta_pct") is None else f"{r['delta_pct']:+.2f}%"
        lines.append(f"| {r.get('label', r['method'])} | {r['ppl']:.3f} | {delta} | "
                     f"{r.get(bits_key, float('nan')):.2f} | {r['bits_per_elem']:.2f} |")
    m = data["meta"]
    shapes = m.get("shapes", {})
    lines.append("")
    if m.get("unfinished"):
        lines.append(f"(unfinished run, rows so far; commit {m['git_commit'][:10]})")
        return "\n".join(lines)
    lines.append(f"`{m['command']}` — commit {m['git_commit'][:10]}, {shapes.get('windows')} windows × "
                 f"({shapes.get('prefill')} prefill + {shapes.get('decode')} decoded) tokens, "
                 f"{m.get('device')}, torch {m.get('torch')}")
    return "\n".join(lines)


def decode_table(path: Path) -> str:
    """Every row of the honest-decode result (fixed-rate and calibrated methods) as the README shows it."""
    data = json.loads(path.read_text())
    lines = ["| method | options | ppl (decode) | Δ vs fp16 | bits/elem, fp16 model at 1K | at 8K | "
             "bits/elem measured (fp32 model) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        opts = ", ".join(f"{k}={v}" for k, v in r.get("options", {}).items()
                         if k not in ("calibration", "scale_dtype") and v is not None) or "—"
        measured = f"{r['bits_per_elem']:.2f}"
        reached = r.get("qaq_average_bits")
        if reached:
            first = next(iter(reached.values()))
            measured += f" (codes reached {first['code_bits']:.2f}, stored {first['stored_bits']:.2f})"
        lines.append(f"| {r.get('label', r['method'])} | {opts} | {r['ppl']:.3f} | {r['delta_pct']:+.2f}% | "
                     f"{r['bits_per_elem_fp16_model']:.2f} | {r['bits_per_elem_fp16_model_8k']:.2f} | {measured} |")
    return "\n".join(lines)


def gpu_tables(attention: Path, context: Path, e2e: Path) -> str:
    """Decode attention vs SDPA, append cost, the largest context and end-to-end decode, from the GPU result
    files. Rows a result file marks as superseded (``kivi4_reshape_rows``: the main loop the launcher takes
    now) replace the run's own and are marked †."""
    data = json.loads(attention.read_text())
    replaced = {(r["method"], r["batch"], r["length"]): dict(r, method=r["method"] + " †")
                for r in data.get("kivi4_reshape_rows", [])}
    rows = [replaced.get((r["method"], r.get("batch"), r.get("length")), r) for r in data["rows"]
            if r["bench"] == "decode_attention"]
    lines = ["| batch × context | bf16 SDPA | " + " | ".join(m for m in dict.fromkeys(
        r["method"] for r in rows if r["method"] != "sdpa-bf16")) + " |"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "sdpa-bf16"))
    lines.append("| --- " * (2 + len(methods)) + "|")
    for b, length in dict.fromkeys((r["batch"], r["length"]) for r in rows):
        cell = {r["method"]: r for r in rows if r["batch"] == b and r["length"] == length}
        cell.update({m.rstrip(" †"): cell[m] for m in list(cell) if m.endswith("†")})
        base = cell["sdpa-bf16"]
        lines.append(f"| {b} × {length // 1024}K | {base['us']:.0f} µs ({base['read_gbs']:.0f} GB/s) | " + " | ".join(
            f"{cell[m]['us']:.0f} µs, {cell[m]['speedup']:.2f}× ({cell[m]['read_gbs']:.0f} GB/s)" for m in methods)
            + " |")
    appends = [r for r in data["rows"] if r["bench"] == "append"]
    one = [r for r in appends if r["new_tokens"] == 1]
    if one:
        lines.append("")
        lines.append(f"Append of one token: {min(r['us'] for r in one):.1f}–{max(r['us'] for r in one):.1f} µs "
                     f"({100 * min(r['fraction_of_decode_attention'] for r in one):.1f}–"
                     f"{100 * max(r['fraction_of_decode_attention'] for r in one):.1f}% of the attention step); "
                     + "; ".join(f"{r['method']} prefill of {r['new_tokens'] // 1024}K tokens "
                                 f"{r['us'] / 1e3:.2f} ms" for r in appends if r["new_tokens"] > 1) + ".")
    m = data["meta"]
    lines.append(f"{m['device']}, torch {m['torch']}, triton {m['triton']}, {m['date'][:10]}; copy bandwidth "
                 f"{m['copy_gbs']:.0f} GB/s; {m['timing']}.")
    if context.exists():
        ctx = json.loads(context.read_text())
        lines.append("")
        lines.append("| method | largest context (batch 1, 32 layers) | KiB per token | "
                     "attention step over all layers |")
        lines.append("| --- | --- | --- | --- |")
        for r in ctx["rows"]:
            lines.append(f"| {r['method']} | {r['max_tokens'] / 1e6:.2f}M tokens | "
                         f"{r['bytes_per_token_all_layers'] / 1024:.1f} | {r['attention_step_ms']:.0f} ms |")
    if e2e.exists():
        runs = json.loads(e2e.read_text())
        lines.append("")
        lines.append("| run | setup | batch × context | ms / step | tokens/s | vs hf-static-compiled (same run) | "
                     "memory-bound limit | step / limit | KV cache |")
        lines.append("| --- " * 9 + "|")
        for r in runs["rows"]:
            if "step_ms" not in r:
                continue
            ref = next((x for x in runs["rows"] if x.get("run") == r.get("run")
                        and x["setup"] == "hf-static-compiled" and "step_ms" in x), None)
            ratio = f"{ref['step_ms'] / r['step_ms']:.2f}×" if ref else "—"
            lines.append(f"| {r.get('run', 1)} | {r['setup']} | {r['batch']} × {r['context'] // 1024}K | "
                         f"{r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {ratio} | {r['bound_ms']:.1f} ms | "
                         f"{r['step_over_bound']:.2f}× | {r['cache_bytes'] / 2 ** 30:.1f} GiB |")
    return "\n".join(lines)


def main() -> None:
    if (RESULTS / "quality_decode.json").exists():
        print("### quality_decode.json (all rows)\n")
        print(decode_table(RESULTS / "quality_decode.json"))
        print()
    for name in ("quality_decode.json", "quality_calibrated.json"):
        path = RESULTS / name
        if path.exists():
            print(f"### {name}\n")
            print(ppl_table(path))
            print()
    if (RESULTS / "decode_attention.json").exists():
        print("### decode_attention.json, max_context.json, e2e_decode.json\n")
        print(gpu_tables(RESULTS / "decode_attention.json", RESULTS / "max_context.json",
                         RESULTS / "e2e_decode.json"))


if __name__ == "__main__":
    main()
