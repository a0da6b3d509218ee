"""An OpenAI conversation mapped onto the serving contract: ChatGLM2's prompt + history, or, for the
families with roles (ChatGLM3, GLM-4), the whole conversation in the family's own messages.

ChatGLM2 (:func:`to_prompt`), as THUDM's own ``openai_api.py``:

ChatGLM2-6B has no system role: its chat format is rounds of ``问：`` (query) and ``答：`` (answer).
So, like THUDM's server:

* the last message must be the user's: it is the ``prompt``;
* the messages before it must be user/assistant pairs: they are the ``history``;
* a system (or ``developer``) message, allowed first only, is put in front of the prompt of this
  turn (``system + prompt``), so it is seen once, right before the question, every turn.

>>> to_prompt([ChatMessage(role="system", content="Be brief. "),
...            ChatMessage(role="user", content="1+1?")])
Conversation(prompt='Be brief. 1+1?', history=())

ChatGLM3 and GLM-4 (:func:`to_family_messages`): every message keeps its role (``developer`` is
``system``); an assistant's ``tool_calls`` become calls in the family's format and a ``tool``
message an ``observation`` (:func:`builder.model.tools.from_openai_messages`); the last message
must be the user's or a tool's result. :func:`map_chat` picks one or the other by the family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .protocol import ChatCompletionRequest, ChatMessage

SYSTEM_ROLES = ("system", "developer")


class ConversationError(ValueError):
    """Messages ChatGLM2's chat format cannot express; ``param`` names the message."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Conversation:
    prompt: str
    history: tuple[tuple[str, str], ...]  # (query, answer) pairs, oldest first
    messages: Optional[tuple[dict[str, Any], ...]] = None  # the family's messages (roles families)
    tools: Optional[tuple[dict[str, Any], ...]] = None  # what the model is shown; None: no tools

    def prompt_ids(self, tokenizer) -> list[int]:
        """The prompt's token ids, as the router builds them (``tokenizer``: the family's)."""
        if self.messages is None:
            return tokenizer.build_chat_input(self.prompt, self.history)
        return tokenizer.encode_messages(list(self.messages), list(self.tools) if self.tools else None)


def to_prompt(messages: Sequence[ChatMessage]) -> Conversation:
    """The serving contract's ``prompt`` and ``history`` for ``messages`` (see the module's rules)."""
    messages = list(messages)
    system = ""
    if messages and messages[0].role in SYSTEM_ROLES:
        system = messages.pop(0).text
        offset = 1
    else:
        offset = 0
    for i, m in enumerate(messages):
        if m.role == "tool" or m.tool_calls:
            raise ConversationError(f"messages[{offset + i}]", f"messages[{offset + i}] is a tool "
                                    f"{'result' if m.role == 'tool' else 'call'}: ChatGLM2-6B has no "
                                    "tool calling (ChatGLM3-6B and GLM-4-9B-chat do)")
    if not messages or messages[-1].role != "user":
        index = offset + len(messages) - 1
        raise ConversationError(f"messages[{max(index, 0)}]", "the last message must be the user's "
                                "(ChatGLM2 answers a user's question)")
    *past, last = messages
    history = []
    for i in range(0, len(past), 2):
        pair = past[i:i + 2]
        roles = tuple(m.role for m in pair)
        if roles != ("user", "assistant"):
            bad = i + (0 if pair[0].role != "user" else 1)  # the first message out of place
            role = messages[bad].role
            raise ConversationError(
                f"messages[{offset + bad}]",
                f"messages[{offset + bad}] has role {role!r}: before the last user message, ChatGLM2's "
                "chat format needs user/assistant pairs (one system message may come first)")
        history.append((pair[0].text, pair[1].text))
    return Conversation(system + last.text, tuple(history))


def to_family_messages(tool_format: str, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """``messages`` as the family's message dicts (roles system/user/assistant/observation, a call's
    name in ``metadata``), checked: a tool result follows a call, the last message is answerable."""
    from ...model.tools import from_openai_messages

    for i, m in enumerate(messages):
        if m.role == "tool" and not (i and (messages[i - 1].role == "tool" or messages[i - 1].tool_calls)):
            raise ConversationError(f"messages[{i}]", f"messages[{i}] has role 'tool': a tool result "
                                    "must follow the assistant message with its tool_calls")
    if messages[-1].role not in ("user", "tool"):
        raise ConversationError(f"messages[{len(messages) - 1}]", "the last message must be the "
                                "user's or a tool's result (the model answers it)")
    plain = []
    for m in messages:
        item = {"role": m.role, "content": m.text}
        if m.tool_calls:
            item["tool_calls"] = [call.model_dump() for call in m.tool_calls]
        plain.append(item)
    return from_openai_messages(tool_format, plain)


def map_chat(chat: ChatCompletionRequest, family) -> Conversation:
    """The contract's view of ``chat`` for ``family`` (a :class:`~builder.model.family.Family`):
    prompt + history for ChatGLM2, the family's messages (and the tools shown) for the others.
    Tools for a family without a tool format are refused, naming ``tools``.

    >>> map_chat(chat, get_family("glm-4-9b-chat")).messages[-1]
    {'role': 'observation', 'content': '{"temperature": 25}'}
    """
    if family.tool_format is None:
        if chat.tools:
            raise ConversationError("tools", f"tools: {family.name} has no tool calling (ChatGLM3-6B "
                                    "and GLM-4-9B-chat have); leave tools out",
                                    "unsupported_parameter")
        return to_prompt(chat.messages)  # ChatGLM2's rounds: no roles, no tools
    tools = chat.prompt_tools
    messages = to_family_messages(family.tool_format, chat.messages)
    last = messages[-1]
    return Conversation(last.get("content") or "", (), tuple(messages),
                        tuple(tools) if tools else None)
