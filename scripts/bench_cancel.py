#!/usr/bin/env python3
"""How long a dropped client's request takes to leave the batch, through each router (live).

A random-weight checkpoint with the tiny model's shapes (it never says a stop id, so every answer
runs to ``max_token`` unless cancelled) is built in fp16/int8/int4 for the ``cpu`` profile and
served with glm-serve's library on loopback. Per round:

- stream router: ``--streams`` clients open a stream through ``chatglm2-6b-stream``, read their
  first piece, then are dropped one at a time ``--spacing`` seconds apart
  (``stop_stream(cancel_requests=True)``). A poller scrapes the metrics port every 10 ms; the
  router's ``glm_router_cancelled_requests_total`` is counted live, after the variant confirmed
  the cancel (the batched request has left our batcher; transformers frees its KV blocks at its
  next step), so drop i's latency is when the counter first reached its i-th increment.
- then the time from the last drop until every variant reports 0 running, 0 queued and 0 KV
  blocks used (these gauges are published once a second: a bound, not a resolution).
- one-response router: ``--requests`` ``async_infer`` calls to ``chatglm2-6b``, all cancelled
  at once once the router's 8 instances forward theirs; time until the router counted them all
  and until the gauges are zero.

    .venv/bin/python scripts/bench_cancel.py                  # 48 streams, 3 rounds
"""
from __future__ import annotations

import argparse
import queue
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder import TINY_CHECKPOINT  # noqa: E402
from builder.build.pipeline import BuildOptions, build  # noqa: E402
from builder.client.chat import contract_inputs  # noqa: E402
from builder.model.config import ChatGLM2Config  # noqa: E402
from builder.serving.server import ServerOptions, TritonServer  # noqa: E402
from builder.model.synthetic import write_synthetic_checkpoint  # noqa: E402

LIMITS = {"fp16": 1000, "int8": 1500, "int4": 2000}
PROMPT = "1加1等于多少？"


def scrape(url: str) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://{url}/metrics", timeout=10).read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r'^(glm_\w+)\{(.*)\} (\S+)$', line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            key = f"{match.group(1)}[{labels.get('model') or labels.get('router')}]"
            found[key] = found.get(key, 0.0) + float(match.group(3))
    return found


def busy(found: dict) -> float:
    return sum(v for k, v in found.items() if k.split("[")[0] in (
        "glm_batch_running_requests", "glm_batch_queued_requests", "glm_kv_blocks_used"))


def inputs(max_token: int) -> list:
    return contract_inputs(PROMPT, temperature=0, max_token=max_token, history_len=0)


class Poller(threading.Thread):
    """Scrapes the metrics port every 10 ms: (time, router counter, busy gauges) samples."""

    def __init__(self, url: str, router: str):
        super().__init__(daemon=True)
        self.url, self.key = url, f"glm_router_cancelled_requests_total[{router}]"
        self.samples: list[tuple[float, float, float]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                found = scrape(self.url)
            except OSError:  # the metrics port refused one scrape under load: take the next
                continue
            self.samples.append((time.monotonic(), found.get(self.key, 0.0), busy(found)))
            time.sleep(0.01)

    def reached(self, count: float) -> float:
        return next(t for t, c, _ in self.samples if c >= count)

    def idle_after(self, start: float) -> float:
        return next(t for t, _, b in self.samples if t >= start and b == 0)


def wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.02)


def stream_round(server, streams: int, spacing: float) -> tuple[list[float], float]:
    clients = []
    for i in range(streams):
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(server.urls["grpc"])
        client.start_stream(callback=lambda result, error, q=results: q.put(error))
        client.async_stream_infer("chatglm2-6b-stream", inputs([900, 1400, 1900][i % 3]))
        clients.append((client, results))
    for _, results in clients:
        assert results.get(timeout=120) is None
    poller = Poller(server.urls["metrics"], "chatglm2-6b-stream")
    poller.start()
    wait(lambda: poller.samples)
    base = poller.samples[-1][1]
    drops = []
    for client, _ in clients:
        drops.append(time.monotonic())
        client.stop_stream(cancel_requests=True)
        client.close()
        time.sleep(spacing)
    try:
        wait(lambda: poller.samples[-1][1] >= base + streams)
    except TimeoutError:
        raise SystemExit(f"only {poller.samples[-1][1] - base:g} of {streams} dropped streams were "
                         f"cancelled: {scrape(server.urls['metrics'])}")
    wait(lambda: poller.samples[-1][2] == 0 and poller.samples[-1][0] > drops[-1] + 1.1)
    poller.stop.set()
    poller.join()
    latencies = [poller.reached(base + i + 1) - drop for i, drop in enumerate(drops)]
    return latencies, poller.idle_after(drops[-1]) - drops[-1]


