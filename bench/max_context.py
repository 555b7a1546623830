"""Largest context whose KV cache fits one GPU beside a Llama-3-8B-shaped model, per method.

    python bench/max_context.py --output bench/results/max_context.json     (kvpass installed, on the GPU)

Llama-3-8B shapes (32 layers, 32 query / 8 KV heads, head_dim 128, bf16). The model's weights are stood in
for by one allocation of their size (8.03e9 parameters x 2 bytes) so that only the cache competes for the
rest of the memory. For each method the script predicts the largest length from the bytes per token of
the method's layout, then tries lengths downward in steps of 1/64 of the prediction until all 32 layers'
caches (batch 1) allocate, are filled (zeros; ``length`` set to the capacity, as if prefilled), and one
decode-attention step over every layer runs with finite output. That step is timed (kvpass kernel for
compressed methods, bf16 SDPA for fp16). This is the cache side of decoding only: no weights are read and
no MLP runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpass import CacheShape, get_scheme
from kvpass.codegen import kernel_attend
from common import provenance  # bench/common.py (scripts run as python bench/NAME.py)

LAYERS, HQ, HKV, D = 32, 32, 8, 128
WEIGHT_BYTES = 8_030_261_248 * 2
METHODS = {"fp16": ("fp16", {}), "kivi-2": ("kivi", {"bits": 2}), "kivi-4": ("kivi", {"bits": 4})}


def try_length(method: str, options: dict, length: int) -> float:
    """Allocate every layer's cache at ``length`` tokens and run one decode-attention step; returns ms."""
    scheme = get_scheme(method, **options)
    states = [scheme.allocate(CacheShape(1, HKV, D, length, torch.bfloat16), "cuda") for _ in range(LAYERS)]
    for st in states:
        st.length_tensor.fill_(length)
    q = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16)

    def step():
        outs = []
        for st in states:
            if method == "fp16":
                k, v = st["k"][:, :, :length], st["v"][:, :, :length]
                outs.append(F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            else:
                outs.append(kernel_attend(scheme, st, q, length=length))
        return outs

    outs = step()
    torch.cuda.synchronize()
    if not all(torch.isfinite(o).all() for o in outs):
        raise RuntimeError("non-finite attention output")
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / 3 * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    weights = torch.empty(WEIGHT_BYTES, dtype=torch.uint8, device="cuda")
    free, total = torch.cuda.mem_get_info()
    rows = []
    for name in args.methods:
        method, options = METHODS[name]
        scheme = get_scheme(method, **options)
        big = CacheShape(1, HKV, D, 1 << 20, torch.bfloat16)
        per_token = sum(s.nbytes for s in scheme.full_layout(big).values() if not s.host) / big.capacity * LAYERS
        predicted = int((free - (2 << 30)) / per_token)       # 2 GiB for workspaces and the allocator
        step = max(predicted // 64, 1024)
        length, ms, error = predicted // 1024 * 1024, None, None
        while length > 0:
            try:
                ms = try_length(method, options, length)
                break
            except (torch.OutOfMemoryError, RuntimeError) as e:
                error = f"{type(e).__name__}: {str(e)[:120]}"
                torch.cuda.empty_cache()
                length -= step
        rows.append({"bench": "max_context", "method": name, "max_tokens": length, "predicted_tokens": predicted,
                     "bytes_per_token_all_layers": per_token, "attention_step_ms": ms, "last_error": error})
        print(f"{name}: {length:,} tokens ({per_token / 1024:.1f} KiB/token over {LAYERS} layers), "
              f"attention step {ms:.1f} ms" if ms else f"{name}: failed ({error})", flush=True)
        torch.cuda.empty_cache()
    result = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       **provenance(),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "gpu_total_bytes": total, "free_after_weights": free, "weight_bytes": WEIGHT_BYTES,
                       "shapes": {"layers": LAYERS, "q_heads": HQ, "kv_heads": HKV, "head_dim": D,
                                  "dtype": "bfloat16", "batch": 1}},
              "rows": rows}
    text = json.dumps(result, indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    print(text)
    del weights


if __name__ == "__main__":
    main()
