"""Exact-answer scoring of the tiny model (builder.evaluate.score), as the fidelity report and
scripts/make_tiny_model.py use it."""
from __future__ import annotations

import pytest
import torch

from builder import TINY_CHECKPOINT, load_chatglm2
from builder.evaluate.corpus import Dialogue
from builder.evaluate.score import _accuracies, answer_accuracy, answer_is_right

QUESTION = "3只鸡和2只兔子一共有几条腿？"
RIGHT = Dialogue(((QUESTION, "3只鸡有6条腿，2只兔子有8条腿，一共有14条腿。"),))
WRONG = Dialogue(((QUESTION, "3只鸡有6条腿，2只兔子有8条腿，一共有15条腿。"),))


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    return load_chatglm2(TINY_CHECKPOINT)


def test_an_answer_is_right_only_when_it_matches_exactly(tiny):
    model, tokenizer = tiny
    assert answer_is_right(model, tokenizer, RIGHT)
    assert not answer_is_right(model, tokenizer, WRONG)
    assert answer_accuracy(model, tokenizer, [RIGHT, WRONG, RIGHT]) == pytest.approx(2 / 3)


def test_accuracies_group_each_answer_once(tiny, monkeypatch):
    import builder.evaluate.score as evaluate

    model, tokenizer = tiny
    asked = []
    score = evaluate.answer_is_right
    monkeypatch.setattr(evaluate, "answer_is_right", lambda *a: asked.append(a[2]) or score(*a))
    found = _accuracies(model, tokenizer, [RIGHT, WRONG], lambda d: "right" if d is RIGHT else "wrong")
    assert found == {"accuracy": 0.5, "accuracy_by": {"right": 1.0, "wrong": 0.0}}
    assert asked == [RIGHT, WRONG]  # each dialogue answered once, whatever the grouping
