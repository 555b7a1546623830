import json

import pytest
import torch

from kvpass.calibration import Calibration, CalibrationMismatchError, model_fingerprint
from kvpass.errors import KVPassError
from kvpass.models import tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


def make_calibration(model):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.k_codebook": torch.randn(4, 16, 8, generator=gen) for i in range(2)}
    tensors.update({"layers.0.v_levels": torch.randn(16, generator=gen).half(),
                    "layers.1.v_levels": torch.randn(16, generator=gen).bfloat16(),
                    "layers.1.mask": torch.tensor([True, False]),
                    "layers.0.counts": torch.arange(5, dtype=torch.int32),
                    "shared": torch.randint(0, 255, (3, 3), dtype=torch.uint8)})
    return Calibration("cq", {"bits": 8, "channels": 4, "fisher": True}, model_fingerprint(model), tensors,
                       {"tokens": 4096, "sink": 1})


def test_round_trip_is_exact(tmp_path, llama):
    cal = make_calibration(llama)
    folder = cal.save(tmp_path / "cal")
    assert sorted(p.name for p in folder.iterdir()) == ["calibration.json", "calibration.safetensors"]
    doc = json.loads((folder / "calibration.json").read_text())
    assert doc["method"] == "cq" and doc["kvpass_version"] and doc["model"]["num_layers"] == 2
    back = Calibration.load(folder)
    assert (back.method, back.options, back.model, back.meta) == (cal.method, cal.options, cal.model, cal.meta)
    assert set(back.tensors) == set(cal.tensors)
    for name, t in cal.tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name], t), name
    # a path to one of the files works too
    assert set(Calibration.load(folder / "calibration.json").tensors) == set(cal.tensors)


def test_layer_and_summary(llama):
    cal = make_calibration(llama)
    assert set(cal.layer(1)) == {"k_codebook", "v_levels", "mask"}
    assert torch.equal(cal.layer(0)["counts"], torch.arange(5, dtype=torch.int32))
    assert cal.layers() == [0, 1]
    with pytest.raises(KVPassError, match="no tensors for layer 7.*layers 0-1"):
        cal.layer(7)
    s = cal.summary()
    assert "cq calibration" in s and "LlamaForCausalLM" in s and "layers 0-1: k_codebook (4, 16, 8)" in s


def test_check_same_model_and_other_dtype(llama):
    cal = make_calibration(llama)
    cal.check(llama)
    cal.check(llama, method="cq")
    cal.check(tiny_llama(seed=0).to(torch.bfloat16))        # same weights, another dtype
    cal.check(tiny_llama(seed=0).half())
    with pytest.raises(CalibrationMismatchError, match="'cq' calibration, not one for 'kvquant'"):
        cal.check(llama, method="kvquant")


def test_check_other_weights(llama):
    cal = make_calibration(llama)
    with pytest.raises(CalibrationMismatchError, match="weights differ"):
        cal.check(tiny_llama(seed=1))


def test_check_other_config(llama):
    cal = make_calibration(llama)
    with pytest.raises(CalibrationMismatchError,
                       match=r"for LlamaForCausalLM with 2 layers.*num_layers: calibration 2, model 3"):
        cal.check(tiny_llama(seed=0, num_hidden_layers=3))
    with pytest.raises(CalibrationMismatchError, match=r"kv_heads: calibration 2, model 4"):
        cal.check(tiny_llama(seed=0, num_key_value_heads=4))


def test_check_other_architecture(llama):
    from tests.toy_models import ToyGPT
    cal = make_calibration(llama)
    with pytest.raises(CalibrationMismatchError, match="architecture: calibration 'LlamaForCausalLM', "
                                                       "model 'ToyGPT'"):
        cal.check(ToyGPT())
    toy = ToyGPT()
    fp = model_fingerprint(toy)
    assert fp["architecture"] == "ToyGPT" and fp["num_layers"] is None and len(fp["weights"]["sample"]) == 64
    Calibration("x", model=fp).check(toy)


def test_load_missing_or_corrupt(tmp_path, llama):
    with pytest.raises(KVPassError, match=f"no calibration at {tmp_path / 'nope'}"):
        Calibration.load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KVPassError, match=r"empty.*calibration.json is missing"):
        Calibration.load(empty)
    folder = make_calibration(llama).save(tmp_path / "cal")
    (folder / "calibration.safetensors").write_bytes(b"garbage")
    with pytest.raises(KVPassError, match=r"corrupt calibration at .*cal"):
        Calibration.load(folder)
    folder = make_calibration(llama).save(tmp_path / "cal2")
    (folder / "calibration.json").write_text("{not json")
    with pytest.raises(KVPassError, match=r"corrupt calibration at .*cal2"):
        Calibration.load(folder)


def test_save_rejects_non_json_options(tmp_path):
    with pytest.raises(KVPassError, match="JSON-able"):
        Calibration("x", {"dtype": torch.float16}).save(tmp_path / "c")
