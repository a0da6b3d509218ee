"""The tiny model's corpus: a held-out split by numbers, families, and the demo's question."""
from __future__ import annotations

import pytest

from builder.evaluate.corpus import FAMILIES, by_family, dialogues, family, is_heldout, single_rounds


def test_heldout_questions_never_appear_in_training():
    train = {q for q, _ in single_rounds("train")}
    heldout = {q for q, _ in single_rounds("heldout")}
    assert heldout and not train & heldout


def test_the_demo_question_is_held_out_and_answered_in_full():
    assert is_heldout(3, 2)
    assert ("3只鸡和2只兔子一共有几条腿？", "3只鸡有6条腿，2只兔子有8条腿，一共有14条腿。") in single_rounds("heldout")


@pytest.mark.parametrize("query, expected", [
    ("3只鸡和2只兔子一共有几条腿？", "legs"), ("How many legs do 2 chickens and 6 rabbits have?", "legs"),
    ("7只兔子有几条腿？", "count"), ("How many legs do 8 chickens have?", "count"),
    ("鸡兔同笼，共有10个头，28只脚，鸡和兔子各有几只？", "cage"), ("What is 2 plus 3?", "add"),
    ("7乘以8等于多少？", "times"), ("你好", "other")])
def test_family_names_the_template_of_the_scored_question(query, expected):
    from builder.evaluate.corpus import Dialogue

    assert family(Dialogue(((query, ""),))) == expected


def test_leg_counts_and_sums_cover_numbers_up_to_20_in_both_languages():
    rounds = single_rounds("train") + single_rounds("heldout")
    assert ("How many legs do 20 chickens and 20 rabbits have?",
            "20 chickens have 40 legs and 20 rabbits have 80 legs, so there are 120 legs in all.") in rounds
    assert ("40加80等于多少？", "40加80等于120。") in rounds


def test_by_family_takes_the_first_of_each_family_with_and_without_history():
    heldout = dialogues("heldout")
    sample = by_family(heldout, 5)
    assert [family(d) for d in sample].count("legs") == 5
    assert {family(d) for d in sample} == set(FAMILIES)
    assert any(d.history for d in sample) and any(not d.history for d in sample)


def test_split_must_be_named():
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout', got 'test'"):
        single_rounds("test")
