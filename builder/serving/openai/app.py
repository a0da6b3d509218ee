"""The OpenAI-compatible routes: ``GET /v1/models`` and ``POST /v1/chat/completions``.

A protocol layer only: each request is checked, mapped onto the serving contract (prompt, history,
or for ChatGLM3 / GLM-4 the whole conversation as the ``messages`` input; temperature,
``max_token`` = prompt tokens + ``max_tokens``) and forwarded to Triton
(:class:`~.triton.TritonBackend`); routing, fallback, batching, metrics and cancellation stay there.
With ``tools``, a reply in the family's call format comes back as OpenAI ``tool_calls``
(:mod:`.tool_calls`). Errors carry OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.

>>> app = create_app(GatewayConfig(repository=Path("generated_repo"), grpc_url="127.0.0.1:8001"))
"""
from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ...model.tools import parse_tool_calls
from ..request import messages_input
from .conversation import ConversationError, map_chat
from .protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                       Choice, ChunkChoice, Delta, ErrorBody, ErrorDetail, ModelCard, ModelList,
                       Unsupported, Usage, completion_id, now)
from .tool_calls import call_deltas, call_state, tool_names
from .triton import Piece, ServedModel, TritonBackend, TritonUnavailable

MAX_BODY_BYTES = 4 * 2**20  # a longer request body is refused (413) before it is parsed
VARIANT_HEADER = "x-glm-variant"  # which precision served the answer
OWNER = "THUDM"  # ChatGLM2-6B's authors; the weights' owner
_CONTEXT_MARKERS = ("more than any variant serves", "leaves no room to answer")
_BUSY_MARKERS = ("no variant could take the request now", "not ready", "unavailable",
                 "is not found", "unknown model", "not healthy")


@dataclass(frozen=True)
class GatewayConfig:
    repository: Path  # the model repository Triton serves (the router's tokenizer is in it)
    grpc_url: str  # Triton's gRPC endpoint, "127.0.0.1:8001"
    api_key: Optional[str] = None  # None: no key asked for


class APIError(Exception):
    """An OpenAI error response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=ErrorDetail(message=message, type=type_, param=param, code=code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status)


def triton_error(message: str, max_tokens_given: bool) -> APIError:
    """The OpenAI error for Triton's refusal ``message`` (the router's reason, word for word)."""
    text = message.lower()
    if any(marker in text for marker in _CONTEXT_MARKERS):
        return APIError(400, message, param="max_tokens" if max_tokens_given else "messages",
                        code="context_length_exceeded")
    if any(marker in text for marker in _BUSY_MARKERS):
        return APIError(503, message, "server_error", code="service_unavailable")
    if "input '" in text:  # the contract's own check of an input
        return APIError(400, message, code="invalid_value")
    return APIError(500, message, "server_error")


def validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, Unsupported):
        return APIError(400, str(cause), param=cause.param, code=cause.code)
    loc = [str(part) for part in first["loc"] if not str(part).startswith(("function-", "tagged-"))]
    param = ".".join(loc) or None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    if first["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    return APIError(400, f"Invalid value for '{param}': {first['msg']}", param=param,
                    code="invalid_value")


class _DisconnectAwareStream(StreamingResponse):
    """Server-sent events that stop (and close their generator, cancelling the Triton request) the
    moment the client disconnects, not at the next chunk."""

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, watcher):
                pending.cancel()
            await asyncio.gather(task, watcher, return_exceptions=True)
            await self.body_iterator.aclose()


async def _until_disconnect(request: Request, work):
    """Await ``work``; cancel it (and raise CancelledError) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise asyncio.CancelledError("the client disconnected")
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()


def _sse(payload) -> str:
    return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"


