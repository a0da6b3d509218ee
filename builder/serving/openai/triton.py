"""The gateway's side of Triton: what the router serves, and one chat streamed over gRPC.

Everything goes through Triton's gRPC endpoint, asynchronously (tritonclient's asyncio client for
readiness and model configs, its protobuf stubs on a ``grpc.aio`` channel for the stream), so one
event loop carries any number of requests. A request is always streamed from a decoupled model
(the router's streaming twin, ``chatglm2-6b-stream`` or ``glm-4-9b-chat-stream``, or a variant asked
with ``stream`` = "1"), non-streamed OpenAI requests included: cancelling the gRPC call is how a client that went away frees its request
(the router then cancels it at the variant, :mod:`builder.serving.cancel`).

>>> backend = TritonBackend(Path("generated_repo"), "127.0.0.1:8001")
>>> async for piece in backend.generate("chatglm2-6b-stream", "你好", (), 0.0, 64): ...
"""
from __future__ import annotations

import asyncio
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Optional, Sequence

import grpc

ROUTER = "chatglm2-6b"  # the name clients know (THUDM's seed deployment), when the repository says none
STREAM_SUFFIX = "-stream"  # the router's streaming twin: what the gateway forwards its requests to
DEFAULT_FAMILY = "chatglm2-6b"  # a router built before families were recorded
FINAL_PARAMETER = "triton_final_response"
_MAX_MESSAGE = 64 * 2**20  # bytes: a long history is a big request


class TritonUnavailable(RuntimeError):
    """Triton, or the model asked for, cannot take requests now (not started, loading, gone)."""


_ROUTING_PARAMETER = re.compile(r'key:\s*"routing"')


def find_router(repository: Path) -> str:
    """The router's name in ``repository``: the model folder whose streaming twin
    (``NAME-stream``) is a router (its config.pbtxt has the ``routing`` parameter); the repository
    is named after the model (``glm-4-9b-chat``), so this is read from the folder, not assumed.
    :data:`ROUTER` when no folder says (a repository that cannot be read here yet).

    >>> find_router(Path("generated_repo"))
    'glm-4-9b-chat'
    """
    found = []
    for config in sorted(Path(repository).glob(f"*{STREAM_SUFFIX}/config.pbtxt")):
        name = config.parent.name.removesuffix(STREAM_SUFFIX)
        try:
            text = config.read_text(encoding="utf-8")
        except OSError:
            continue
        if _ROUTING_PARAMETER.search(text) and (Path(repository) / name / "config.pbtxt").is_file():
            found.append(name)
    if len(found) > 1:
        raise TritonUnavailable(f"{repository} holds several routers {found}; the gateway serves one")
    return found[0] if found else ROUTER


def family_of(config: dict) -> str:
    """The ``family`` parameter of a router's model config (JSON), or :data:`DEFAULT_FAMILY`."""
    return (config.get("parameters", {}).get("family", {}).get("string_value")
            or DEFAULT_FAMILY)


@dataclass(frozen=True)
class ServedModel:
    """One name the gateway serves: the router, or a variant by name."""

    name: str
    triton_model: str  # what the gateway sends to
    precision: str  # "router", or fp16 / int8 / int4
    max_tokens: int  # the longest request (prompt + answer) it serves
    direct: bool  # a variant: its inputs carry stream = "1"


@dataclass(frozen=True)
class Piece:
    """One answer from Triton: the answer so far (``text``), who served it, whether it is the last."""

    text: str
    variant: str
    final: bool


def bytes_tensor(values: Sequence[str]) -> bytes:
    """Triton's raw BYTES layout: each element as a little-endian uint32 length, then its bytes."""
    out = bytearray()
    for value in values:
        data = value.encode("utf-8")
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


