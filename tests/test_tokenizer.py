"""The tokenizer: special ids, the chat format, and exact round trips."""
from __future__ import annotations

import pytest

from builder import TINY_CHECKPOINT
from builder.model.tokenizer import ChatGLM2Tokenizer, build_prompt


@pytest.fixture(scope="module")
def tok():
    return ChatGLM2Tokenizer(TINY_CHECKPOINT / "tokenizer.model")


def test_special_ids_follow_the_sentencepiece_vocabulary(tok):
    n = tok.sp.vocab_size()
    assert [tok.special_ids[t] for t in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")] == [n, n + 1, n + 2, n + 3, n + 4]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.vocab_size == n + 5


def test_chat_input_starts_with_gmask_sop(tok):
    ids = tok.build_chat_input("你好")
    assert ids[:2] == [tok.special_ids["[gMASK]"], tok.special_ids["sop"]]
    assert tok.decode(ids) == "[Round 1]\n\n问：你好\n\n答："


def test_chat_format_numbers_rounds_from_one():
    prompt = build_prompt("再见", [("你好", "你好！"), ("1加1等于多少？", "1加1等于2。")])
    assert prompt == ("[Round 1]\n\n问：你好\n\n答：你好！\n\n"
                      "[Round 2]\n\n问：1加1等于多少？\n\n答：1加1等于2。\n\n"
                      "[Round 3]\n\n问：再见\n\n答：")


@pytest.mark.parametrize("text", [
    "", "你好", "Hello, world!", "3只鸡和2只兔子一共有几条腿？", "全角：冒号，逗号。",
    "emoji 😀🐔🐇 mixed 中文 text", "line one\nline two\n\n\ttabbed", "  leading and trailing  ",
    "rare 字符 龘 and bytes \u200b\u00e9", "[Round 1]\n\n问：x\n\n答：",
])
def test_decode_encode_round_trips_exactly(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_skips_special_and_control_tokens(tok):
    ids = tok.encode("abc")
    wrapped = [tok.special_ids["[gMASK]"], tok.special_ids["sop"], tok.bos_id, *ids, tok.eop_id, tok.eos_id, tok.pad_id]
    assert tok.decode(wrapped) == "abc"


def test_unknown_characters_fall_back_to_bytes(tok):
    ids = tok.encode("龘")
    assert tok.pad_id not in ids  # no <unk>
    assert all(i < tok.sp.vocab_size() for i in ids)
