"""The OpenAI chat-completions API's request and response shapes, as pydantic models.

Only what ChatGLM2's serving contract can honour is accepted; a request that asks for more (tools,
``n`` > 1, ``top_p`` below 1, penalties, log-probabilities, JSON mode) is refused with a 400 that
names the field, as OpenAI itself refuses an unknown one. Hints the OpenAI docs call optional
(:data:`IGNORED_HINTS`) are accepted and ignored.

>>> ChatCompletionRequest.model_validate({"model": "chatglm2-6b",
...                                       "messages": [{"role": "user", "content": "你好"}]})
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Fields the OpenAI docs describe as best-effort hints or bookkeeping for OpenAI's own platform:
# accepted and ignored (listed in the README).
IGNORED_HINTS = ("seed", "user", "metadata", "store", "service_tier", "parallel_tool_calls",
                 "prompt_cache_key", "safety_identifier")
MAX_STOP_SEQUENCES = 4  # as OpenAI


class Unsupported(ValueError):
    """A field ChatGLM2 cannot honour; ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name` and other per-message annotations
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    @property
    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI joins them)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


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
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
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
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise Unsupported(name, f"{name}: ChatGLM2-6B has no tool calling")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise Unsupported("tool_choice" if self.tool_choice not in (None, "none") else "function_call",
                              "ChatGLM2-6B has no tool calling")
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "stream_options is only allowed when stream is true")
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise Unsupported("max_completion_tokens", "max_tokens and max_completion_tokens differ")
        return self

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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str  # which variant served it: "glm-<precision>"
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[Literal["stop", "length"]] = None
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
