"""Start and stop a real ``tritonserver`` process (found and prepared by :mod:`.install`).

>>> options = ServerOptions("generated_repo", http_port=8000, grpc_port=8001, metrics_port=8002)
>>> with TritonServer(options) as server:   # starts, waits until ready, stops on exit
...     print(server.urls["grpc"])
127.0.0.1:8001
"""
from __future__ import annotations

import collections
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

from .load_causes import LoadCauses
from .stub_paths import StubPaths
from .install import (INSTALL_HINT, STUB_NAME, ServerInstall, ServerNotFoundError,  # noqa: F401
                      default_cache_dir, find_tritonserver, prepare_server_tree, server_environment)

_LOG_TAIL_LINES = 60

# Triton's protocol groups that only glm-serve itself may call (on HTTP and gRPC alike): the
# repository API loads, unloads and *uploads* models (a `file:1/model.py` override is Python code the
# server runs), shared-memory registration makes the server read memory it is pointed at, and the
# trace and logging settings write files where a client says. Inference, health, metadata, model
# config and statistics (all read-only) stay open.
RESTRICTED_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = "glm-admin-key"  # the HTTP request header that carries the secret
ADMIN_GRPC_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER  # the gRPC metadata key: Triton prefixes it
# Flags glm-serve sets itself; passing them through extra_args would undo the restrictions.
_MANAGED_FLAGS = ("--http-restricted-api", "--grpc-restricted-protocol", "--model-control-mode",
                  "--load-model", "--model-repository", "--model-store")


class ServerStartError(RuntimeError):
    """The server exited, or did not become ready in time."""


@dataclass(frozen=True)
class ServerOptions:
    """What one ``tritonserver`` serves and where, validated up front.

    >>> ServerOptions("generated_repo", http_port=9000, grpc_port=9001, metrics_port=9002)
    """

    model_repository: Path  # a folder of Triton models (<name>/config.pbtxt, <name>/1/model.py)
    http_port: int = 8000  # Triton's own default ports
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_config_name: Optional[str] = None  # load <model>/configs/<name>.pbtxt, e.g. "h100"
    log_verbose: int = 0  # Triton's --log-verbose: 1 logs every request
    log_file: Optional[Path] = None  # None: the server's log passes through to our stdout
    extra_args: tuple[str, ...] = ()  # more tritonserver flags, passed as they are
    address: str = "0.0.0.0"  # where HTTP, gRPC and metrics listen; tests use 127.0.0.1
    metrics_address: Optional[str] = None  # None: the same as address; 127.0.0.1 hides metrics
    restart_stubs: bool = True  # reload a model whose stub process died (builder.serving.watchdog)

    @classmethod
    def on_loopback(cls, model_repository, **options) -> "ServerOptions":
        """Options for a server on 127.0.0.1 with three distinct free ports (the demo, tests and
        benchmarks; another process may still take a port before the server binds it).

        >>> ServerOptions.on_loopback("generated_repo", log_file=Path("server.log")).address
        '127.0.0.1'
        """
        ports: set[int] = set()
        while len(ports) < 3:  # free_port() may hand out the same port twice in a row
            ports.add(free_port())
        http, grpc, metrics = sorted(ports)
        return cls(model_repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                   address="127.0.0.1", **options)

    def __post_init__(self):
        object.__setattr__(self, "model_repository", Path(self.model_repository))
        if self.log_file is not None:
            object.__setattr__(self, "log_file", Path(self.log_file))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if not self.model_repository.is_dir():
            raise ValueError(f"model_repository={str(self.model_repository)!r}: no such folder")
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        for name, port in ports.items():
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"{name}={port!r}: must be a port number in 1..65535")
        if len(set(ports.values())) < len(ports):
            raise ValueError(f"ports must differ, got {ports}")
        if self.model_config_name is not None and (
            not self.model_config_name or any(c.isspace() or c in "/\\" for c in self.model_config_name)
        ):
            raise ValueError(f"model_config_name={self.model_config_name!r}: must be a bare name without spaces")
        if not isinstance(self.log_verbose, int) or self.log_verbose < 0:
            raise ValueError(f"log_verbose={self.log_verbose!r}: must be an integer >= 0")
        import ipaddress

        for name in ("address", "metrics_address"):
            value = getattr(self, name)
            if name == "metrics_address" and value is None:
                continue
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: must be an IP address such as 127.0.0.1 "
                                 f"or 0.0.0.0") from None
        if not all(isinstance(arg, str) for arg in self.extra_args):
            raise ValueError(f"extra_args={self.extra_args!r}: must be strings")
        for arg in self.extra_args:
            if arg.split("=", 1)[0] in _MANAGED_FLAGS:
                raise ValueError(f"extra_args: {arg!r} is set by glm-serve itself (model control "
                                 f"and the restricted protocols; see the README's Security section)")


