"""``kvpass.calibrate``: learn a calibrated scheme's tensors from a model's own activations."""

from __future__ import annotations

import dataclasses

import torch

from .calibration import Calibration, CalibrationMismatchError, model_fingerprint
from .errors import KVPassError
from .methods import get_scheme, scheme_class


def calibrate(model: torch.nn.Module, method: str, data=None, *, tokenizer=None, sequences: int = 16,
              seq_len: int = 512, fisher: bool | None = None, max_tokens: int = 4096, sink: int | None = None,
              progress: bool = True, seed: int = 0, **options) -> Calibration:
    """Calibrate ``method`` (with ``options``, e.g. bits=3) on ``model``.

    data: LongTensor (n, T) of token ids; or a list of strings / one string (needs ``tokenizer``); or None
    for the built-in calibration text (State of the Union speeches before 2010; needs ``tokenizer``),
    cut into ``sequences`` windows of ``seq_len`` tokens. KVQuant used 16 x 2K; the default 16 x 512 keeps
    the Fisher pass (a backward through the model) to minutes on a CPU; on a GPU, pass seq_len=2048.
    fisher: weight k-means by Fisher information (squared LM-loss gradients w.r.t. K/V); default: what the
    method uses (KVQuant and CQ: yes; MILLION: no).
    Activations of every attention layer are captured through the graph pass (any model it handles), at
    most ``max_tokens`` tokens per layer, the first ``sink`` (1) positions of each sequence left out.
    ``method="duo"`` optimizes DuoAttention's gates instead (:func:`kvpass.duo.calibrate_duo`: ``data`` is a
    list of passkey samples or None for passkey prompts made with ``tokenizer``; ``sink`` and ``recent`` are
    the streaming heads' sizes, options ``lengths``, ``depths``, ``steps``, ``lr``, ``l1``).
    Returns a :class:`Calibration` that records the model's fingerprint; save it with ``.save(dir)``.
    """
    from .capture import collect_activations

    if method == "duo":
        from .duo import calibrate_duo
        extra = {} if sink is None else {"sink": sink}
        return calibrate_duo(model, tokenizer=tokenizer, data=data, progress=progress, seed=seed, **extra,
                             **options)
    sink = 1 if sink is None else sink
    cls = scheme_class(method)
    if not cls.needs_calibration:
        raise KVPassError(f"{method} needs no calibration (calibrated methods: "
                          f"{', '.join(m for m in _calibrated())})")
    get_scheme(method, **options)                       # validate the options before the long work
    ids = _token_ids(data, tokenizer, sequences, seq_len)
    if fisher is None:
        fisher = getattr(cls, "fisher_weighted", False)
    device = next(model.parameters()).device
    acts = collect_activations(model, ids.to(device), fisher=fisher, max_tokens=max_tokens, sink=sink,
                               progress=progress, seed=seed)
    tensors = cls.fit(acts, **options)
    return Calibration(method=method, options=_jsonable(options), model=model_fingerprint(model),
                       tensors={k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                       meta={"data": acts.meta if hasattr(acts, "meta") else {}, "fisher": fisher})


def load_calibration(calibration) -> Calibration:
    """``calibration`` itself, or the one saved in that directory; anything else is a KVPassError."""
    from pathlib import Path

    if isinstance(calibration, (str, Path)):
        calibration = Calibration.load(calibration)
    if not isinstance(calibration, Calibration):
        raise KVPassError(f"calibration must be a kvpass Calibration or its directory, got "
                          f"{type(calibration).__name__}")
    return calibration


def resolve_calibration(model, method: str, calibration, options: dict) -> dict:
    """For ``kvpass.compile``: load/check ``calibration`` against the model and method, and merge its
    options under the user's (a conflicting option is an error). Returns the scheme options."""
    calibration = load_calibration(calibration)
    calibration.check(model, method)
    merged = dict(calibration.options)
    for k, v in options.items():
        if k in merged and merged[k] != _jsonable({k: v})[k]:
            raise CalibrationMismatchError(f"the {method} calibration was made with {k}={merged[k]!r}, "
                                           f"not {k}={v!r}; calibrate again with {k}={v!r}")
        merged[k] = v
    known = {f.name for f in dataclasses.fields(scheme_class(method))}
    merged = {k: v for k, v in merged.items() if k in known}
    merged["calibration"] = calibration
    return merged


def _token_ids(data, tokenizer, sequences: int, seq_len: int) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype != torch.long or data.shape[1] < 2:
            raise KVPassError(f"data must be a LongTensor (n, T >= 2) of token ids, got {data.dtype} "
                              f"{tuple(data.shape)}")
        return data
    if tokenizer is None:
        raise KVPassError("calibrating on text needs tokenizer=...; or pass token ids as a LongTensor (n, T)")
    from .data import calib_texts, token_windows
    texts = calib_texts() if data is None else data
    return token_windows(tokenizer, texts, seq_len, sequences, spread=True)


def _jsonable(options: dict) -> dict:
    return {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in options.items()
            if k != "calibration"}


def _calibrated() -> list[str]:
    from .methods import methods
    return [m for m in methods() if scheme_class(m).needs_calibration]
