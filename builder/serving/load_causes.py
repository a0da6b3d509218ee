"""Why a model did not load, per model, from the server's log as it passes.

Triton logs a load that fails as ``failed to load 'NAME' version 1: <cause>`` (and again in its
model table); a Python-backend stub that cannot even start (Triton 2.51 pastes the model path into
``bash -c`` unquoted) leaves Triton waiting for it with no line naming the model, while bash or the
stub print their own complaint (``unexpected EOF while looking for matching `''``, ``what(): stol``)
untagged. So each model still loading is given the first such untagged line seen while it loaded.

>>> causes = LoadCauses()
>>> for line in log_lines: causes.feed(line)
>>> causes.report(waited_s=60)
["chatglm2-6b-int4: failed: UnicodeEncodeError: 'ascii' codec can't encode characters ..."]
"""
from __future__ import annotations

import re
import threading

_TRITON_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] (.*)$")  # glog: I1205 17:16:51.1 42 a.cc:472] ...
_LOADING = re.compile(r"\"loading: (?P<model>[^:\"]+):\d+\"")
_LOADED = re.compile(r"successfully loaded '(?P<model>[^']+)'")
_FAILED = re.compile(r"failed to load '(?P<model>[^']+)' version \d+: (?P<cause>.*?)\"?$")
_TABLE = re.compile(r"^\| (?P<model>\S+) +\| \d+ +\| UNAVAILABLE: (?P<cause>.*?) *\|$")
_NOISE = ("NVML", "DCGM")  # a CPU host's GPU-monitoring complaints, once loading is over
# the rest of a stub's Python traceback ("At:", then one frame a line): its first line is the cause
_TRACEBACK = re.compile(r"^(At:$|<frozen [\w.]+>\(\d+\)|\S.*\(\d+\): \S)")


def _first_line(text: str) -> str:
    # Triton's log quotes the cause as a C string: newlines arrive as the two characters \n
    return text.replace("\\n", "\n").strip().splitlines()[0].strip() if text.strip() else ""


class LoadCauses:
    """Per model: loading, loaded, or failed with a cause; fed one log line at a time (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.states: dict[str, str] = {}  # model -> "loading" | "loaded" | "failed"
        self.causes: dict[str, str] = {}  # model -> first line of what Triton logged as its failure
        self.stub_lines: dict[str, str] = {}  # model -> a stub line naming its files, while loading
        self.untagged: list[str] = []  # stub / bash output naming no model, seen while loading

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        with self._lock:
            triton = _TRITON_LINE.match(line)
            text = triton.group(1) if triton else line
            if match := _LOADING.search(text):
                self.states[match["model"]] = "loading"
            elif match := _LOADED.search(text):
                self.states[match["model"]] = "loaded"
            elif (match := _FAILED.search(text)) or (match := _TABLE.match(line)):
                self._fail(match["model"], _first_line(match["cause"]))
            elif triton is None and line.strip() and not line.startswith(("+", "|")):
                self._untagged(line.strip())
            elif triton is not None and (line.startswith("E") or "pb_stub" in line):
                self._untagged(text.strip().strip('"'))

    def _fail(self, model: str, cause: str) -> None:
        self.states[model] = "failed"
        self.causes.setdefault(model, cause)

    def _explained(self, line: str) -> bool:
        """Whether ``line`` is the stub's side of a failure Triton has already tied to a model."""
        return any(cause.split(": ", 1)[-1] in line for cause in self.causes.values() if cause)

    def _untagged(self, line: str) -> None:
        loading = [m for m, state in self.states.items() if state == "loading"]
        if not loading or any(word in line for word in _NOISE) or _TRACEBACK.match(line):
            return
        for model in loading:  # a stub line that names its model's file (".../NAME/1/model.py")
            if f"/{model}/" in line:
                self.stub_lines.setdefault(model, line)
                return
        if line.startswith("what():") and self.untagged:
            self.untagged[-1] += f" ({line})"
        elif len(self.untagged) < 20:
            self.untagged.append(line)

    def report(self, waited_s: float | None = None) -> list[str]:
        """One line per model that did not load: ``"NAME: <first line of its cause>"``."""
        with self._lock:
            lines = []
            for model, state in sorted(self.states.items()):
                if state == "failed":
                    lines.append(f"{model}: failed: {self.causes.get(model) or 'no cause logged'}")
                elif state == "loading":
                    waited = f" after {waited_s:.0f} s" if waited_s is not None else ""
                    untagged = [u for u in self.untagged if not self._explained(u)]
                    cause = self.stub_lines.get(model) or (
                        f"its stub never started; logged meanwhile: {untagged[0]}"
                        if untagged else "its stub never started; nothing logged")
                    lines.append(f"{model}: still loading{waited}: {cause}")
            return lines
