"""The serving contract's request parsing and the router's count, without Triton or torch."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from builder import TINY_CHECKPOINT
from builder.serving.request import RequestError, parse_request, request_length
from builder.model.tokenizer import ChatGLM2Tokenizer

PAIRS = [("1加1等于多少？", "1加1等于2。"), ("2加2等于多少？", "2加2等于4。"),
         ("3加3等于多少？", "3加3等于6。")]
QUESTION = "3只鸡和2只兔子一共有几条腿？"


def strings(items) -> np.ndarray:
    return np.array([s.encode() for s in items], dtype=object)


def inputs(prompt=QUESTION, history=(), history_len=0, max_token=64) -> dict:
    """A request as the models receive it: numpy arrays of UTF-8 bytes."""
    return {"prompt": strings([prompt]), "history": strings([t for pair in history for t in pair]),
            "temperature": strings(["0"]), "max_token": strings([str(max_token)]),
            "history_len": strings([str(history_len)])}


@pytest.fixture(scope="module")
def tokenizer():
    return ChatGLM2Tokenizer(TINY_CHECKPOINT / "tokenizer.model")


def test_parsing_and_counting_need_neither_triton_nor_torch():
    code = ("import sys, numpy as np\n"
            "from builder import TINY_CHECKPOINT\n"
            "from builder.serving.request import parse_request, request_length\n"
            "from builder.model.tokenizer import ChatGLM2Tokenizer\n"
            "b = lambda s: np.array([s.encode()], dtype=object)\n"
            "req = parse_request({'prompt': b('hi'), 'history': np.array([], dtype=object),\n"
            "                     'temperature': b('0'), 'max_token': b('64'), 'history_len': b('0')})\n"
            "tok = ChatGLM2Tokenizer(TINY_CHECKPOINT / 'tokenizer.model')\n"
            "assert request_length(req, tok, 2048)[0] == 64\n"
            "print(sorted({'torch', 'triton_python_backend_utils'} & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("history_len,kept", [(0, []), (1, PAIRS[2:]), (2, PAIRS[1:]),
                                              (3, PAIRS), (10, PAIRS)])
def test_history_len_keeps_the_most_recent_pairs(history_len, kept):
    req = parse_request(inputs(history=PAIRS, history_len=history_len))
    assert req.history == tuple(kept) and req.history_len == history_len


def test_history_len_on_an_empty_history():
    assert parse_request(inputs(history=(), history_len=5)).history == ()


def test_request_length_is_max_token_for_a_short_prompt(tokenizer):
    prompt_tokens = len(tokenizer.build_chat_input(QUESTION))
    assert request_length(parse_request(inputs(max_token=64)), tokenizer, 2048) == (64, prompt_tokens)
    # above seq_length, max_token is clamped as the variant clamps it
    assert request_length(parse_request(inputs(max_token=40000)), tokenizer, 2048)[0] == 2048


def test_request_length_counts_the_kept_history_only(tokenizer):
    history = PAIRS * 4  # 12 pairs, ~300 tokens
    kept = len(tokenizer.build_chat_input(QUESTION, history))
    assert kept > 64
    req = parse_request(inputs(history=history, history_len=12))
    assert request_length(req, tokenizer, 2048) == (kept + 1, kept)
    two = len(tokenizer.build_chat_input(QUESTION, history[-2:]))
    req = parse_request(inputs(history=history, history_len=2))
    assert request_length(req, tokenizer, 2048) == (max(two + 1, 64), two)
    req = parse_request(inputs(history=history, history_len=0))
    assert request_length(req, tokenizer, 2048)[0] == 64


def test_request_length_counts_a_long_prompt(tokenizer):
    prompt = "1加1等于多少？" * 12
    prompt_tokens = len(tokenizer.build_chat_input(prompt))
    past = len(tokenizer.build_chat_input(prompt, PAIRS[:1]))
    assert prompt_tokens < 90 < past
    req = parse_request(inputs(prompt=prompt, history=PAIRS[:1], history_len=1, max_token=90))
    assert request_length(req, tokenizer, 2048) == (past + 1, past)


def test_a_query_that_alone_does_not_fit_max_token_is_refused(tokenizer):
    prompt = "1加1等于多少？" * 12
    prompt_tokens = len(tokenizer.build_chat_input(prompt))
    with pytest.raises(RequestError, match=f"input 'max_token' = 64: the query alone is "
                                           f"{prompt_tokens} tokens.*max_length=64"):
        request_length(parse_request(inputs(prompt=prompt, max_token=64)), tokenizer, 2048)
    with pytest.raises(RequestError, match="max_length=20"):  # the clamp counts too
        request_length(parse_request(inputs(prompt=prompt, max_token=4000)), tokenizer, 20)
