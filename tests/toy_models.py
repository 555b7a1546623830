"""Two models that are not from transformers, written the way people write them by hand."""

import math

import torch
from torch import nn


class ToyAttention(nn.Module):
    def __init__(self, dim, heads, kv_heads, einsum=False):
        super().__init__()
        self.h, self.kvh, self.d, self.einsum = heads, kv_heads, dim // heads, einsum
        self.q = nn.Linear(dim, heads * self.d, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, dim, bias=False)

    def forward(self, x, past):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kvh, self.d).permute(2, 0, 3, 1, 4)
        if past is not None:                       # a torch.cat KV cache
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        new_past = (k, v)
        rep = self.h // self.kvh
        kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        length = kk.shape[2]
        if self.einsum:
            att = torch.einsum("bhqd,bhkd->bhqk", q, kk) / math.sqrt(self.d)
        else:
            att = (q @ kk.transpose(-2, -1)) * (1.0 / math.sqrt(self.d))
        causal = torch.ones(t, length, dtype=torch.bool, device=x.device).tril(length - t)
        att = att.masked_fill(~causal, float("-inf"))
        att = torch.softmax(att.float(), dim=-1).to(q.dtype)
        y = torch.einsum("bhqk,bhkd->bhqd", att, vv) if self.einsum else att @ vv
        return self.o(y.transpose(1, 2).reshape(b, t, -1)), new_past


class ToyGPT(nn.Module):
    """nanoGPT-style decoder with learned positions and a list-of-tuples cache."""

    def __init__(self, vocab=97, dim=64, heads=4, kv_heads=2, layers=2, einsum=False, max_len=128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.attn = nn.ModuleList(ToyAttention(dim, heads, kv_heads, einsum) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                               nn.Linear(2 * dim, dim)) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, past=None):
        start = 0 if past is None else past[0][0].shape[2]
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        new = []
        for i, (attn, mlp, norm) in enumerate(zip(self.attn, self.mlp, self.norm)):
            a, p = attn(norm(x), None if past is None else past[i])
            x = x + a
            x = x + mlp(x)
            new.append(p)
        return self.head(x), new


def greedy(model, idx, steps):
    """A plain decode loop over the model's own cache; returns (tokens (B, steps), logits list)."""
    logits, past = model(idx)
    out, all_logits = [], [logits[:, -1]]
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits, past = model(nxt, past)
        all_logits.append(logits[:, -1])
    return torch.cat(out, 1), all_logits
