"""A chat client for the ``chatglm2-6b`` router (or any router or variant) over gRPC (default) or HTTP.

>>> client = ChatGLMClient("localhost:8001")
>>> result = client.chat("3只鸡和2只兔子一共有几条腿？")
>>> result.response, result.variant, result.latency_s
"""
from __future__ import annotations

import itertools
import queue
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

ROUTER = "chatglm2-6b"
STREAM_ROUTER = "chatglm2-6b-stream"
OUTPUTS = ("response", "history", "variant")


class ChatError(RuntimeError):
    """The server answered with an error (the message is the server's)."""


@dataclass(frozen=True)
class ChatResult:
    response: str
    history: list = field(default_factory=list)  # [(query, response), ...] after this turn
    variant: str = ""  # which precision served it
    latency_s: float = 0.0


def _client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return module


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=object)


def contract_inputs(prompt: str, history: Sequence[Sequence[str]] = (), *, temperature: float,
                    max_token: int, history_len: int, stream: bool | None = None,
                    protocol: str = "grpc") -> list:
    """The contract's input tensors for one request, as tritonclient's ``InferInput`` of ``protocol``.
    ``stream``: variants only (the routers set it themselves); None leaves the input out.

    >>> client.async_stream_infer("chatglm2-6b-int4", contract_inputs("你好", temperature=0,
    ...                           max_token=64, history_len=0, stream=True))
    """
    module = _client_module(protocol)
    flat = [text for pair in history for text in pair]
    values = {"prompt": [prompt], "history": flat, "temperature": [str(temperature)],
              "max_token": [str(max_token)], "history_len": [str(history_len)]}
    if stream is not None:
        values["stream"] = ["1" if stream else "0"]
    out = []
    for name, items in values.items():
        tensor = module.InferInput(name, [len(items)], "BYTES")
        tensor.set_data_from_numpy(_strings(items).reshape(len(items)))
        out.append(tensor)
    return out


@dataclass
class ChatGLMClient:
    """A chat client; ``url`` is "host:port" as tritonclient spells it (8001 gRPC, 8000 HTTP)."""

    url: str = "localhost:8001"
    protocol: str = "grpc"
    temperature: float = 0.01
    max_token: int = 16000  # total tokens, prompt included (the usual client's default)
    history_len: int = 10
    model: str = ROUTER
    timeout_s: float = 120.0

    def __post_init__(self):
        self._module = _client_module(self.protocol)
        self._client = self._module.InferenceServerClient(url=self.url)
        self._decoupled: dict[str, bool] = {}
        self._stream: queue.Queue | None = None  # the open gRPC stream's (result, error) pairs
        self._request_ids = itertools.count()

    def is_decoupled(self, model: str) -> bool:
        """Whether ``model`` streams (the variants and chatglm2-6b-stream do); asked once per model."""
        if model not in self._decoupled:
            try:
                config = self._client.get_model_config(model)
            except Exception as err:
                raise ChatError(str(err)) from err
            config = config.get("config", config) if isinstance(config, dict) else config.config
            policy = (config.get("model_transaction_policy", {}) if isinstance(config, dict)
                      else {"decoupled": config.model_transaction_policy.decoupled})
            self._decoupled[model] = bool(policy.get("decoupled", False))
        return self._decoupled[model]

    def inputs(self, prompt: str, history: Sequence[Sequence[str]] = (), *,
               stream: bool | None = None) -> list:
        return contract_inputs(prompt, history, temperature=self.temperature, max_token=self.max_token,
                               history_len=self.history_len, stream=stream, protocol=self.protocol)

    @staticmethod
    def _result(result, started: float) -> ChatResult:
        response = result.as_numpy("response").reshape(-1)[0].decode("utf-8")
        history = [(q.decode(), a.decode()) for q, a in result.as_numpy("history").reshape(-1, 2)]
        variant = result.as_numpy("variant").reshape(-1)[0].decode("utf-8")
        return ChatResult(response, history, variant, time.perf_counter() - started)

    def chat(self, prompt: str, history: Sequence[Sequence[str]] = (), *, model: str | None = None
             ) -> ChatResult:
        """One request to the router (or ``model``), one answer."""
        model = model or self.model
        if model != ROUTER and self.protocol == "grpc" and self.is_decoupled(model):
            result = None
            for result in self.stream(prompt, history, model=model, partial=False):
                pass
            if result is None:
                raise ChatError(f"{model} sent no answer")
            return result
        started = time.perf_counter()
        outputs = [self._module.InferRequestedOutput(name) for name in OUTPUTS]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self._client.infer(model, self.inputs(prompt, history),
                                        outputs=outputs, **kwargs)
        except Exception as err:  # tritonclient raises InferenceServerException for server errors
            raise ChatError(str(err)) from err
        return self._result(result, started)

    def stream(self, prompt: str, history: Sequence[Sequence[str]] = (), *,
               model: str = STREAM_ROUTER, partial: bool = True) -> Iterator[ChatResult]:
        """Partial answers as they arrive (gRPC only), each the text so far; with ``partial``
        False, a variant sends only its final answer.

        The client keeps one gRPC stream open across its requests (opening one per request costs
        more than a small model's answer); a request left before its last answer, or failed,
        closes it with the request cancelled, so the server frees its place in the batch.
        """
        if self.protocol != "grpc":
            raise ValueError("streaming needs protocol 'grpc' (Triton streams decoupled models over gRPC)")
        results = self._open_stream()
        request_id = str(next(self._request_ids))
        started = time.perf_counter()
        finished = False
        try:
            stream = None if model == STREAM_ROUTER else partial
            self._client.async_stream_infer(model, self.inputs(prompt, history, stream=stream),
                                            request_id=request_id, enable_empty_final_response=True)
            while True:
                result, error = results.get(timeout=self.timeout_s)
                if error is not None:
                    raise ChatError(str(error))
                response = result.get_response()
                if response.id != request_id:  # a late piece of an earlier request
                    continue
                final = response.parameters["triton_final_response"].bool_param
                if result.as_numpy("response") is not None:
                    yield self._result(result, started)
                if final:
                    finished = True
                    return
        finally:
            if not finished:
                self._close_stream()

    def _open_stream(self) -> queue.Queue:
        if self._stream is None:
            results: queue.Queue = queue.Queue()
            self._client.start_stream(callback=lambda result, error: results.put((result, error)))
            self._stream = results
        return self._stream

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream = None
            self._client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        self._close_stream()
        self._client.close()
