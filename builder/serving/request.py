"""The serving contract's inputs and outputs, parsed and checked without Triton or torch.

Every input is a TYPE_STRING tensor, as in the usual hand-written ChatGLM2 deployment: ``prompt``
[1], ``history`` [-1] (flattened question/answer pairs, may be empty), ``temperature`` [1],
``max_token`` [1] (total length, prompt included), ``history_len`` [1] (how many past pairs to
keep), and an optional ``stream`` [1] ("1" to receive partial answers from a decoupled model).

>>> parse_request({"prompt": np.array([b"hi"], dtype=object), ...})
ChatRequest(prompt='hi', ...)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

REQUIRED_INPUTS = ("prompt", "history", "temperature", "max_token", "history_len")
OPTIONAL_INPUTS = ("stream", "messages")  # messages: MESSAGES_INPUT, below
OUTPUTS = ("response", "history", "variant")


class RequestError(ValueError):
    """A bad request: the message names the field and the value; the model keeps serving."""


@dataclass(frozen=True)
class ChatRequest:
    prompt: str
    history: tuple[tuple[str, str], ...]  # the pairs kept (the last `history_len`)
    temperature: float
    max_token: int  # total tokens, prompt included
    history_len: int
    stream: bool = False


def _text(field: str, raw) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"input {field!r} is not valid UTF-8: {bytes(raw)[:40]!r} ({err.reason} "
                           f"at byte {err.start})") from None


def _scalar(inputs: Mapping[str, np.ndarray], field: str) -> str:
    values = np.asarray(inputs[field]).reshape(-1)
    if values.size != 1:
        raise RequestError(f"input {field!r} must hold exactly one value, got {values.size}")
    return _text(field, values[0])


def _number(field: str, text: str, *, integer: bool) -> float | int:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"input {field!r} must be {kind}, got {text!r}") from None
    if not integer and not math.isfinite(value):
        raise RequestError(f"input {field!r} must be a finite number, got {text!r}")
    return value


def parse_request(inputs: Mapping[str, np.ndarray | None]) -> ChatRequest:
    """Check a request's inputs (``name -> numpy array of bytes``) and return what they mean."""
    missing = [name for name in REQUIRED_INPUTS if inputs.get(name) is None]
    if missing:
        raise RequestError(f"missing input(s) {missing}; expected {list(REQUIRED_INPUTS)}")
    prompt = _scalar(inputs, "prompt")
    temperature = _number("temperature", _scalar(inputs, "temperature").strip(), integer=False)
    if temperature < 0:
        raise RequestError(f"input 'temperature' must not be negative, got {temperature!r}")
    max_token = _number("max_token", _scalar(inputs, "max_token").strip(), integer=True)
    if max_token <= 0:
        raise RequestError(f"input 'max_token' must be a positive integer, got {max_token!r}")
    history_len = _number("history_len", _scalar(inputs, "history_len").strip(), integer=True)
    if history_len < 0:
        raise RequestError(f"input 'history_len' must not be negative, got {history_len!r}")
    flat = [_text("history", item) for item in np.asarray(inputs["history"]).reshape(-1)]
    if len(flat) % 2:
        raise RequestError(f"input 'history' must hold question/answer pairs, got {len(flat)} "
                           f"strings (an odd number)")
    pairs = tuple(zip(flat[0::2], flat[1::2]))
    kept = pairs[len(pairs) - history_len:] if history_len > 0 else ()
    stream = inputs.get("stream") is not None and _scalar(inputs, "stream").strip().lower() in ("1", "true")
    return ChatRequest(prompt, kept, temperature, max_token, history_len, stream)


def request_length(req: ChatRequest, tokenizer, seq_length: int) -> tuple[int, int]:
    """``(needed, prompt_tokens)``: the length the router routes ``req`` by, and its prompt's
    length with the kept history (``tokenizer``: a :class:`~builder.model.tokenizer.ChatGLM2Tokenizer`).

    ``needed`` is ``max_token`` clamped to ``seq_length``, as the variant clamps it, or the prompt
    with its kept history plus one new token when that is longer. (A variant drops the oldest
    pairs that do not fit ``max_token``; counting them anyway never under-counts.) A query that
    alone leaves no room to answer is refused here, with the variant's own words, rather than
    forwarded to a variant that would refuse it.

    >>> request_length(parse_request(inputs), tokenizer, seq_length=2048)
    (64, 20)
    """
    budget = min(req.max_token, seq_length)
    query_tokens = len(tokenizer.build_chat_input(req.prompt))
    if query_tokens >= budget:
        raise RequestError(f"input 'max_token' = {req.max_token}: the query alone is {query_tokens} "
                           f"tokens, which leaves no room to answer within max_length={budget}")
    prompt_tokens = len(tokenizer.build_chat_input(req.prompt, req.history))
    return max(prompt_tokens + 1, budget), prompt_tokens


def output_arrays(response: str, history, variant: str) -> dict[str, np.ndarray]:
    """The contract's outputs as numpy arrays of UTF-8 bytes: response [1], history [n, 2], variant [1]."""
    pairs = np.array([[q.encode(), a.encode()] for q, a in history], dtype=object).reshape(-1, 2)
    return {"response": np.array([response.encode()], dtype=object),
            "history": pairs,
            "variant": np.array([variant.encode()], dtype=object)}


