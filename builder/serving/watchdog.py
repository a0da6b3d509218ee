"""Bring a model back when its Python-backend stub dies.

Triton 2.51's Python backend marks an instance whose stub process died as "not healthy" and fails
every request to it from then on; it does not start a new stub. The watchdog notices the missing
stub (the server runs with ``--model-control-mode=explicit``) and reloads that model through the
repository API, which refuses every client without the server's admin key (``headers``), so requests routed to it succeed again while the other models keep serving.

>>> watchdog = StubWatchdog(server_pid, repo, "http://127.0.0.1:8000", headers=server.admin_headers).start()
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
import urllib.request
from pathlib import Path

import psutil

log = logging.getLogger("glm-serve")

# The model-control flags the watchdog needs; every model in the repository is loaded at start.
EXPLICIT_CONTROL = ("--model-control-mode=explicit", "--load-model=*")


def stubs_by_model(server_pid: int, repo: Path) -> collections.Counter:
    """How many live stub processes each model of ``repo`` (the path tritonserver was given, which
    the stubs' command lines repeat: glm-serve's alias, not resolved) has in the server's process
    group."""
    counts: collections.Counter = collections.Counter()
    served = Path(os.path.abspath(repo))
    prefix = str(served) + os.sep
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if os.getpgid(proc.pid) != server_pid or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except (ProcessLookupError, psutil.Error):
            continue
        for part in proc.info["cmdline"] or ():
            if part.startswith(prefix) and part.endswith(os.sep + "model.py"):
                counts[Path(part).relative_to(served).parts[0]] += 1
    return counts


class StubWatchdog:
    """Every ``interval`` s, reload (unload, then load) each model that lost a stub."""

    def __init__(self, server_pid: int, repo: Path, http_url: str, interval: float = 2.0,
                 headers: dict[str, str] | None = None):
        self.server_pid, self.repo, self.http_url, self.interval = server_pid, Path(repo), http_url, interval
        self.headers = dict(headers or {})  # the admin key: the repository API refuses requests without it
        self.expected = stubs_by_model(server_pid, self.repo)
        self.reloads: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stub-watchdog", daemon=True)

    def start(self) -> "StubWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            live = stubs_by_model(self.server_pid, self.repo)
            for model, count in self.expected.items():
                if live[model] < count and not self._stop.is_set():
                    self._reload(model)

    def _reload(self, model: str) -> None:
        log.warning("glm-serve: a stub process of %s died; reloading the model", model)
        started = time.monotonic()
        try:
            for verb in ("unload", "load"):
                request = urllib.request.Request(
                    f"{self.http_url}/v2/repository/models/{model}/{verb}", data=b"{}", method="POST",
                    headers=self.headers)
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=600):
                    pass
        except OSError as err:
            log.error("glm-serve: reloading %s failed: %s", model, err)
            return
        self.reloads[model] += 1
        log.warning("glm-serve: %s serves again (reloaded in %.1f s)", model, time.monotonic() - started)
