"""``kvpass bench``: decode speed on the current device.

- :func:`bench_attention` — one decode step of attention (q: (batch, Hq, 1, D)) over a compressed cache of
  each context length, timed against ``F.scaled_dot_product_attention(enable_gqa=True)`` over the same K/V
  uncompressed, in the same run. The cache is filled through the scheme's own ``append`` with random
  K/V (calibrated methods get a random calibration of the right geometry: speed does not depend on it).
  ``Scheme.attend`` runs the Triton kernel on CUDA and the PyTorch reference on the CPU — CPU figures time
  the reference path, not the kernels (bench/decode_attention.py has the GPU protocol: CUDA graphs, L2
  flushes, bandwidth).
- :func:`bench_e2e` — a model's decode loop: prefill ``context`` random tokens, then greedy steps, the
  median step time through ``kvpass.compile`` against the plain model with transformers' cache.

Rows follow shared/BENCHMARKS.md's speed format (``bench``, ``method``, ``batch``, ``context``,
``time_ms``, ``fp16_time_ms``, ``speedup_vs_fp16``, ...). Absolute CPU times on a shared machine are noise;
read the ratios.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from .errors import KVPassError, OptionError
from .toolkit import method_label, method_options, parse_device, parse_dtype, provenance, write_json


class _RandomCalibration:
    """The same random tensors for every layer: a stand-in calibration for timing."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def layer(self, i: int) -> dict:
        return self.tensors


