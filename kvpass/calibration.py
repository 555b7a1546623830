"""Calibration artifacts: the tensors a calibrated scheme learned, and the model they belong to.

A :class:`Calibration` is saved as a directory holding ``calibration.safetensors`` (the tensors, named like
``layers.3.k_codebook``) and ``calibration.json`` (method, options, model fingerprint, free-form meta and
the kvpass version). :meth:`Calibration.check` refuses a model whose architecture or weights differ from
the fingerprint recorded at calibration time.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import KVPassError

TENSORS_FILE = "calibration.safetensors"
JSON_FILE = "calibration.json"
FORMAT = "kvpass-calibration"
FORMAT_VERSION = 1
SAMPLED_PARAMETERS = 4        # parameters the weight fingerprint samples
SAMPLES_PER_PARAMETER = 16    # values taken from each
WEIGHT_RTOL = 1e-2            # same weights in fp32 / fp16 / bf16 agree well within this

_CONFIG_FIELDS = {            # fingerprint field -> config attribute names (first found wins)
    "model_type": ("model_type",),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "vocab_size": ("vocab_size",),
}
_ORDER = ("architecture", "model_type", "num_layers", "heads", "kv_heads", "head_dim", "hidden_size",
          "vocab_size", "parameters")


class CalibrationMismatchError(KVPassError):
    """A calibration applied to a model (or method) it was not made for."""


def config_geometry(model: torch.nn.Module) -> dict:
    """The model config's (text part's) geometry: ``model_type``, ``num_layers``, ``heads``, ``kv_heads``
    (= heads without GQA), ``head_dim`` (= hidden_size / heads when the config has none), ``hidden_size``,
    ``vocab_size``; None for what the config lacks (or with no config)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    geo = {name: next((_jsonable(getattr(config, a)) for a in attrs if getattr(config, a, None) is not None),
                      None) for name, attrs in _CONFIG_FIELDS.items()}
    if geo["kv_heads"] is None and geo["heads"] is not None:
        geo["kv_heads"] = geo["heads"]
    if geo["head_dim"] is None and geo["hidden_size"] and geo["heads"]:
        geo["head_dim"] = geo["hidden_size"] // geo["heads"]
    return geo


