"""DuoAttention on SmolLM2: passkey accuracy over depth x length and honest decode perplexity, per head policy.

    python bench/duo_passkey.py --output bench/results/duo_passkey.json --plot bench/results/duo_passkey.png

Every setup runs ``kvpass.compile`` (eager backend, fp32 SmolLM2) on the same prompts: fp16 (all heads
full), duo at ``--ratios`` of retrieval heads with the shipped gates (kvpass/gates/smollm2-duo, made by
bench/duo_gates.py), streaming (StreamingLLM: every head sink + recent) and duo at the first ratio with
KIVI-2 retrieval heads. Passkey prompts come from the held-out speeches (2010 on), fed ``--chunk`` tokens at
a time (chunked prefill). Perplexity is the honest decode mode (prompt, then one token at a time through
the real caches) on ``--windows`` windows of the held-out text. Rows follow shared/BENCHMARKS.md
("passkey": length, depth, accuracy, fp16_accuracy; "ppl": ppl, fp16_ppl, delta_pct).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import kvpass
from common import provenance  # bench/common.py (scripts run as python bench/NAME.py)
from kvpass.data import eval_text, token_windows
from kvpass.duo import resolve_gates
from kvpass.models import SMOLLM2_NAME, load_smollm2
from kvpass.passkey import Setup, evaluate_setups, passkey_samples
from kvpass.perplexity import decode_perplexity


def setups(ratios: list[float], gates) -> list[Setup]:
    out = [Setup("fp16", "fp16", {})]
    out += [Setup(f"duo-{r:g}", "fp16", {}, "duo", {"duo": gates, "retrieval": r}) for r in ratios]
    out.append(Setup("streaming", "fp16", {}, "streaming", {"sink": gates.options["sink"],
                                                           "recent": gates.options["recent"]}))
    out.append(Setup(f"duo-{ratios[0]:g}+kivi-2", "kivi", {"bits": 2}, "duo", {"duo": gates, "retrieval": ratios[0]}))
    return out


def perplexity_rows(model, tok, runs: list[Setup], windows: int, prefill: int, decode: int) -> list[dict]:
    ids = token_windows(tok, eval_text(), prefill + decode, windows, spread=True)
    rows = []
    for st in runs:
        torch._dynamo.reset()
        compiled = kvpass.compile(copy.deepcopy(model), st.method, heads=st.heads, backend="eager",
                                  capacity=prefill + decode + 8, **st.options, **(st.policy or {}))
        r = decode_perplexity(compiled, ids, prefill, desc=f"ppl {st.label}")
        report = kvpass.report(compiled)
        rows.append({"bench": "ppl", "mode": "decode", "model": SMOLLM2_NAME, "setup": st.label, "method": st.method,
                     "heads": st.heads, "ppl": r["ppl"], "tokens": r["tokens"], "windows": windows,
                     "prefill": prefill, "bits_per_elem": report.bits_per_element})
        print(f"ppl {st.label}: {r['ppl']:.3f}", flush=True)
    base = next(r["ppl"] for r in rows if r["setup"] == "fp16")
    for r in rows:
        r["fp16_ppl"], r["delta_pct"] = base, 100 * (r["ppl"] / base - 1)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(r["setup"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(labels), figsize=(2.6 * len(labels) + 1, 3.2), sharey=True)
    for ax, label in zip(axes, labels):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for r in rows:
            if r["setup"] == label:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.1f}" for d in depths])
        ax.set_xlabel("prompt length")
    axes[0].set_ylabel("needle depth")
    fig.colorbar(im, ax=list(axes), label="passkey accuracy")
    fig.suptitle(f"{SMOLLM2_NAME}: passkey retrieval per head policy", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    p.add_argument("--depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    p.add_argument("--samples", type=int, default=2, help="prompts per (length, depth)")
    p.add_argument("--ratios", type=float, nargs="*", default=[0.5, 0.25])
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--gates", default="smollm2")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=1024)
    p.add_argument("--passkey-rows", type=Path, default=None,
                   help="take the passkey rows from this JSON (an earlier run's) and measure perplexity only")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    gates = resolve_gates(args.gates)
    model, tok = load_smollm2(torch.float32)
    gates.check(model, "duo")
    runs = setups(args.ratios, gates)
    if args.passkey_rows:
        rows = [r for r in json.loads(args.passkey_rows.read_text())["rows"] if r["bench"] == "passkey"]
    else:
        samples = passkey_samples(tok, args.lengths, args.depths, args.samples, seed=0)
        rows = [{"bench": "passkey", "model": SMOLLM2_NAME, **r}
                for r in evaluate_setups(model, samples, runs, capacity=max(args.lengths) + 16, chunk=args.chunk)]
        base = {(r["length"], r["depth"]): r["accuracy"] for r in rows if r["setup"] == "fp16"}
        for r in rows:
            r["fp16_accuracy"] = base[(r["length"], r["depth"])]
        if args.output:         # the passkey part alone first: the perplexity part takes as long again
            args.output.write_text(json.dumps({"meta": {"unfinished": True}, "rows": rows}, indent=2) + "\n")
    rows += perplexity_rows(model, tok, runs, args.windows, args.prefill, args.decode)
    meta = {**provenance(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
            "model": SMOLLM2_NAME, "gates": {"source": args.gates, **gates.options, "meta": gates.meta},
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "seconds": round(time.perf_counter() - t0)}
    text = json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    if args.plot:
        plot([r for r in rows if r["bench"] == "passkey"], args.plot)
    for r in rows:
        if r["bench"] == "passkey":
            print(f"{r['setup']:>18} L={r['length']:>5} depth={r['depth']:.1f}: {r['accuracy']:.2f} "
                  f"(fp16 {r['fp16_accuracy']:.2f})")
        else:
            print(f"{r['setup']:>18} ppl {r['ppl']:.3f} ({r['delta_pct']:+.2f}% vs fp16), {r['bits_per_elem']:.2f} b/elem")


if __name__ == "__main__":
    main()
