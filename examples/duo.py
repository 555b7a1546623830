"""DuoAttention on SmolLM2: half the KV heads keep the whole context (in KIVI-2), the others only a sink and
a recent window, with the gates kvpass ships for SmolLM2.

    python examples/duo.py                       # CPU, ~1 min

Gates for another model come from kvpass.calibrate(model, "duo", tokenizer=tok) (or `kvpass calibrate duo`).
"""

import torch

import kvpass
from kvpass.models import load_smollm2

model, tok = load_smollm2()
model = kvpass.compile(model, "kivi", bits=2, heads="duo", duo="smollm2", retrieval=0.5, sink=64, recent=256,
                       capacity=1024, backend="eager")
ids = tok("My fellow Americans, the state of our union", return_tensors="pt")
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
print(tok.decode(out[0]))
rep = kvpass.report(model)
print(f"cache {rep.cache_bytes / 2**20:.2f} MiB vs {rep.dense_bytes / 2**20:.2f} MiB dense "
      f"({rep.bits_per_element:.2f} bits per element)")
