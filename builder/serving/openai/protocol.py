"""The OpenAI chat-completions API's request and response shapes, as pydantic models.

Only what the serving contract can honour is accepted; a request that asks for more (``n`` > 1,
``top_p`` below 1, penalties, log-probabilities, JSON mode, a forced tool call) is refused with a
400 that names the field, as OpenAI itself refuses an unknown one. ``tools`` are checked here and
accepted for the families that call tools (ChatGLM3, GLM-4; :mod:`.conversation` refuses them for
ChatGLM2). Hints the OpenAI docs call optional (:data:`IGNORED_HINTS`) are accepted and ignored.

>>> ChatCompletionRequest.model_validate({"model": "chatglm2-6b",
...                                       "messages": [{"role": "user", "content": "你好"}]})
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

# Fields the OpenAI docs describe as best-effort hints or bookkeeping for OpenAI's own platform:
# accepted and ignored (listed in the README).
IGNORED_HINTS = ("seed", "user", "metadata", "store", "service_tier", "parallel_tool_calls",
                 "prompt_cache_key", "safety_identifier")
MAX_STOP_SEQUENCES = 4  # as OpenAI


class Unsupported(ValueError):
    """A field the serving contract cannot honour (or, with ``code="invalid_value"``, a value that
    contradicts another field); ``param`` names it."""

    def __init__(self, param: str, message: str, code: str = "unsupported_parameter"):
        super().__init__(message)
        self.param = param
        self.code = code


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # a JSON object, as text

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"arguments must be a JSON object as a string: {err}") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object as a string")
        return value


class ToolCall(BaseModel):
    """One call, in a request's assistant message and in a response's message."""

    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name` and other per-message annotations
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's calls
    tool_call_id: Optional[str] = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _shape(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role!r} ones")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant message "
                             "with tool_calls)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    @property
    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI joins them)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # as OpenAI
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # JSON Schema
    strict: Optional[bool] = None  # accepted; nothing constrains decoding here


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition

    def for_prompt(self) -> dict[str, Any]:
        """What the model is shown: ``{"type": "function", "function": {name, description?,
        parameters?}}`` (THUDM's demos show name, description and parameters)."""
        return {"type": "function",
                "function": self.function.model_dump(exclude_none=True, exclude={"strict"})}


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 that names it

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)  # new tokens (the router's max_token is the total)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)  # the newer name of max_tokens
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[int] = 1
    frequency_penalty: Optional[float] = 0
    presence_penalty: Optional[float] = 0
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    # optional hints, ignored
    seed: Optional[int] = None
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    parallel_tool_calls: Optional[bool] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} non-empty stop sequences")
        return value

    @model_validator(mode="after")
    def _honourable(self):
        if self.n not in (None, 1):
            raise Unsupported("n", f"n = {self.n}: ChatGLM2's serving contract returns one choice; use n = 1")
        if self.top_p not in (None, 1):
            raise Unsupported("top_p", f"top_p = {self.top_p}: the serving contract samples with "
                              "temperature alone; leave top_p unset or 1")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise Unsupported(name, f"{name} is not supported by ChatGLM2's serving contract; leave it 0")
        if self.logprobs or self.top_logprobs:
            raise Unsupported("logprobs" if self.logprobs else "top_logprobs",
                              "log-probabilities are not returned by ChatGLM2's serving contract")
        if self.logit_bias:
            raise Unsupported("logit_bias", "logit_bias is not supported by ChatGLM2's serving contract")
        if self.response_format and self.response_format.get("type") != "text":
            raise Unsupported("response_format", "only response_format {\"type\": \"text\"} is supported")
        if self.functions or self.function_call not in (None, "none"):
            raise Unsupported("functions" if self.functions else "function_call",
                              "functions / function_call are deprecated: send tools (and tool_choice)")
        self._check_tools()
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "stream_options is only allowed when stream is true")
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise Unsupported("max_completion_tokens", "max_tokens and max_completion_tokens differ")
        return self

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise Unsupported("tools", f"tools: each function name must be given once, got {names}",
                              "invalid_value")
        choice = self.tool_choice
        if choice in (None, "none"):
            return
        if not names:
            raise Unsupported("tool_choice", "tool_choice is only allowed when tools are specified",
                              "invalid_value")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise Unsupported("tool_choice", f"tool_choice names {choice.function.name!r}, which is "
                              f"not among the tools {names}", "invalid_value")
        if choice != "auto":
            raise Unsupported("tool_choice", "tool_choice 'required' or a named function would force "
                              "a call, and nothing here constrains what the model writes: use "
                              "'auto' (the model decides) or 'none'")

    @property
    def prompt_tools(self) -> Optional[list[dict[str, Any]]]:
        """The tools the model is shown: None without tools or with tool_choice 'none'."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.for_prompt() for t in self.tools]

    @property
    def new_tokens(self) -> Optional[int]:
        """The most tokens the answer may have, None when the request does not say."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# -- responses ---------------------------------------------------------------------------------

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _without_none(handler, model, keys: tuple[str, ...]) -> dict[str, Any]:
    data = handler(model)
    return {k: v for k, v in data.items() if not (k in keys and v is None)}


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]  # null when the answer is tool_calls
    refusal: None = None
    tool_calls: Optional[list[ToolCall]] = None  # left out when there are none, as OpenAI

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return _without_none(handler, self, ("tool_calls",))


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str  # which variant served it: "glm-<precision>"
    choices: list[Choice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return _without_none(handler, self, ("name", "arguments"))


class ToolCallDelta(BaseModel):
    """A streamed piece of call ``index``: its id, type and name first, then its arguments."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: FunctionDelta

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return _without_none(handler, self, ("id", "type"))


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None  # left out when there are none

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return _without_none(handler, self, ("tool_calls",))


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[FinishReason] = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    precision: str  # "router" for chatglm2-6b, else fp16 / int8 / int4
    max_tokens: int  # the longest request (prompt + answer) it serves


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    error: ErrorDetail
