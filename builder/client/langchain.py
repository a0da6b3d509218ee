"""LangChain integration over the ``chatglm2-6b`` router, on ``langchain-core``.

- :class:`ChatGLMTriton`: a chat model (``prompt | model | parser`` chains, ``.stream()``).
  System messages are prepended to the first question; earlier human/AI turns become ChatGLM2's
  history pairs.
- :class:`ChatGLM`: the LLM of the usual hand-made integration, whose ``chat(query, history)``
  returns ``(response, history)``.

>>> from langchain_core.output_parsers import StrOutputParser
>>> chain = prompt | ChatGLMTriton(url="localhost:8001") | StrOutputParser()
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import LLM, BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import BaseModel, PrivateAttr

from .chat import ChatGLMClient


def _cut_at_stop(text: str, stop: Optional[List[str]]) -> str:
    for token in stop or ():
        index = text.find(token)
        if index != -1:
            text = text[:index]
    return text


def messages_to_turn(messages: Sequence[BaseMessage]) -> tuple[str, list[tuple[str, str]]]:
    """The last human message as the query, earlier human/AI pairs as history."""
    system = "\n".join(m.content for m in messages if isinstance(m, SystemMessage))
    turns = [m for m in messages if not isinstance(m, SystemMessage)]
    if not turns or not isinstance(turns[-1], HumanMessage):
        raise ValueError("the last message must be a human message (the question)")
    history, pending = [], None
    for message in turns[:-1]:
        if isinstance(message, HumanMessage):
            pending = message.content
        elif isinstance(message, AIMessage) and pending is not None:
            history.append((pending, message.content))
            pending = None
    query = turns[-1].content
    if system:
        if history:
            history[0] = (f"{system}\n{history[0][0]}", history[0][1])
        else:
            query = f"{system}\n{query}"
    return query, history


class TritonConnection(BaseModel):
    """Where the router is and how to call it; shared by both LangChain classes."""

    url: str = "localhost:8001"  # the gRPC endpoint, spelled as tritonclient spells it
    protocol: str = "grpc"
    temperature: float = 0.01
    max_token: int = 32000  # total tokens, prompt included (the usual integration's default)
    history_len: int = 10
    timeout_s: float = 120.0
    _client: Any = PrivateAttr(default=None)

    def client(self) -> ChatGLMClient:
        if self._client is None:
            self._client = ChatGLMClient(self.url, self.protocol, self.temperature, self.max_token,
                                         self.history_len, timeout_s=self.timeout_s)
        return self._client


class ChatGLMTriton(TritonConnection, BaseChatModel):
    """ChatGLM2 served by Triton, as a LangChain chat model (streams through chatglm2-6b-stream)."""

    @property
    def _llm_type(self) -> str:
        return "chatglm2-triton"

    @property
    def _identifying_params(self) -> dict:
        return {"url": self.url, "protocol": self.protocol, "temperature": self.temperature,
                "max_token": self.max_token}


    def _generate(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        query, history = messages_to_turn(messages)
        result = self.client().chat(query, history)
        message = AIMessage(content=_cut_at_stop(result.response, stop),
                            response_metadata={"variant": result.variant, "latency_s": result.latency_s})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any
                ) -> Iterator[ChatGenerationChunk]:
        query, history = messages_to_turn(messages)
        sent = ""
        for partial in self.client().stream(query, history):
            text = _cut_at_stop(partial.response, stop)
            if not text.startswith(sent):  # the text so far was revised (stripped): resend nothing
                continue
            delta, sent = text[len(sent):], text
            if delta:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                if run_manager:
                    run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk


class ChatGLM(TritonConnection, LLM):
    """The LLM of the usual hand-made integration: ``llm.chat(query, history) -> (response, history)``."""

    @property
    def _llm_type(self) -> str:
        return "ChatGLM2-6B"

    @property
    def _identifying_params(self) -> dict:
        return {"url": self.url}


    def _call(self, prompt: str, stop: Optional[List[str]] = None,
              run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> str:
        return _cut_at_stop(self.client().chat(prompt, kwargs.get("history", ())).response, stop)

    def chat(self, query: str, history: Sequence[Sequence[str]] = (), stop: Optional[List[str]] = None
             ) -> tuple[str, list]:
        result = self.client().chat(query, history)
        return _cut_at_stop(result.response, stop), [list(pair) for pair in result.history]