# -- the optional ``messages`` input: a whole conversation in the family's own roles ---------------
MESSAGES_INPUT = "messages"
"""Optional TYPE_STRING [1]: ``{"messages": [{"role", "content", "metadata"?}, ...], "tools": [...]}``
as JSON. When present, the router and the variant build the prompt from it with the family's
``tokenizer.encode_messages(messages, tools)`` and ignore ``prompt``/``history``/``history_len``
(still sent, as the contract requires them). Roles are the family's (``system``, ``user``,
``assistant``, ``observation``), ``metadata`` is an assistant call's function name; ``tools`` are
OpenAI tool objects (or bare function descriptions). ChatGLM3 and GLM-4 only: ChatGLM2 has no roles."""
MESSAGE_ROLES = ("system", "user", "assistant", "observation")
_MESSAGE_KEYS = {"role", "content", "metadata"}


@dataclass(frozen=True)
class ChatMessages:
    """The ``messages`` input, checked: the conversation and the tools the prompt describes."""

    messages: tuple[dict, ...]  # {"role", "content", "metadata"?}, oldest first; the last is answered
    tools: tuple[dict, ...] = ()  # OpenAI tool objects; () for none

    def prompt_ids(self, tokenizer) -> list[int]:
        """The prompt's token ids (``tokenizer``: the family's, with ``encode_messages``)."""
        encode = getattr(tokenizer, "encode_messages", None)
        if encode is None:
            raise RequestError(f"input {MESSAGES_INPUT!r}: this model's chat format has no roles "
                               f"(ChatGLM2); send 'prompt' and 'history' instead")
        return list(encode(list(self.messages), list(self.tools) or None))


def messages_input(messages, tools=None) -> str:
    """The ``messages`` input's text for ``messages`` (family message dicts) and ``tools``: what
    the OpenAI gateway sends, and what :func:`parse_messages` reads back.

    >>> messages_input([{"role": "user", "content": "你好"}])
    '{"messages": [{"role": "user", "content": "你好"}], "tools": []}'
    """
    import json

    return json.dumps({"messages": list(messages), "tools": list(tools or [])}, ensure_ascii=False)


def parse_messages(inputs: Mapping[str, np.ndarray | None]) -> "ChatMessages | None":
    """The optional ``messages`` input checked (:class:`ChatMessages`), or None when it is absent;
    :class:`RequestError` names what is wrong. The last message must be a ``user`` or an
    ``observation`` one (the model answers it).

    >>> parse_messages({"messages": np.array([messages_input(msgs, tools).encode()], dtype=object)})
    ChatMessages(messages=({'role': 'user', 'content': '北京天气？'},), tools=({'type': 'function', ...},))
    """
    import json

    from ..model.tools import ToolFormatError, function_of

    if inputs.get(MESSAGES_INPUT) is None:
        return None
    text = _scalar(inputs, MESSAGES_INPUT)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"input {MESSAGES_INPUT!r} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list):
        raise RequestError(f"input {MESSAGES_INPUT!r} must be a JSON object "
                           f'{{"messages": [...], "tools": [...]}}, got {text[:60]!r}')
    messages = []
    for i, m in enumerate(raw["messages"]):
        where = f"input {MESSAGES_INPUT!r}: messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in MESSAGE_ROLES:
            raise RequestError(f"{where} must be an object with a role in {list(MESSAGE_ROLES)}, "
                               f"got {json.dumps(m, ensure_ascii=False)[:60]}")
        unknown = sorted(set(m) - _MESSAGE_KEYS)
        if unknown:
            raise RequestError(f"{where} has unknown keys {unknown}; allowed: {sorted(_MESSAGE_KEYS)}")
        for key in ("content", "metadata"):
            if not isinstance(m.get(key, ""), str):
                raise RequestError(f"{where}.{key} must be a string")
        messages.append(dict(m))
    if not messages or messages[-1]["role"] not in ("user", "observation"):
        raise RequestError(f"input {MESSAGES_INPUT!r}: the last message must be a user or an "
                           f"observation message (the model answers it)")
    tools = raw.get("tools") or []
    if not isinstance(tools, list):
        raise RequestError(f"input {MESSAGES_INPUT!r}: tools must be a list")
    for i, tool in enumerate(tools):
        try:
            if not isinstance(tool, dict):
                raise ToolFormatError(f"a tool must be an object, got {tool!r}")
            function_of(tool)
        except ToolFormatError as err:
            raise RequestError(f"input {MESSAGES_INPUT!r}: tools[{i}]: {err}") from None
    return ChatMessages(tuple(messages), tuple(tools))


def messages_length(req: ChatRequest, chat: ChatMessages, tokenizer, seq_length: int
                    ) -> tuple[int, int]:
    """:func:`request_length` for a request with the ``messages`` input: ``(needed,
    prompt_tokens)``. Nothing is dropped from a conversation (a tool call's context matters), so
    a prompt that leaves no room to answer is refused, in the variant's words.

    >>> messages_length(parse_request(inputs), parse_messages(inputs), tokenizer, seq_length=2048)
    (64, 41)
    """
    budget = min(req.max_token, seq_length)
    prompt_tokens = len(chat.prompt_ids(tokenizer))
    if prompt_tokens >= budget:
        raise RequestError(f"input 'max_token' = {req.max_token}: the conversation is "
                           f"{prompt_tokens} tokens, which leaves no room to answer within "
                           f"max_length={budget}")
    return max(prompt_tokens + 1, budget), prompt_tokens
