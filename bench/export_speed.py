"""SmolLM2 exported per scheme: ONNX file sizes, and onnxruntime decode speed against kvpass's PyTorch CPU path.

    python bench/export_speed.py --output bench/results/export_speed.json

For each scheme: SmolLM2-135M (fp32, CPU) is compiled by kvpass (``backend="eager"``: the rewritten graphs run
the PyTorch reference ops; the CPU has no Triton kernels) with a cache of ``--capacity`` tokens, and greedy-
decodes ``--new`` tokens after a ``--prompt``-token window of an evaluation speech; the same model is exported
(``kvpass.export``, ONNX and .pt2) and the exports decode the same prompt: onnxruntime through
``kvpass.onnx_generate``, torch through ``export.pt2_generate``. Recorded: token equality with kvpass, the
largest logit difference over the generated positions, the ONNX files' bytes, and decode milliseconds per
token of each path in the same run (PyTorch timed step by step on a second, warm generation: the first
one includes Dynamo's tracing). ``ratio`` = PyTorch ms/token / onnxruntime ms/token (> 1: onnxruntime is faster). Both
paths use the same number of threads (``--threads``). Results are written after every scheme.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import tempfile
import time

import torch

import kvpass
from common import provenance  # bench/common.py (scripts run as python bench/NAME.py)
from kvpass.data import speeches, token_windows
from kvpass.export import export, pt2_generate, reference_generate
from kvpass.models import load_smollm2
from kvpass.onnx_generate import onnx_generate

SCHEMES = {"fp16": ("fp16", {}), "int8": ("int8", {}), "kivi2": ("kivi", {"bits": 2}),
           "kivi4": ("kivi", {"bits": 4}), "million4": ("million", {"bits": 4})}


@torch.no_grad()
def timed_reference(model, ids, new):
    """kvpass's greedy decoding in PyTorch (as :func:`kvpass.export.reference_generate`), timed: a first
    generation lets Dynamo trace the prefill and decode graphs, the second is timed step by step.
    Returns (tokens, logits, prefill seconds, decode seconds per token)."""
    from kvpass.perplexity import _returned_cache, cache_argument
    reference_generate(model, ids, 3)
    arg = cache_argument(model)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - t0
    cache, seen = _returned_cache(out), [out.logits[:, -1]]
    tokens = [seen[-1].argmax(-1, keepdim=True)]
    t0 = time.perf_counter()
    for _ in range(new - 1):
        out = model(input_ids=tokens[-1], **{arg: cache}, use_cache=True)
        cache = _returned_cache(out)
        seen.append(out.logits[:, -1])
        tokens.append(seen[-1].argmax(-1, keepdim=True))
    decode = (time.perf_counter() - t0) / (new - 1)
    return torch.cat(tokens, dim=1), torch.stack(seen, dim=1), prefill, decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--capacity", type=int, default=320)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="bench/results/export_speed.json")
    p.add_argument("--append", action="store_true", help="keep the rows of other schemes already in --output")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    hf, tok = load_smollm2()
    text = " ".join(s.text for s in speeches("eval")[:2])
    ids = token_windows(tok, text, a.prompt, 1)
    rows = []
    if a.append and os.path.exists(a.output):
        rows = [r for r in json.load(open(a.output))["rows"] if r["scheme"] not in a.schemes]
    meta = dict(provenance(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                model="SmolLM2-135M-Instruct fp32", prompt=a.prompt, new=a.new, capacity=a.capacity,
                threads=a.threads, torch=torch.__version__, backend="eager (PyTorch reference ops)")
    try:
        import onnxruntime
        meta["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    for name in a.schemes:
        method, opts = SCHEMES[name]
        base = copy.deepcopy(hf)
        if method in ("million", "cq"):
            t0 = time.perf_counter()
            opts = dict(opts, calibration=kvpass.calibrate(base, method, tokenizer=tok, sequences=4, seq_len=256,
                                                          progress=False, **opts))
            print(f"{name}: calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
        model = kvpass.compile(base, method, backend="eager", capacity=a.capacity, **opts)
        want, want_logits, pt_prefill, pt_ms = timed_reference(model, ids, a.new)
        row = dict(scheme=name, method=method, options={k: v for k, v in opts.items() if k != "calibration"},
                   torch_prefill_s=round(pt_prefill, 3), torch_decode_ms=round(pt_ms * 1e3, 2))
        with tempfile.TemporaryDirectory() as d:
            for fmt in ("onnx", "pt2"):
                t0 = time.perf_counter()
                export(model, os.path.join(d, fmt), fmt)
                row[f"{fmt}_export_s"] = round(time.perf_counter() - t0, 1)
            row["onnx_prefill_bytes"] = os.path.getsize(os.path.join(d, "onnx", "prefill.onnx"))
            row["onnx_decode_bytes"] = os.path.getsize(os.path.join(d, "onnx", "decode.onnx"))
            state = json.load(open(os.path.join(d, "onnx", "kvpass_export.json")))["state"]
            row["cache_bytes"] = sum(torch.empty((), dtype=getattr(torch, s["dtype"][6:])).element_size()
                                     * int(torch.tensor(s["shape"]).prod()) for s in state)
            t: dict = {}
            got, logits = onnx_generate(os.path.join(d, "onnx"), ids.numpy(), a.new, threads=a.threads,
                                        return_logits=True, timings=t)
            row.update(onnx_same_tokens=bool(torch.equal(torch.from_numpy(got), want)),
                       onnx_max_logit_diff=float((torch.from_numpy(logits) - want_logits).abs().max()),
                       onnx_prefill_s=round(t["prefill_s"], 3),
                       onnx_decode_ms=round(t["decode_s"] / t["decode_steps"] * 1e3, 2))
            row["ratio"] = round(row["torch_decode_ms"] / row["onnx_decode_ms"], 2)
            got, logits = pt2_generate(os.path.join(d, "pt2"), ids, a.new, return_logits=True)
            row.update(pt2_same_tokens=bool(torch.equal(got, want)),
                       pt2_max_logit_diff=float((logits - want_logits).abs().max()))
        row["tokens"] = want[0].tolist()
        rows.append(row)
        rows.sort(key=lambda r: list(SCHEMES).index(r["scheme"]))
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
        os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
        with open(a.output, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
