"""``glm-serve``'s whole service: Triton (:mod:`.server`) and, beside it, the OpenAI-compatible
gateway (:mod:`.openai.gateway`), until the server exits or Ctrl-C / SIGTERM.

>>> serve(ServerOptions("generated_repo"), openai_port=9000)   # what `glm-serve generated_repo` does
"""
from __future__ import annotations

import sys
from typing import IO, Optional

from .openai.gateway import beside
from .server import ServerOptions, TritonServer


def serve(options: ServerOptions, out: Optional[IO[str]] = None, ready_timeout: float = 300.0,
          openai_port: int = 0, openai_api_key: Optional[str] = None) -> int:
    """Run a server until it exits or we are interrupted; its exit code.

    Prints the endpoints once ready. ``openai_port``: also serve the OpenAI-compatible ``/v1``
    there (0: not), started once the router is ready and stopped first
    (:mod:`.openai.gateway`). Ctrl-C (KeyboardInterrupt) stops the server and every stub,
    then propagates.

    >>> serve(ServerOptions("generated_repo"))   # what `glm-serve generated_repo` does
    """
    out = out or sys.stdout
    with TritonServer(options, ready_timeout=ready_timeout) as server:
        urls = server.urls
        print(
            f"Triton ready (pid {server.pid}): HTTP {urls['http']}  gRPC {urls['grpc']}  metrics {urls['metrics']}",
            file=out,
            flush=True,
        )
        with beside(server, openai_port, openai_api_key, out):
            return server.wait()
