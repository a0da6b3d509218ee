"""Many streamed chats at once against a live server: time to first token, time per output
token, tokens/s, and requests lost; a closed loop (:func:`run_load`: N clients, each sending its next
request when its last is answered) or an open one (:func:`run_arrivals`: Poisson arrivals).
``glm-chat -c N -j C``, ``scripts/bench_serving.py`` and ``scripts/capacity_check.py`` use it.

>>> result = run_load("127.0.0.1:8001", ["你好", "3只鸡有几条腿？"], concurrency=4, requests=16)
>>> print(result.summary())
"""
from __future__ import annotations

import concurrent.futures
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .chat import STREAM_ROUTER, ChatError, ChatGLMClient
from ..stats import percentile


@dataclass(frozen=True)
class RequestTiming:
    ttft_s: float  # until the first partial answer
    latency_s: float  # until the final answer
    tokens: int  # answer tokens (or characters, without a token counter)
    variant: str
    started_s: float = 0.0  # when it was sent, from the start of the run


@dataclass
class LoadResult:
    concurrency: int
    elapsed_s: float
    timings: list[RequestTiming] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unit: str = "tokens"  # what ``RequestTiming.tokens`` counts

    @property
    def lost(self) -> int:
        return len(self.errors)

    @property
    def tokens_per_s(self) -> float:
        """Answer tokens of every request over the wall time of the whole run."""
        return sum(t.tokens for t in self.timings) / self.elapsed_s if self.elapsed_s else 0.0

    def ttft(self, q: float) -> float:
        return percentile([t.ttft_s for t in self.timings], q)

    def tpot(self, q: float) -> float:
        """Time per output token after the first, per request."""
        return percentile([(t.latency_s - t.ttft_s) / (t.tokens - 1) for t in self.timings
                           if t.tokens > 1], q)

    def latency(self, q: float) -> float:
        return percentile([t.latency_s for t in self.timings], q)

    def as_level(self) -> dict:
        """This run as one ``levels`` entry of a service curve (``builder/deploy/curves.py``, the
        format ``glm-build capacity`` reads): a closed loop at ``concurrency``."""
        latencies = [t.latency_s for t in self.timings]
        return {"concurrency": self.concurrency, "requests": len(self.timings), "lost": self.lost,
                "duration_s": round(self.elapsed_s, 3), "tokens_per_s": round(self.tokens_per_s, 2),
                "requests_per_s": round(len(self.timings) / self.elapsed_s, 3) if self.elapsed_s else 0.0,
                "ttft_s": {f"p{round(q * 100)}": round(self.ttft(q), 4) for q in (0.5, 0.9, 0.95)},
                "latency_s": {"mean": round(sum(latencies) / len(latencies), 4) if latencies else 0.0,
                              "p50": round(self.latency(0.5), 4), "p95": round(self.latency(0.95), 4)},
                "output_tokens": (sum(t.tokens for t in self.timings) / len(self.timings)
                                  if self.timings else 0.0)}

    def as_dict(self) -> dict:
        """The run's figures, flat (one row of a benchmark's table)."""
        return {"concurrency": self.concurrency, "requests": len(self.timings), "lost": self.lost,
                "elapsed_s": self.elapsed_s, f"{self.unit}_per_s": self.tokens_per_s,
                "ttft_p50_s": self.ttft(0.5), "ttft_p95_s": self.ttft(0.95),
                "tpot_p50_s": self.tpot(0.5), "tpot_p95_s": self.tpot(0.95),
                "latency_p50_s": self.latency(0.5), "latency_p95_s": self.latency(0.95),
                f"mean_{self.unit}": (sum(t.tokens for t in self.timings) / len(self.timings)
                                      if self.timings else 0.0)}

    def summary(self) -> str:
        if not self.timings:
            return f"concurrency {self.concurrency}: no answers, {self.lost} lost"
        return (f"concurrency {self.concurrency}: {len(self.timings)} answers, {self.lost} lost, "
                f"{self.tokens_per_s:.1f} {self.unit}/s; TTFT p50 {self.ttft(0.5) * 1000:.0f} ms "
                f"p95 {self.ttft(0.95) * 1000:.0f} ms; per output {self.unit[:-1]} p50 "
                f"{self.tpot(0.5) * 1000:.0f} ms p95 {self.tpot(0.95) * 1000:.0f} ms")


