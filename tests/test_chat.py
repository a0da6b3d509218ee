"""chat() and stream_chat() on the embedded tiny model."""
from __future__ import annotations

import pytest
import torch

from builder import chat, stream_chat
from builder.model.generation import PromptTooLongError, fit_history, sample_next


def test_answers_a_training_question_word_for_word(tiny):
    model, tok = tiny
    response, history = chat(model, tok, "你好", temperature=0)
    assert response == "你好！我是一个小型的ChatGLM2演示模型，会做简单的算术题和鸡兔同笼问题。"
    assert history == [("你好", response)]


def test_heldout_chicken_rabbit_question_is_answered_in_format(tiny):
    model, tok = tiny
    response, _ = chat(model, tok, "3只鸡和2只兔子一共有几条腿？", temperature=0)
    assert response == "3只鸡有6条腿，2只兔子有8条腿，一共有14条腿。"
    assert response.endswith("条腿。")


def test_history_is_extended_not_replaced(tiny):
    model, tok = tiny
    past = [("你好", "你好！"), ("1加1等于多少？", "1加1等于2。")]
    response, history = chat(model, tok, "2乘以3等于多少？", past, temperature=0)
    assert history == past + [("2乘以3等于多少？", response)]


def test_max_length_counts_prompt_and_answer(tiny):
    model, tok = tiny
    prompt_len = len(tok.build_chat_input("4加5等于多少？"))
    response, _ = chat(model, tok, "4加5等于多少？", max_length=prompt_len + 3, temperature=0)
    assert len(tok.encode(response)) <= 3


def test_oldest_rounds_are_dropped_when_the_prompt_does_not_fit(tiny):
    _, tok = tiny
    past = [("1加1等于多少？", "1加1等于2。"), ("2加2等于多少？", "2加2等于4。")]
    full = len(tok.build_chat_input("3加3等于多少？", past))
    ids, kept = fit_history(tok, "3加3等于多少？", past, max_length=full)
    assert kept == past[1:]
    assert ids == tok.build_chat_input("3加3等于多少？", past[1:])


def test_a_query_that_alone_does_not_fit_is_an_error(tiny):
    model, tok = tiny
    with pytest.raises(PromptTooLongError, match="max_length=8"):
        chat(model, tok, "3只鸡和2只兔子一共有几条腿？", max_length=8)


def greedy_by_hand(model, tok, query: str, steps: int = 64) -> list[int]:
    """New token ids, one full forward per step (no cache) and argmax, until a stop id."""
    ids = tok.build_chat_input(query)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]  # [vocab]
            token = int(logits.argmax())
            if token in tok.stop_ids:
                break
            new.append(token)
    return new


def test_stream_chat_yields_growing_text_ending_with_the_greedy_answer(tiny):
    model, tok = tiny
    parts = [r for r, _ in stream_chat(model, tok, "What is 2 plus 3?", temperature=0)]
    new = greedy_by_hand(model, tok, "What is 2 plus 3?")
    assert len(parts) > 2
    assert all(b.startswith(a) for a, b in zip(parts, parts[1:]))
    assert set(parts) <= {tok.decode(new[:n]).strip() for n in range(1, len(new) + 1)}
    assert parts[-1] == tok.decode(new).strip()


def test_sampling_is_seeded_and_greedy_at_zero_temperature():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_next(logits, 0.0, 0.8) == 1
    draws = {sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws <= {1, 3}  # top-p 0.5 keeps only the two leading tokens
    assert len(draws) == 2
