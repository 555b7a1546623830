"""Build every Triton kernel launch the interpreter tests make for the H200 (sm_90), on a machine with no GPU.

The Triton interpreter runs a kernel's Python, not its compiler: code the compiler rejects (an early
``return`` whose shape differs from a later one, a constexpr used as a tensor) passes every CPU test and
fails on the GPU. As a pytest plugin this module records each interpreted launch — the kernel, its argument
types, constexprs and launch options — and at the end of the session compiles all of them for sm_90 with
``triton.compile`` (front end to cubin, with the ptxas Triton ships) in a fresh process without
``TRITON_INTERPRET``. A failure fails the session and names the kernel and its constexprs::

    make check-sm90                      # the kernel tests, then their launches built for sm_90
    TRITON_INTERPRET=1 python -m pytest -p tests.sm90_build tests/test_kernels.py -k mask

Run as ``python -m tests.sm90_build SPECS.json`` it compiles a saved list of launches.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile

import torch

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
          torch.float8_e4m3fn: "fp8e4nv"}
_OPTIONS = ("num_warps", "num_stages", "maxnreg", "num_ctas")
_launches: dict[str, dict] = {}


def launch_spec(fn, arg_names: list[str], args: tuple, kwargs: dict) -> dict:
    """What a launch of the jitted Python function ``fn`` compiles to: {"module", "name", "signature"
    (argument -> Triton type), "constexprs", "options"}; tensors become pointers of their dtype, ints i32
    or i64 by value, floats fp32."""
    params = inspect.signature(fn).parameters
    bound = dict(zip(arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    signature, constexprs = {}, {}
    for name in arg_names:
        value = bound.get(name, params[name].default)
        if "constexpr" in str(params[name].annotation) or value is None:
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            constexprs[name] = value
    options = {k: kwargs[k] for k in _OPTIONS if kwargs.get(k) is not None}
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


def pytest_configure(config) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("tests.sm90_build records interpreted launches: set TRITON_INTERPRET=1")
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = launch_spec(self.fn, self.arg_names, args, kwargs)
        _launches.setdefault(json.dumps(spec, sort_keys=True, default=str), spec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run


def pytest_sessionfinish(session, exitstatus) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(list(_launches.values()), f, default=str)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print(f"\nbuilding {len(_launches)} kernel launches for sm_90", flush=True)
    if subprocess.run([sys.executable, "-m", "tests.sm90_build", f.name], env=env).returncode:
        session.exitstatus = 1
    os.unlink(f.name)


def _build(spec: dict) -> str | None:
    """Compile one launch spec for sm_90; None, or the error's last line."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    signature = {**spec["signature"], **{k: "constexpr" for k in spec["constexprs"]}}
    source = triton.compiler.ASTSource(fn, signature={n: signature[n] for n in fn.arg_names},
                                       constexprs=spec["constexprs"])
    try:
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec["options"])
    except Exception as e:       # report every failing launch, not just the first
        where = (str(e).strip().splitlines() or [""])[0]
        cause = e
        while cause.__cause__ is not None:       # a kernel's error wraps the callee's that wraps the cause
            cause = cause.__cause__
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]} ({where[:60]})"
    return None


def main(path: str) -> int:
    from concurrent.futures import ProcessPoolExecutor
    specs = json.load(open(path))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        errors = list(pool.map(_build, specs))
    for spec, error in zip(specs, errors):
        if error:
            shown = {k: v for k, v in spec["constexprs"].items() if k.isupper()}
            print(f"FAILED {spec['module']}.{spec['name']} {shown} {spec['options']}\n    {error}")
    failed = sum(e is not None for e in errors)
    print(f"sm_90 build: {len(specs) - failed} of {len(specs)} kernel launches compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))


_GLUON_BUILD = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
args = json.loads(sys.argv[1])
mod = importlib.import_module(args["module"])
fn = getattr(mod, args["kernel"])
consts = eval(args["constexprs"], {"mod": mod})
signature = {n: args["pointers"].get(n, "constexpr" if n in consts else "i32") for n in fn.arg_names}
signature.update(args.get("scalars", {}))
kernel = triton.compile(GluonASTSource(fn, signature=signature, constexprs=consts, attrs={}),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": args["num_warps"]})
print("RESULT " + json.dumps({"shared": kernel.metadata.shared, "cubin_bytes": len(kernel.asm["cubin"]),
                              "ptx_global_smem": "global_smem" in kernel.asm["ptx"]}))
"""


def gluon_build(module: str, kernel: str, pointers: dict, constexprs: str, num_warps: int,
                scalars: dict | None = None) -> dict:
    """Build the Gluon kernel ``module.kernel`` for sm_90 in a fresh Python without ``TRITON_INTERPRET`` (under
    the interpreter triton.language's own jit helpers, such as the combine function of ``gl.max``, are
    interpreted functions the Gluon front end cannot call). ``pointers``: argument -> pointer type;
    ``constexprs``: a Python expression for the constexpr dict, evaluated with the module as ``mod``; other
    arguments are i32 unless ``scalars`` names their type. Returns {"shared": bytes, "cubin_bytes",
    "ptx_global_smem": whether the PTX names the shared-memory base symbol}; raises RuntimeError with the
    compiler's output when the build fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = json.dumps({"module": module, "kernel": kernel, "pointers": pointers, "constexprs": constexprs,
                       "num_warps": num_warps, "scalars": scalars or {}})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _GLUON_BUILD, spec], env=env, cwd=root, capture_output=True,
                          text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"sm_90 build of {module}.{kernel} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])
