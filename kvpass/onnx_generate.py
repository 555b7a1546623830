"""Greedy generation from ``kvpass.export(model, dir, format="onnx")`` with onnxruntime alone.

This file imports only numpy and onnxruntime (plus the standard library), so it can be copied next to an
exported model and run where neither torch nor kvpass is installed:

    python onnx_generate.py out/ --ids 1 2 3 4 --new 32

The exported steps (see :mod:`kvpass.export`): ``prefill(input_ids)`` returns the last position's logits
and a fresh compressed cache; ``decode(input_ids, past...)`` takes one token and the cache, and returns
logits and the updated cache (``present...``), which the next step takes as its ``past...``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def sessions(directory: str, threads: int | None = None):
    """(prefill, decode) onnxruntime InferenceSessions (CPU) of an exported directory."""
    import onnxruntime as ort
    with open(os.path.join(directory, "kvpass_export.json")) as f:
        files = json.load(f)["files"]
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return tuple(ort.InferenceSession(os.path.join(directory, files[m]), opts, providers=["CPUExecutionProvider"])
                 for m in ("prefill", "decode"))


def onnx_generate(directory: str, input_ids, max_new_tokens: int, *, threads: int | None = None,
                  return_logits: bool = False, timings: dict | None = None):
    """Greedy decoding of the exported model in ``directory`` from ``input_ids`` (1, T) int64 (a numpy array
    or anything ``np.asarray`` takes; T >= 2 and T + max_new_tokens <= the exported capacity).

    Returns the (1, max_new_tokens) int64 generated tokens, and with ``return_logits`` also their logits
    (1, max_new_tokens, vocab) float32: the prefill's last-position logits, then each decode step's.
    ``timings``, if given, receives ``prefill_s`` and ``decode_s`` (wall seconds of the decode steps) and
    ``decode_steps``.
    """
    prefill, decode = sessions(directory, threads)
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (1, T), got {ids.shape}")
    past = [i.name for i in decode.get_inputs()][1:]
    t0 = time.perf_counter()
    logits, *state = prefill.run(None, {"input_ids": ids})
    t1 = time.perf_counter()
    tokens, seen = [logits[:, -1].argmax(-1)], [logits[:, -1]]
    for _ in range(max_new_tokens - 1):
        feed = dict(zip(past, state))
        feed["input_ids"] = tokens[-1][:, None].astype(np.int64)
        logits, *state = decode.run(None, feed)
        tokens.append(logits[:, -1].argmax(-1))
        seen.append(logits[:, -1])
    t2 = time.perf_counter()
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=max_new_tokens - 1)
    out = np.stack(tokens, axis=1).astype(np.int64)
    return (out, np.stack(seen, axis=1)) if return_logits else out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="greedy generation from a kvpass ONNX export (onnxruntime only)")
    p.add_argument("directory")
    p.add_argument("--ids", type=int, nargs="+", required=True, help="prompt token ids (at least 2)")
    p.add_argument("--new", type=int, default=32, help="tokens to generate")
    a = p.parse_args(argv)
    t: dict = {}
    out = onnx_generate(a.directory, [a.ids], a.new, timings=t)
    print(" ".join(map(str, out[0].tolist())))
    print(f"prefill {t['prefill_s'] * 1e3:.1f} ms, decode {t['decode_s'] / max(t['decode_steps'], 1) * 1e3:.2f} ms/token")


if __name__ == "__main__":
    main()
