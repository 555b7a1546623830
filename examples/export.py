"""Export SmolLM2 with a KIVI-2 cache to ONNX and generate from it with onnxruntime alone.

    python examples/export.py [out_dir]

kvpass.export writes prefill.onnx / decode.onnx (the compressed cache is their state: decode takes it and
returns the updated one) and kvpass_export.json. kvpass/onnx_generate.py needs only numpy + onnxruntime.
"""

import sys

import kvpass
from kvpass.models import load_smollm2
from kvpass.onnx_generate import onnx_generate

out = sys.argv[1] if len(sys.argv) > 1 else "smollm2-kivi2-onnx"
hf, tok = load_smollm2()
model = kvpass.compile(hf, "kivi", bits=2, backend="eager", capacity=512)     # prompt + new tokens must fit
kvpass.export(model, out, format="onnx")                                        # or format="pt2"

prompt = "The state of the union is"
ids = tok(prompt, return_tensors="np")["input_ids"]
new = onnx_generate(out, ids, max_new_tokens=32)                                # onnxruntime, greedy
print(prompt + tok.decode(new[0].tolist()))