def stream_request(model: str, inputs: dict[str, list[str]]):
    """A ``ModelInferRequest`` of BYTES inputs asking for the empty final response (the stream's end)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    for name, values in inputs.items():
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, "BYTES"
        tensor.shape.append(len(values))
        request.raw_input_contents.append(bytes_tensor(values))
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


class TritonBackend:
    """Triton as the gateway sees it; create and use inside one event loop."""

    def __init__(self, repository: Path, grpc_url: str):
        self.repository = Path(repository)  # for the router's tokenizer file
        self.grpc_url = grpc_url
        self._client = None  # tritonclient.grpc.aio.InferenceServerClient
        self._channel: Optional[grpc.aio.Channel] = None
        self._stub = None
        self._models: Optional[dict[str, ServedModel]] = None
        self.tokenizer = None  # the router's tokenizer (its family's), once the catalog is read
        self.family = None  # the router's builder.model.family.Family, once the catalog is read
        self._lock = asyncio.Lock()
        self._router: Optional[str] = None

    @property
    def router(self) -> str:
        """The name clients know (``glm-4-9b-chat``), read from the repository."""
        if self._router is None or self._models is None:  # until the catalog is read, look again
            self._router = find_router(self.repository)
        return self._router

    @property
    def stream_router(self) -> str:
        return self.router + STREAM_SUFFIX

    def _connect(self) -> None:
        if self._stub is None:
            import tritonclient.grpc.aio as aioclient
            from tritonclient.grpc import service_pb2_grpc

            self._client = aioclient.InferenceServerClient(self.grpc_url)
            self._channel = grpc.aio.insecure_channel(self.grpc_url, options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.max_receive_message_length", _MAX_MESSAGE)])
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._channel is not None:
            await self._channel.close()
        self._client = self._channel = self._stub = None

    async def ready(self, model: Optional[str] = None) -> bool:
        """Whether Triton is up and ``model`` ready (the gateway's readiness: the streaming router's)."""
        self._connect()
        try:
            return bool(await self._client.is_model_ready(model or self.stream_router))
        except Exception:  # not started yet, or gone: not ready
            return False

    async def models(self) -> dict[str, ServedModel]:
        """The names served (the router, then each variant), read once from the router's config;
        :class:`TritonUnavailable` while the router is not ready."""
        if self._models is not None:
            return self._models
        async with self._lock:
            if self._models is None:
                self._models = await self._read_catalog()
        return self._models

    async def _read_catalog(self) -> dict[str, ServedModel]:
        from ...model.family import get_family
        from ..params import RouterParameters

        router, stream_router = self.router, self.stream_router
        if not await self.ready(stream_router):
            raise TritonUnavailable(f"the router {stream_router} is not ready")
        try:
            config = (await self._client.get_model_config(stream_router, as_json=True))["config"]
        except Exception as err:
            raise TritonUnavailable(f"cannot read {stream_router}'s config: {err}") from None
        params = RouterParameters.from_model_config(config)
        family = get_family(family_of(config))
        # the router's own tokenizer, loaded as the router loads it
        self.tokenizer = family.load_tokenizer((self.repository / stream_router / params.tokenizer).parent)
        self.family = family
        routes = json.loads(params.routing)
        longest = max(route["max_tokens"] for route in routes)
        models = {router: ServedModel(router, stream_router, "router", longest, direct=False)}
        for route in routes:
            models[route["name"]] = ServedModel(route["name"], route["name"], route["precision"],
                                                route["max_tokens"], direct=True)
        return models

    async def generate(self, model: ServedModel, prompt: str, history: Sequence[tuple[str, str]],
                       temperature: float, max_token: int, *, messages: Optional[str] = None
                       ) -> AsyncIterator[Piece]:
        """Stream one chat from ``model``; each :class:`Piece` holds the answer so far.
        ``messages``: the optional ``messages`` input (:func:`~..request.messages_input`), the
        whole conversation for a family with roles; the router then reads it, not prompt + history.

        Raises :class:`TritonUnavailable` when Triton cannot be reached, and ``RuntimeError``
        with Triton's message for a request it refused. Leaving the loop early (``aclose()``, a
        cancelled task) cancels the gRPC call, and with it the request.
        """
        self._connect()
        inputs = {"prompt": [prompt], "history": [text for pair in history for text in pair],
                  "temperature": [repr(float(temperature))], "max_token": [str(max_token)],
                  "history_len": [str(len(history))]}
        if model.direct:
            inputs["stream"] = ["1"]
        if messages is not None:
            inputs["messages"] = [messages]
        request = stream_request(model.triton_model, inputs)
        done = asyncio.Event()

        async def requests():
            yield request
            await done.wait()  # keep our half of the stream open until the answer has ended

        call = self._stub.ModelStreamInfer(requests())
        finished = False
        try:
            from tritonclient.grpc import InferResult

            async for response in call:
                if response.error_message:
                    finished = True
                    raise RuntimeError(response.error_message)
                infer = response.infer_response
                final = infer.parameters[FINAL_PARAMETER].bool_param
                result = InferResult(infer)
                text = result.as_numpy("response")
                if text is not None:
                    variant = result.as_numpy("variant")
                    yield Piece(text.reshape(-1)[0].decode("utf-8"),
                                variant.reshape(-1)[0].decode("utf-8") if variant is not None else "",
                                final)
                if final:
                    finished = True
                    if text is None:
                        yield Piece("", "", True)
                    return
            raise TritonUnavailable(f"{model.triton_model}: the stream ended without an answer")
        except grpc.aio.AioRpcError as err:
            finished = True
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise TritonUnavailable(f"Triton at {self.grpc_url}: {err.details()}") from None
            raise RuntimeError(err.details()) from None
        finally:
            done.set()
            if not finished:
                call.cancel()  # the client went away: the router cancels the request at its variant
