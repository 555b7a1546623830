"""Time to first token: prefilling a prompt into a compressed cache against the fp16 prefill, same run.

    python bench/ttft.py --output bench/results/ttft.json      (kvpass installed, on the GPU)
    python bench/ttft.py --tiny                                (the same code, tiny, on the CPU)

A Llama-3-8B-shaped model with random bf16 weights (bench/e2e_decode.py) prefills one prompt of each
``--lengths`` and returns the first token's logits. ``hf`` is transformers' own forward (SDPA attention,
DynamicCache); ``kvpass-<method>`` is ``kvpass.compile`` (Inductor), whose prefill attends the prompt
through SDPA and compresses it into the cache (the KIVI append kernels). Each figure is the median of
``--repeats`` timed prefills after one untimed (compiling) call; ``ratio`` is the setup's time over hf's at
the same length.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import kvpass
from common import provenance  # bench/common.py (scripts run as python bench/NAME.py)
from e2e_decode import build_model


def timed(fn, repeats: int, device: str) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one untimed call."""
    out = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            out.append(time.perf_counter() - t0)
    return out


def profile(name: str, fn, device: str) -> None:
    """Print the kernels taking most device time in one call of ``fn``."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"--- {name}\n" + prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=70),
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama on the CPU (a smoke test)")
    p.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768])
    p.add_argument("--methods", nargs="*", default=["kivi-2"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true",
                   help="print each setup's busiest GPU kernels (torch.profiler) at the last length")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        args.lengths, args.repeats = [64, 128], 2
    base = build_model(args.tiny, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    prompts = {n: torch.randint(0, base.config.vocab_size, (1, n), device=device, generator=gen)
               for n in args.lengths}
    rows = []
    with torch.no_grad():
        for n, ids in prompts.items():
            s = timed(lambda: base(input_ids=ids, use_cache=True, logits_to_keep=1), args.repeats, device)
            rows.append({"bench": "ttft", "setup": "hf", "length": n, "ms": statistics.median(s) * 1e3,
                         "ratio": 1.0})
            print(f"hf {n}: {rows[-1]['ms']:.1f} ms", flush=True)
        if args.profile:
            profile(f"hf {n}", lambda: base(input_ids=ids, use_cache=True, logits_to_keep=1), device)
        for m in args.methods:
            method, _, bits = m.partition("-")
            model = kvpass.compile(build_model(args.tiny, device, dtype), method, capacity=max(args.lengths) + 8,
                                   backend="eager" if args.tiny else "inductor",
                                   **({"bits": int(bits)} if bits else {}))
            for n, ids in prompts.items():
                s = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), args.repeats, device)
                base_ms = next(r["ms"] for r in rows if r["setup"] == "hf" and r["length"] == n)
                rows.append({"bench": "ttft", "setup": f"kvpass-{m}", "length": n,
                             "ms": statistics.median(s) * 1e3, "ratio": statistics.median(s) * 1e3 / base_ms})
                print(f"kvpass-{m} {n}: {rows[-1]['ms']:.1f} ms ({rows[-1]['ratio']:.2f}x hf)", flush=True)
            if args.profile:
                profile(f"kvpass-{m} {n}", lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), device)
            del model
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, **provenance(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": "tiny Llama" if args.tiny else "Llama-3-8B shapes, random bf16 weights, batch 1",
            "repeats": args.repeats}
    text = json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