def restriction_flags(admin_key: str) -> list[str]:
    """Triton flags that refuse :data:`RESTRICTED_PROTOCOLS` to any request without the admin key.

    >>> restriction_flags("s3cret")[0]
    '--http-restricted-api=model-repository,shared-memory,trace,logging:glm-admin-key=s3cret'
    """
    if not admin_key or not all(c.isalnum() or c in "-_" for c in admin_key):
        raise ValueError("admin_key must be a non-empty URL-safe token")
    rule = f"{','.join(RESTRICTED_PROTOCOLS)}:{ADMIN_HEADER}={admin_key}"
    return [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]


def server_command(options: ServerOptions, install: ServerInstall, shm_prefix: str,
                   admin_key: str, repository: Optional[Path] = None) -> list[str]:
    """The ``tritonserver`` command line for ``options``.

    ``shm_prefix`` names this server's shared-memory regions, so that two servers on one machine
    (two test runs) never share them; ``admin_key`` is the secret of :func:`restriction_flags`;
    ``repository``: the path Triton is given (default ``options.model_repository``; glm-serve
    passes its stub-safe alias, :class:`~.stub_paths.StubPaths`).

    >>> server_command(options, install, "glm1234", "s3cret")[:3]
    ['/.../bin/tritonserver', '--model-repository', 'generated_repo']
    """
    command = [
        str(install.binary),
        "--model-repository", str(repository or options.model_repository),
        "--http-port", str(options.http_port),
        "--grpc-port", str(options.grpc_port),
        "--metrics-port", str(options.metrics_port),
        "--http-address", options.address,
        "--grpc-address", options.address,
        "--metrics-address", options.metrics_address or options.address,
        "--log-verbose", str(options.log_verbose),
        "--backend-config", f"python,shm-region-prefix-name={shm_prefix}",
        *restriction_flags(admin_key),
    ]
    if install.backend_dir is not None:
        command += ["--backend-directory", str(install.backend_dir)]
    if install.caches_dir is not None:
        command += ["--cache-directory", str(install.caches_dir)]
    if options.model_config_name is not None:
        command += ["--model-config-name", options.model_config_name]
    if options.restart_stubs:
        from .watchdog import EXPLICIT_CONTROL

        command += list(EXPLICIT_CONTROL)
    return command + list(options.extra_args)


