"""Run the OpenAI-compatible gateway (uvicorn) beside a Triton server, in this process.

``glm-serve`` starts it once Triton is up and stops it first on Ctrl-C/SIGTERM (the same
``with`` unwinding that stops Triton). uvicorn runs in a thread with its own event loop; it never
touches signals (only the main thread may), so glm-serve's own handlers stay in charge.

>>> with OpenAIGateway(GatewayOptions(Path("generated_repo"), "127.0.0.1:8001", port=9000)) as gateway:
...     gateway.wait_ready(60)   # once the router is ready
"""
from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..server import ServerStartError

API_KEY_ENV = "GLM_OPENAI_API_KEY"
DEFAULT_PORT = 9000
log = logging.getLogger("glm-build.openai")


@dataclass(frozen=True)
class GatewayOptions:
    """Where the gateway listens and which Triton it forwards to."""

    repository: Path  # the model repository Triton serves (for the router's tokenizer)
    grpc_url: str  # Triton's gRPC endpoint as a client reaches it, "127.0.0.1:8001"
    port: int = DEFAULT_PORT
    address: str = "0.0.0.0"  # glm-serve passes its --address
    api_key: Optional[str] = None  # None: GLM_OPENAI_API_KEY from the environment, if set

    def __post_init__(self):
        object.__setattr__(self, "repository", Path(self.repository))
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"openai port={self.port!r}: must be a port number in 1..65535 (0 turns it off)")
        ipaddress.ip_address(self.address)
        if self.api_key is None and os.environ.get(API_KEY_ENV):
            object.__setattr__(self, "api_key", os.environ[API_KEY_ENV])
        if self.api_key is not None and (not self.api_key or any(c.isspace() for c in self.api_key)):
            raise ValueError("the OpenAI API key must be a non-empty string without spaces")

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback

    def warning(self) -> Optional[str]:
        """What glm-serve says when anyone on the network could use the endpoint."""
        if self.api_key is None and not self.loopback:
            return (f"glm-serve: WARNING: the OpenAI endpoint on {self.address}:{self.port} takes "
                    f"requests from anyone who reaches it; set --openai-api-key or {API_KEY_ENV}")
        return None


class OpenAIGateway:
    """uvicorn serving :func:`~.app.create_app` in a background thread."""

    def __init__(self, options: GatewayOptions):
        self.options = options
        self._server = None  # uvicorn.Server
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        """Where a client on this machine reaches ``/v1``: ``http://127.0.0.1:9000/v1``."""
        host = "127.0.0.1" if self.options.address in ("0.0.0.0", "127.0.0.1") else self.options.address
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.options.port}/v1"

    def __enter__(self) -> "OpenAIGateway":
        return self if self._thread is not None else self.start()  # beside() started it already

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> "OpenAIGateway":
        """Listen, and return once the port is bound (``RuntimeError`` if it cannot be)."""
        import uvicorn

        from .app import GatewayConfig, create_app

        if self._thread is not None:
            raise RuntimeError("the OpenAI gateway is already started")
        app = create_app(GatewayConfig(self.options.repository, self.options.grpc_url, self.options.api_key))
        config = uvicorn.Config(app, host=self.options.address, port=self.options.port,
                                log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="glm-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the OpenAI endpoint could not listen on "
                                   f"{self.options.address}:{self.options.port}")
            time.sleep(0.02)
        if self.options.warning():  # on stderr even when logging is not set up (its last resort)
            log.warning(self.options.warning())
        return self

    def ready(self) -> bool:
        """Whether the gateway answers and the router behind it is ready."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.url.removesuffix("/v1") + "/health/ready", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> "OpenAIGateway":
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI endpoint {self.url} was not ready after {timeout:.0f} s")
            time.sleep(0.2)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, end open streams (their Triton requests are cancelled); safe twice."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)


def beside(server, port: int, api_key: Optional[str] = None, out=None, ready_timeout: float = 60.0):
    """The gateway for a ready :class:`~..server.TritonServer` on ``port`` of its address, started
    and ready (a context manager that stops it); a no-op context when ``port`` is 0.

    >>> with TritonServer(options) as server, beside(server, 9000):
    ...     server.wait()
    """
    import contextlib
    import sys

    if not port:
        return contextlib.nullcontext()
    out = out or sys.stdout
    options = GatewayOptions(server.options.model_repository, server.urls["grpc"], port=port,
                             address=server.options.address, api_key=api_key)
    gateway = OpenAIGateway(options)
    try:
        gateway.start().wait_ready(ready_timeout)
    except BaseException as err:
        gateway.stop()
        if isinstance(err, RuntimeError):
            raise ServerStartError(str(err)) from None
        raise
    print(f"OpenAI endpoint ready: {gateway.url}" + ("  (API key required)" if options.api_key else ""),
          file=out, flush=True)
    return gateway