def random_calibration_tensors(method: str, options: dict, kv_heads: int, head_dim: int) -> dict:
    """One layer's stand-in calibration tensors for timing ``method(**options)`` (speed does not depend on
    their values): QAQ's query norms, KVQuant's ranges and levels, or random fp16 codebooks."""
    from .methods import scheme_class
    probe = scheme_class(method)(**options)
    gen = torch.Generator().manual_seed(0)
    if method == "qaq":
        return {"q_norm2": torch.full((kv_heads,), float(head_dim))}
    if method == "kvquant":
        levels = torch.linspace(-1, 1, 2 ** probe.bits)
        return {"k_center": torch.randn(kv_heads, head_dim, generator=gen).half(),
                "k_range": (torch.rand(kv_heads, head_dim, generator=gen) + 0.5).half(),
                "k_levels": levels, "v_levels": levels}
    c = probe.vq_channels
    shape = (kv_heads if probe.codebook == "head" else 1, head_dim // c, 2 ** probe.vq_bits, c)
    return {f"{t}_codebook": torch.randn(shape, generator=gen).half() for t in ("k", "v")}


def timing_scheme(method: str, options: dict, kv_heads: int, head_dim: int):
    """The scheme ``method(**options)``; calibrated methods get a random calibration of this geometry."""
    from .methods import get_scheme, scheme_class
    if not scheme_class(method).needs_calibration or "calibration" in options:
        return get_scheme(method, **options)
    tensors = random_calibration_tensors(method, options, kv_heads, head_dim)
    return get_scheme(method, **options, calibration=_RandomCalibration(tensors))


def random_calibration(model: torch.nn.Module, method: str, options: dict):
    """A :class:`kvpass.Calibration` for ``model`` (its fingerprint, every layer) with
    :func:`random_calibration_tensors`: what ``kvpass.compile`` takes to time a calibrated method on random
    weights."""
    from .calibration import Calibration, config_geometry, model_fingerprint
    geo = config_geometry(model)
    tensors = random_calibration_tensors(method, options, geo["kv_heads"], geo["head_dim"])
    return Calibration(method=method, options=dict(options), model=model_fingerprint(model),
                       tensors={f"layers.{i}.{name}": t for i in range(geo["num_layers"])
                                for name, t in tensors.items()})


def median_ms(fn, repeats: int, device: torch.device, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` (CUDA synchronized)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def bench_attention(method: str, options: dict, contexts: list[int], *, batch: int = 1, q_heads: int = 32,
                    kv_heads: int = 8, head_dim: int = 128, dtype: torch.dtype = torch.float16,
                    device: torch.device = torch.device("cpu"), repeats: int = 10, progress: bool = True) -> list[dict]:
    """Decode-attention rows, one per context: ``time_ms`` of ``scheme.attend`` over a cache of ``context``
    tokens (q (batch, q_heads, 1, head_dim) in ``dtype``), ``fp16_time_ms`` of SDPA over the same K/V held
    dense in ``dtype``, ``speedup_vs_fp16``, ``cache_bytes`` (every buffer) vs ``fp16_bytes``, ``path``
    ("triton" where a kernel covers the call on CUDA, else "reference")."""
    from tqdm import tqdm

    from .methods import CacheShape
    from .rotary import Rotary
    if q_heads % kv_heads:
        raise KVPassError(f"--heads-q ({q_heads}) must be a multiple of --kv-heads ({kv_heads})")
    scheme = timing_scheme(method, options, kv_heads, head_dim)
    label = method_label(method, options)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for ctx in tqdm(contexts, desc=f"bench attention {label}", unit="ctx", disable=not progress):
        k = torch.randn(batch, kv_heads, ctx, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(batch, kv_heads, ctx, head_dim, generator=gen).to(device, dtype)
        q = torch.randn(batch, q_heads, 1, head_dim, generator=gen).to(device, dtype)
        state = scheme.allocate(CacheShape(batch, kv_heads, head_dim, ctx + 1, dtype), device)
        rotary = Rotary(1.0 / 500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        step = 4096
        for s in range(0, ctx, step):
            scheme.append(state, k[:, :, s:s + step], v[:, :, s:s + step], rotary=rotary)
        with torch.no_grad():
            t, path = median_ms(_attention_call(scheme, state, q, ctx), repeats, device), _path(scheme, state, q)
            t16 = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), repeats, device)
        dense = 2 * batch * kv_heads * ctx * head_dim * k.element_size()
        rows.append({"bench": "decode_attention", "method": method, "label": label,
                     "bits": options.get("bits"), "options": {k_: v_ for k_, v_ in options.items()},
                     "heads": "full", "batch": batch, "context": ctx, "q_heads": q_heads, "kv_heads": kv_heads,
                     "head_dim": head_dim, "dtype": str(dtype).replace("torch.", ""), "time_ms": t,
                     "fp16_time_ms": t16, "speedup_vs_fp16": t16 / t, "cache_bytes": state.nbytes,
                     "fp16_bytes": dense, "device": device.type,
                     "path": path})
        del state, k, v
    return rows


def _path(scheme, state, q: torch.Tensor) -> str:
    from .codegen import try_attend
    return "triton" if q.is_cuda and try_attend(scheme, state, q, causal=False) is not None else "reference"


def _attention_call(scheme, state, q: torch.Tensor, length: int):
    """The timed call: the scheme's Triton kernel with the length known on the host (what a compiled decode
    step runs on CUDA), or its PyTorch reference where no kernel covers it (the CPU)."""
    if _path(scheme, state, q) == "triton":
        from .codegen import kernel_attend
        return lambda: kernel_attend(scheme, state, q, causal=False, length=length)
    return lambda: scheme.attend(state, q, causal=False)


def bench_e2e(model, method: str, options: dict, contexts: list[int], *, batch: int = 1, steps: int = 16,
              warmup: int = 2, progress: bool = True) -> list[dict]:
    """End-to-end decode rows, one per context: ``time_ms`` (median decode step through ``kvpass.compile``,
    eager backend on the CPU, Inductor on CUDA) and ``fp16_time_ms`` (the plain model, transformers'
    DynamicCache) after prefilling ``context`` random tokens of a ``batch``; ``tokens_per_s`` = batch /
    step; ``cache_bytes`` (kvpass's buffers) vs ``fp16_cache_bytes`` (transformers' cache)."""
    from tqdm import tqdm

    from .compiler import compile as kvpass_compile
    from .perplexity import _returned_cache, cache_argument
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    arg = cache_argument(model)
    label = method_label(method, options)
    backend = "inductor" if device.type == "cuda" else "eager"
    rows = []
    for ctx in tqdm(contexts, desc=f"bench e2e {label}", unit="ctx", disable=not progress):
        ids = torch.randint(3, vocab, (batch, ctx), generator=torch.Generator().manual_seed(ctx)).to(device)

        def decode(m):
            with torch.no_grad():
                out = m(input_ids=ids, use_cache=True)
                cache = [_returned_cache(out)]
                tok = [out.logits[:, -1:].argmax(-1)]

                def step():
                    o = m(input_ids=tok[0], use_cache=True, **{arg: cache[0]})
                    cache[0] = _returned_cache(o)
                    tok[0] = o.logits[:, -1:].argmax(-1)
                t = median_ms(step, steps, device, warmup=warmup)
                return t, cache[0]
        t16, plain_cache = decode(model)
        plain_bytes = sum(x.numel() * x.element_size() for layer in getattr(plain_cache, "layers", [])
                          for x in (getattr(layer, "keys", None), getattr(layer, "values", None))
                          if isinstance(x, torch.Tensor))
        del plain_cache
        torch._dynamo.reset()
        compiled = kvpass_compile(copy.deepcopy(model), method, backend=backend,
                                  capacity=ctx + steps + warmup + 8, **options)
        t, _ = decode(compiled)
        rows.append({"bench": "decode_e2e", "method": method, "label": label, "bits": options.get("bits"),
                     "heads": "full", "batch": batch, "context": ctx, "time_ms": t, "fp16_time_ms": t16,
                     "speedup_vs_fp16": t16 / t, "tokens_per_s": 1e3 * batch / t,
                     "cache_bytes": compiled._kvpass.manager.nbytes, "fp16_cache_bytes": plain_bytes,
                     "backend": backend, "device": device.type})
        del compiled
    return rows


def run_bench(kind: str, method: str, bits, options: dict, *, contexts: list[int], batch: int = 1,
              device: str = "cpu", dtype: str = "float16", output=None, plot=None, calibration=None,
              model: str | None = None, steps: int | None = None, warmup: int | None = None,
              repeats: int | None = None, geometry=(None, None, None), quiet: bool = False) -> dict:
    """``kvpass bench attention|e2e``: checks the arguments, runs :func:`bench_attention` or
    :func:`bench_e2e`, prints a table, writes JSON (``output``) and the time-vs-context plot (``plot``)."""
    import sys

    from rich.console import Console
    from rich.table import Table
    opts = method_options(method, bits, options)
    if kind not in ("attention", "e2e"):
        raise OptionError(f"bench: KIND must be attention or e2e, got {kind!r}")
    if not contexts or min(contexts) < 1 or batch < 1:
        raise KVPassError(f"--context values and --batch must be >= 1, got {contexts} and {batch}")
    if plot is not None and not str(plot).endswith(".png"):
        raise KVPassError(f"--plot takes a .png path, got {plot}")
    dev = parse_device(device)
    dt = parse_dtype(dtype)
    if calibration is not None:
        opts["calibration"] = calibration
    console = Console(quiet=quiet, width=None if sys.stdout.isatty() else 140)
    if dev.type == "cpu":
        console.print("[dim]CPU: timing the PyTorch reference paths; the Triton kernels' timings need CUDA "
                      "(--device cuda).[/dim]")
    if kind == "attention":
        q_heads, kv_heads, head_dim = (g if g is not None else d for g, d in zip(geometry, (32, 8, 128)))
        if min(q_heads, kv_heads, head_dim) < 1 or (repeats or 10) < 1:
            raise KVPassError("--heads-q, --kv-heads, --head-dim and --repeats must be >= 1")
        if calibration is not None:
            raise KVPassError("bench attention times a random calibration of the benchmark's shapes; drop "
                              "--calibration")
        rows = bench_attention(method, opts, contexts, batch=batch, q_heads=q_heads, kv_heads=kv_heads,
                               head_dim=head_dim, dtype=dt, device=dev, repeats=repeats or 10, progress=not quiet)
        name = "decode attention"
    else:
        if (steps or 16) < 1 or (warmup if warmup is not None else 2) < 0:
            raise KVPassError("--steps must be >= 1 and --warmup >= 0")
        from .toolkit import check_model_name, load_model
        check_model_name(model or "smollm2")
        from .toolkit import needs_calibration
        if needs_calibration(method) and calibration is None:
            raise KVPassError(f"{method} needs a calibration of this model: pass --calibration DIR")
        loaded = load_model(model or "smollm2", dev, dt, status=console)
        rows = bench_e2e(loaded.model, method, opts, contexts, batch=batch, steps=steps or 16,
                         warmup=2 if warmup is None else warmup, progress=not quiet)
        for r in rows:
            r["model"] = loaded.name
        name = f"end-to-end decode, {loaded.name}"
    table = Table(title=f"{name} on {dev} ({rows[0].get('path', rows[0].get('backend'))})", title_justify="left")
    for col in ("method", "batch", "context", "ms", "dense ms", "speedup", "cache", "dense cache"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        fp16_bytes = r.get("fp16_bytes", r.get("fp16_cache_bytes", 0))
        table.add_row(r["label"], str(r["batch"]), str(r["context"]), f"{r['time_ms']:.3f}",
                      f"{r['fp16_time_ms']:.3f}", f"{r['speedup_vs_fp16']:.2f}x", f"{r['cache_bytes'] / 2**20:.2f} MiB",
                      f"{fp16_bytes / 2**20:.2f} MiB")
    console.print(table)
    result = {"meta": provenance(), "rows": rows}
    write_json(output, result)
    if plot is not None:
        from .plots import latency_plot
        both = rows + [dict(r, label="fp16 (sdpa)" if kind == "attention" else "plain model",
                            time_ms=r["fp16_time_ms"]) for r in rows]
        latency_plot(both, plot, title=name)
    return result
