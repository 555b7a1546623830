"""Sequence-parallel decode of a Llama-3-8B-shaped model with a KIVI-2 cache over 1, 2, 4, ... GPUs.

    torchrun --nproc-per-node 2 bench/multi_gpu.py --output bench/results/multi_gpu_2.json     (GPUs)
    torchrun --nproc-per-node 2 bench/multi_gpu.py --tiny                                       (CPU, gloo)

One launch of N processes measures every world size w in ``--worlds`` (default 1, 2, 4, ... up to N) on
the first w ranks (a ``torch.distributed`` sub-group each; the others wait), so one command gives the
scaling. Per world size:

- ``check``: ``--check-tokens`` real tokens appended through :class:`kvpass.distributed.SequenceParallel`
  (KIVI quantization with no full-precision window, so that every world size stores the same codes; the
  append kernel) and one decode step; the merged output is compared with the same cache on one rank
  (w = 1) — the largest difference is recorded;
- ``scaling``: a cache of ``--context`` tokens (default 4M: fits one H200) sliced over the w ranks, filled
  directly (random codes and scales, as bench/max_context.py fills its caches), then ``--steps`` decode
  steps timed after ``--warmup``. A step is what decoding one token costs with weights replicated on every
  rank: per layer the layer's weight matrices read by GEMVs (Llama-3-8B's q/k/v/o and MLP, random bf16;
  ``--no-weights`` leaves them out), the new token appended on the rank owning its block, every rank's
  partial attention (the KIVI kernel with its log-sum-exp) and the all-gather + log-sum-exp merge;
  tokens/s = batch / step, speedup and efficiency against w = 1 in the same run;
- ``max_context``: the largest context whose slices fit the w ranks beside the weights (predicted from
  the layout's bytes per token, stepped down on out-of-memory), with one timed step there;
- ``long``: a step at ``--long`` tokens (default 10M) where it fits.

Norms, RoPE and sampling are left out (small beside the GEMVs and the attention). Rows follow
shared/BENCHMARKS.md (``bench``, ``method``, ``bits``, ``batch``, ``context``, ``time_ms``, ...) plus
``world``; meta has provenance (bench/common.py). ``--tiny``: 2 layers, 4 query / 2 KV heads, head_dim 32,
8K tokens, float32 on the CPU over gloo (the reference attention: a smoke test of the same code).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import kvpass
from kvpass import CacheShape
from kvpass.distributed import SequenceParallel
from common import provenance  # bench/common.py (scripts run as python bench/NAME.py)

LLAMA3_8B = dict(layers=32, hq=32, hkv=8, d=128, hidden=4096, ffn=14336, vocab=128256)
TINY = dict(layers=2, hq=4, hkv=2, d=32, hidden=64, ffn=128, vocab=128)


def setup() -> tuple[int, int, torch.device]:
    """Join the torchrun group (or make a one-process one); returns (rank, world, device)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


