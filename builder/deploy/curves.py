"""Measured per-replica service curves: how one replica (one pod: the whole plan) serves at each
concurrency. The serving benchmark writes them; ``glm-build capacity`` reads them.

The JSON format, ``glm-build.service-curve/1`` (one object; units in the names)::

    {
      "format": "glm-build.service-curve/1",
      "target": "chatglm2-6b-stream",   # the model the benchmark called (the streaming router)
      "profile": "cpu",                 # glm-build --gpu of the measured repository
      "prompt_tokens": 26,              # tokens of each request's chat prompt, mean
      "output_tokens": 20,              # answer tokens per request, mean
      "measured": "2026-11-26T12:00:00+00:00", "machine": "...", "command": "...",
      "levels": [                       # closed loop: `concurrency` clients, each sending the next
        {"concurrency": 1,              #   request when its last one is answered
         "requests": 24, "duration_s": 2.9,
         "tokens_per_s": 165.2,         # answer tokens per second, all requests together
         "requests_per_s": 8.3,         # optional, with latency_s.mean: see below
         "ttft_s": {"p50": 0.031, "p95": 0.048},     # time to the first streamed answer
         "latency_s": {"mean": 0.11, "p50": 0.12, "p95": 0.15}},   # to the last one (optional)
        ...
      ]
    }

Every benchmark writes this format (``builder.client.loadtest.LoadResult.as_level`` makes a level). Files
from before, which ``scripts/bench_serving.py --curves`` wrote flat, are still read::

    {"checkpoint": "...", "new_tokens": 24, "prompt_tokens": [28, 70, 196],
     "points": [{"concurrency": 1, "requests": 2, "elapsed_s": 5.1, "tokens_per_s": 9.5,
                 "ttft_p50_s": 0.30, "ttft_p95_s": 0.44, "latency_p50_s": 2.5, "mean_tokens": 24.0}]}

``levels`` are in increasing concurrency; ``ttft_s`` needs ``p50`` and ``p95`` (more percentiles may
be there). A closed-loop client spends some time between an answer and its next request, so the
server holds fewer requests than there are clients: where a level gives ``requests_per_s`` and
``latency_s.mean``, it is placed at the requests the server held on average (Little's law:
``requests_per_s × latency_s.mean``), else at ``concurrency``. Between levels figures are
interpolated linearly; past the last one the replica is taken as saturated: tokens/s stays, time to
first token keeps growing along the last two levels' slope.

>>> curve = ServiceCurve.read("docs/service-curves/tiny-cpu.json")
>>> curve.tokens_per_s(3) > curve.tokens_per_s(1)
True
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "glm-build.service-curve/1"


class CurveError(ValueError):
    """A curves file that does not follow the format; the message names the field."""


@dataclass(frozen=True)
class Level:
    """One concurrency level of a closed-loop measurement."""

    concurrency: int
    tokens_per_s: float  # answer tokens per second, all requests together
    ttft_p50_s: float
    ttft_p95_s: float
    requests: int = 0
    in_flight: float | None = None  # requests the server held on average (Little's law), if known


@dataclass(frozen=True)
class ServiceCurve:
    """A replica's measured curve; see the module docstring for the file."""

    levels: tuple[Level, ...]  # increasing concurrency
    prompt_tokens: float
    output_tokens: float
    target: str = ""
    profile: str = ""

    def prompt_scale(self, prompt_tokens: float) -> float:
        """How much longer than the measured prompts ``prompt_tokens`` is (1 when not longer): the
        factor the simulator stretches time to first token by."""
        return max(1.0, prompt_tokens / self.prompt_tokens)

    def __post_init__(self):
        if not self.levels:
            raise CurveError("levels: at least one measured concurrency level is needed")
        concurrencies = [lv.concurrency for lv in self.levels]
        in_flight = [lv.in_flight for lv in self.levels]
        if None in in_flight or in_flight != sorted(set(in_flight)) or in_flight[0] <= 0:
            # unknown, or not increasing (a noisy measurement): place levels at their clients
            object.__setattr__(self, "levels", tuple(
                Level(lv.concurrency, lv.tokens_per_s, lv.ttft_p50_s, lv.ttft_p95_s, lv.requests)
                for lv in self.levels))
        if concurrencies != sorted(set(concurrencies)) or concurrencies[0] < 1:
            raise CurveError(f"levels: concurrency must be >= 1 and increasing, got {concurrencies}")
        for lv in self.levels:
            if not (lv.tokens_per_s > 0 and 0 < lv.ttft_p50_s <= lv.ttft_p95_s):
                raise CurveError(f"levels[concurrency={lv.concurrency}]: needs tokens_per_s > 0 and "
                                 f"0 < ttft p50 <= p95, got {lv}")
        if not (self.prompt_tokens > 0 and self.output_tokens > 0):
            raise CurveError("prompt_tokens and output_tokens must be positive")

    @classmethod
    def from_dict(cls, raw: dict) -> "ServiceCurve":
        if "format" not in raw and "points" in raw:
            raw = from_bench_serving(raw)
        if raw.get("format") != FORMAT:
            raise CurveError(f"format: expected {FORMAT!r}, got {raw.get('format')!r}")
        try:
            levels = tuple(Level(concurrency=int(lv["concurrency"]),
                                 tokens_per_s=float(lv["tokens_per_s"]),
                                 ttft_p50_s=float(lv["ttft_s"]["p50"]),
                                 ttft_p95_s=float(lv["ttft_s"]["p95"]),
                                 requests=int(lv.get("requests", 0)),
                                 in_flight=_in_flight(lv)) for lv in raw["levels"])
            return cls(levels=levels, prompt_tokens=float(raw["prompt_tokens"]),
                       output_tokens=float(raw["output_tokens"]), target=raw.get("target", ""),
                       profile=raw.get("profile", ""))
        except (KeyError, TypeError) as err:
            raise CurveError(f"missing or malformed field: {err}") from None

    @classmethod
    def read(cls, path: str | Path) -> "ServiceCurve":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise CurveError(f"{path}: {err}") from None
        try:
            return cls.from_dict(raw)
        except CurveError as err:
            raise CurveError(f"{path}: {err}") from None

    # -- reading the curve at any concurrency ------------------------------------------------------
    @staticmethod
    def load(level: Level) -> float:
        """Where a level sits on the requests-in-the-replica axis."""
        return level.in_flight if level.in_flight is not None else float(level.concurrency)

    def _at(self, concurrency: float, value, extrapolate: bool) -> float:
        levels, load = self.levels, self.load
        if concurrency <= load(levels[0]):
            return value(levels[0])
        for lo, hi in zip(levels, levels[1:]):
            if concurrency <= load(hi):
                share = (concurrency - load(lo)) / (load(hi) - load(lo))
                return value(lo) + share * (value(hi) - value(lo))
        last = levels[-1]
        if not extrapolate or len(levels) == 1:
            return value(last)
        prev = levels[-2]
        slope = max(0.0, (value(last) - value(prev)) / (load(last) - load(prev)))
        return value(last) + slope * (concurrency - load(last))

    def tokens_per_s(self, concurrency: float) -> float:
        """Answer tokens per second the replica produces with ``concurrency`` requests in it:
        interpolated between levels; below the first, each request at the first level's speed;
        past the last, the replica is saturated (its total stays)."""
        first = self.levels[0]
        if concurrency < self.load(first):
            return concurrency * first.tokens_per_s / self.load(first)
        return self._at(concurrency, lambda lv: lv.tokens_per_s, extrapolate=False)

    def request_speed(self, concurrency: float) -> float:
        """Answer tokens per second each of ``concurrency`` requests in the replica gets."""
        return self.tokens_per_s(concurrency) / concurrency

    def ttft(self, concurrency: float) -> tuple[float, float]:
        """(p50, p95) time to first token of a request that finds ``concurrency - 1`` others."""
        return (self._at(concurrency, lambda lv: lv.ttft_p50_s, extrapolate=True),
                self._at(concurrency, lambda lv: lv.ttft_p95_s, extrapolate=True))

    @property
    def max_tokens_per_s(self) -> float:
        return max(lv.tokens_per_s for lv in self.levels)

    @property
    def peak_request_speed(self) -> float:
        """Tokens/s of one request alone in the replica (the first level's per-request speed)."""
        return self.levels[0].tokens_per_s / self.load(self.levels[0])