def one_response_round(server, requests: int) -> tuple[float, float]:
    poller = Poller(server.urls["metrics"], "chatglm2-6b")
    poller.start()
    wait(lambda: poller.samples)
    base = poller.samples[-1][1]
    client = grpcclient.InferenceServerClient(server.urls["grpc"])
    done: queue.Queue = queue.Queue()
    calls = [client.async_infer("chatglm2-6b", inputs(900 if i % 2 else 1400),
                                callback=lambda result, error: done.put(error)) for i in range(requests)]
    wait(lambda: scrape(server.urls["metrics"]).get("glm_batch_running_requests[chatglm2-6b-fp16]", 0)
         + scrape(server.urls["metrics"]).get("glm_batch_running_requests[chatglm2-6b-int8]", 0) >= 8)
    start = time.monotonic()
    for call in calls:
        call.cancel()
    for _ in calls:
        done.get(timeout=60)
    client.close()
    wait(lambda: poller.samples[-1][1] >= base + requests)
    wait(lambda: poller.samples[-1][2] == 0 and poller.samples[-1][0] > start + 1.1)
    poller.stop.set()
    poller.join()
    return poller.reached(base + requests) - start, poller.idle_after(start) - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=48, help="streams dropped per round (default: 48)")
    parser.add_argument("--requests", type=int, default=32, help="one-response requests cancelled per round (default: 32)")
    parser.add_argument("--spacing", type=float, default=0.1, help="seconds between two drops (default: 0.1)")
    parser.add_argument("--rounds", type=int, default=3, help="repeats (default: 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="glm-bench-cancel-") as tmp:
        tmp = Path(tmp)
        config = ChatGLM2Config.from_json(TINY_CHECKPOINT / "config.json")
        checkpoint = write_synthetic_checkpoint(tmp / "never-stops", num_layers=config.num_layers,
                                                config=config)
        build(BuildOptions(quant=tuple(LIMITS), gpu="cpu", out=tmp / "repo", limits=LIMITS,
                           model=str(checkpoint)), progress=False)
        options = ServerOptions.on_loopback(tmp / "repo", log_file=tmp / "server.log")
        with TritonServer(options, ready_timeout=240) as server:
            every, idle, routed, one_idle = [], [], [], []
            for r in range(args.rounds):
                latencies, until_idle = stream_round(server, args.streams, args.spacing)
                counted, one_until_idle = one_response_round(server, args.requests)
                every += latencies
                idle.append(until_idle)
                routed.append(counted)
                one_idle.append(one_until_idle)
                print(f"round {r + 1}: {args.streams} streams dropped {args.spacing:g} s apart: "
                      f"cancelled at the variant p50 {statistics.median(latencies) * 1e3:.0f} ms, "
                      f"max {max(latencies) * 1e3:.0f} ms; all variants idle {until_idle:.2f} s after "
                      f"the last drop | {args.requests} one-response requests cancelled at once: all "
                      f"counted in {counted * 1e3:.0f} ms, variants idle after {one_until_idle:.2f} s",
                      flush=True)
            print(f"all rounds: stream drop -> cancelled at the variant: p50 "
                  f"{statistics.median(every) * 1e3:.0f} ms, max {max(every) * 1e3:.0f} ms over "
                  f"{len(every)} drops; idle after the last drop: min {min(idle):.2f} s, median "
                  f"{statistics.median(idle):.2f} s (gauges published every 1 s); one-response: counted "
                  f"min {min(routed) * 1e3:.0f} / median {statistics.median(routed) * 1e3:.0f} ms, idle "
                  f"min {min(one_idle):.2f} / median {statistics.median(one_idle):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