class Layers:
    """Replicated per-layer weights (the GEMVs of a decode step) and per-layer sequence-parallel caches."""

    def __init__(self, shapes: dict, sp: SequenceParallel, context: int, batch: int, dtype, device,
                 weights: bool, capacity: int | None = None):
        self.s, self.sp, self.dtype, self.device = shapes, sp, dtype, device
        shape = CacheShape(batch, shapes["hkv"], shapes["d"], capacity or context, dtype)
        self.states = [sp.allocate(shape, device) for _ in range(shapes["layers"])]
        h, f, hq, hkv, d = shapes["hidden"], shapes["ffn"], shapes["hq"], shapes["hkv"], shapes["d"]
        g = torch.Generator(device=device).manual_seed(0)
        mk = lambda *sz: (torch.randn(*sz, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)  # noqa
        self.weights = [dict(qkv=mk((hq + 2 * hkv) * d, h), o=mk(h, hq * d), up=mk(2 * f, h), down=mk(h, f))
                        for _ in range(shapes["layers"])] if weights else None
        self.head = mk(shapes["vocab"], h) if weights else None

    def fill(self, context: int) -> None:
        """Random codes, scales, zeros and windows for ``context`` tokens; every layer's length set."""
        for st in self.states:
            for name, t in st.buffers.items():
                if t.dtype == torch.uint8:
                    t.random_(0, 256)
                elif name.endswith("scale"):
                    t.fill_(0.02)
                elif name.endswith("zero"):
                    t.fill_(-0.03)
                else:
                    t.normal_()
            st.length_tensor.fill_(context)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One decode step of every layer for hidden states x (B, 1, hidden); returns the new x."""
        s = self.s
        b = x.shape[0]
        for i, st in enumerate(self.states):
            if self.weights is not None:
                w = self.weights[i]
                qkv = _norm(x) @ w["qkv"].T
            else:
                qkv = x.new_zeros(b, 1, (s["hq"] + 2 * s["hkv"]) * s["d"]).normal_()
            q, k, v = qkv.split([s["hq"] * s["d"], s["hkv"] * s["d"], s["hkv"] * s["d"]], dim=-1)
            q = q.reshape(b, 1, s["hq"], s["d"]).transpose(1, 2)
            k = k.reshape(b, 1, s["hkv"], s["d"]).transpose(1, 2).contiguous()
            v = v.reshape(b, 1, s["hkv"], s["d"]).transpose(1, 2).contiguous()
            att = self.sp.step(st, q, k, v, k_pre=None, rotary=None, fresh=False, scale=None, causal=True,
                               attn_mask=None, softcap=None)
            if self.weights is not None:
                x = x + att.transpose(1, 2).reshape(b, 1, -1) @ w["o"].T
                gate, up = (_norm(x) @ w["up"].T).chunk(2, dim=-1)
                x = x + (torch.nn.functional.silu(gate) * up) @ w["down"].T
        if self.head is not None:
            x = x + (_norm(x) @ self.head.T)[..., :1]     # the LM head's GEMV (its logits otherwise unused)
        return _norm(x)          # the next step's input embedding: bounded, as a real one is


def _norm(x: torch.Tensor) -> torch.Tensor:
    """RMS normalisation (Llama's, without its weight): keeps random-weight activations finite across 32 layers
    and many steps (unnormalised, bf16 keys overflowed to inf within a few steps)."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=1e-6)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(layers: Layers, steps: int, warmup: int, group) -> list[float]:
    """Seconds of each decode step after ``warmup`` (every rank of ``group`` in step, max over ranks)."""
    x = torch.randn(layers.states[0].shape.batch, 1, layers.s["hidden"], device=layers.device, dtype=layers.dtype)
    out = []
    for i in range(steps + warmup):
        sync(layers.device)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        x = layers.step(x)
        sync(layers.device)
        dt = torch.tensor(time.perf_counter() - t0, dtype=torch.float64, device=layers.device)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)
        x = x / x.float().norm().clamp_min(1e-6).to(x.dtype) * 30      # keep random activations finite
        if i >= warmup:
            out.append(dt.item())
    return out


def check(shapes, w, group, kivi, block, tokens, dtype, device) -> torch.Tensor:
    """Append ``tokens`` real tokens (the same on every rank) to a KIVI cache sliced over ``group`` and
    return one decode step's merged output of layer 0 (B, Hq, 1, D) float32."""
    sp = SequenceParallel(inner=kivi, block=block, group=group)
    state = sp.allocate(CacheShape(1, shapes["hkv"], shapes["d"], tokens + block * w, dtype), device)
    g = torch.Generator(device=device).manual_seed(1)
    k, v = (torch.randn(1, shapes["hkv"], tokens + 1, shapes["d"], generator=g, device=device).to(dtype)
            for _ in range(2))
    q = torch.randn(1, shapes["hq"], 1, shapes["d"], generator=g, device=device).to(dtype)
    for a in range(0, tokens, 4096):
        sp.append(state, k[:, :, a:min(a + 4096, tokens)], v[:, :, a:min(a + 4096, tokens)])
    out = sp.step(state, q, k[:, :, tokens:], v[:, :, tokens:], k_pre=None, rotary=None, fresh=False, scale=None,
                  causal=True, attn_mask=None, softcap=None)
    return out.float()


def per_token_bytes(sp: SequenceParallel, shapes: dict, dtype) -> float:
    """Device bytes per token of one rank's slice, all layers (from the layout at a large capacity)."""
    big = CacheShape(1, shapes["hkv"], shapes["d"], 1 << 22, dtype)
    local = sp.local_shape(big)
    return sum(b.nbytes for b in sp.full_layout(big).values() if not b.host) / local.capacity * shapes["layers"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, float32, CPU/gloo smoke test")
    p.add_argument("--worlds", type=int, nargs="*", default=None, help="world sizes (default 1, 2, 4 ... N)")
    p.add_argument("--context", type=int, default=None, help="scaling context (default 4M; tiny 8K)")
    p.add_argument("--long", type=int, default=None, help="long-context row (default 10M; tiny 16K)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--block", type=int, default=1024, help="tokens per block dealt round robin")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--check-tokens", type=int, default=None, help="tokens of the correctness check (default 64K)")
    p.add_argument("--no-weights", action="store_true", help="leave the weight GEMVs out of a step")
    p.add_argument("--no-max", action="store_true", help="skip the max-context search")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    rank, n, device = setup()
    shapes = TINY if args.tiny else LLAMA3_8B
    dtype = torch.float32 if args.tiny or device.type == "cpu" else torch.bfloat16
    context = args.context or (8192 if args.tiny else 4 << 20)
    long = args.long or (16384 if args.tiny else 10_000_000)
    check_tokens = args.check_tokens or (2048 if args.tiny else 65536)
    worlds = args.worlds or [w for w in (1, 2, 4, 8, 16, 32, 64) if w <= n]
    kivi = kvpass.get_scheme("kivi", bits=args.bits) if not args.tiny else \
        kvpass.get_scheme("kivi", bits=args.bits, group_size=16, residual=32)
    # the check slices a cache with no full-precision window: then every world size stores the same codes
    # (kvpass.distributed), so the outputs may differ only by rounding
    exact = kvpass.get_scheme("kivi", bits=args.bits, group_size=kivi.group_size, residual=0)
    block = args.block if not args.tiny else 64
    rows, reference, t_one = [], None, None
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    for w in worlds:
        group = dist.new_group(list(range(w)))          # every rank takes part in creating it
        if rank < w:
            base = dict(method=f"kivi-{args.bits}", bits=args.bits, batch=args.batch, world=w, block=block)
            out = check(shapes, w, group, exact, block, check_tokens, dtype, device)
            if w == 1:
                reference = out
            if rank == 0 and reference is not None:
                diff = (out - reference).abs().max().item()
                rows.append({"bench": "check", **base, "scheme": exact.describe(), "context": check_tokens,
                             "max_abs_diff_vs_world1": diff, "mean_abs_out": out.abs().mean().item()})
                say(f"w={w} check over {check_tokens} tokens: max |out - out(w=1)| = {diff:.3g}")
            sp = SequenceParallel(inner=kivi, block=block, group=group)
            plan = [("scaling", context)] + [("long", long)]
            for kind, ctx in plan:
                free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 1 << 40
                need = per_token_bytes(sp, shapes, dtype) * ctx / w * args.batch
                weights = 0 if args.no_weights else _weight_bytes(shapes, dtype)
                fits = torch.tensor(int(need + weights < free - (4 << 30) * (device.type == "cuda")), device=device)
                dist.all_reduce(fits, op=dist.ReduceOp.MIN, group=group)
                if not fits.item():
                    say(f"w={w} {kind}: {ctx:,} tokens do not fit ({need / 2**30:.1f} GiB a rank)")
                    rows.append({"bench": f"decode_sp_{kind}", **base, "context": ctx, "fits": False}) if rank == 0 \
                        else None
                    continue
                layers = Layers(shapes, sp, ctx, args.batch, dtype, device, not args.no_weights,
                                capacity=ctx + (args.steps + args.warmup + 1) + block * w)
                layers.fill(ctx)
                times = time_steps(layers, args.steps, args.warmup, group)
                ms = statistics.median(times) * 1e3
                mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
                row = {"bench": f"decode_sp_{kind}", **base, "context": ctx, "fits": True, "time_ms": ms,
                       "tokens_per_s": args.batch / ms * 1e3, "tokens_per_rank": ctx // w,
                       "cache_gib_per_rank": need / 2**30, "peak_mem_gb": mem, "weights": not args.no_weights}
                if kind == "scaling":
                    if w == 1:
                        t_one = ms
                    if t_one is not None:
                        row |= {"speedup_vs_world1": t_one / ms, "efficiency": t_one / ms / w}
                rows.append(row) if rank == 0 else None
                say(f"w={w} {kind}: {ctx:,} tokens, {ms:.2f} ms/step, {args.batch / ms * 1e3:.1f} tokens/s"
                    + (f", {t_one / ms:.2f}x of w=1 ({t_one / ms / w:.0%} of linear)" if kind == "scaling"
                       and t_one else ""))
                del layers
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
            if not args.no_max:
                row = max_context(shapes, sp, w, group, args, dtype, device, block)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()      # the next world size's rows report their own peak
                if rank == 0:
                    rows.append({"bench": "max_context", **base, **row})
                    say(f"w={w} max context: {row['context']:,} tokens, {row.get('time_ms') or float('nan'):.2f} ms/step")
        dist.barrier()
    if rank == 0:
        meta = {**provenance(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "gpus": n if device.type == "cuda" else 0, "backend": dist.get_backend(),
                "torch": torch.__version__, "triton": _version("triton"),
                "shapes": {**shapes, "dtype": str(dtype).replace("torch.", ""), "batch": args.batch},
                "scheme": kivi.describe(), "steps": args.steps, "warmup": args.warmup, "tiny": args.tiny,
                "note": "a step = per layer: weight GEMVs (unless weights=false), append on the owning rank, "
                        "every rank's partial attention, all-gather + log-sum-exp merge; no norms/RoPE/sampling"}
        text = json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
        if args.output:
            args.output.write_text(text)
        print(text)
    dist.destroy_process_group()


def max_context(shapes, sp, w, group, args, dtype, device, block) -> dict:
    """The largest context whose slices fit every rank of ``group`` (weights allocated), with a timed step."""
    per_token = per_token_bytes(sp, shapes, dtype) * args.batch
    if device.type == "cuda":
        free = torch.tensor(torch.cuda.mem_get_info()[0], device=device)
        dist.all_reduce(free, op=dist.ReduceOp.MIN, group=group)
        weight_bytes = 0 if args.no_weights else _weight_bytes(shapes, dtype)
        predicted = int((free.item() - weight_bytes - (4 << 30)) / per_token) * w
    else:
        predicted = 4 * (args.context or 8192)
    length = predicted // (block * w) * block * w
    step = max(length // 32 // (block * w) * block * w, block * w)
    while length > 0:
        ok = torch.tensor(1, device=device)
        try:
            layers = Layers(shapes, sp, length, args.batch, dtype, device, not args.no_weights,
                            capacity=length + block * w + 32)
            layers.fill(length)
        except torch.OutOfMemoryError:
            ok.zero_()
            layers = None
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
        if ok.item():
            ms = statistics.median(time_steps(layers, 3, 1, group)) * 1e3
            del layers
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return {"context": length, "predicted": predicted, "time_ms": ms, "tokens_per_s": args.batch / ms * 1e3,
                    "cache_bytes_per_token_all_layers": per_token}
        del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
        length -= step
    return {"context": 0, "predicted": predicted}


def _weight_bytes(shapes, dtype) -> int:
    h, f, hq, hkv, d = shapes["hidden"], shapes["ffn"], shapes["hq"], shapes["hkv"], shapes["d"]
    per_layer = (hq + 2 * hkv) * d * h + h * hq * d + 2 * f * h + h * f
    return (per_layer * shapes["layers"] + shapes["vocab"] * h) * torch.empty((), dtype=dtype).element_size()


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
