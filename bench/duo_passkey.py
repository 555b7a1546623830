"""DuoAttention on SmolLM2: passkey accuracy over depth x length and honest decode perplexity, per head policy.

    python bench/duo_passkey.py --output bench/results/duo_passkey.json --plot bench/results/duo_passkey.png
    python bench/duo_passkey.py --device cuda --samples 10 --max-seconds 480 --output ...   (on the GPU)

Every setup runs ``kvpass.compile`` (eager backend; SmolLM2 in ``--dtype`` on ``--device``, where on CUDA the
kvpass ops run their Triton kernels) on the same prompts: fp16 (all heads full), duo at ``--ratios`` of
retrieval heads with the shipped gates (kvpass/gates/smollm2-duo, made by bench/duo_gates.py), streaming
(StreamingLLM: every head sink + recent) and duo at the first ratio with KIVI-2 retrieval heads. Passkey
prompts come from the held-out speeches (2010 on), fed ``--chunk`` tokens at a time (chunked prefill).
Perplexity is the honest decode mode (prompt, then one token at a time through the real caches) on
``--windows`` windows of the held-out text. Rows follow shared/BENCHMARKS.md ("passkey": length, depth,
accuracy, fp16_accuracy; "ppl": ppl, fp16_ppl, delta_pct). ``--output`` is rewritten after every setup (meta
"unfinished" until the end), so a run killed at a time limit keeps what it measured; ``--max-seconds`` skips
the setups that would not fit (meta "skipped"), and ``--resume`` (an earlier output) measures only the setups
that output lacks.
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
from kvpass.toolkit import parse_device


def setups(ratios: list[float], gates) -> list[Setup]:
    out = [Setup("fp16", "fp16", {})]
    out += [Setup(f"duo-{r:g}", "fp16", {}, "duo", {"duo": gates, "retrieval": r}) for r in ratios]
    out.append(Setup("streaming", "fp16", {}, "streaming", {"sink": gates.options["sink"],
                                                           "recent": gates.options["recent"]}))
    out.append(Setup(f"duo-{ratios[0]:g}+kivi-2", "kivi", {"bits": 2}, "duo", {"duo": gates, "retrieval": ratios[0]}))
    return out


def passkey_rows(model, samples, st: Setup, capacity: int, chunk: int) -> list[dict]:
    """The passkey rows of one setup (kvpass.passkey.evaluate_setups on it alone, so each can be saved)."""
    return [{"bench": "passkey", "model": SMOLLM2_NAME, **r}
            for r in evaluate_setups(model, samples, [st], capacity=capacity, chunk=chunk)]


def perplexity_row(model, ids: torch.Tensor, st: Setup, prefill: int) -> dict:
    """Honest decode perplexity of one setup on the windows ``ids`` (prompt ``prefill`` tokens)."""
    torch._dynamo.reset()
    compiled = kvpass.compile(copy.deepcopy(model), st.method, heads=st.heads, backend="eager",
                              capacity=ids.shape[1] + 8, **st.options, **(st.policy or {}))
    r = decode_perplexity(compiled, ids, prefill, desc=f"ppl {st.label}")
    report = kvpass.report(compiled)
    return {"bench": "ppl", "mode": "decode", "model": SMOLLM2_NAME, "setup": st.label, "method": st.method,
            "heads": st.heads, "ppl": r["ppl"], "tokens": r["tokens"], "windows": ids.shape[0],
            "prefill": prefill, "bits_per_elem": report.bits_per_element}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class Budget:
    """``--max-seconds``: a setup starts only if the time spent so far plus what the previous setup of the
    same part took (for a part's first setup: the previous setup of the other part) fits; the skipped ones are
    listed in the meta. None: no limit."""

    def __init__(self, seconds: float | None):
        self.seconds, self.t0, self.last, self.skipped = seconds, time.perf_counter(), {}, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, part: str, label: str) -> bool:
        guess = self.last.get(part, max(self.last.values(), default=0.0))
        ok = self.seconds is None or self.elapsed() + guess <= self.seconds
        if not ok:
            self.skipped.append(f"{part} {label}")
            print(f"skipped {part} {label}: {self.elapsed():.0f} s spent of --max-seconds {self.seconds:g}",
                  flush=True)
        return ok

    def took(self, part: str, seconds: float) -> None:
        self.last[part] = seconds


RESUME_SETTINGS = ("lengths", "depths", "samples", "ratios", "chunk", "gates", "windows", "prefill", "decode",
                   "dtype")


def resumed_rows(path: Path, meta: dict) -> list[dict]:
    """The rows of an earlier output of this script (``--resume``), which must have been measured with the same
    settings on the same device (SystemExit otherwise); notes where they came from in ``meta``."""
    old = json.loads(path.read_text())
    before = old.get("meta", {})
    settings = before.get("settings", {})
    differ = [k for k in RESUME_SETTINGS if settings.get(k) != meta["settings"][k]]
    if before.get("device") != meta["device"]:
        differ.append(f"device ({before.get('device')} there)")
    if differ:
        raise SystemExit(f"--resume {path}: measured with other settings: {', '.join(differ)}")
    meta["resumed_from"] = {"path": str(path), **{k: before.get(k) for k in ("git_commit", "date", "seconds")}}
    print(f"resuming {path}: {len(old['rows'])} rows kept", flush=True)
    return old["rows"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(r["setup"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(labels), figsize=(2.6 * len(labels) + 1, 3.2), sharey=True, squeeze=False)
    axes = list(axes[0])
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
    fig.colorbar(im, ax=axes, label="passkey accuracy")
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
    p.add_argument("--windows", type=int, default=2, help="perplexity windows (0: no perplexity part)")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=1024)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the model's dtype (the 'fp16' setup keeps its uncompressed cache in it)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no setup that would not end by then (judged by the previous one of its part)")
    reuse = p.add_mutually_exclusive_group()
    reuse.add_argument("--passkey-rows", type=Path, default=None,
                       help="take the passkey rows from this JSON (an earlier run's) and measure perplexity only")
    reuse.add_argument("--resume", type=Path, default=None,
                       help="keep the rows of this earlier (unfinished) output, same settings, and measure only the "
                            "setups it lacks")
    p.add_argument("--output", type=Path, default=None, help="JSON, rewritten after every setup")
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args()
    budget = Budget(args.max_seconds)
    device = parse_device(args.device)
    gates = resolve_gates(args.gates)
    meta = {**provenance(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "dtype": args.dtype, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "model": SMOLLM2_NAME,
            "gates": {"source": args.gates, **gates.options, "meta": gates.meta},
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    rows: list[dict] = []
    if args.passkey_rows:
        rows += [r for r in json.loads(args.passkey_rows.read_text())["rows"] if r["bench"] == "passkey"]
    elif args.resume:
        rows += resumed_rows(args.resume, meta)
    done = {(r["bench"], r["setup"]) for r in rows}
    model, tok = load_smollm2(getattr(torch, args.dtype))
    model.to(device)
    gates.check(model, "duo")
    runs = setups(args.ratios, gates)

    def save(finished: bool = False) -> None:
        """Write what is measured so far: a run killed part way keeps it (meta "unfinished": true)."""
        if args.output:
            end = {"seconds": round(budget.elapsed()), "skipped": budget.skipped, "unfinished": not finished}
            text = json.dumps({"meta": {**meta, **end}, "rows": rows}, indent=2) + "\n"
            tmp = args.output.with_name(args.output.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(args.output)          # never a half-written file

    todo = [st for st in runs if ("passkey", st.label) not in done] if not args.passkey_rows else []
    samples = passkey_samples(tok, args.lengths, args.depths, args.samples, seed=0) if todo else []
    for st in todo:
        if not budget.allows("passkey", st.label):
            continue
        t = time.perf_counter()
        new = passkey_rows(model, samples, st, max(args.lengths) + 16, args.chunk)
        budget.took("passkey", time.perf_counter() - t)
        rows += new
        base = {(r["length"], r["depth"]): r["accuracy"] for r in rows if r["bench"] == "passkey"
                and r["setup"] == "fp16"}
        for r in new:
            r["fp16_accuracy"] = base.get((r["length"], r["depth"]))
        save()
        hits = sum(r["accuracy"] * r["samples"] for r in new) / sum(r["samples"] for r in new)
        print(f"passkey {st.label}: {hits:.3f} over {len(samples)} prompts in {time.perf_counter() - t:.0f} s "
              f"({budget.elapsed():.0f} s so far)", flush=True)
    todo = [st for st in runs if ("ppl", st.label) not in done] if args.windows > 0 else []
    ids = token_windows(tok, eval_text(), args.prefill + args.decode, args.windows, spread=True) if todo else None
    for st in todo:
        if not budget.allows("ppl", st.label):
            continue
        t = time.perf_counter()
        r = perplexity_row(model, ids, st, args.prefill)
        budget.took("ppl", time.perf_counter() - t)
        rows.append(r)
        base = next((x["ppl"] for x in rows if x["bench"] == "ppl" and x["setup"] == "fp16"), None)
        r["fp16_ppl"], r["delta_pct"] = base, None if base is None else 100 * (r["ppl"] / base - 1)
        save()
        print(f"ppl {st.label}: {r['ppl']:.3f} in {time.perf_counter() - t:.0f} s ({budget.elapsed():.0f} s so far)",
              flush=True)
    save(finished=True)
    if args.plot and any(r["bench"] == "passkey" for r in rows):
        plot([r for r in rows if r["bench"] == "passkey"], args.plot)
    for r in rows:
        if r["bench"] == "passkey":
            fp16 = "-" if r["fp16_accuracy"] is None else f"{r['fp16_accuracy']:.2f}"
            print(f"{r['setup']:>18} L={r['length']:>5} depth={r['depth']:.1f}: {r['accuracy']:.2f} (fp16 {fp16})")
        else:
            delta = "-" if r["delta_pct"] is None else f"{r['delta_pct']:+.2f}%"
            print(f"{r['setup']:>18} ppl {r['ppl']:.3f} ({delta} vs fp16), {r['bits_per_elem']:.2f} b/elem")


if __name__ == "__main__":
    main()
