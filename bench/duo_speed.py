"""Decode-attention time of the head policies on the GPU, Llama-3-8B shapes, against bf16 SDPA in the same run.

    python bench/duo_speed.py --output bench/results/duo_speed.json      (kvpass importable, CUDA)

One layer, 32 query / 8 KV heads, head_dim 128, one new token, batch 1 and 8, caches of 32K and 128K tokens.
A duo layer at ratio 0.5 keeps 4 KV heads whole in its inner scheme and serves 4 from a sink + recent ring
(64 + 256 tokens). The timed call is what :meth:`DuoHeads.attend` runs for a decode step, with the length
known on the host (so it replays from a CUDA graph): the retrieval heads' queries gathered and attended over
their part (fp16: SDPA over exactly the held tokens; KIVI-2: kvpass's kernel), the streaming heads' queries
over the ring (SDPA over sink + recent), the outputs scattered back to their heads. "one-launch" times
``kvpass::duo_kivi_attention`` (both groups in one KIVI call) or, for the fp16 cache,
``kvpass::duo_scaled_attention`` (the retrieval heads through the fp16 kernel with the rings in the same
launch, one merge), and records its largest difference from the group path. Caches are filled with
random codes and values (speed does not depend on them). Times are do_bench medians of CUDA-graph replays;
``speedup`` is SDPA's time over the setup's. ``--breakdown`` adds the device time of each launch of the
one-launch setups; ``--sweep`` times the scaled kernel's launch parameters (``kvpass.codegen.scaled.TUNING``)
on the fp16 duo one-launch call and on the plain fp16 cache, as ``sweep`` rows; ``--sweep-rings`` times
duo + KIVI-2 with its rings in the main or the tail launch (``sweep_rings`` rows).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import kvpass
from common import provenance  # bench/common.py (scripts run as python bench/NAME.py)
from decode_attention import D, HKV, HQ, bench_sdpa, fill_random, graph_us, launch_times
from kvpass.calibration import Calibration
from kvpass.codegen import kernel_attend, scaled

SINK, RECENT = 64, 256


def half_gates(layers: int = 1) -> Calibration:
    """Gates that make KV heads 0, 2, 4, 6 of every layer the retrieval heads at ratio 0.5."""
    gates = torch.tensor([1.0, 0.0] * (HKV // 2))
    return Calibration(method="duo", options={"sink": SINK, "recent": RECENT}, model={},
                       tensors={f"layers.{i}.gates": gates for i in range(layers)})


def duo_call(scheme, state, q: torch.Tensor, length: int):
    """The decode attention of a duo layer holding ``length`` tokens, q (B, Hq, 1, D) -> (B, Hq, 1, D)."""
    ret, stream = scheme.parts(state)
    _, _, qr, qs = scheme._indices(0, HKV, HQ, q.device)

    def run():
        out = torch.empty_like(q)
        q_r = q.index_select(1, qr)
        if scheme.inner.name == "fp16":
            o = F.scaled_dot_product_attention(q_r, ret["k"][:, :, :length], ret["v"][:, :, :length],
                                               enable_gqa=True)
        else:
            o = kernel_attend(scheme.inner, ret, q_r, length=length)
        out.index_copy_(1, qr, o)
        k = torch.cat([stream["k_sink"], stream["k_ring"]], 2)
        v = torch.cat([stream["v_sink"], stream["v_ring"]], 2)
        out.index_copy_(1, qs, F.scaled_dot_product_attention(q.index_select(1, qs), k, v, enable_gqa=True))
        return out
    return run


def streaming_call(state, q: torch.Tensor):
    def run():
        k = torch.cat([state["k_sink"], state["k_ring"]], 2)
        v = torch.cat([state["v_sink"], state["v_ring"]], 2)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return run


def setups(gates):
    kivi = kvpass.get_scheme("kivi", bits=2)
    return {"kivi-2": kivi, "streaming": kvpass.get_scheme("streaming", sink=SINK, recent=RECENT),
            "duo-0.5": kvpass.get_scheme("duo", gates=gates, ratio=0.5),
            "duo-0.5 one-launch": kvpass.get_scheme("duo", gates=gates, ratio=0.5),
            "duo-0.5+kivi-2": kvpass.get_scheme("duo", inner=kivi, gates=gates, ratio=0.5),
            "duo-0.5+kivi-2 one-launch": kvpass.get_scheme("duo", inner=kivi, gates=gates, ratio=0.5)}


def filled(scheme, batch: int, length: int, dtype: torch.dtype):
    """(state, q): a CUDA cache of ``scheme`` holding ``length`` random tokens (Llama-3-8B shapes) and one new
    token's queries (batch, HQ, 1, D) in ``dtype``."""
    state = scheme.allocate(kvpass.CacheShape(batch, HKV, D, length, dtype), "cuda")
    fill_random(state, length)
    return state, torch.randn(batch, HQ, 1, D, device="cuda", dtype=dtype)


@contextlib.contextmanager
def tuned(table: dict, config: dict):
    """A kernel module's TUNING table with ``config`` applied for the block, restored after it."""
    saved = dict(table)
    table.update(config)
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


def sweep_configs() -> list[dict]:
    """The scaled kernel's launch parameters ``--sweep`` tries (the current table first)."""
    import itertools
    configs = [dict(scaled.TUNING)]
    for block, warps, programs in itertools.product((64, 128), (2, 4), (4, 8, 16)):
        config = {**scaled.TUNING, "block_n": block, "num_warps": warps, "programs_per_sm": programs}
        if config not in configs:
            configs.append(config)
    return configs + [{**scaled.TUNING, "num_stages": stages} for stages in (2, 4)]


