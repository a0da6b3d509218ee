"""Shared by the benchmark scripts: the command line, the machine, and one section of docs/benchmarks.md.

Each script owns the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` and replaces
only that, so sections written by other scripts (or by hand) stay as they are.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

INTRO = """# Benchmarks

Measured on the development machine (CPU only, no GPU) with the scripts in `scripts/`. Each section
starts with the exact command that wrote it; rerun it to refresh the section. The real ChatGLM2-6B
cannot be downloaded here, so the speed and memory figures use a random-weight checkpoint with
ChatGLM2-6B's real layer shapes and fewer layers (`builder.synthetic`), extrapolated to 28 layers.
"""


def command_line() -> str:
    """This process's command, with the interpreter as a path relative to the working directory."""
    python = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") \
        else sys.executable
    return shlex.join([python, *sys.argv])


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
