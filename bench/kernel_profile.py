"""Hardware counters of the decode-attention kernels under Nsight Compute (ncu), on the GPU.

    python bench/kernel_profile.py --methods kivi-2 fp16 --output bench/results/kernel_profile.json

For each method, a child process of this script fills a random cache (Llama-3-8B shapes, as
bench/decode_attention.py does) and calls the kernel a few times; ncu (``--clock-control none``: the
clocks stay as the device runs them) profiles one call's split-K launches — the main loop over the
compressed cache, and for KIVI the tail launch over the window — with the sections that say what bounds a
kernel: throughput against the peaks, occupancy, issue-slot use, instruction mix, and the warp stall
reasons (cycles a warp waited per issued instruction, by reason). The JSON keeps ncu's raw metrics that
matter for that reading, per launch, with each launch's share of the call.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from common import provenance  # bench/common.py (scripts run as python bench/NAME.py)

SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats", "InstructionStats",
            "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "MemoryWorkloadAnalysis_Tables", "SourceCounters")
# the split-K kernel names of each method's decode attention (the merge is timed by decode_attention.py)
KERNEL_REGEX = {"kivi": "_kivi_split_kernel", "fp16": "_scaled_split_kernel", "int8": "_scaled_split_kernel",
                "fp8": "_scaled_split_kernel"}
WARMUP_CALLS = 2
KEEP = ("gpu__time_duration.sum", "launch__grid_size", "launch__block_size", "launch__registers_per_thread",
        "launch__shared_mem_per_block", "launch__occupancy_limit", "sm__warps_active.avg.pct_of_peak",
        "sm__throughput.avg.pct", "dram__throughput.avg.pct", "dram__bytes_read.sum",
        "smsp__issue_active.avg.pct", "smsp__inst_executed.sum", "smsp__thread_inst_executed.sum",
        "smsp__average_warp_latency_per_inst_issued", "smsp__warps_eligible.avg.per_cycle_active",
        "sm__pipe_", "sm__inst_executed_pipe_", "smsp__average_warps_issue_stalled_",
        "l1tex__data_bank_conflicts_pipe_lsu_mem_shared", "l1tex__data_pipe_lsu_wavefronts", "l1tex__throughput",
        "l1tex__t_requests_pipe_lsu", "l1tex__t_sectors_pipe_lsu", "smsp__sass_inst_executed_op",
        "smsp__inst_executed_op", "dram__throughput", "gpu__dram_throughput", "gpu__compute_memory_throughput",
        "smsp__pcsamp_warps_issue_stalled_", "smsp__pcsamp_sample_count")


def child(method: str, batch: int, length: int) -> None:
    """Fill a random cache for ``method`` and call its kernel WARMUP_CALLS + 1 times (the last is profiled)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from decode_attention import HQ, D, METHODS, random_state
    from kvpass.codegen import kernel_attend
    name, options = METHODS[method]
    scheme, state = random_state(name, options, batch, length, torch.bfloat16)
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    for _ in range(WARMUP_CALLS + 1):
        out = kernel_attend(scheme, state, q)
    torch.cuda.synchronize()
    if not torch.isfinite(out).all():
        raise SystemExit(f"{method}: non-finite output")


def kept(name: str) -> bool:
    """A KEEP metric, in its average / total form only (ncu also prints per-unit max and min)."""
    return any(name.startswith(k) for k in KEEP) and ".max" not in name and ".min" not in name


def number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def parse_raw_csv(text: str) -> list[dict]:
    """ncu ``--page raw --csv``: a header of metric names, a row of units, one row per profiled launch.
    Returns per launch {metric: {"value", "unit"}} for the KEEP metrics plus the kernel name."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if len(rows) < 3:
        raise RuntimeError(f"ncu printed no metrics:\n{text[-2000:]}")
    header, units, launches = rows[0], rows[1], rows[2:]
    out = []
    for launch in launches:
        rec = {"kernel": launch[header.index("Kernel Name")], "metrics": {}}
        for name, unit, value in zip(header, units, launch):
            if kept(name):
                rec["metrics"][name] = {"value": number(value), "unit": unit}
        out.append(rec)
    return out


def stall_summary(metrics: dict) -> dict:
    """Warp cycles stalled per issued instruction, by reason, largest first (reasons under 0.05 dropped)."""
    prefix, suffix = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"
    stalls = {name[len(prefix):-len(suffix)]: m["value"] for name, m in metrics.items()
              if name.startswith(prefix) and name.endswith(suffix) and isinstance(m["value"], float)}
    return dict(sorted(((k, round(v, 3)) for k, v in stalls.items() if v >= 0.05), key=lambda kv: -kv[1]))


def profile(method: str, batch: int, length: int, ncu: str, raw_dir: Path) -> None:
    """Run the child under ncu into ``raw_dir``/ncu_METHOD.ncu-rep, profiling the last call's launches (the
    main loop, then the tail for KIVI), and export ncu's raw metrics (ncu_METHOD.csv) and its per-SASS-line
    source page (ncu_METHOD_sass.csv: executed instructions, shared-memory wavefronts, stall samples)."""
    name = method.split("-")[0]
    per_call = 2 if name == "kivi" else 1
    report = raw_dir / f"ncu_{method}"
    cmd = [ncu, "--clock-control", "none", "-f", "-o", str(report), "-k", f"regex:{KERNEL_REGEX[name]}",
           "--launch-skip", str(WARMUP_CALLS * per_call), "--launch-count", str(per_call)]
    for section in SECTIONS:
        cmd += ["--section", section]
    cmd += [sys.executable, __file__, "--child", method, "--batch", str(batch), "--length", str(length)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"ncu failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    rep = f"{report}.ncu-rep"
    raw = subprocess.run([ncu, "-i", rep, "--csv", "--page", "raw"], capture_output=True, text=True).stdout
    (raw_dir / f"ncu_{method}.csv").write_text(raw)
    source = subprocess.run([ncu, "-i", rep, "--csv", "--page", "source", "--print-source", "sass"],
                            capture_output=True, text=True)
    (raw_dir / f"ncu_{method}_sass.csv").write_text(source.stdout or source.stderr)


def sass_blocks(text: str) -> list[list[dict]]:
    """ncu's source page (CSV): one table per profiled launch, each a "Kernel Name" line, then a header and
    one row per SASS instruction. Returns the launches' rows as dicts."""
    blocks, cur = [], None
    for line in text.splitlines():
        if line.startswith('"Kernel Name"'):
            cur = []
            blocks.append(cur)
        elif cur is not None and line.strip():
            cur.append(line)
    out = []
    for block in blocks:
        rows = list(csv.reader(io.StringIO("\n".join(block))))
        out.append([dict(zip(rows[0], r)) for r in rows[1:]])
    return out