RING_PLACEMENTS = [{"rings": "main", "ring_tile_main": 16}, {"rings": "main", "ring_tile_main": 32},
                   {"rings": "tail"}]


def sweep_kivi_rings(batches: list[int], lengths: list[int], dtype: torch.dtype) -> list[dict]:
    """CUDA-graph time of the duo + KIVI-2 one-launch call with its rings in each launch
    (``kvpass.codegen.kivi.TUNING["rings"]``), at every shape."""
    from kvpass.codegen import kivi
    rows = []
    scheme = kvpass.get_scheme("duo", inner=kvpass.get_scheme("kivi", bits=2), gates=half_gates(), ratio=0.5)
    for batch in batches:
        for length in lengths:
            state, q = filled(scheme, batch, length, dtype)
            want = duo_call(scheme, state, q, length)()
            for config in RING_PLACEMENTS:
                with tuned(kivi.TUNING, config):
                    fn = lambda st=state: kernel_attend(scheme, st, q, length=length)  # noqa: E731
                    diff = (fn().float() - want.float()).abs().max().item()
                    us = graph_us(fn)
                rows.append({"setup": "duo-0.5+kivi-2 one-launch", "batch": batch, "length": length, "us": us,
                             "max_abs_diff_vs_group_path": diff, **config})
                print(f"  B={batch} L={length} kivi rings {config}: {us:.1f} us (diff {diff:.2g})", flush=True)
            del state
            torch.cuda.empty_cache()
    return rows


def sweep(batches: list[int], lengths: list[int], dtype: torch.dtype) -> list[dict]:
    """CUDA-graph time of the fp16 duo one-launch call and of the plain fp16 kernel under each
    :func:`sweep_configs` entry, at every shape."""
    rows = []
    gates = half_gates()
    for batch in batches:
        for length in lengths:
            cases = {"duo-0.5 one-launch": kvpass.get_scheme("duo", gates=gates, ratio=0.5),
                     "fp16": kvpass.get_scheme("fp16")}
            for label, scheme in cases.items():
                state, q = filled(scheme, batch, length, dtype)
                fn = lambda s=scheme, st=state: kernel_attend(s, st, q, length=length)  # noqa: E731
                for config in sweep_configs():
                    try:
                        with tuned(scaled.TUNING, config):
                            us = graph_us(fn)
                    except Exception as e:       # a combination past the shared memory or registers
                        print(f"  {label} {config}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                        continue
                    rows.append({"setup": label, "batch": batch, "length": length, "us": us, **config})
                    print(f"  B={batch} L={length} {label} {config}: {us:.1f} us", flush=True)
                del state
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--breakdown", action="store_true", help="device time of each launch of the one-launch setups")
    p.add_argument("--sweep", action="store_true", help="time the scaled kernel's launch parameters (sweep rows)")
    p.add_argument("--sweep-rings", action="store_true",
                   help="time duo + KIVI-2 with its rings in the main or the tail launch (sweep_rings rows)")
    p.add_argument("--skip-setups", action="store_true", help="only the sweeps")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    dtype = torch.bfloat16
    meta = {**provenance(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shapes": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "new_tokens": 1, "layers": 1},
            "retrieval_ratio": 0.5, "sink": SINK, "recent": RECENT, "dtype": "bfloat16",
            "timing": "triton.testing.do_bench median of CUDA-graph replays, L2 flushed",
            "scaled_tuning": dict(scaled.TUNING)}
    rows = []

    def save() -> None:          # after every shape: a run stopped at its time limit keeps what it measured
        if args.output:
            args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    for batch in [] if args.skip_setups else args.batches:
        for length in args.lengths:
            _, base = bench_sdpa(batch, length, dtype)
            rows.append({"setup": "sdpa-bf16", "batch": batch, "length": length, "us": base, "speedup": 1.0})
            print(f"B={batch} L={length}: sdpa {base:.1f} us", flush=True)
            for label, scheme in setups(half_gates()).items():
                state, q = filled(scheme, batch, length, dtype)
                extra = {}
                if label.endswith("one-launch"):      # kvpass::duo_*_attention, checked against the group path
                    fn = lambda s=scheme, st=state: kernel_attend(s, st, q, length=length)  # noqa: E731
                    extra["max_abs_diff_vs_group_path"] = (fn().float() - duo_call(scheme, state, q, length)().float()
                                                           ).abs().max().item()
                elif scheme.name == "duo":
                    fn = duo_call(scheme, state, q, length)
                elif scheme.name == "streaming":
                    fn = streaming_call(state, q)
                else:
                    fn = lambda s=scheme, st=state: kernel_attend(s, st, q, length=length)  # noqa: E731
                if not torch.isfinite(fn()).all():
                    raise RuntimeError(f"{label}: non-finite output")
                us = graph_us(fn)
                rows.append({"setup": label, "batch": batch, "length": length, "us": us, "speedup": base / us,
                             "cache_bytes": state.nbytes, **extra})
                print(f"  {label}: {us:.1f} us, {base / us:.2f}x", flush=True)
                if args.breakdown and label.endswith("one-launch"):
                    parts = launch_times(fn)
                    rows.append({"setup": label, "bench": "breakdown", "batch": batch, "length": length, **parts})
                    print("    " + ", ".join(f"{k['name'][:40]} {k['us']:.1f}" for k in parts["kernels"]), flush=True)
                del state
                torch.cuda.empty_cache()
            save()
    if args.sweep:
        rows += [{"bench": "sweep", **r} for r in sweep(args.batches, args.lengths, dtype)]
    if args.sweep_rings:
        rows += [{"bench": "sweep_rings", **r} for r in sweep_kivi_rings(args.batches, args.lengths, dtype)]
    save()


if __name__ == "__main__":
    main()
