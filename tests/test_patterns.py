"""The pattern library, one unit at a time: each attention form has a positive graph (found, with the
right canonical fields) and a lookalike that must not be taken for attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvpass.patterns import find_sites


def sites_of(fn, *args):
    """Capture fn with Dynamo and return the canonical sites of its graph."""
    found = []

    def backend(gm, example_inputs):
        found.extend(find_sites(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)(*args)
    return found


B, H, HKV, T, P, D = 2, 4, 2, 3, 5, 8


def qkv(tq=T, past=P):
    q = torch.randn(B, H, tq, D)
    k_new, v_new = torch.randn(B, HKV, tq, D), torch.randn(B, HKV, tq, D)
    pk, pv = torch.randn(B, HKV, past, D), torch.randn(B, HKV, past, D)
    return q, k_new, v_new, pk, pv


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def one(sites):
    assert len(sites) == 1, sites
    return sites[0]


# -- positives ------------------------------------------------------------------------------------
def test_sdpa_with_concat_cache_and_repeat_kv():
    def f(q, k, v, pk, pv, mask):
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=-2)
        return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask, scale=0.3)
    mask = torch.ones(B, 1, T, T + P, dtype=torch.bool)
    s = one(sites_of(f, *qkv(), mask))
    assert (s.pattern, s.kv_source, s.gqa, s.mask_form, s.scale) == ("sdpa", "concat", "repeat_kv", "keep", 0.3)
    assert (s.heads, s.kv_heads, s.head_dim) == (H, HKV, D) and s.problem is None


def test_sdpa_enable_gqa_is_causal_no_cache():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    q, k, v, _, _ = qkv()
    s = one(sites_of(f, q, k, v))
    assert (s.kv_source, s.gqa, s.causal, s.scale, s.mask) == ("none", "enable_gqa", True, None, None)


@pytest.mark.parametrize("mask_form", ["add", "masked_fill", "where"])
def test_hand_written_attention_mask_forms(mask_form):
    def f(q, k, v, pk, pv, keep):
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        if mask_form == "add":
            s = s + torch.where(keep, 0.0, float("-inf"))
        elif mask_form == "masked_fill":
            s = s.masked_fill(~keep, float("-inf"))
        else:
            s = torch.where(keep, s, torch.finfo(s.dtype).min)
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        p = F.dropout(p, p=0.1, training=False)
        return torch.matmul(p, v)
    keep = torch.ones(B, 1, T, T + P, dtype=torch.bool)
    s = one(sites_of(f, *qkv(), keep))
    assert s.pattern == "matmul-softmax" and s.gqa == "repeat_interleave" and s.kv_source == "concat"
    assert s.scale == pytest.approx(1 / math.sqrt(D))
    assert s.mask_form == {"add": "additive", "masked_fill": "drop", "where": "keep"}[mask_form]


def test_soft_capping_and_mqa_expand():
    def f(q, k, v):
        kk, vv = k.expand(B, H, T, D), v.expand(B, H, T, D)
        s = (q @ kk.transpose(2, 3)) * 0.25
        s = torch.tanh(s / 30.0) * 30.0
        return torch.softmax(s, -1) @ vv
    q = torch.randn(B, H, T, D)
    s = one(sites_of(f, q, torch.randn(B, 1, T, D), torch.randn(B, 1, T, D)))
    assert (s.softcap, s.scale, s.gqa, s.kv_heads) == (30.0, 0.25, "expand", 1)


def test_einsum_attention():
    def f(q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.5
        return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, dim=-1), v)
    q, k, v = torch.randn(B, HKV, T, D), torch.randn(B, HKV, T, D), torch.randn(B, HKV, T, D)
    s = one(sites_of(f, q, k, v))
    assert (s.pattern, s.scale, s.gqa) == ("einsum", 0.5, "none")


def test_baddbmm_with_alibi_bias():
    def f(q, k, v, bias):
        s = torch.baddbmm(bias, q, k.transpose(-1, -2), beta=1.0, alpha=0.125)
        return torch.matmul(torch.softmax(s, -1), v)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    bias = torch.randn(B, H, 1, T)
    s = one(sites_of(lambda *a: f(*a), q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), bias.flatten(0, 1)))
    # 3-D (batch*heads) forms are recognized as attention but not rewritten yet: they say why
    assert s.pattern == "baddbmm" and s.scale == 0.125 and s.mask_form == "additive"
    assert "3-D" in s.problem


def test_static_cache_index_copy():
    def f(q, k, v, kbuf, vbuf, pos):
        kbuf.index_copy_(2, pos, k)
        vbuf.index_copy_(2, pos, v)
        return F.scaled_dot_product_attention(q, repeat_kv(kbuf, 2), repeat_kv(vbuf, 2))
    q, k, v, _, _ = qkv(tq=1)
    kbuf, vbuf = torch.zeros(B, HKV, 16, D), torch.zeros(B, HKV, 16, D)
    s = one(sites_of(f, q, k, v, kbuf, vbuf, torch.tensor([4])))
    assert s.kv_source == "static" and s.cache_position is not None and s.k_write is not None


def test_rope_detection_full_and_partial():
    def rot(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def f(q, k, v, cos, sin, partial: bool):
        if partial:
            kr, kp = k[..., :4], k[..., 4:]
            k = torch.cat([kr * cos[..., :4] + rot(kr) * sin[..., :4], kp], dim=-1)
        else:
            k = k * cos + rot(k) * sin
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    q, k, v, _, _ = qkv()
    cos, sin = torch.randn(1, 1, T, D), torch.randn(1, 1, T, D)
    full = one(sites_of(lambda *a: f(*a, False), q, k, v, cos, sin))
    part = one(sites_of(lambda *a: f(*a, True), q, k, v, cos, sin))
    assert full.rope == "rotate_half" and full.k_pre_rope is not None
    assert part.rope == "partial"


def test_sliding_window_cache_slice_is_a_store():
    def f(q, k, v, pk, pv):
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return out, k[:, :, -4:], v[:, :, -4:]          # the model keeps only its last 4 tokens
    s = one(sites_of(f, *qkv()))
    assert s.cache_window and s.problem is None


# -- negatives ------------------------------------------------------------------------------------
def test_softmax_over_another_dim_is_not_attention():
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=2) @ v
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    assert sites_of(f, q, k, v) == []


def test_softmax_of_a_plain_product_is_not_attention():
    w1, w2 = torch.randn(D, D), torch.randn(D, D)

    def f(x):
        return torch.softmax(x @ w1, dim=-1) @ w2        # no K^T: a gated MLP, not attention
    assert sites_of(f, torch.randn(B, T, D)) == []


def test_a_mild_masked_fill_is_not_a_mask():
    def f(q, k, v, m):
        s = (q @ k.transpose(-1, -2)).masked_fill(m, 0.0)   # zeroing scores is not hiding keys
        return torch.softmax(s, -1) @ v
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    assert sites_of(f, q, k, v, torch.zeros(B, 1, T, T, dtype=torch.bool)) == []


def test_wrong_einsum_is_not_attention():
    def f(q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        return torch.einsum("bhqk,bhqd->bhkd", torch.softmax(s, -1), v)    # contracts the query axis
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    assert sites_of(f, q, k, v) == []


def test_active_dropout_is_reported_not_rewritten():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    assert "dropout" in one(sites_of(f, q, k, v)).problem


def test_keys_read_outside_attention_are_reported():
    def f(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out + k.mean()                 # something else reads the keys: the cache must stay dense
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    assert "outside the attention" in one(sites_of(f, q, k, v)).problem


def test_cross_attention_is_reported():
    def f(q, mem_k, mem_v):
        return F.scaled_dot_product_attention(q, mem_k, mem_v)      # 3 queries over 7 encoder states
    q = torch.randn(B, H, T, D)
    s = one(sites_of(f, q, torch.randn(B, H, 7, D), torch.randn(B, H, 7, D)))
    assert "unrecognized source" in s.problem


def test_torch_export_graphs_canonicalize_the_same_way():
    """torch.export (aten IR, with metadata assertions) and Dynamo (torch IR) give the same sites."""
    from .architectures import tiny_model
    from .toy_models import ToyGPT

    toy = ToyGPT().eval()
    idx = torch.randint(0, 97, (2, 1))
    past = [(torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)) for _ in range(2)]
    exported = find_sites(torch.export.export(toy, (idx, past)).graph_module.graph)
    dynamo = sites_of(toy, idx, past)

    def summary(sites):
        return [(s.pattern, s.kv_source, s.gqa, s.heads, s.kv_heads, s.head_dim, s.scale, s.mask_form,
                 s.problem, s.layer) for s in sites]
    assert len(exported) == 2 and summary(exported) == summary(dynamo)

    llama = tiny_model("llama", "sdpa")
    ids = torch.randint(1, 128, (1, 6))
    ep = torch.export.export(llama, (), {"input_ids": ids, "use_cache": False})
    sites = find_sites(ep.graph_module.graph)
    assert [(s.pattern, s.kv_source, s.rope, s.layer, s.problem) for s in sites] == \
        [("sdpa", "none", "rotate_half", i, None) for i in range(2)]
