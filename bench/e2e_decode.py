"""End-to-end decode speed of a Llama-3-8B-shaped model (random bf16 weights) on one GPU.

    python bench/e2e_decode.py --output bench/results/e2e_decode.json     (kvpass installed, on the GPU)
    python bench/e2e_decode.py --tiny                                     (the same code, tiny, on the CPU)

Setups (shared/BENCHMARKS.md): ``hf-static-compiled`` — transformers' StaticCache with
``torch.compile(model.forward, mode="reduce-overhead")``, the best plain-PyTorch fp16 setup;
``hf-dynamic`` — transformers' eager DynamicCache; ``kvpass-<method>`` — ``kvpass.compile`` (Inductor
backend) with a compressed cache; ``kvpass-duo-<method>[-graph]`` — the same under ``heads="duo"`` at 50% retrieval
heads (random gates with half the KV heads of every layer retrieval heads: which heads does not change the
speed); ``kvpass-<method>-graph`` — the same with a memoryless StaticCache and the
decode step replayed from a CUDA graph (GPU only); ``kvpass-fp16-graph`` is the fp16 cache through that
same pipeline (attention over the unexpanded GQA heads), the fp16 reference that isolates the cache's effect. Each setup prefills ``--context`` tokens per sequence (the prompt's logits
are computed for its last token only), then decodes ``--steps`` tokens greedily, one call per step; the
figure is the median step time after ``--warmup`` steps, with tokens/s = batch / step. ``bound_ms`` is the
memory-bound limit of one step: weight bytes plus the bytes of K/V the step must read (the cache's used
bytes), over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import kvpass
from kvpass.benchmark import random_calibration
from kvpass.methods import scheme_class
from kvpass.perplexity import _returned_cache, cache_argument
from common import provenance  # bench/common.py (scripts run as python bench/NAME.py)

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                 rope_theta=500000.0)
TINY = dict(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512)


def build_model(tiny: bool, device: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    cfg = transformers.LlamaConfig(**(TINY if tiny else LLAMA3_8B))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def timed_decode(step, first: torch.Tensor, steps: int, warmup: int, device: str) -> list[float]:
    """Run ``step(tokens) -> next tokens`` ``steps`` times; seconds of each call after ``warmup``."""
    times, tokens = [], first
    for i in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = step(tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


KERNEL_KINDS = (("append", ("append", "flush", "ring_write", "quantize", "index_put", "index_copy", "scatter")),
                ("attention", ("split_kernel", "merge", "kivi", "codebook", "kvquant", "duo", "flash", "fmha",
                               "attention", "sdpa")),
                ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "gemv", "splitk", "cublas", "mm_")))


def kernel_kind(name: str) -> str:
    """Which part of a decode step a CUDA kernel's name belongs to (attention, append, matmul, other)."""
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


PROFILE_STEPS = 3


def profile_steps(step, tokens: torch.Tensor, n: int = PROFILE_STEPS) -> dict:
    """Device time of each kernel over ``n`` decode steps (torch.profiler, CUDA activity), per step: the
    sum by :func:`kernel_kind` and the 30 costliest kernel names, in microseconds."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            tokens = step(tokens)
        torch.cuda.synchronize()
    by_name: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            entry = by_name.setdefault(e.name, [0.0, 0])
            entry[0] += e.device_time / n
            entry[1] += 1
    kinds: dict[str, float] = {}
    for name, (us, _) in by_name.items():
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + us
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]
    return {"steps": n, "kernel_us_per_step": sum(kinds.values()), "by_kind_us": kinds,
            "top": [{"name": name[:120], "us": us, "launches_per_step": count / n} for name, (us, count) in top]}


def run_hf(model, ids: torch.Tensor, steps: int, warmup: int, static: bool, compiled: bool, device: str,
           profiled: bool = False) -> dict:
    """transformers' own cache: StaticCache (optionally under torch.compile reduce-overhead) or DynamicCache."""
    b, ctx = ids.shape
    room = ctx + steps + 1 + (PROFILE_STEPS if profiled else 0)
    cache = transformers.StaticCache(config=model.config, max_cache_len=room) if static else \
        transformers.DynamicCache()
    cache_arg = cache_argument(model)
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if compiled else model.forward
    with torch.no_grad():
        out = model(input_ids=ids, **{cache_arg: cache}, use_cache=True, logits_to_keep=1,
                    cache_position=torch.arange(ctx, device=ids.device))
        pos = [ctx]

        def step(tokens):
            o = forward(input_ids=tokens, **{cache_arg: cache}, use_cache=True,
                        cache_position=torch.tensor([pos[0]], device=ids.device))
            pos[0] += 1
            return o.logits[:, -1:].argmax(-1)
        times = timed_decode(step, out.logits[:, -1:].argmax(-1), steps, warmup, device)
        prof = profile_steps(step, out.logits[:, -1:].argmax(-1)) if profiled else None
    kv_bytes = sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)
    cfg, itemsize = model.config, next(model.parameters()).element_size()
    read = 2 * b * (ctx + steps) * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    return {"step_s": times, "cache_bytes": kv_bytes, "read_kv_bytes": read, "profile": prof}


