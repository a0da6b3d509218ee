"""Shared by the benchmark scripts: the command line, the machine, and one section of docs/benchmarks.md.

Each script owns the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` and replaces
only that, so sections written by other scripts (or by hand) stay as they are.
"""
from __future__ import annotations

import os
import platform
import shlex
import time
import sys
from pathlib import Path

INTRO = """# Benchmarks

Measured on the development machine (CPU only, no GPU) with the scripts in `scripts/`. Each section
starts with the exact command that wrote it; rerun it to refresh the section. The real ChatGLM2-6B
cannot be downloaded here, so the speed and memory figures use a random-weight checkpoint with
ChatGLM2-6B's real layer shapes and fewer layers (`builder.model.synthetic`), extrapolated to 28 layers.
"""


def command_line() -> str:
    """This process's command, with the interpreter as a path relative to the working directory."""
    python = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") \
        else sys.executable
    env = [f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}"] \
        if os.environ.get("ATEN_CPU_CAPABILITY") else []  # it changes every CPU figure
    return " ".join(env + [shlex.join([python, *sys.argv])])


def machine() -> str:
    """CPU model, core count, torch version, and the load average now (1/5/15 min)."""
    import torch

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), load average {load}")


def write_section(path: str | Path, name: str, body: str) -> None:
    """Put ``body`` between the ``name`` markers of ``path``, appending the section if it is new."""
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else INTRO
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


class OtherCpu:
    """How many cores other processes kept busy between ``start()`` and ``cores()``.

    Busy time of the whole machine (``/proc/stat``) minus this process's own CPU time and its
    children's: the contention a measurement ran under, on a machine shared with other work.
    """

    def __init__(self):
        self.start()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def start(self) -> None:
        self._t0, self._busy0, self._own0 = self._sample()

    def cores(self) -> float:
        t, busy, own = self._sample()
        return max(0.0, (busy - self._busy0) - (own - self._own0)) / max(t - self._t0, 1e-9)


def wait_for_quiet(max_wait: float, threshold: float = 0.25, window: float = 3.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores over ``window`` s.

    Returns their use in the last window.
    """
    deadline = time.monotonic() + max_wait
    while True:
        probe = OtherCpu()
        time.sleep(window)
        used = probe.cores()
        if used < threshold or time.monotonic() >= deadline:
            return used


def publish(table: str, out: str | Path | None, name: str, heading: str) -> None:
    """Print ``table``; with ``out``, also write it as section ``name`` under ``heading``, after
    the command that made it."""
    print(table)
    if out:
        write_section(out, name, f"## {heading}\n\n```\n{command_line()}\n```\n\n{table}")
        print(f"wrote the {name} section of {out}")
