"""KV-cache bytes of the head policies at long contexts, Llama-3-8B shapes, from the layouts kvpass allocates.

    python bench/duo_memory.py --output bench/results/duo_memory.json

Llama-3-8B geometry (32 layers, 8 KV heads, head_dim 128, bf16), batch 1. For each context length the bytes
are summed over every layer's :meth:`Scheme.full_layout` — the exact buffers ``Scheme.allocate`` creates on
any device (tests check allocate against the layout), so no GPU is needed to count them: fp16 (all heads
full), streaming (every head sink + recent), duo at ``--ratio`` retrieval heads with fp16 and with KIVI-2
retrieval heads. Which heads are retrieval heads does not change the bytes, so random gates stand in for
calibrated ones. ``ratio_vs_fp16`` is each setup's bytes over fp16's at the same context.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

import kvpass
from common import provenance  # bench/common.py (scripts run as python bench/NAME.py)
from kvpass.calibration import Calibration

LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128


def random_gates(sink: int, recent: int) -> Calibration:
    gen = torch.Generator().manual_seed(0)
    return Calibration(method="duo", options={"sink": sink, "recent": recent}, model={},
                       tensors={f"layers.{i}.gates": torch.rand(KV_HEADS, generator=gen) for i in range(LAYERS)})


def cache_bytes(scheme, context: int) -> int:
    return sum(spec.nbytes for layer in range(LAYERS)
               for spec in scheme.full_layout(kvpass.CacheShape(1, KV_HEADS, HEAD_DIM, context, torch.bfloat16,
                                                                layer)).values() if not spec.host)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768, 131072, 1 << 20])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    gates = random_gates(args.sink, args.recent)
    kivi = kvpass.get_scheme("kivi", bits=2)
    setups = {"fp16": kvpass.get_scheme("fp16"),
              "streaming": kvpass.get_scheme("streaming", sink=args.sink, recent=args.recent),
              f"duo-{args.ratio:g}": kvpass.get_scheme("duo", gates=gates, ratio=args.ratio),
              "kivi-2": kivi,
              f"duo-{args.ratio:g}+kivi-2": kvpass.get_scheme("duo", inner=kivi, gates=gates, ratio=args.ratio)}
    rows = []
    for context in args.contexts:
        base = cache_bytes(setups["fp16"], context)
        for label, scheme in setups.items():
            n = cache_bytes(scheme, context)
            rows.append({"bench": "cache_memory", "setup": label, "context": context, "batch": 1, "bytes": n,
                         "gib": n / 2**30, "fp16_bytes": base, "ratio_vs_fp16": n / base})
            print(f"{context:>8} {label:>14}: {n / 2**30:8.3f} GiB ({n / base:.3f}x fp16)")
    meta = {**provenance(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shapes": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
            "retrieval_ratio": args.ratio, "sink": args.sink, "recent": args.recent,
            "source": "Scheme.full_layout byte counts (what Scheme.allocate allocates); not a GPU allocation"}
    text = json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