def opcode(source: str) -> str:
    """The SASS opcode of a source line without its predicate and modifiers (IMAD.MOV kept: it is a move)."""
    words = source.split()
    op = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "?")
    return "IMAD.MOV" if op.startswith("IMAD.MOV") else op.split(".")[0]


def loop_summary(rows: list[dict]) -> dict:
    """The hot loop of a launch — the instructions executed most often, all the same number of times — as a
    per-iteration instruction mix, with every opcode's share of the launch's shared-memory wavefronts and
    stall samples (the whole launch, loop or not)."""
    count = lambda r, k: float((r.get(k) or "0").replace(",", "") or 0)          # noqa: E731
    execs = [count(r, "Instructions Executed") for r in rows]
    hot = max(execs)
    mix, wavefronts, ideal, samples = {}, {}, {}, {}
    for r, n in zip(rows, execs):
        op = opcode(r["Source"])
        if n == hot:
            mix[op] = mix.get(op, 0) + 1
        wavefronts[op] = wavefronts.get(op, 0) + count(r, "L1 Wavefronts Shared")
        ideal[op] = ideal.get(op, 0) + count(r, "L1 Wavefronts Shared Ideal")
        samples[op] = samples.get(op, 0) + count(r, "Warp Stall Sampling (All Samples)")
    total_samples = sum(samples.values()) or 1.0
    return {"loop_instructions_per_iteration": sum(mix.values()), "loop_iterations_per_warp_total": hot,
            "loop_mix": dict(sorted(mix.items(), key=lambda kv: -kv[1])),
            "shared_wavefronts_by_opcode": {k: [v, ideal[k]] for k, v in
                                            sorted(wavefronts.items(), key=lambda kv: -kv[1]) if v},
            "stall_sample_share_by_opcode": {k: round(v / total_samples, 3) for k, v in
                                             sorted(samples.items(), key=lambda kv: -kv[1])[:15]}}


def summarize(method: str, raw_dir: Path) -> list[dict]:
    """Per profiled launch: KEEP metrics, share of the split launches' time, stall reasons, loop summary."""
    launches = parse_raw_csv((raw_dir / f"ncu_{method}.csv").read_text())
    sass = sass_blocks((raw_dir / f"ncu_{method}_sass.csv").read_text())
    total = sum(launch["metrics"]["gpu__time_duration.sum"]["value"] for launch in launches)
    for i, launch in enumerate(launches):
        launch["share_of_split_time"] = launch["metrics"]["gpu__time_duration.sum"]["value"] / total
        launch["stalls_per_issued_instruction"] = stall_summary(launch["metrics"])
        if i < len(sass) and sass[i] and launch["share_of_split_time"] >= 0.5:     # the main loop's launch
            launch["sass"] = loop_summary(sass[i])
    return launches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="*", default=["kivi-2", "fp16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--summarize", action="store_true",
                   help="no profiling: rebuild --output from the CSVs already in --raw-dir (any machine)")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--raw-dir", type=Path, default=Path("/tmp/kvpass_ncu"),
                   help="where ncu's reports and whole CSVs go (one set per method)")
    args = p.parse_args()
    if args.child:
        child(args.child, args.batch, args.length)
        return
    if args.summarize:
        result = {"meta": {**provenance(), "batch": args.batch, "length": args.length, "sections": SECTIONS},
                  "methods": {method: summarize(method, args.raw_dir) for method in args.methods}}
        (args.output.write_text if args.output else print)(json.dumps(result, indent=2) + "\n")
        return
    args.raw_dir.mkdir(parents=True, exist_ok=True)
    ncu = shutil.which("ncu") or next(iter(sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) is not installed here")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **provenance(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "ncu": subprocess.run([str(ncu), "--version"], capture_output=True, text=True).stdout.strip()[-60:],
            "batch": args.batch, "length": args.length, "sections": SECTIONS,
            "shapes": "32 q / 8 KV heads, head_dim 128, bf16 queries, one new token"}
    result = {"meta": meta, "methods": {}}
    for method in args.methods:
        try:
            profile(method, args.batch, args.length, str(ncu), args.raw_dir)
            result["methods"][method] = summarize(method, args.raw_dir)
        except Exception as e:        # one method failing must not lose the others
            result["methods"][method] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
        for launch in result["methods"][method] if isinstance(result["methods"][method], list) else []:
            m = launch["metrics"]
            print(f"{method} {launch['kernel'][:40]}: {m['gpu__time_duration.sum']['value']} "
                  f"{m['gpu__time_duration.sum']['unit']}, stalls {launch['stalls_per_issued_instruction']}",
                  flush=True)
        if args.output:
            args.output.write_text(json.dumps(result, indent=2) + "\n")
    if not args.output:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