def create_app(config: GatewayConfig) -> FastAPI:
    """The FastAPI application of the gateway (served by :class:`~.gateway.OpenAIGateway`)."""
    app = FastAPI(title="glm-serve OpenAI-compatible API", docs_url=None, redoc_url=None,
                  openapi_url=None)
    backend = TritonBackend(config.repository, config.grpc_url)
    app.state.backend = backend

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(),
                                                                    config.api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Send 'Authorization: Bearer <key>' "
                           "with the key glm-serve was started with.", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, err):
        return APIError(404, f"Unknown request URL: {request.method} {request.url.path}",
                        code="unknown_url").response()

    @app.exception_handler(405)
    async def _not_allowed(request: Request, err):
        return APIError(405, f"Method {request.method} not allowed on {request.url.path}",
                        code="method_not_allowed").response()

    async def catalog() -> dict[str, ServedModel]:
        try:
            return await backend.models()
        except TritonUnavailable as err:
            raise APIError(503, f"not ready: {err}", "server_error", code="service_unavailable") from None

    @app.get("/health/ready")
    async def health_ready():
        """200 once the router takes requests (Kubernetes' readiness probe); no key needed."""
        if await backend.ready():
            return Response(status_code=200)
        return Response(status_code=503)

    @app.get("/v1/models")
    async def list_models(request: Request) -> ModelList:
        authorize(request)
        created = now()
        return ModelList(data=[ModelCard(id=m.name, created=created, owned_by=OWNER,
                                         precision=m.precision, max_tokens=m.max_tokens)
                               for m in (await catalog()).values()])

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request) -> ModelCard:
        authorize(request)
        models = await catalog()
        if name not in models:
            raise APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        m = models[name]
        return ModelCard(id=m.name, created=now(), owned_by=OWNER, precision=m.precision,
                         max_tokens=m.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {len(body)} bytes is over the {MAX_BODY_BYTES} "
                           "bytes this endpoint accepts", code="request_too_large")
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"We could not parse the JSON body of your request: {err}",
                           code="invalid_json") from None
        if not isinstance(raw, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            chat = ChatCompletionRequest.model_validate(raw)
        except ValidationError as err:
            raise validation_error(err) from None
        models = await catalog()
        model = models.get(chat.model)
        if model is None:
            raise APIError(404, f"The model `{chat.model}` does not exist; served: "
                           f"{', '.join(models)}", param="model", code="model_not_found")
        try:
            conversation = map_chat(chat, backend.family)
        except ConversationError as err:
            raise APIError(400, str(err), param=err.param, code=err.code) from None
        tokenizer = backend.tokenizer
        prompt_tokens = len(conversation.prompt_ids(tokenizer))
        max_token = (prompt_tokens + chat.new_tokens) if chat.new_tokens else model.max_tokens
        temperature = 1.0 if chat.temperature is None else chat.temperature  # OpenAI's default
        messages = (None if conversation.messages is None else
                    messages_input(conversation.messages, conversation.tools))
        answer = Answer(chat, model, tokenizer, prompt_tokens, max_token,
                        backend.generate(model, conversation.prompt, conversation.history,
                                         temperature, max_token, messages=messages),
                        tool_format=backend.family.tool_format, tools=conversation.tools)
        first = await _until_disconnect(request, answer.first())
        headers = {VARIANT_HEADER: first.variant}
        if chat.stream:
            return _DisconnectAwareStream(answer.events(first), media_type="text/event-stream",
                                          headers=headers | {"cache-control": "no-cache"})
        completion = await _until_disconnect(request, answer.whole(first))
        return JSONResponse(completion.model_dump(), headers={VARIANT_HEADER: completion_variant(completion)})

    return app


def completion_variant(completion: ChatCompletion) -> str:
    return completion.system_fingerprint.removeprefix("glm-")


class Answer:
    """One chat's answer as it streams from Triton, as OpenAI chunks or one completion.

    Stop sequences are applied here: the text is cut before the first one, and the Triton request
    is cancelled (as for a client that left). With ``tools`` (the ones the model was shown), a
    reply in ``tool_format`` is returned as ``tool_calls``; streamed, the reply is held back while
    it may still be a call (:func:`~.tool_calls.call_state`).
    """

    def __init__(self, chat: ChatCompletionRequest, model: ServedModel, tokenizer, prompt_tokens: int,
                 max_token: int, pieces: AsyncIterator[Piece], *, tool_format: Optional[str] = None,
                 tools=None):
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.prompt_tokens, self.max_token = prompt_tokens, max_token
        self.pieces = pieces
        self.tool_format = tool_format if tools else None
        self.tools = list(tools or [])
        self.id, self.created = completion_id(), now()
        self.text = ""  # the answer so far, stop sequences cut
        self.variant = ""
        self.stopped = False  # a stop sequence ended it
        self.calls: Optional[list[dict]] = None  # the reply's tool calls, once parsed

    async def next(self) -> Optional[Piece]:
        """The next piece, None at the end; raises :class:`APIError` for Triton's refusal."""
        try:
            return await self.pieces.__anext__()
        except StopAsyncIteration:
            return None
        except TritonUnavailable as err:
            raise APIError(503, str(err), "server_error", code="service_unavailable") from None
        except RuntimeError as err:
            raise triton_error(str(err), self.chat.new_tokens is not None) from None

    async def first(self) -> Piece:
        piece = await self.next()
        if piece is None:
            raise APIError(500, "Triton sent no answer", "server_error")
        self.variant = piece.variant or self.variant
        return piece

    def visible(self, text: str, final: bool) -> str:
        """What of ``text`` (the answer so far) may be shown: up to a stop sequence; while the
        answer goes on, short of a tail that could still become one."""
        stops = self.chat.stops
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            self.stopped = True
            return text[:min(hits)]
        if final or not stops:
            return text
        hold = max(len(s) for s in stops) - 1
        return text[:max(len(text) - hold, len(self.text))]

    async def deltas(self, first: Piece) -> AsyncIterator[str]:
        """The new text of each piece, ending at the final one (or a stop sequence)."""
        piece = first
        try:
            while piece is not None:
                self.variant = piece.variant or self.variant
                shown = self.visible(piece.text, piece.final)
                if shown.startswith(self.text) and len(shown) > len(self.text):
                    delta, self.text = shown[len(self.text):], shown
                    yield delta
                if self.stopped or piece.final:
                    return
                piece = await self.next()
        finally:
            await self.pieces.aclose()  # cancels the Triton request if it is still going

    def usage(self) -> Usage:
        completion = len(self.tokenizer.encode(self.text)) if self.text else 0
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)

    def finish_reason(self, usage: Usage) -> str:
        if self.calls:
            return "tool_calls"
        if self.stopped:
            return "stop"
        return "length" if self.prompt_tokens + usage.completion_tokens >= self.max_token else "stop"

    def parse_calls(self) -> Optional[list[dict]]:
        """The whole reply's calls in OpenAI's shape (kept in ``calls``), or None: plain text, or
        no tools."""
        if self.tool_format is not None:
            self.calls = parse_tool_calls(self.tool_format, self.text, self.tools)
        return self.calls

    @property
    def fingerprint(self) -> str:
        return f"glm-{self.variant}"

    async def whole(self, first: Piece) -> ChatCompletion:
        async for _ in self.deltas(first):
            pass
        usage = self.usage()
        if self.parse_calls():
            choice = Choice(message=AssistantMessage(content=None, tool_calls=self.calls),
                            finish_reason="tool_calls")
        else:
            choice = Choice(message=AssistantMessage(content=self.text),
                            finish_reason=self.finish_reason(usage))
        return ChatCompletion(id=self.id, created=self.created, model=self.chat.model,
                              system_fingerprint=self.fingerprint, usage=usage, choices=[choice])

    def chunk(self, delta: Delta, finish_reason=None, usage=None, choices=True) -> str:
        return _sse(ChatCompletionChunk(
            id=self.id, created=self.created, model=self.chat.model, system_fingerprint=self.fingerprint,
            choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)] if choices else [],
            usage=usage))

    async def events(self, first: Piece) -> AsyncIterator[str]:
        """Server-sent events: the role, the content deltas (or the tool calls), the finish
        reason, (usage), [DONE]."""
        try:
            if self.tool_format is None:
                yield self.chunk(Delta(role="assistant", content=""))
                async for delta in self.deltas(first):
                    yield self.chunk(Delta(content=delta))
            else:
                async for event in self._tool_events(first):
                    yield event
        except APIError as err:  # after the headers: OpenAI's error as an event, then the end
            yield f"data: {err.body.model_dump_json()}\n\n"
            return
        usage = self.usage()
        yield self.chunk(Delta(), finish_reason=self.finish_reason(usage))
        if self.chat.stream_options is not None and self.chat.stream_options.include_usage:
            yield self.chunk(Delta(), usage=usage, choices=False)
        yield "data: [DONE]\n\n"

    async def _tool_events(self, first: Piece):
        """The chunks of a reply that may be a call: nothing while it may still be one; text
        from the moment it cannot be; at the end, the calls or the text held back."""
        names = tool_names(self.tools)
        plain = False
        async for delta in self.deltas(first):
            if plain:
                yield self.chunk(Delta(content=delta))
            elif call_state(self.tool_format, self.text, names) == "plain":
                plain = True
                yield self.chunk(Delta(role="assistant", content=""))
                yield self.chunk(Delta(content=self.text))
        if plain:
            return
        if self.parse_calls():
            first_delta, *rest = call_deltas(self.calls)
            yield self.chunk(Delta(role="assistant", content=None, tool_calls=first_delta))
            for tool_calls in rest:
                yield self.chunk(Delta(tool_calls=tool_calls))
            return
        yield self.chunk(Delta(role="assistant", content=""))
        if self.text:
            yield self.chunk(Delta(content=self.text))