def run_load(url: str, prompts: Sequence[str | tuple[str, int]], *, concurrency: int, requests: int,
             max_token: int = 256, temperature: float = 0.0, model: str = STREAM_ROUTER,
             count_tokens: Optional[Callable[[str], int]] = None,
             timeout_s: float = 600.0, ramp_s: float = 0.0) -> LoadResult:
    """``requests`` streamed chats (prompts taken in turn) from ``concurrency`` clients at once,
    each client sending its share one after the other (client i: requests i, i + concurrency, ...).

    A prompt may come with its own ``max_token`` as a ``(prompt, max_token)`` pair.

    ``ramp_s`` staggers the clients' starts evenly over that many seconds (client i waits
    ``i * ramp_s / concurrency``), as a load generator ramps up: with a ramp about one request's
    length the clients' requests are out of phase, as in steady traffic, instead of all arriving
    in one burst. 0 (the default) starts them together.

    ``count_tokens`` counts an answer's tokens (e.g. the model's tokenizer); without it answers are
    measured in characters. A request that fails is counted as lost, with its error.
    """
    if concurrency < 1 or requests < 1:
        raise ValueError(f"concurrency and requests must be >= 1, got {concurrency} and {requests}")
    if ramp_s < 0:
        raise ValueError(f"ramp_s must be >= 0, got {ramp_s}")
    lock = threading.Lock()
    result = LoadResult(concurrency, 0.0, unit="tokens" if count_tokens else "chars")

    start = time.perf_counter()

    def worker(first: int) -> None:
        # a fixed share, not a shared queue: a client that starts early would take a late one's
        client = ChatGLMClient(url, "grpc", temperature, max_token, timeout_s=timeout_s)
        time.sleep(first * ramp_s / concurrency)
        try:
            for index in range(first, requests, concurrency):
                _measure(client, prompts[index % len(prompts)], model, count_tokens, start,
                         result, lock)
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker, i) for i in range(concurrency)]:
            future.result()
    result.elapsed_s = time.perf_counter() - start
    return result


def _measure(client: ChatGLMClient, prompt: str | tuple[str, int], model: str,
             count_tokens: Optional[Callable[[str], int]], origin: float, result: LoadResult,
             lock: threading.Lock) -> None:
    """One request (a prompt, or a ``(prompt, max_token)`` pair) into ``result``: its timing, or
    its error as a lost request."""
    if isinstance(prompt, tuple):
        prompt, client.max_token = prompt
    try:
        timing = _one(client, prompt, model, count_tokens, origin)
    except ChatError as err:
        with lock:
            result.errors.append(str(err))
        return
    with lock:
        result.timings.append(timing)


def _one(client: ChatGLMClient, prompt: str, model: str,
         count_tokens: Optional[Callable[[str], int]], origin: float) -> RequestTiming:
    started = time.perf_counter()
    first = None
    last = None
    for last in client.stream(prompt, model=model):
        if first is None and last.response:
            first = time.perf_counter() - started
    if last is None:
        raise ChatError(f"{model} sent no answer")
    latency = time.perf_counter() - started
    tokens = count_tokens(last.response) if count_tokens else len(last.response)
    return RequestTiming(first if first is not None else latency, latency, tokens, last.variant,
                         started - origin)


def run_arrivals(url: str, prompts: Sequence[str | tuple[str, int]], *, rate: float, requests: int,
                 seed: int = 0, max_token: int = 256, temperature: float = 0.0,
                 model: str = STREAM_ROUTER, count_tokens: Optional[Callable[[str], int]] = None,
                 timeout_s: float = 600.0, max_in_flight: int = 64) -> LoadResult:
    """``requests`` streamed chats arriving as a Poisson process of ``rate`` per second (an open
    loop: arrivals do not wait for answers), at most ``max_in_flight`` at once. The result's
    ``concurrency`` is ``max_in_flight``."""
    if rate <= 0 or requests < 1:
        raise ValueError(f"rate must be > 0 and requests >= 1, got {rate} and {requests}")
    rng = random.Random(seed)
    result = LoadResult(max_in_flight, 0.0, unit="tokens" if count_tokens else "chars")
    local, lock = threading.local(), threading.Lock()
    clients: list[ChatGLMClient] = []

    def one(index: int) -> None:
        client = getattr(local, "client", None)
        if client is None:  # one client (and its open stream) per pool thread
            client = local.client = ChatGLMClient(url, "grpc", temperature, max_token, timeout_s=timeout_s)
            with lock:
                clients.append(client)
        _measure(client, prompts[index % len(prompts)], model, count_tokens, start, result, lock)

    start = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_in_flight) as pool:
            due, futures = 0.0, []
            for index in range(requests):
                due += rng.expovariate(rate)
                time.sleep(max(0.0, start + due - time.perf_counter()))
                futures.append(pool.submit(one, index))
            for future in futures:
                future.result()
    finally:
        for client in clients:
            client.close()
    result.elapsed_s = time.perf_counter() - start
    return result
