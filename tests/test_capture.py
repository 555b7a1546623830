"""collect_activations on a tiny Llama (RoPE, GQA, SDPA) and the hand-written ToyGPT, against references
computed without the graph pass: transformers' own cache, and gradients from forward hooks."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpass.capture import collect_activations
from kvpass.errors import KVPassError
from kvpass.models import tiny_llama
from tests.toy_models import ToyGPT

N, T = 3, 12


def ids_for(vocab, seed=0):
    return torch.randint(0, vocab, (N, T), generator=torch.Generator().manual_seed(seed))


def tokens(x, sink=1):
    """(B, H, T, D) -> (B*(T-sink), H, D), token-major, first ``sink`` positions of each row dropped."""
    x = x.detach().transpose(1, 2)[:, sink:]
    return x.reshape(-1, *x.shape[2:])


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


def llama_reference(model, ids):
    """Per layer: k, v (post-RoPE, from transformers' cache), k_pre, q norms and squared gradients."""
    outs = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            def hook(mod, inp, out, i=i, name=name):
                out.retain_grad()
                outs[i, name] = out
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    try:
        out = model(ids, use_cache=True)
        lm_loss(out.logits, ids).backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    b, t = ids.shape
    pos = torch.arange(t).expand(b, t)
    cos, sin = model.model.rotary_emb(outs[0, "k_proj"], pos)
    ref = {}
    for i, layer in enumerate(out.cache.layers):
        heads = lambda x: x.detach().view(b, t, -1, 16).transpose(1, 2)        # noqa: E731
        k_pre, k_pre_g = heads(outs[i, "k_proj"]), heads(outs[i, "k_proj"].grad)
        _, k_g = apply_rotary_pos_emb(k_pre_g, k_pre_g, cos, sin)     # RoPE is orthogonal: dL/dk = R dL/dk_pre
        ref[i] = dict(k=tokens(layer.keys), v=tokens(layer.values), k_pre=tokens(k_pre),
                      q_norm=tokens(heads(outs[i, "q_proj"])).norm(dim=-1),
                      k_fisher=tokens(k_g).square(), k_pre_fisher=tokens(k_pre_g).square(),
                      v_fisher=tokens(heads(outs[i, "v_proj"].grad)).square())
    return ref


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def llama_acts(llama):
    return collect_activations(llama, ids_for(128), batch_size=N, progress=False)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def test_llama_matches_transformers(llama, llama_acts):
    ref = llama_reference(llama, ids_for(128))
    acts = llama_acts
    assert sorted(acts.layers) == [0, 1]
    assert acts.model["architecture"] == "LlamaForCausalLM" and acts.fisher and acts.sink == 1
    for i, r in ref.items():
        a = acts.layers[i]
        assert a.module == f"model.layers.{i}.self_attn" and a.rope == "rotate_half"
        assert a.k.shape == (N * (T - 1), 2, 16) and a.q_norm.shape == (N * (T - 1), 4)
        for name in ("k", "v", "k_pre", "q_norm"):
            assert getattr(a, name).dtype == torch.float32
            close(getattr(a, name), r[name])
        for name in ("k_fisher", "v_fisher", "k_pre_fisher"):
            assert getattr(a, name).shape == a.k.shape and getattr(a, name).abs().sum() > 0
            close(getattr(a, name), r[name])
        assert torch.equal(a.positions, torch.arange(1, T).repeat(N))
        assert torch.equal(a.rows, torch.arange(N).repeat_interleave(T - 1))


def test_llama_left_as_found(llama):
    llama.model.embed_tokens.weight.requires_grad_(False)
    llama.train()
    try:
        collect_activations(llama, ids_for(128)[:1, :4], max_tokens=2, progress=False)
        assert llama.training
        assert not llama.model.embed_tokens.weight.requires_grad
        assert all(p.requires_grad for n, p in llama.named_parameters() if "embed" not in n)
        assert all(p.grad is None for p in llama.parameters())
    finally:
        llama.model.embed_tokens.weight.requires_grad_(True)
        llama.eval()


def test_subsample_and_batching(llama, llama_acts):
    """max_tokens keeps a seeded random subset (the same tokens in every layer); one row per pass gives
    the same values and Fisher as all rows at once (the loss is a sum)."""
    sub = collect_activations(llama, ids_for(128), max_tokens=10, batch_size=1, seed=3, progress=False)
    full = llama_acts.layers
    for i, a in sub.layers.items():
        assert a.k.shape[0] == 10
        assert torch.equal(a.positions, sub.layers[0].positions) and (a.positions >= 1).all()
        at = a.rows * (T - 1) + a.positions - 1          # index into the full capture
        assert torch.equal(at, at.sort().values) and len(set(at.tolist())) == 10
        for name in ("k", "v", "k_pre", "q_norm", "k_fisher", "v_fisher", "k_pre_fisher"):
            close(getattr(a, name), getattr(full[i], name)[at])
    again = collect_activations(llama, ids_for(128), max_tokens=10, seed=3, fisher=False, progress=False)
    assert torch.equal(again.layers[0].positions, sub.layers[0].positions)
    assert again.layers[0].k_fisher is None and again.layers[0].v_fisher is None
    other = collect_activations(llama, ids_for(128), max_tokens=10, seed=4, fisher=False, progress=False)
    assert not torch.equal(other.layers[0].rows * T + other.layers[0].positions,
                           sub.layers[0].rows * T + sub.layers[0].positions)


def toy_reference(model, ids):
    outs = {}
    hooks = []
    for i, attn in enumerate(model.attn):
        def hook(mod, inp, out, i=i):
            out.retain_grad()
            outs[i] = out
        hooks.append(attn.kv.register_forward_hook(hook))
    try:
        logits, past = model(ids)
        lm_loss(logits, ids).backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    b, t = ids.shape
    ref = {}
    for i, (k, v) in enumerate(past):
        g = outs[i].grad.view(b, t, 2, 2, 16).permute(2, 0, 3, 1, 4)    # like ToyAttention's k, v
        ref[i] = dict(k=tokens(k.detach()), v=tokens(v.detach()), k_fisher=tokens(g[0]).square(),
                      v_fisher=tokens(g[1]).square())
    return ref


def test_toy_gpt_no_rope():
    torch.manual_seed(0)
    model = ToyGPT(vocab=97, dim=64, heads=4, kv_heads=2, layers=2).eval()
    ids = ids_for(97)
    acts = collect_activations(model, ids, progress=False, batch_size=N)
    ref = toy_reference(model, ids)
    assert acts.model["architecture"] == "ToyGPT"
    for i, r in ref.items():
        a = acts.layers[i]
        assert a.k_pre is None and a.k_pre_fisher is None and a.rope == "none"
        for name in ("k", "v", "k_fisher", "v_fisher"):
            close(getattr(a, name), r[name])
        assert a.q_norm.shape == (N * (T - 1), 4)


class Unnumbered(torch.nn.Module):
    """Two attention modules whose paths carry no layer number: layers are numbered by call order."""

    def __init__(self):
        super().__init__()
        from tests.toy_models import ToyAttention
        self.emb = torch.nn.Embedding(50, 32)
        self.second, self.first = ToyAttention(32, 2, 1), ToyAttention(32, 2, 1)   # defined out of order
        self.head = torch.nn.Linear(32, 50)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.first(x, None)[0]
        return self.head(x + self.second(x, None)[0])


def test_layers_without_numbers_follow_call_order():
    torch.manual_seed(0)
    model = Unnumbered().eval()
    ids = torch.randint(0, 50, (2, 6))
    acts = collect_activations(model, ids, fisher=False, progress=False)
    assert sorted(acts.layers) == [0, 1]
    assert acts.layers[0].module == "first" and acts.layers[1].module == "second"
    x = model.emb(ids)
    k_first = model.first.kv(x).view(2, 6, 2, 1, 16)[:, 1:, 0]
    close(acts.layers[0].k, k_first.reshape(-1, 1, 16).detach())


def test_bad_inputs(llama):
    with pytest.raises(KVPassError, match="LongTensor"):
        collect_activations(llama, torch.zeros(2, 5), progress=False)
    with pytest.raises(KVPassError, match="sink=5"):
        collect_activations(llama, ids_for(128)[:, :5], sink=5, progress=False)
    with pytest.raises(KVPassError, match="no attention"):
        collect_activations(torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10)),
                            torch.zeros(1, 4, dtype=torch.long), progress=False)
    import kvpass
    compiled = kvpass.compile(tiny_llama(seed=0), method="fp16", backend="eager")
    with pytest.raises(KVPassError, match="already compiled by kvpass"):
        collect_activations(compiled, ids_for(128), progress=False)