def from_bench_serving(raw: dict) -> dict:
    """``scripts/bench_serving.py --curves``'s flat points as this format's levels."""
    try:
        points = raw["points"]
        prompt = raw["prompt_tokens"]
        prompt = sum(prompt) / len(prompt) if isinstance(prompt, list) else prompt
        tokens = [p.get("mean_tokens") for p in points if p.get("mean_tokens")]
        output = sum(tokens) / len(tokens) if tokens else raw["new_tokens"]
        levels = [{"concurrency": p["concurrency"], "requests": p.get("requests", 0),
                   "tokens_per_s": p["tokens_per_s"],
                   "ttft_s": {"p50": p["ttft_p50_s"], "p95": p["ttft_p95_s"]}} for p in points]
    except (KeyError, TypeError, ZeroDivisionError) as err:
        raise CurveError(f"bench_serving points: missing or malformed field {err}") from None
    return {"format": FORMAT, "target": raw.get("target", "chatglm2-6b"), "profile": raw.get(
        "profile", ""), "prompt_tokens": prompt, "output_tokens": output, "levels": levels}


def _in_flight(level: dict) -> float | None:
    rate, mean = level.get("requests_per_s"), (level.get("latency_s") or {}).get("mean")
    return float(rate) * float(mean) if rate and mean else None


def curve_record(levels: list[dict], *, target: str, profile: str, prompt_tokens: float,
                 output_tokens: float, **extra) -> dict:
    """A curves file's content (what a benchmark writes), checked by reading it back."""
    record = {"format": FORMAT, "target": target, "profile": profile,
              "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, **extra,
              "levels": levels}
    ServiceCurve.from_dict(record)
    return record
