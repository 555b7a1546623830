"""Passkey prompts (kvpass.passkey) and the accuracy harness, with a word tokenizer and oracle models."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from kvpass.errors import KVPassError
from kvpass.passkey import INSTRUCTION, NEEDLE, QUESTION, passkey_accuracy, passkey_samples, retrieves

TEXTS = [" ".join(f"w{i}" for i in range(2000))]


class WordTokenizer:
    """Stand-in for a HF tokenizer: one id per digit and per run of other non-space characters."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        words = re.findall(r"\d|[^\s\d]+", text)
        return {"input_ids": [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in words]}


def test_prompts_have_the_length_the_needle_depth_and_the_answer():
    tok = WordTokenizer()
    samples = passkey_samples(tok, [120, 300], [0.0, 0.5, 1.0], per_cell=2, texts=TEXTS, seed=3)
    assert len(samples) == 12 and len({s.key for s in samples}) > 1
    head, question = len(tok(INSTRUCTION)["input_ids"]), len(tok(QUESTION)["input_ids"])
    for s in samples:
        assert s.ids.dtype == torch.long and s.length in (120, 300) and len(s.key) == 5
        needle = tok(NEEDLE.format(key=s.key))["input_ids"]
        assert s.ids[s.needle_at:s.needle_at + len(needle)].tolist() == needle     # the needle where it says
        hay = s.length - head - len(needle) - question
        assert abs((s.needle_at - head) - s.depth * hay) <= 1
        assert s.answer.tolist() == tok(" " + s.key)["input_ids"] and len(s.answer) == 5
    again = passkey_samples(WordTokenizer(), [120, 300], [0.0, 0.5, 1.0], per_cell=2, texts=TEXTS, seed=3)
    assert [s.key for s in again] == [s.key for s in samples]          # seeded
    assert all(torch.equal(a.ids, s.ids) for a, s in zip(again, samples))


@pytest.mark.parametrize("bad,match", [(dict(lengths=[30]), "too short"), (dict(depths=[1.5]), r"\[0, 1\]"),
                                       (dict(lengths=[20000]), "haystack text has"), (dict(per_cell=0), ">= 1")])
def test_bad_requests_fail_clearly(bad, match):
    args = dict(lengths=[200], depths=[0.5], per_cell=1) | bad
    with pytest.raises(KVPassError, match=match):
        passkey_samples(WordTokenizer(), args["lengths"], args["depths"], args["per_cell"], texts=TEXTS)


class Oracle(torch.nn.Module):
    """A 'model' that knows each prompt's answer and greedily emits it (wrong from the second token on for
    prompts whose needle sits past ``fail_after``): checks the harness's decoding loop and bookkeeping."""

    def __init__(self, samples, fail_after=None, vocab=100000):
        super().__init__()
        self.answers = {tuple(s.ids.tolist()): (s.answer.tolist(), s.depth) for s in samples}
        self.fail_after, self.vocab = fail_after, vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        if past_key_values is None:
            answer, depth = self.answers[tuple(input_ids[0].tolist())]
            step = 0
        else:
            answer, depth, step = past_key_values
        token = answer[step]
        if step == len(answer) - 1 and self.fail_after is not None and depth > self.fail_after:
            token += 1                  # right up to the last digit
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, token] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=(answer, depth, step + 1))


def test_accuracy_counts_exact_continuations_per_cell():
    tok = WordTokenizer()
    samples = passkey_samples(tok, [150], [0.0, 0.5, 1.0], per_cell=3, texts=TEXTS, seed=1)
    assert all(retrieves(Oracle(samples), s) for s in samples)
    grid = passkey_accuracy(Oracle(samples, fail_after=0.6), samples)
    cells = [(r["depth"], r["accuracy"], r["samples"]) for r in grid]
    assert cells == [(0.0, 1.0, 3), (0.5, 1.0, 3), (1.0, 0.0, 3)]