def run_kvpass(model, ids: torch.Tensor, steps: int, warmup: int, method: str, options: dict, device: str,
               backend: str) -> dict:
    b, ctx = ids.shape
    cache_arg = cache_argument(model)
    compiled = kvpass.compile(model, method, capacity=ctx + steps + 8, backend=backend, **options)
    with torch.no_grad():
        out = compiled(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = [_returned_cache(out)]

        def step(tokens):
            o = compiled(input_ids=tokens, **{cache_arg: cache[0]}, use_cache=True)
            cache[0] = _returned_cache(o)
            return o.logits[:, -1:].argmax(-1)
        times = timed_decode(step, out.logits[:, -1:].argmax(-1), steps, warmup, device)
    used = compiled._kvpass.manager.nbytes
    return {"step_s": times, "cache_bytes": used, "read_kv_bytes": used}


def run_kvpass_graph(model, ids: torch.Tensor, steps: int, warmup: int, method: str, options: dict,
                     profiled: bool = False) -> dict:
    """kvpass with a memoryless transformers StaticCache (:func:`kvpass.graphs.static_cache`) and the decode
    step replayed from a CUDA graph (:class:`kvpass.graphs.DecodeGraph`, after 2 eager steps)."""
    from kvpass.graphs import DecodeGraph, static_cache
    b, ctx = ids.shape
    room = ctx + steps + 4 + (PROFILE_STEPS if profiled else 0)
    compiled = kvpass.compile(model, method, capacity=room + 4, **options)
    cache = static_cache(compiled, b, room)
    with torch.no_grad():
        out = compiled(input_ids=ids, **{cache_argument(compiled): cache}, use_cache=True, logits_to_keep=1,
                       cache_position=torch.arange(ctx, device=ids.device))
        graph = DecodeGraph(compiled, cache, b, warmup=2)
        pos = [ctx]

        def step(tokens):
            logits = graph.step(tokens, pos[0])
            pos[0] += 1
            return logits[:, -1:].argmax(-1)
        times = timed_decode(step, out.logits[:, -1:].argmax(-1), steps, warmup, "cuda")
        prof = profile_steps(step, out.logits[:, -1:].argmax(-1)) if profiled else None
    used = compiled._kvpass.manager.nbytes
    return {"step_s": times, "cache_bytes": used, "read_kv_bytes": used, "profile": prof}


def half_gates(model, sink: int, recent: int) -> "kvpass.Calibration":
    """Duo gates for ``model`` (its fingerprint) making KV heads 0, 2, 4, ... of every layer retrieval heads;
    streaming heads keep ``sink`` + ``recent`` tokens."""
    from kvpass.calibration import model_fingerprint
    cfg = model.config
    gates = torch.tensor([1.0 - (h % 2) for h in range(cfg.num_key_value_heads)])
    return kvpass.Calibration(method="duo", options={"sink": sink, "recent": recent},
                              model=model_fingerprint(model),
                              tensors={f"layers.{i}.gates": gates for i in range(cfg.num_hidden_layers)})


def copy_gbs(device: str) -> float:
    if device != "cuda":
        return float("nan")
    from triton.testing import do_bench
    x = torch.empty(2 ** 30, dtype=torch.int16, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / do_bench(lambda: y.copy_(x), warmup=10, rep=100, return_mode="median") / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama on the CPU (a smoke test)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--setups", nargs="*",
                   default=["hf-static-compiled", "hf-dynamic", "kvpass-kivi-2-graph", "kvpass-fp16-graph",
                            "kvpass-kivi-2"])
    p.add_argument("--profile", action="store_true",
                   help="also profile 3 steps of the CUDA-graph setups: device time per kernel and part")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        args.batch, args.context, args.steps, args.warmup = 2, 200, 6, 2
    base = build_model(args.tiny, device, dtype)
    weight_bytes = sum(t.numel() * t.element_size() for t in base.parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.context), device=device, generator=gen)
    bw = copy_gbs(device)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            **provenance(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": "tiny Llama" if args.tiny else "Llama-3-8B shapes, random bf16 weights",
            "weight_bytes": weight_bytes, "copy_gbs": bw, "steps": args.steps, "warmup": args.warmup}
    rows = []
    for setup in args.setups:
        torch._dynamo.reset()
        try:
            r = run_setup(setup, base, ids, args, device)
        except Exception as e:       # one setup failing (out of memory, say) must not lose the others
            rows.append({"bench": "e2e_decode", "setup": setup, "batch": args.batch, "context": args.context,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{setup}: {rows[-1]['error']}", flush=True)
        else:
            step = statistics.median(r["step_s"])
            bound = (weight_bytes + r["read_kv_bytes"]) / (bw * 1e9) if bw == bw else float("nan")
            rows.append({"bench": "e2e_decode", "setup": setup, "batch": args.batch, "context": args.context,
                         "step_ms": step * 1e3, "tokens_per_s": args.batch / step, "bound_ms": bound * 1e3,
                         "step_over_bound": step / bound if bound == bound else None,
                         "cache_bytes": r["cache_bytes"], "steps_timed": len(r["step_s"])})
            if r.get("profile"):
                rows[-1]["profile"] = r["profile"]
                print(f"  kernels {r['profile']['kernel_us_per_step']:.0f} us/step: "
                      f"{ {k: round(v) for k, v in r['profile']['by_kind_us'].items()} }", flush=True)
            print(f"{setup}: {step * 1e3:.2f} ms/step, {args.batch / step:.1f} tokens/s "
                  f"(memory bound {bound * 1e3:.2f} ms)", flush=True)
        if device == "cuda":
            gc.collect()             # the compiled copies hold reference cycles
            torch.cuda.empty_cache()
        text = json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
        if args.output:              # after every setup, so a run cut short keeps what it measured
            args.output.write_text(text)
    print(text)


def run_setup(setup: str, base, ids: torch.Tensor, args, device: str) -> dict:
    """One setup's decode run (see the module docstring for the names)."""
    if setup == "hf-static-compiled":
        return run_hf(base, ids, args.steps, args.warmup, static=True, compiled=not args.tiny, device=device,
                      profiled=args.profile and device == "cuda")
    if setup == "hf-dynamic":
        return run_hf(base, ids, args.steps, args.warmup, static=False, compiled=False, device=device)
    if setup.startswith("kvpass-"):
        graph = setup.endswith("-graph")
        name = setup[len("kvpass-"):len(setup) - (len("-graph") if graph else 0)]
        duo = name.startswith("duo-")
        method, _, bits = name[len("duo-") if duo else 0:].partition("-")
        # CQ's "bits" are per element: 8-bit codes over 8 / bits channels
        options = ({"channels": 8 // int(bits)} if method == "cq" else {"bits": int(bits)}) if bits else {}
        if scheme_class(method).needs_calibration:
            options["calibration"] = random_calibration(base, method, options)
        if duo:
            options.update(heads="duo", duo=half_gates(base, *((16, 32) if args.tiny else (64, 256))), retrieval=0.5)
        if graph:
            return run_kvpass_graph(copy.deepcopy(base), ids, args.steps, args.warmup, method, options,
                                    profiled=args.profile)
        model = copy.deepcopy(base) if args.tiny else base
        return run_kvpass(model, ids, args.steps, args.warmup, method, options, device,
                          "eager" if args.tiny else "inductor")
    raise SystemExit(f"unknown setup {setup!r}")


if __name__ == "__main__":
    main()
