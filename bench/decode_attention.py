"""Decode-attention microbenchmark on the GPU: kvpass kernels against bf16 SDPA, Llama-3-8B shapes.

    python bench/decode_attention.py --tune --output bench/results/decode_attention.json   (kvpass installed)

Shapes follow shared/BENCHMARKS.md: 32 query / 8 KV heads, head_dim 128, one new token, batch 1 and 8,
cache lengths 32K and 128K. The baseline is ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)``
on bf16 K/V holding exactly the cached tokens. Compressed caches are filled directly with random codes,
scales and windows (the kernel's speed does not depend on the values) and their length set, so no
128K-token quantization runs before timing. Every time is the median of ``triton.testing.do_bench``
(L2 flushed between runs) of the call replayed from a CUDA graph — the GPU's time, as in a captured
decode step — and, as ``eager_us``, of the plain call with the host's launch work included. ``read_gbs`` divides
the bytes the kernel must read (the cache's used bytes plus q) by the time; ``copy_gbs`` is the device's
measured copy bandwidth (bytes read + written by a 2 GiB device-to-device copy) in the same run.
A correctness check against the PyTorch reference (:meth:`Scheme.attend`, :meth:`Scheme._append`) on
smaller caches comes first. ``append`` rows time the append kernels: one new token at each cache length
(CUDA graph, as a fraction of the decode-attention step) and a 32K-token prefill. ``--breakdown METHOD``
adds ``breakdown`` rows: the device time of each launch of one call (split programs, tail, merge).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpass import CacheShape
from kvpass.benchmark import timing_scheme
from kvpass.codegen import append_supports, has_append_kernel, kernel_attend, try_append, tuning_of
from common import provenance  # bench/common.py (scripts run as python bench/NAME.py)

HQ, HKV, D = 32, 8, 128
METHODS = {"kivi-2": ("kivi", {"bits": 2}), "kivi-4": ("kivi", {"bits": 4}), "fp16": ("fp16", {}),
           "int8": ("int8", {}), "fp8": ("fp8", {}), "million-4": ("million", {"bits": 4}),
           "cq-1": ("cq", {"channels": 8}), "kvquant-3": ("kvquant", {"bits": 3}), "qaq": ("qaq", {})}
QAQ_WIDTH = 3          # the width every random QAQ record gets (the kernel's speed depends on it)


def make_scheme(method: str, options: dict, kv_heads: int = HKV, head_dim: int = D):
    """The scheme, with a random calibration when it needs one (codebooks; KVQuant's ranges and levels):
    :func:`kvpass.benchmark.timing_scheme`."""
    return timing_scheme(method, options, kv_heads, head_dim)


def random_state(method: str, options: dict, batch: int, length: int, dtype: torch.dtype):
    """A cache of ``length`` random tokens without running the quantizer (codes, scales, windows random)."""
    scheme = make_scheme(method, options)
    state = scheme.allocate(CacheShape(batch, HKV, D, length, dtype), "cuda")
    fill_random(state, length)
    return scheme, state


def fill_random(state, length: int) -> None:
    """Random codes, scales and values in every buffer of ``state``, its length set to ``length``."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, buf in state.buffers.items():
        name = name.rsplit(".", 1)[-1]             # a policy's parts: retrieval.k_codes, streaming.k_ring
        if buf.device.type != "cuda":             # QAQ's host copies: never read by attention
            continue
        if buf.dtype in (torch.uint8, torch.int8):
            lo, hi = (0, 256) if buf.dtype == torch.uint8 else (-127, 128)
            if name.endswith("_out_idx"):           # KVQuant's outlier channels
                hi = D
            buf.copy_(torch.randint(lo, hi, buf.shape, device="cuda", dtype=buf.dtype, generator=gen))
        elif "scale" in name:
            buf.copy_(torch.rand(buf.shape, device="cuda", generator=gen) * 0.05 + 0.01)
        elif buf.is_floating_point() and not name.startswith("rope_") and name not in (
                "k_center", "k_range", "k_levels", "v_levels"):
            buf.copy_(torch.randn(buf.shape, device="cuda", generator=gen) * 0.3)
    if "arena" in state.buffers:                # QAQ: consistent records, K then V, QAQ_WIDTH bits each
        rec = HKV * D * QAQ_WIDTH // 8
        tokens = torch.arange(length, device="cuda")
        for i, t in enumerate(("k", "v")):
            state[f"{t}_bits"][:, :length] = QAQ_WIDTH
            state[f"{t}_off"][:, :length] = (i * length + tokens) * rec
            state[f"{t}_out_idx"].zero_()
    if "rope_meta" in state.buffers:            # Llama-3's RoPE over every channel
        state["rope_inv_freq"].copy_(1.0 / 500000.0 ** (torch.arange(0, D, 2, device="cuda") / D))
        state["rope_meta"].copy_(torch.tensor([1.0, D], device="cuda"))
        state.rotary_dims = D
    state.length_tensor.fill_(length)


def used_bytes(state) -> int:
    return sum(b.numel() * b.element_size() for b in state.buffers.values())


CHECK_SHAPES = [  # (batch, q heads, kv heads, head_dim, cached tokens, new tokens)
    (2, 32, 8, 128, 4099, 1), (1, 8, 8, 128, 1000, 1), (3, 16, 2, 64, 777, 1), (2, 12, 4, 64, 2050, 3),
    (1, 32, 4, 128, 161, 1)]


def check(method: str, options: dict, dtype: torch.dtype) -> dict:
    """Kernel vs reference (:meth:`Scheme.attend`) on real quantized data over CHECK_SHAPES (GQA 1/4/8,
    head_dim 64/128, odd lengths, 3 new tokens once, a padding mask on the last): the largest absolute
    error relative to the reference output's mean magnitude."""
    worst = 0.0
    for b, hq, hkv, d, length, t in CHECK_SHAPES:
        scheme = make_scheme(method, options, hkv, d)
        state = scheme.allocate(CacheShape(b, hkv, d, length + 8, dtype), "cuda")
        k = torch.randn(b, hkv, length, d, device="cuda", dtype=dtype)
        v = torch.randn(b, hkv, length, d, device="cuda", dtype=dtype)
        rotary = None
        if scheme.key_space == "pre_rope":
            from kvpass.rotary import Rotary
            rotary = Rotary(1.0 / 500000.0 ** (torch.arange(0, d, 2, device="cuda") / d))
        scheme.append(state, k[:, :, :length - t], v[:, :, :length - t], rotary=rotary)
        scheme.append(state, k[:, :, length - t:], v[:, :, length - t:], rotary=rotary)
        q = torch.randn(b, hq, t, d, device="cuda", dtype=dtype)
        mask = None
        if (b, hq, hkv, d, length, t) == CHECK_SHAPES[-1]:
            mask = torch.zeros(b, 1, t, length, device="cuda")
            mask[..., :5] = float("-inf")
        ref = scheme.attend(state, q, attn_mask=mask).float()
        out = kernel_attend(scheme, state, q, attn_mask=mask).float()
        worst = max(worst, ((out - ref).abs().max() / ref.abs().mean()).item())
    if not has_append_kernel(make_scheme(method, options)):
        return {"max_abs_err_over_mean_abs": worst, "shapes": CHECK_SHAPES}
    # the append kernels against the reference on the same device: every buffer bit for bit
    scheme = make_scheme(method, options)
    shape = CacheShape(2, HKV, D, 3000, dtype)
    ref, ker = scheme.allocate(shape, "cuda"), scheme.allocate(shape, "cuda")
    for n in (1500, 1, 1, 300, 1):
        k = torch.randn(2, HKV, n, D, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        scheme._append(ref, k, v, ref.length)
        ref.length_tensor += n
        if not try_append(scheme, ker, k, v):
            if n == 1:
                raise RuntimeError(f"{method}: no decode-step append kernel for {options}")
            scheme._append(ker, k, v, ker.length)   # a prompt chunk beyond the kernel's token limit
        ker.length_tensor += n
    differ = [name for name in ref.buffers if not torch.equal(ref[name], ker[name])]
    return {"max_abs_err_over_mean_abs": worst, "shapes": CHECK_SHAPES, "append_buffers_differing": differ}


def graph_us(fn) -> float:
    """GPU time of ``fn`` replayed from a CUDA graph (no launch overhead): do_bench median, microseconds."""
    from triton.testing import do_bench
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3


def bench_sdpa(batch: int, length: int, dtype: torch.dtype) -> tuple[float, float]:
    """(eager us, CUDA-graph us) of bf16 SDPA over exactly ``length`` cached tokens."""
    from triton.testing import do_bench
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=dtype)
    k = torch.randn(batch, HKV, length, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3, graph_us(fn)


def bench_kernel(method: str, options: dict, batch: int, length: int, dtype: torch.dtype,
                 cached: dict | None = None, eager: bool = True, mask: torch.Tensor | None = None
                 ) -> tuple[float, float, int]:
    """(eager us incl. the host's launch work, CUDA-graph us, bytes the kernel reads); ``mask``: an
    attention mask (B, 1, 1, length) passed to every call."""
    from triton.testing import do_bench
    key = (method, str(options), batch, length)
    if cached is not None and key in cached:
        scheme, state = cached[key]
    else:
        scheme, state = random_state(method, options, batch, length, dtype)
        if cached is not None:
            cached[key] = scheme, state
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=dtype)
    out = kernel_attend(scheme, state, q, attn_mask=mask)
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{method}: non-finite output")
    us = (do_bench(lambda: kernel_attend(scheme, state, q, attn_mask=mask), warmup=25, rep=200,
                   return_mode="median") * 1e3 if eager else float("nan"))
    try:
        gus = graph_us(lambda: kernel_attend(scheme, state, q, attn_mask=mask, length=length))
    except Exception as e:      # QAQ plans on the host: no CUDA graph; its eager time stands
        print(f"  {method}: no CUDA-graph time ({type(e).__name__}: {str(e)[:120]})", flush=True)
        gus = us
    return us, gus, used_bytes(state) + q.numel() * q.element_size()


def bench_append(method: str, options: dict, batch: int, length: int, new: int, dtype: torch.dtype) -> float:
    """CUDA-graph time (us) of appending ``new`` tokens to a cache holding ``length`` (the length is reset
    before each replay by the graph itself, so every replay appends at the same place)."""
    scheme, state = random_state(method, options, batch, length + new, dtype)
    k = torch.randn(batch, HKV, new, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)

    def step():
        state.length_tensor.fill_(length)
        if not try_append(scheme, state, k, v):
            raise RuntimeError(f"{method}: no append kernel for {options}")
    return graph_us(step)


def padding_mask(kind: str, batch: int, length: int) -> torch.Tensor:
    """A decode step's padding mask (B, 1, 1, length) as transformers passes it: each row's first
    ``row`` positions masked. ``kind``: "float" (additive, 0 / -inf, bf16) or "bool" (True = attend)."""
    keep = torch.arange(length, device="cuda")[None, :] >= torch.arange(batch, device="cuda")[:, None]
    keep = keep[:, None, None, :]
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape, device="cuda", dtype=torch.bfloat16).masked_fill(~keep, float("-inf"))


