"""Calibrate KVQuant-3 on SmolLM2, save the calibration, load it back and compile with it.

    python examples/calibrate_save_load.py       # CPU, ~2 min

kvpass.calibrate runs the model on calibration text (here 4 x 256 tokens of the built-in pre-2010 State of
the Union speeches; the default is 16 x 512), captures every layer's K/V through the graph pass
and fits KVQuant's per-channel ranges and non-uniform codebooks. The result is
a directory (safetensors + JSON) that records the model it belongs to: loading it for another model is an
error. The same from the command line:

    kvpass calibrate kvquant --bits 3 --output kvquant3/
    kvpass eval ppl --method kvquant --calibration kvquant3/
"""

import copy

import torch

import kvpass
from kvpass.models import load_smollm2

model, tok = load_smollm2()
cal = kvpass.calibrate(model, "kvquant", tokenizer=tok, bits=3, sequences=4, seq_len=256)
cal.save("kvquant3/")
print(kvpass.Calibration.load("kvquant3/").summary())

compiled = kvpass.compile(copy.deepcopy(model), "kvquant", calibration="kvquant3/", capacity=512, backend="eager")
ids = tok("Tonight, I want to talk about", return_tensors="pt")
with torch.no_grad():
    out = compiled.generate(**ids, max_new_tokens=24, do_sample=False)
print(tok.decode(out[0]))
print(f"{kvpass.report(compiled).bits_per_element:.2f} bits per K/V element")