def model_fingerprint(model: torch.nn.Module) -> dict:
    """What identifies a model for a calibration, as a JSON-able dict.

    Fields: ``architecture`` (class name), ``model_type``, ``num_layers``, ``heads``, ``kv_heads``,
    ``head_dim``, ``hidden_size``, ``vocab_size`` (from ``model.config`` when there is one, else None),
    ``parameters`` (number of parameter elements) and ``weights``: a fixed sample of
    ``SAMPLED_PARAMETERS x SAMPLES_PER_PARAMETER`` parameter values (float32, from evenly spaced parameters
    at evenly spaced positions) with the names they came from. The sample is compared with a relative
    tolerance, so the same weights in another dtype match while different weights never do.
    """
    fp: dict = {"architecture": type(model).__name__, **config_geometry(model)}
    params = list(model.named_parameters())
    fp["parameters"] = sum(p.numel() for _, p in params)
    picks = sorted({round(i * (len(params) - 1) / max(1, SAMPLED_PARAMETERS - 1))
                    for i in range(SAMPLED_PARAMETERS)}) if params else []
    names, values = [], []
    with torch.no_grad():
        for i in picks:
            name, p = params[i]
            flat = p.detach().reshape(-1)
            m = min(SAMPLES_PER_PARAMETER, flat.numel())
            idx = torch.tensor([j * (flat.numel() - 1) // max(1, m - 1) for j in range(m)], device=flat.device)
            names.append(name)
            values += [float(v) for v in flat[idx].float().cpu()]
    fp["weights"] = {"names": names, "sample": values}
    return fp


def _jsonable(v):
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def fingerprint_differences(recorded: dict, actual: dict) -> list[str]:
    """Human-readable differences between two fingerprints ("num_layers: calibration 30, model 2",
    "weights differ (...)"); empty when they match."""
    out = []
    for key in _ORDER:
        a, b = recorded.get(key), actual.get(key)
        if a != b:
            out.append(f"{key}: calibration {a!r}, model {b!r}")
    if out:                     # other geometry: the weights differ too, nothing more to say
        return out
    wa, wb = recorded.get("weights") or {}, actual.get("weights") or {}
    sa, sb = wa.get("sample") or [], wb.get("sample") or []
    if wa.get("names") != wb.get("names") or len(sa) != len(sb) or any(
            not math.isclose(x, y, rel_tol=WEIGHT_RTOL, abs_tol=1e-6) for x, y in zip(sa, sb)):
        out.append("weights differ (same architecture, other parameter values)")
    return out


@dataclass
class Calibration:
    """A calibrated method's learned tensors and the model they belong to.

    method: scheme name ("kvquant", "cq", ...); options: the scheme options it was made with (JSON-able);
    model: :func:`model_fingerprint` of the calibrated model; tensors: name -> tensor, per-layer ones
    named ``layers.<i>.<name>`` (any dtype/shape; saved bit-exact); meta: free-form JSON-able notes
    (data, token counts, sink, ...).
    """

    method: str
    options: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # -- per-layer access -----------------------------------------------------------------------
    def layers(self) -> list[int]:
        """Layer numbers that have tensors (sorted)."""
        return sorted({int(m.group(1)) for n in self.tensors if (m := re.match(r"layers\.(\d+)\.", n))})

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of layer ``i`` with the ``layers.<i>.`` prefix stripped. Raises KVPassError if the
        calibration has none for that layer."""
        prefix = f"layers.{i}."
        out = {n[len(prefix):]: t for n, t in self.tensors.items() if n.startswith(prefix)}
        if not out:
            have = self.layers()
            raise KVPassError(f"the {self.method} calibration has no tensors for layer {i} (it has layers "
                              f"{_ranges(have) or 'none'})")
        return out

    # -- checks ---------------------------------------------------------------------------------
    def check(self, model: torch.nn.Module, method: str | None = None) -> None:
        """Raise :class:`CalibrationMismatchError` unless this calibration was made for ``model`` (same
        architecture, geometry and weights) and, if given, for ``method``. The message names each field
        that differs."""
        if method is not None and method != self.method:
            raise CalibrationMismatchError(f"this is a {self.method!r} calibration, not one for {method!r}")
        diffs = fingerprint_differences(self.model, model_fingerprint(model))
        if diffs:
            m = self.model
            raise CalibrationMismatchError(
                f"the {self.method} calibration is for {m.get('architecture')} with {m.get('num_layers')} "
                f"layers, {m.get('heads')} heads, {m.get('kv_heads')} kv heads, head_dim {m.get('head_dim')}"
                f"; it does not fit this {type(model).__name__}: " + "; ".join(diffs))

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``calibration.safetensors`` and ``calibration.json`` into directory ``path`` (created if
        needed; existing files are replaced). Returns the directory."""
        from safetensors.torch import save_file

        from . import __version__
        folder = Path(path)
        for name, t in self.tensors.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise KVPassError(f"calibration tensors must map names to tensors, got {name!r}: {type(t)}")
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "kvpass_version": __version__,
               "method": self.method, "options": self.options, "model": self.model, "meta": self.meta,
               "tensors": {n: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                           for n, t in sorted(self.tensors.items())}}
        try:
            text = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise KVPassError(f"calibration options/meta must be JSON-able (no tensors, dtypes or NaN): {e}") \
                from None
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.detach().cpu().contiguous().clone() for n, t in self.tensors.items()}
        _atomic(folder / TENSORS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
        _atomic(folder / JSON_FILE, lambda p: p.write_text(text + "\n"))
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        """Read a calibration directory written by :meth:`save` (``path`` may also name one of its two
        files). Raises KVPassError naming the path when a file is missing or unreadable."""
        from safetensors.torch import load_file

        folder = Path(path)
        if folder.is_file() and folder.name in (TENSORS_FILE, JSON_FILE):
            folder = folder.parent
        if not folder.is_dir():
            raise KVPassError(f"no calibration at {folder}: not a directory")
        for name in (JSON_FILE, TENSORS_FILE):
            if not (folder / name).is_file():
                raise KVPassError(f"no calibration at {folder}: {name} is missing (a calibration directory "
                                  f"holds {JSON_FILE} and {TENSORS_FILE})")
        try:
            doc = json.loads((folder / JSON_FILE).read_text())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            if doc.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError(f"format version {doc['format_version']} is newer than this kvpass reads "
                                 f"({FORMAT_VERSION})")
            tensors = load_file(str(folder / TENSORS_FILE))
        except Exception as e:     # json, safetensors and OS errors all mean the same to the user
            raise KVPassError(f"corrupt calibration at {folder}: {e}") from None
        listed = set(doc.get("tensors", {}))
        if listed != set(tensors):
            raise KVPassError(f"corrupt calibration at {folder}: {JSON_FILE} lists {len(listed)} tensors but "
                              f"{TENSORS_FILE} holds {len(tensors)} (mismatched files?)")
        return cls(method=doc["method"], options=doc.get("options", {}), model=doc.get("model", {}),
                   tensors=tensors, meta=doc.get("meta", {}))

    # -- display --------------------------------------------------------------------------------
    def summary(self) -> str:
        """A few lines: method, options, model, and the tensors (per-layer ones collapsed)."""
        m = self.model
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items()) or "defaults"
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        lines = [f"{self.method} calibration ({opts})",
                 f"  model: {m.get('architecture')} ({m.get('model_type')}), {m.get('num_layers')} layers, "
                 f"{m.get('heads')}/{m.get('kv_heads')} heads, head_dim {m.get('head_dim')}",
                 f"  tensors: {len(self.tensors)}, {total / 1024:.1f} KiB"]
        kinds: dict[str, tuple[list[int], torch.Tensor]] = {}
        for n, t in sorted(self.tensors.items()):
            mt = re.match(r"layers\.(\d+)\.(.+)$", n)
            key, layer = (mt.group(2), int(mt.group(1))) if mt else (n, None)
            ls, _ = kinds.setdefault(key, ([], t))
            if layer is not None:
                ls.append(layer)
        for key, (ls, t) in kinds.items():
            where = f"layer{'s' if len(ls) > 1 else ''} {_ranges(sorted(ls))}: " if ls else ""
            lines.append(f"    {where}{key} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
        for k, v in self.meta.items():
            lines.append(f"  {k}: {v}")
        return "\n".join(lines)


def _ranges(nums: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(out)


def _atomic(target: Path, write) -> None:
    """Write through a temporary sibling file, then rename (no half-written file on interruption)."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = ["Calibration", "CalibrationMismatchError", "fingerprint_differences", "model_fingerprint"]