def kernel_breakdown(method: str, options: dict, batch: int, length: int, dtype: torch.dtype,
                     calls: int = 5) -> dict:
    """Device time of each launch of one decode-attention call of ``method`` (:func:`launch_times`)."""
    scheme, state = random_state(method, options, batch, length, dtype)
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=dtype)
    return launch_times(lambda: kernel_attend(scheme, state, q, length=length), calls)


def launch_times(fn, calls: int = 5) -> dict:
    """Device time of each launch ``fn`` makes (torch.profiler, CUPTI), in launch order:
    {"kernels": [{"name", "us"} median over ``calls`` profiled calls], "span_us": first start to last end}.
    Eager calls, so the span includes the host's gaps between launches; the kernel times do not."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    runs = []
    for _ in range(calls):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                         key=lambda e: e.time_range.start)
        runs.append([(e.name, e.time_range.elapsed_us(), e.time_range.start, e.time_range.end) for e in kernels])
    if not runs[0] or any(len(r) != len(runs[0]) for r in runs):
        return {"kernels": [], "span_us": float("nan"), "note": "launch counts differ between calls"}
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    kernels = [{"name": runs[0][i][0][:80], "us": median([r[i][1] for r in runs])} for i in range(len(runs[0]))]
    return {"kernels": kernels, "span_us": median([r[-1][3] - r[0][2] for r in runs])}


def copy_bandwidth() -> float:
    from triton.testing import do_bench
    x = torch.empty(2 ** 30, dtype=torch.int16, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=10, rep=100, return_mode="median")
    return 2 * x.numel() * x.element_size() / ms / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--tune", nargs="*", default=None, metavar="METHOD",
                   help="sweep these methods' kernel launch parameters first (no METHOD: every method run)")
    p.add_argument("--set", nargs="*", default=[], metavar="SCHEME.KEY=VALUE",
                   help="override a kernel launch parameter, e.g. million.block_n=64 (recorded in meta)")
    p.add_argument("--breakdown", nargs="*", default=[], metavar="METHOD",
                   help="also record the device time of each launch of these methods' calls (torch.profiler)")
    p.add_argument("--mask-cost", nargs="*", default=[], metavar="METHOD",
                   help="also time these methods' calls with a padding mask, float and bool ('mask' rows)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    dtype = torch.bfloat16
    for item in args.set:
        name, value = item.split("=", 1)
        scheme, key = name.split(".", 1)
        tuning_of(scheme)[key] = json.loads(value)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shapes": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "new_tokens": 1}, "dtype": "bfloat16",
            "timing": "triton.testing.do_bench median, L2 flushed; us: CUDA-graph replay, eager_us: plain call",
            **provenance()}
    meta["copy_gbs"] = copy_bandwidth()
    print(f"copy bandwidth {meta['copy_gbs']:.0f} GB/s", flush=True)
    checks = {m: check(*METHODS[m], dtype) for m in args.methods}
    print("checks", checks, flush=True)
    if args.tune is not None:
        meta["tuning"] = tune(args.tune or args.methods, dtype)
    meta["kivi_tuning"] = json.loads(json.dumps(tuning_of("kivi")))
    meta["overrides"] = args.set
    rows = []

    def save() -> str:          # after every shape: a run stopped at its time limit keeps what it measured
        text = json.dumps({"meta": meta, "checks": checks, "rows": rows}, indent=2) + "\n"
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
        return text

    for batch in args.batches:
        for length in args.lengths:
            base_eager, base = bench_sdpa(batch, length, dtype)
            fp16_bytes = 2 * batch * HKV * length * D * 2
            rows.append({"bench": "decode_attention", "method": "sdpa-bf16", "batch": batch, "length": length,
                         "us": base, "eager_us": base_eager, "read_bytes": fp16_bytes,
                         "read_gbs": fp16_bytes / base / 1e3, "speedup": 1.0})
            print(f"B={batch} L={length}: sdpa {base:.1f} us graph, {base_eager:.1f} us eager "
                  f"({fp16_bytes / base / 1e3:.0f} GB/s)", flush=True)
            for m in args.methods:
                eager_us, us, nbytes = bench_kernel(*METHODS[m], batch, length, dtype)
                rows.append({"bench": "decode_attention", "method": m, "batch": batch, "length": length, "us": us,
                             "eager_us": eager_us, "read_bytes": nbytes, "read_gbs": nbytes / us / 1e3,
                             "speedup": base / us, "copy_fraction": nbytes / us / 1e3 / meta["copy_gbs"]})
                print(f"  {m}: {us:.1f} us graph ({eager_us:.1f} eager), {nbytes / us / 1e3:.0f} GB/s, "
                      f"{base / us:.2f}x", flush=True)
            for m in args.mask_cost:
                plain = next(r["us"] for r in rows if r["bench"] == "decode_attention" and r["method"] == m
                             and r["batch"] == batch and r["length"] == length)
                for kind in ("float", "bool"):
                    _, us, _ = bench_kernel(*METHODS[m], batch, length, dtype, eager=False,
                                            mask=padding_mask(kind, batch, length))
                    rows.append({"bench": "mask", "method": m, "mask": kind, "batch": batch, "length": length,
                                 "us": us, "unmasked_us": plain, "speedup": base / us})
                    print(f"  {m} with a {kind} mask: {us:.1f} us ({us / plain:.2f}x unmasked)", flush=True)
            for m in args.breakdown:
                parts = kernel_breakdown(*METHODS[m], batch, length, dtype)
                rows.append({"bench": "breakdown", "method": m, "batch": batch, "length": length, **parts})
                print(f"  {m} launches: " + ", ".join(f"{k['name'][:30]} {k['us']:.1f} us" for k in parts["kernels"])
                      + f" (span {parts['span_us']:.1f} us eager)", flush=True)
            save()
    for m in args.methods:
        if not has_append_kernel(make_scheme(*METHODS[m])):
            continue
        for batch in args.batches:
            for length in args.lengths:
                us = bench_append(*METHODS[m], batch, length, 1, dtype)
                step = next(r["us"] for r in rows if r["method"] == m and r["batch"] == batch
                            and r["length"] == length)
                rows.append({"bench": "append", "method": m, "batch": batch, "length": length, "new_tokens": 1,
                             "us": us, "fraction_of_decode_attention": us / step})
                print(f"  append {m} B={batch} L={length}: {us:.1f} us ({100 * us / step:.1f}% of attention)",
                      flush=True)
        prompt = torch.empty(1, HKV, 32768, D, device="cuda", dtype=dtype)
        if append_supports(make_scheme(*METHODS[m]), prompt):     # the codebook kernel: decode steps only
            us = bench_append(*METHODS[m], 1, 0, 32768, dtype)
            rows.append({"bench": "append", "method": m, "batch": 1, "length": 0, "new_tokens": 32768, "us": us})
            print(f"  prefill append {m} 32K tokens: {us:.1f} us", flush=True)
        save()
    print(save())


def _merge(table: dict, update: dict) -> None:
    """Apply a (nested) tuning update in place: dict values update the sub-table of that key."""
    for key, value in update.items():
        if isinstance(value, dict):
            table[key] = {**table[key], **value}
        else:
            table[key] = value


def _sweep(method: str, dtype: torch.dtype, configs: list[dict], states: dict) -> list:
    """CUDA-graph time (sum at 1 x 128K and 8 x 128K) of ``method`` under each tuning update."""
    table = tuning_of(METHODS[method][0])
    results = []
    for config in configs:
        saved = json.dumps(table)
        _merge(table, config)
        try:
            err = check(*METHODS[method], dtype)["max_abs_err_over_mean_abs"]
            if not err < 0.1:         # a variant must be right before it may be fast
                raise RuntimeError(f"kernel differs from the reference: {err:.3g} of the mean |output|")
            t = sum(bench_kernel(*METHODS[method], b, 131072, dtype, states, eager=False)[1] for b in (1, 8))
            results.append((t, config))
            print(f"  {method} {config}: {t:.1f} us", flush=True)
        except Exception as e:  # some combinations exceed shared memory / registers
            print(f"  {method} {config}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        table.clear()
        table.update(json.loads(saved))
        torch.cuda.empty_cache()
    return results


def tune_configs(method: str) -> list[dict]:
    """The launch parameters :func:`tune` tries for ``method``."""
    import itertools
    if method == "kivi-2":
        # 32-bit word loads without folding won the first sweep (words x fold x 4/8 warps x 2/3 stages);
        # the second found pairs at 2 warps, 3 stages and 16 programs per SM best of 1/2/4 warps x 4/8/16
        # programs x 2/3/4 stages; the third (bench/results/decode_attention.json) kept it against register
        # caps and a since-removed "quad" loop; the fourth took 5 tail programs at 1 stage (905.7 us against
        # 949.9 for 1 tail program) and kept 16 programs per SM against 8 and 32; the fifth kept 16 against
        # whole waves (10, 12, 20, 24); the sixth took adjacent pairs (bytes 0, 1 / 2, 3 of a word, scale pairs
        # loaded as words; 837.1 against 867.7 us) ahead of register caps of 112 and 96 and of 24 programs an
        # SM. This one re-times the pipeline depth and warps under adjacent pairs, against plain pairs.
        # The seventh swept the Gluon main loop (codegen/kivi_gluon.py) against it (programs per SM 16/32/64, with
        # and without prefetch: 32 with prefetch, sweep_gluon in the results); this one tries prefetching the
        # packed words only (no spills in its sm_90 build, 671 instead of 758 instructions a group).
        return [{"gluon": {"on": False}}] + [{"gluon": {"on": True, "programs_per_sm": pps, "prefetch": pf}}
                                             for pps in (24, 32, 48) for pf in (1, 2)]
    if method == "kivi-4":        # the reshape loop (4 bits at head_dim 128); KIVI-2's "main" stays as it is
        return [{"reshape": dict(groups_per_block=gpb, num_warps=warps, num_stages=2, programs_per_sm=pps)}
                for gpb, warps, pps in itertools.product((2, 4), (2, 4), (4, 16))]
    if method in ("million-4", "cq-1"):
        # the Gluon main loop (codegen/codebook_gluon.py: codebooks in shared memory) against the Triton loop
        # (block 16, 2 warps, 2 stages, 16 programs an SM: the last sweep's pick) took 16 warps a program over 4 and
        # 8 (sweep_codebook_gluon in the results); this one tries prefetching the codes at 8 and 16 warps
        return [{"gluon": {"on": True, "warps": w, "prefetch": pf}} for w in (8, 16) for pf in (False, True)]
    if method == "kvquant-3":
        # the Gluon main loop (codegen/kvquant_gluon.py) against the Triton loop (block 16, 2 warps, 2 stages, 16
        # programs an SM: the last sweep's pick). Its first sweeps: 4 / 8 / 16 warps, 1-2 programs an SM, asking L1
        # for the next tile's lines (slower: 3105 / 3422 us against 2677 / 2847 without); 8 warps at 255 registers
        # beat 16 capped at 128 (spilling). The last one timed the scatter pulled by shared-memory descriptor loads
        # (2774 / 2831 us: slower, reverted); this sweep re-checks 8 against 16 warps.
        return [{"gluon": {"on": False}}] + [{"gluon": {"on": True, "warps": w, "prefetch": False}} for w in (8, 16)]
    return [dict(num_warps=warps, num_stages=stages, programs_per_sm=pps)
            for warps, stages, pps in itertools.product((2, 4), (2, 3), (4, 16))]


def tune(methods: list[str], dtype: torch.dtype) -> dict:
    """Sweep each method's kernel launch parameters (:func:`tune_configs`) on B=1 and B=8 at 128K and keep
    the fastest in its TUNING table for the run."""
    sweeps = {}
    for method in methods:
        results = _sweep(method, dtype, tune_configs(method), {})
        sweeps[method] = [dict(us=t, **c) for t, c in results]
        if results:
            _merge(tuning_of(METHODS[method][0]), min(results, key=lambda r: r[0])[1])
    tuned = {m: json.loads(json.dumps(tuning_of(METHODS[m][0]))) for m in methods}
    print(f"tuned: {tuned}", flush=True)
    return {"tuning": tuned, "sweeps": sweeps}


if __name__ == "__main__":
    main()