class TritonServer:
    """One ``tritonserver`` process (and its Python-backend stubs) in its own process group.

    >>> with TritonServer(ServerOptions("generated_repo")) as server:
    ...     client = tritonclient.grpc.InferenceServerClient(server.urls["grpc"])

    or without ``with``: ``server.start(); server.wait_ready(60); ...; server.stop()``.
    """

    def __init__(
        self,
        options: ServerOptions,
        install: Optional[ServerInstall] = None,  # None: find_tritonserver()
        cache_dir: Optional[Path] = None,  # None: default_cache_dir(), for the wheel's tree copy
        ready_timeout: float = 120.0,  # seconds `with` waits for the server to become ready
    ):
        self.options = options
        self.ready_timeout = ready_timeout
        self._install = install
        self._cache_dir = cache_dir
        self._process: Optional[subprocess.Popen] = None
        self.watchdog = None  # a StubWatchdog once ready, with options.restart_stubs
        self._log_tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._log_thread: Optional[threading.Thread] = None
        self._shm_prefix = ""  # names this server's Python-backend shared-memory regions
        self._admin_key = ""  # made at each start; only this object (and its watchdog) knows it
        self.stub_paths: Optional[StubPaths] = None  # the repository as Triton sees it, while running
        self.load_causes = LoadCauses()  # per model, why it did not load (from the log)

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def host(self) -> str:
        """Where a client on this machine reaches the server."""
        return "127.0.0.1" if self.options.address in ("0.0.0.0", "127.0.0.1") else self.options.address

    @property
    def urls(self) -> dict[str, str]:
        """Client addresses: ``{"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001", "metrics": ...}``."""
        return {
            "http": f"{self.host}:{self.options.http_port}",
            "grpc": f"{self.host}:{self.options.grpc_port}",
            "metrics": f"{self.host}:{self.options.metrics_port}",
        }

    @property
    def admin_headers(self) -> dict[str, str]:
        """The header that lets a request through the restricted protocols (model control & co).

        Kept in-process: tests and the watchdog use it; nothing prints or writes it.

        >>> httpclient.InferenceServerClient(url).get_model_repository_index(headers=server.admin_headers)
        """
        if not self._admin_key:
            raise RuntimeError("tritonserver not started: call start() first")
        return {ADMIN_HEADER: self._admin_key}

    @property
    def admin_grpc_headers(self) -> dict[str, str]:
        """:attr:`admin_headers` for a gRPC client (Triton looks for its own metadata key)."""
        return {ADMIN_GRPC_HEADER: self.admin_headers[ADMIN_HEADER]}

    @property
    def pid(self) -> Optional[int]:
        """The server's process id (also its process-group id), None when not started."""
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> "TritonServer":
        """Launch the server in a new session and return at once; see ``wait_ready``.

        >>> server = TritonServer(options).start()
        """
        if self._process is not None:
            raise RuntimeError(f"tritonserver already started (pid {self._process.pid})")
        install = prepare_server_tree(self._install or find_tritonserver(), self._cache_dir)
        self._shm_prefix = f"glm{os.getpid()}_{secrets.token_hex(3)}_"
        self._admin_key = secrets.token_urlsafe(32)
        self._log_tail.clear()
        self.load_causes = LoadCauses()
        # Kept even for a tritonserver that quotes the path itself (2.60+): it costs nothing.
        self.stub_paths = StubPaths.open(self.options.model_repository, self.options.model_config_name)
        if self.stub_paths.aliased:
            self._note(self.stub_paths.note())
        try:
            self._process = subprocess.Popen(
                server_command(self.options, install, self._shm_prefix, self._admin_key,
                               repository=self.stub_paths.repository),
                env=server_environment(install) | self.stub_paths.environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Its own process group: Ctrl-C in our terminal does not reach it half-way, and
                # stop() can signal the server and every stub it spawned at once.
                start_new_session=True,
            )
        except BaseException:
            self.stub_paths.close()
            raise
        self._log_thread = threading.Thread(
            target=self._pass_log_through, args=(self._process.stdout,), name="tritonserver-log", daemon=True
        )
        self._log_thread.start()
        return self

    def _note(self, line: str) -> None:
        """A line of glm-serve's own, where the server's log goes."""
        self._log_tail.append(line)
        if self.options.log_file:
            with open(self.options.log_file, "a", encoding="utf-8") as sink:
                sink.write(line)
        else:
            sys.stdout.write(line)
            sys.stdout.flush()

    def _pass_log_through(self, pipe: IO[bytes]) -> None:
        """Copy the server's log to the log file or our stdout, keeping its last lines."""
        sink = open(self.options.log_file, "a", encoding="utf-8") if self.options.log_file else sys.stdout
        try:
            for raw in pipe:  # ends when every writer (server and stubs) has exited
                line = raw.decode("utf-8", errors="replace")
                self._log_tail.append(line)
                self.load_causes.feed(line)
                sink.write(line)
                sink.flush()
        except ValueError:
            pass  # our stdout was closed under us (interpreter shutdown)
        finally:
            pipe.close()
            if sink is not sys.stdout:
                sink.close()

    def log_tail(self) -> str:
        """The server's last log lines (up to 60)."""
        return "".join(self._log_tail)

    def _not_ready(self, headline: str, waited_s: float) -> ServerStartError:
        causes = self.load_causes.report(waited_s)
        per_model = "".join(f"\n  {line}" for line in causes)
        return ServerStartError(f"{headline}" + (f"; models that did not load:{per_model}" if causes else "")
                                + f"\nlast log lines:\n{self.log_tail()}")

    def wait_ready(self, timeout: Optional[float] = None) -> "TritonServer":
        """Poll ``/v2/health/ready`` until the server and all its models are ready.

        Fails fast, with the server's last log lines, when the process exits first.

        >>> server.start().wait_ready(timeout=60)
        """
        if self._process is None:
            raise RuntimeError("tritonserver not started: call start() first")
        timeout = self.ready_timeout if timeout is None else timeout
        url = f"http://{self.host}:{self.options.http_port}/v2/health/ready"
        started = time.monotonic()
        deadline = started + timeout
        while True:
            code = self._process.poll()
            if code is not None:
                self._log_thread.join(timeout=2)  # let the last lines arrive
                raise self._not_ready(f"tritonserver exited with code {code} before it was ready",
                                      time.monotonic() - started)
            if _is_ready(url):
                if self.options.restart_stubs and self.watchdog is None:
                    from .watchdog import StubWatchdog

                    self.watchdog = StubWatchdog(self._process.pid, self.stub_paths.repository,
                                                 f"http://{self.urls['http']}",
                                                 headers=self.admin_headers).start()
                return self
            if time.monotonic() > deadline:
                raise self._not_ready(f"tritonserver not ready after {timeout:.0f} s ({url})", timeout)
            time.sleep(0.2)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Block until the server exits; its exit code. ``subprocess.TimeoutExpired`` after ``timeout``."""
        if self._process is None:
            raise RuntimeError("tritonserver not started: call start() first")
        return self._process.wait(timeout)

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM the server's whole process group, SIGKILL what is left after ``timeout`` s.

        Returns the server's exit code (None when it was never started); safe to call twice.

        >>> server.stop()
        0
        """
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        process, self._process = self._process, None
        if process is None:
            return None
        group = process.pid  # start_new_session: the group id is the server's pid
        try:
            if process.poll() is None:
                _signal_group(group, signal.SIGTERM)  # the server and every stub at once
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            # Whatever is left of the group: a server past its timeout, a stub that outlived it, or
            # all of it when a second Ctrl-C cut the wait short.
            _signal_group(group, signal.SIGKILL)
            process.wait()
            _remove_shared_memory(self._shm_prefix)
            if self._log_thread is not None:
                self._log_thread.join(timeout=5)
            if self.stub_paths is not None:
                self.stub_paths.close()  # the aliases go with the server
        return process.returncode


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass  # the whole group has already exited


def _remove_shared_memory(prefix: str) -> None:
    # A server that exits cleanly unlinks its regions; a killed one leaves them in /dev/shm.
    for region in Path("/dev/shm").glob(f"{prefix}*") if prefix else ():
        region.unlink(missing_ok=True)


# Ignore http_proxy & co: the server is on this machine.
_LOCAL_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _is_ready(url: str) -> bool:
    try:
        with _LOCAL_OPENER.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # HTTPError (400: not ready) is a URLError
        return False


def free_port() -> int:
    """A TCP port free on loopback right now (for tests: another process may take it later).

    >>> ServerOptions(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())  # or ServerOptions.on_loopback(repo)
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
