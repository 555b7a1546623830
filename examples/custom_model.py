"""kvpass on a model that is not from transformers: a hand-written nanoGPT-style decoder whose attention is
matmul -> scale -> masked_fill -> softmax -> matmul, with GQA by repeat_interleave and a torch.cat KV cache.

    python examples/custom_model.py              # CPU, seconds

kvpass finds the attention in the traced graph (no per-model code), keeps the cache compressed in its own
buffers, and hands the model's own cache back as shape-only placeholders, so the decode loop is unchanged.
"""

import math

import torch
from torch import nn

import kvpass


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.h, self.kvh, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, dim, bias=False)

    def forward(self, x, past):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kvh, self.d).permute(2, 0, 3, 1, 4)
        if past is not None:                                  # the usual torch.cat cache
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        rep = self.h // self.kvh
        kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = (q @ kk.transpose(-2, -1)) / math.sqrt(self.d)
        causal = torch.ones(t, kk.shape[2], dtype=torch.bool, device=x.device).tril(kk.shape[2] - t)
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        return self.o((att @ vv).transpose(1, 2).reshape(b, t, -1)), (k, v)


class TinyGPT(nn.Module):
    def __init__(self, vocab=256, dim=128, heads=4, kv_heads=2, layers=2, max_len=512):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.attn = nn.ModuleList(Attention(dim, heads, kv_heads) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, past=None):
        start = 0 if past is None else past[0][0].shape[2]
        x = self.tok(idx) + self.pos(torch.arange(start, start + idx.shape[1], device=idx.device))
        new = []
        for i, (attn, norm) in enumerate(zip(self.attn, self.norm)):
            a, p = attn(norm(x), None if past is None else past[i])
            x = x + a
            new.append(p)
        return self.head(x), new


def generate(model, idx, steps):
    logits, past = model(idx)
    out = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits, past = model(nxt, past)
    return torch.cat(out, 1)


torch.manual_seed(0)
model = TinyGPT().eval()
prompt = torch.randint(0, 256, (1, 64))
with torch.no_grad():
    reference = generate(model, prompt, 16)
    compiled = kvpass.compile(model, "int8", capacity=128, backend="eager")
    tokens = generate(compiled, prompt, 16)
print("same greedy tokens as the uncompressed model:", int((tokens == reference).sum()), "of 16")
print(kvpass.report(compiled))
