"""A reply that may be a tool call: when it is clear whether it is one, and its OpenAI shapes.

The families write a call as text (:mod:`builder.model.tools`): GLM-4 ``name\\n{json}``, ChatGLM3
``name\\n```python\\ntool_call(...)\\n``` ``. A streamed reply is held back while its start could
still be a call, shown as text the moment it cannot be, and parsed whole at its end otherwise:

>>> call_state("glm4", "get_wea", {"get_weather"}), call_state("glm4", "今天", {"get_weather"})
('undecided', 'plain')

"plain" is only said when no continuation of the text could parse as a call
(:func:`builder.model.tools.parse_tool_calls` has the last word on a held-back reply).
"""
from __future__ import annotations

from typing import Any, Iterable, Literal, Mapping, Sequence

from .protocol import FunctionDelta, ToolCall, ToolCallDelta

State = Literal["plain", "undecided", "call"]


def _could_be_name(text: str, names: Iterable[str]) -> bool:
    return any(name.startswith(text) for name in names)


def call_state(tool_format: str, text: str, names: set[str]) -> State:
    """Whether ``text`` (the reply so far) is plain text whatever follows (``"plain"``), looks like
    the start of a call to one of ``names`` (``"call"``: wait for the end and parse it), or cannot
    be told yet (``"undecided"``)."""
    if tool_format == "glm4":
        # parse_glm4_call: the stripped reply's first line is a tool's name, its second starts "{"
        head = text.lstrip()
        first, newline, rest = head.partition("\n")
        if not newline:
            return "undecided" if _could_be_name(first.strip(), names) else "plain"
        if first.strip() not in names:
            return "plain"
        second, more, _ = rest.partition("\n")
        if not second.strip():
            return "undecided" if not more else "plain"
        return "call" if second.lstrip().startswith("{") else "plain"
    if tool_format == "chatglm3":
        # parse_chatglm3_call: the first line (unstripped) is a name without spaces, then the code
        first, newline, _ = text.partition("\n")
        name = first.strip()
        if " " in name:
            return "plain"
        if not newline:
            return "undecided" if _could_be_name(name, names) else "plain"
        return "call" if name in names else "plain"
    raise ValueError(f"tool_format must be 'glm4' or 'chatglm3', got {tool_format!r}")


def tool_names(tools: Sequence[Mapping[str, Any]]) -> set[str]:
    """The function names of OpenAI tool objects."""
    return {tool["function"]["name"] for tool in tools}


def call_deltas(calls: Sequence[Mapping[str, Any]]) -> list[list[ToolCallDelta]]:
    """The ``delta.tool_calls`` of the chunks that stream ``calls`` as OpenAI does: per call, one
    with its index, id, type, name and empty arguments, then one with its arguments."""
    out = []
    for index, call in enumerate(calls):
        call = ToolCall.model_validate(call)
        out.append([ToolCallDelta(index=index, id=call.id, type="function",
                                  function=FunctionDelta(name=call.function.name, arguments=""))])
        out.append([ToolCallDelta(index=index, function=FunctionDelta(arguments=call.function.arguments))])
    return out
