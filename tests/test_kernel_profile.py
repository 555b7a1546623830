"""bench/kernel_profile.py's reading of Nsight Compute's CSV exports (the profiling itself needs a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import kernel_profile  # noqa: E402  (bench/ scripts import their neighbours by name)

RAW = "\n".join([
    "==PROF== Connected to process 1",
    '"ID","Kernel Name","gpu__time_duration.sum","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",'
    '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","sm__throughput.max.pct_of_peak",'
    '"unrelated__metric"',
    '"","","us","ratio","ratio","%",""',
    '"0","_kivi_split_kernel","180.5","0.39","1,170.25","90","x"',
    '"1","_kivi_split_kernel","19.5","0.01","1.2","10","y"',
])

SASS_HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
               '"L1 Wavefronts Shared","L1 Wavefronts Shared Ideal"')


def _sass(rows: list[tuple[str, int, int, int, int]]) -> str:
    lines = ['"Kernel Name","_kivi_split_kernel",', SASS_HEADER]
    lines += [f'"{i:04x}","{src}","{samples}","{execs:,}","{wf}","{ideal}"'
              for i, (src, samples, execs, wf, ideal) in enumerate(rows)]
    return "\n".join(lines)


LOOP = [("HFMA2 R1, R2, R3, R4", 5, 1000, 0, 0), ("HFMA2 R5, R2, R3, R4", 1, 1000, 0, 0),
        ("IMAD.MOV.U32 R52, RZ, RZ, R16", 7, 1000, 0, 0), ("@P0 LDS.64 R16, [R93+0x1c00]", 3, 1000, 40, 20),
        ("HMMA.16816.F32 R64, R52, R64, RZ", 2, 1000, 0, 0), ("MOV R1, 0x3", 0, 10, 0, 0),
        ("LDSM.16.M88.4 R48, [R48]", 2, 10, 8, 8)]


def test_raw_metrics_keep_the_listed_ones_per_launch_as_numbers():
    launches = kernel_profile.parse_raw_csv(RAW)
    assert [launch["kernel"] for launch in launches] == ["_kivi_split_kernel"] * 2
    metrics = launches[0]["metrics"]
    assert metrics["gpu__time_duration.sum"] == {"value": 180.5, "unit": "us"}
    assert metrics["smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio"]["value"] == 1170.25
    assert "unrelated__metric" not in metrics and "sm__throughput.max.pct_of_peak" not in metrics
    assert kernel_profile.stall_summary(metrics) == {"long_scoreboard": 1170.25, "barrier": 0.39}


def test_raw_export_without_metrics_is_an_error():
    with pytest.raises(RuntimeError, match="no metrics"):
        kernel_profile.parse_raw_csv("==PROF== nothing was profiled")


def test_hot_loop_mix_counts_each_instruction_of_the_most_executed_block():
    rows = kernel_profile.sass_blocks(_sass(LOOP))[0]
    summary = kernel_profile.loop_summary(rows)
    assert summary["loop_instructions_per_iteration"] == 5
    assert summary["loop_mix"] == {"HFMA2": 2, "IMAD.MOV": 1, "LDS": 1, "HMMA": 1}
    assert summary["shared_wavefronts_by_opcode"] == {"LDS": [40.0, 20.0], "LDSM": [8.0, 8.0]}
    assert summary["stall_sample_share_by_opcode"]["IMAD.MOV"] == pytest.approx(7 / 20, abs=1e-3)


def test_summarize_reads_a_runs_exports_and_keeps_the_loop_of_the_main_launch_only(tmp_path):
    (tmp_path / "ncu_kivi-2.csv").write_text(RAW)
    (tmp_path / "ncu_kivi-2_sass.csv").write_text(_sass(LOOP) + "\n" + _sass(LOOP[:2]))
    launches = kernel_profile.summarize("kivi-2", tmp_path)
    assert [round(launch["share_of_split_time"], 3) for launch in launches] == [0.902, 0.098]
    assert launches[0]["sass"]["loop_instructions_per_iteration"] == 5 and "sass" not in launches[1]
    json.dumps(launches)          # the result file is JSON
