"""Optimize SmolLM2's DuoAttention gates and save them where kvpass ships them (kvpass/gates/smollm2-duo).

    python bench/duo_gates.py --output bench/results/duo_gates.json

The gate optimization of :func:`kvpass.calibrate` (method "duo") on the real model, fp32, on passkey prompts
built from the calibration speeches (before 2010; the evaluation uses the later ones): ``--lengths`` x five
depths x ``--per-cell`` prompts, ``--steps`` Adam steps of one prompt each. The result file records the
settings, the loss at the start and end, the time, and the gates per layer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import kvpass
from common import REPO, provenance  # bench/common.py (scripts run as python bench/NAME.py)
from kvpass.duo import retrieval_heads
from kvpass.models import load_smollm2

SHIPPED = REPO / "kvpass" / "gates" / "smollm2-duo"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[1024])
    p.add_argument("--per-cell", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--l1", type=float, default=0.05)
    p.add_argument("--save", type=Path, default=SHIPPED)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2(torch.float32)
    t0 = time.perf_counter()
    gates = kvpass.calibrate(model, "duo", tokenizer=tok, lengths=args.lengths, per_cell=args.per_cell,
                             sink=args.sink, recent=args.recent, steps=args.steps, lr=args.lr, l1=args.l1)
    seconds = time.perf_counter() - t0
    gates.save(args.save)
    table = torch.stack([gates.layer(i)["gates"] for i in gates.layers()])
    result = {"meta": {**provenance(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"), "device": "cpu", "torch": torch.__version__,
                  "python": platform.python_version(), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)",
                  "saved_to": str(args.save.relative_to(REPO)) if args.save.is_relative_to(REPO) else str(args.save)},
              "settings": {k: v for k, v in vars(args).items() if k not in ("save", "output")},
              "rows": [{"bench": "duo_gates", "seconds": seconds, **gates.meta,
                        "gates": [[round(float(g), 4) for g in row] for row in table],
                        "retrieval_at_0.5": retrieval_heads(table, 0.5).int().tolist()}]}
    text = json.dumps(result, indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
