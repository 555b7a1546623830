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
    lines.append(f"`{m['command']}` — commit {m['git_commit'][:10]}, {shapes.get('windows')} windows × "
                 f"({shapes.get('prefill')} prefill + {shapes.get('decode')} decoded) tokens, "
                 f"{m.get('device')}, torch {m.get('torch')}")
    return "\n".join(lines)


def main() -> None:
    for name in ("quality_decode.json", "quality_calibrated.json"):
        path = RESULTS / name
        if path.exists():
            print(f"### {name}\n")
            print(ppl_table(path))
            print()


if __name__ == "__main__":
    main()
