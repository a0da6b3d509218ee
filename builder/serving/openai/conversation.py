"""An OpenAI conversation mapped onto ChatGLM2's prompt + history, as THUDM's own ``openai_api.py``.

ChatGLM2-6B has no system role: its chat format is rounds of ``问：`` (query) and ``答：`` (answer).
So, like THUDM's server:

* the last message must be the user's: it is the ``prompt``;
* the messages before it must be user/assistant pairs: they are the ``history``;
* a system (or ``developer``) message, allowed first only, is put in front of the prompt of this
  turn (``system + prompt``), so it is seen once, right before the question, every turn.

>>> to_prompt([ChatMessage(role="system", content="Be brief. "),
...            ChatMessage(role="user", content="1+1?")])
Conversation(prompt='Be brief. 1+1?', history=())
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .protocol import ChatMessage

SYSTEM_ROLES = ("system", "developer")


class ConversationError(ValueError):
    """Messages ChatGLM2's chat format cannot express; ``param`` names the message."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Conversation:
    prompt: str
    history: tuple[tuple[str, str], ...]  # (query, answer) pairs, oldest first


def to_prompt(messages: Sequence[ChatMessage]) -> Conversation:
    """The serving contract's ``prompt`` and ``history`` for ``messages`` (see the module's rules)."""
    messages = list(messages)
    system = ""
    if messages and messages[0].role in SYSTEM_ROLES:
        system = messages.pop(0).text
        offset = 1
    else:
        offset = 0
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
