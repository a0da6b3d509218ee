"""Tool calls in ChatGLM3's and GLM-4's own formats, and back to OpenAI's ``tool_calls`` shape.

How each family sees tools (what it was trained on):

- ChatGLM3: a system message whose content is followed by ``"\\n"`` and the tool list as JSON
  (indent 4); a call is ``<|assistant|>name\\n`` and a code block ``tool_call(key=value, ...)``.
- GLM-4: a system block ``# 可用工具`` with one ``## name`` section per function (its JSON, indent 4);
  a call is the function name on the first line and its JSON arguments after it.

Results come back as an ``observation`` message in both.

>>> calls = parse_tool_calls("glm4", 'get_weather\\n{"city": "北京"}', tools=[{"name": "get_weather"}])
>>> calls[0]["function"]
{'name': 'get_weather', 'arguments': '{"city": "北京"}'}
"""
from __future__ import annotations

import ast
import json
import uuid
from typing import Any, Mapping, Optional, Sequence

CHATGLM3_TOOL_SYSTEM = ("Answering the following questions as best as you can. "
                        "You have access to the following tools:")
"""The system prompt ChatGLM3's tool demos put before the tool list."""

GLM4_TOOL_PREAMBLE = ("\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                      "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_TOOL_FOOTER = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
"""GLM-4-9B-chat's chat template: the text after ``<|system|>`` and after each ``## name`` block."""

TOOL_FORMATS = ("chatglm3", "glm4")


class ToolFormatError(ValueError):
    """A tool description that cannot be rendered."""


def function_of(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The function description of an OpenAI tool (``{"type": "function", "function": {...}}``),
    or of a bare one (``{"name", "description", "parameters"}``, THUDM's demos)."""
    if tool.get("type", "function") != "function":
        raise ToolFormatError(f"tool type {tool.get('type')!r}: only 'function' tools are supported")
    function = tool.get("function", tool)
    if not isinstance(function, Mapping) or not function.get("name"):
        raise ToolFormatError(f"a tool needs a function name, got {tool!r}")
    return dict(function)


def tool_names(tools: Optional[Sequence[Mapping[str, Any]]]) -> Optional[set[str]]:
    return None if tools is None else {function_of(t)["name"] for t in tools}


# -- rendering into the prompt ---------------------------------------------------------------------
def chatglm3_system_message(tools: Sequence[Mapping[str, Any]], system: Optional[str] = None
                            ) -> dict[str, Any]:
    """ChatGLM3's system message with ``tools`` (its tokenizer appends them as JSON)."""
    return {"role": "system", "content": system or CHATGLM3_TOOL_SYSTEM,
            "tools": [function_of(t) for t in tools]}


def glm4_tools_system_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The text GLM-4's chat template puts after ``<|system|>`` for ``tools``."""
    text = GLM4_TOOL_PREAMBLE
    for tool in tools:
        function = function_of(tool)
        text += f"\n\n## {function['name']}\n\n{json.dumps(function, indent=4, ensure_ascii=False)}"
        text += GLM4_TOOL_FOOTER
    return text


def tool_call_message(tool_format: str, name: str, arguments: Mapping[str, Any] | str) -> dict[str, Any]:
    """An assistant turn that called ``name``, as the model itself wrote it (for the history)."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments or "{}")
    if tool_format == "glm4":
        return {"role": "assistant", "metadata": name,
                "content": json.dumps(arguments, ensure_ascii=False)}
    if tool_format == "chatglm3":
        args = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
        return {"role": "assistant", "metadata": name, "content": f"```python\ntool_call({args})\n```"}
    raise ValueError(f"tool_format must be one of {TOOL_FORMATS}, got {tool_format!r}")


def observation_message(result: Any) -> dict[str, Any]:
    """A tool's result, returned to the model under ``<|observation|>``."""
    content = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
    return {"role": "observation", "content": content}


def from_openai_messages(tool_format: str, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages as this family's message dicts: an assistant message's ``tool_calls``
    become calls in the family's format, a ``tool`` message an observation."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "tool":
            out.append(observation_message(m.get("content") or ""))
        elif role == "assistant" and m.get("tool_calls"):
            if m.get("content"):
                out.append({"role": "assistant", "content": m["content"]})
            for call in m["tool_calls"]:
                out.append(tool_call_message(tool_format, call["function"]["name"],
                                             call["function"].get("arguments") or "{}"))
        elif role in ("system", "developer"):
            out.append({"role": "system", "content": m.get("content") or ""})
        elif role in ("user", "assistant"):
            out.append({"role": role, "content": m.get("content") or ""})
        else:
            raise ValueError(f"message role {role!r} is not one of system, user, assistant, tool")
    return out


# -- parsing a reply -------------------------------------------------------------------------------
def openai_tool_call(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """``{"id", "type": "function", "function": {"name", "arguments": JSON string}}``."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_chatglm3_call(reply: str, tools: Optional[Sequence[Mapping[str, Any]]] = None
                        ) -> Optional[list[dict[str, Any]]]:
    """``name\\n```python\\ntool_call(a=1)\\n``` `` → one OpenAI tool call; None for a plain answer
    (empty first line, an unknown name, or arguments that are not ``tool_call(key=literal, ...)``).

    THUDM's demo ``eval``s the block; here only literal keyword arguments are accepted."""
    name, sep, body = reply.partition("\n")
    name = name.strip()
    if not sep or not name or " " in name:
        return None
    names = tool_names(tools)
    if names is not None and name not in names:
        return None
    lines = body.strip().split("\n")
    if len(lines) >= 2 and lines[0].startswith("```") and lines[-1].strip() == "```":
        lines = lines[1:-1]
    try:
        call = ast.parse("\n".join(lines).strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                and call.func.id == "tool_call" and not call.args
                and all(k.arg is not None for k in call.keywords)):
            return None
        arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError):
        return None
    return [openai_tool_call(name, arguments)]


def parse_glm4_call(reply: str, tools: Optional[Sequence[Mapping[str, Any]]] = None
                    ) -> Optional[list[dict[str, Any]]]:
    """``name\\n{"json": "arguments"}`` → one OpenAI tool call; None for a plain answer (second
    line not a JSON object, an unknown name, or JSON that does not parse), as GLM-4's demo decides."""
    lines = reply.strip().split("\n")
    if len(lines) < 2 or not lines[1].lstrip().startswith("{"):
        return None
    name = lines[0].strip()
    names = tool_names(tools)
    if not name or (names is not None and name not in names):
        return None
    try:
        arguments = json.loads("\n".join(lines[1:]).strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(arguments, dict):
        return None
    return [openai_tool_call(name, arguments)]


def parse_tool_calls(tool_format: Optional[str], reply: str,
                     tools: Optional[Sequence[Mapping[str, Any]]] = None) -> Optional[list[dict[str, Any]]]:
    """The OpenAI ``tool_calls`` in ``reply`` (the decoded answer), or None when it is plain text.

    ``tool_format``: a :class:`~builder.model.family.Family`'s ``tool_format``; ``tools``: the
    request's tools (a call to a name not among them is plain text)."""
    if tool_format == "glm4":
        return parse_glm4_call(reply, tools)
    if tool_format == "chatglm3":
        return parse_chatglm3_call(reply, tools)
    if tool_format is None:
        return None
    raise ValueError(f"tool_format must be one of {TOOL_FORMATS} or None, got {tool_format!r}")
