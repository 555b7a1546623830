"""An independent reference for compiled generation: transformers runs its own dense cache, and a
custom attention function keeps a kvpass scheme state per layer with the op's semantics (a fresh
prefill attends its prompt in full precision, then compresses it; each later step appends its new
tokens and attends over the compressed state). Compiled logits must equal these."""

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvpass.attention import dense_attention
from kvpass.methods import CacheShape

NAME = "kvpass_reference_decode"


@contextmanager
def reference_decode(model, scheme, capacity):
    states = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, hkv, length, d = key.shape
        t = query.shape[2]
        mask = attention_mask
        if mask is not None:
            mask = mask[..., :length]
        kw = dict(scale=scaling, causal=mask is None, attn_mask=mask, softcap=kwargs.get("softcap"))
        layer = module.layer_idx
        if length == t:       # a fresh prefill
            st = scheme.allocate(CacheShape(b, hkv, d, capacity, key.dtype, layer), key.device)
            states[layer] = st
            out = dense_attention(query, key, value, **kw)
            scheme.append(st, key, value)
        else:
            st = states[layer]
            scheme.append(st, key[:, :, -t:], value[:, :, -t:])
            out = scheme.attend(st, query, **kw)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    original = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield states
    finally:
        model.set_attn_implementation(original)
