"""tests/sm90_build.py, the check that builds interpreted kernel launches for sm_90: what it records of a
launch, and that it passes a kernel the compiler takes and fails one only the compiler rejects."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from tests.sm90_build import launch_spec


@triton.jit
def _fine_kernel(X, Y, n, scale, ROWS: tl.constexpr, ONE_ROW: tl.constexpr):
    offs = tl.arange(0, ROWS)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    if ONE_ROW:
        y = x[None, :] * scale
    else:
        y = x[:, None] * scale
    tl.store(Y + offs, tl.sum(y, 0) if ONE_ROW else tl.sum(y, 1), mask=offs < n)


@triton.jit
def _rows(x, ONE_ROW: tl.constexpr):
    if ONE_ROW:
        return x[None, :]            # an early return: the compiler builds the line after it too
    return x[:, None] + tl.zeros_like(x)[None, :]


@triton.jit
def _clashing_kernel(X, Y, n, ROWS: tl.constexpr, ONE_ROW: tl.constexpr):
    offs = tl.arange(0, ROWS)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Y + offs, tl.sum(_rows(x, ONE_ROW), 0), mask=offs < n)


def test_a_launch_is_recorded_with_its_types_constexprs_and_options():
    x = torch.zeros(4, dtype=torch.float16)
    spec = launch_spec(_fine_kernel.fn, _fine_kernel.arg_names, (x, x.int(), 3, 0.5),
                       dict(ROWS=16, ONE_ROW=True, num_warps=2, num_stages=None))
    assert spec == {"module": __name__, "name": "_fine_kernel",
                    "signature": {"X": "*fp16", "Y": "*i32", "n": "i32", "scale": "fp32"},
                    "constexprs": {"ROWS": 16, "ONE_ROW": True}, "options": {"num_warps": 2}}
    big = launch_spec(_fine_kernel.fn, _fine_kernel.arg_names, (x, x, 2 ** 40, 1.0), dict(ROWS=16, ONE_ROW=False))
    assert big["signature"]["n"] == "i64"


def _build(specs: list[dict], tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "tests.sm90_build", str(path)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                    "ptxas")), reason="this triton ships no ptxas")
def test_the_build_passes_a_sound_kernel_and_fails_one_only_the_compiler_rejects(tmp_path):
    """Both kernels run under the interpreter; only the second has a constexpr branch whose early return
    clashes in shape with the code after it. The build names it and exits non-zero."""
    x = torch.zeros(16)
    fine = [launch_spec(_fine_kernel.fn, _fine_kernel.arg_names, (x, x, 16, 1.0), dict(ROWS=16, ONE_ROW=flag))
            for flag in (True, False)]
    result = _build(fine, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 of 2 kernel launches compiled, 0 failed" in result.stdout
    clash = launch_spec(_clashing_kernel.fn, _clashing_kernel.arg_names, (x, x, 16), dict(ROWS=16, ONE_ROW=True))
    result = _build(fine[:1] + [clash], tmp_path)
    assert result.returncode == 1
    assert "FAILED tests.test_sm90_build._clashing_kernel" in result.stdout
    assert "1 of 2 kernel launches compiled, 1 failed" in result.stdout
