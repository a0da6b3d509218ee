"""Measure one replica's service curve live and check the fleet simulator against it.

    .venv/bin/python scripts/capacity_check.py --out docs/service-curves/tiny-cpu.json

1. builds the embedded tiny model for ``--gpu cpu`` (fp16 only: one variant behind the routers) in a
   temporary folder and starts Triton on loopback (glm-serve's library);
2. closed loop at each ``--levels`` concurrency: that many clients stream the same question through
   ``chatglm2-6b-stream``, each sending its next request when the last is answered: answer tokens/s,
   time-to-first-token p50/p95 → the service-curve JSON (``builder/deploy/curves.py``) at ``--out``;
3. open loop: Poisson arrivals at two ``--rates`` (requests/s; default 40% and 75% of the peak request
   rate just measured), ``--requests`` each: measured TTFT p50/p95;
4. simulates one replica at the same rates from the curve (``builder.deploy.capacity``) and prints
   predicted against measured TTFT p95.

Everything stays on 127.0.0.1; every loop is bounded in requests and time.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import queue
import random
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder import TINY_CHECKPOINT  # noqa: E402
from builder.build import BuildOptions, build  # noqa: E402
from builder.deploy.capacity import percentile, simulate_fleet  # noqa: E402
from builder.deploy.curves import ServiceCurve, curve_record  # noqa: E402
from builder.serving.server import ServerOptions, TritonServer, free_port  # noqa: E402
from builder.tokenizer import ChatGLM2Tokenizer  # noqa: E402

QUESTION = "3只鸡和2只兔子一共有几条腿？"
MAX_TOKEN = 64


class Asker:
    """Streams QUESTION through the streaming router; one gRPC stream per thread, kept open across
    its requests (opening and closing a stream per request costs the client more than the tiny model
    costs the server, and would be measured as the server's)."""

    def __init__(self, url: str):
        self.url, self.local = url, threading.local()
        self.tokenizer = ChatGLM2Tokenizer(TINY_CHECKPOINT / "tokenizer.model")

    def _stream(self):
        state = getattr(self.local, "state", None)
        if state is None:
            client, answers = grpcclient.InferenceServerClient(self.url), queue.Queue()
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            state = self.local.state = (client, answers)
        return state

    def ask(self) -> tuple[float, float, int]:
        """(time to first token, total time, answer tokens)."""
        client, answers = self._stream()
        inputs = []
        for name, value in (("prompt", QUESTION), ("temperature", "0"), ("max_token", str(MAX_TOKEN)),
                            ("history_len", "0")):
            tensor = grpcclient.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value.encode()], dtype=object))
            inputs.append(tensor)
        history = grpcclient.InferInput("history", [0], "BYTES")
        history.set_data_from_numpy(np.array([], dtype=object))
        start = time.perf_counter()
        client.async_stream_infer("chatglm2-6b-stream", inputs + [history],
                                  enable_empty_final_response=True)
        first, text = None, ""
        while True:
            result, error = answers.get(timeout=120)
            if error is not None:
                raise RuntimeError(str(error))
            response = result.as_numpy("response")
            if response is not None:
                first = first or time.perf_counter() - start
                text = response.reshape(-1)[0].decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        return first, time.perf_counter() - start, len(self.tokenizer.encode(text))


def closed_loop(asker: Asker, concurrency: int, requests: int) -> dict:
    per_client = max(1, requests // concurrency)
    ttft, total, tokens = [], [], []
    lock = threading.Lock()

    def client_loop():
        for _ in range(per_client):
            a, b, n = asker.ask()
            with lock:
                ttft.append(a), total.append(b), tokens.append(n)

    asker.ask()  # warm the path
    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(ttft), "duration_s": round(duration, 3),
            "tokens_per_s": round(sum(tokens) / duration, 2),
            "requests_per_s": round(len(ttft) / duration, 3),
            "ttft_s": {q: round(percentile(ttft, p), 4) for q, p in (("p50", 50), ("p90", 90),
                                                                     ("p95", 95))},
            "latency_s": {"mean": round(sum(total) / len(total), 4),
                          **{q: round(percentile(total, p), 4) for q, p in (("p50", 50), ("p95", 95))}},
            "output_tokens": sum(tokens) / len(tokens)}


def open_loop(asker: Asker, rate: float, requests: int, seed: int) -> dict:
    rng = random.Random(seed)
    results = []
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        start = time.perf_counter()
        due = 0.0
        futures = []
        for _ in range(requests):
            due += rng.expovariate(rate)
            time.sleep(max(0.0, start + due - time.perf_counter()))
            futures.append(pool.submit(asker.ask))
        results = [f.result() for f in futures]
    ttft = [r[0] for r in results]
    return {"rate": rate, "requests": requests, "ttft_p50_s": percentile(ttft, 50),
            "ttft_p95_s": percentile(ttft, 95)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/service-curves/tiny-cpu.json"),
                        help="where to write the service curve (default: %(default)s)")
    # Up to 16: at 75% of the peak a Poisson replica holds 8 or more requests about a tenth of the
    # time, and the TTFT the simulator draws there should be measured, not extrapolated.
    parser.add_argument("--levels", default="1,2,4,8,16", help="closed-loop concurrencies")
    parser.add_argument("--curve-requests", type=int, default=64,
                        help="requests per closed-loop level (default: %(default)s)")
    parser.add_argument("--rates", default="", help="open-loop rates, requests/s (default: 40%% "
                        "and 75%% of the peak measured)")
    parser.add_argument("--requests", type=int, default=120,
                        help="requests per open-loop rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="glm-capacity-"))
    repo = build(BuildOptions(quant=("fp16",), gpu="cpu", out=tmp / "repo"), progress=False).out
    options = ServerOptions(repo, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), address="127.0.0.1",
                            log_file=tmp / "server.log")
    load_before = os.getloadavg()
    with TritonServer(options, ready_timeout=240) as server:
        asker = Asker(server.urls["grpc"])
        levels = []
        for concurrency in (int(c) for c in args.levels.split(",")):
            level = closed_loop(asker, concurrency, args.curve_requests)
            levels.append(level)
            print(f"closed loop, concurrency {concurrency}: {level['tokens_per_s']} tokens/s, "
                  f"{level['requests_per_s']} req/s, TTFT p50 {level['ttft_s']['p50'] * 1000:.1f} ms "
                  f"p95 {level['ttft_s']['p95'] * 1000:.1f} ms", flush=True)
        output_tokens = sum(lv.pop("output_tokens") * lv["requests"] for lv in levels) / sum(
            lv["requests"] for lv in levels)
        record = curve_record(
            levels, target="chatglm2-6b-stream", profile="cpu",
            prompt_tokens=len(asker.tokenizer.build_chat_input(QUESTION)), output_tokens=round(output_tokens, 2),
            measured=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
                    f"average before {', '.join(f'{x:.2f}' for x in load_before)}",
            command=" ".join(["scripts/capacity_check.py", *(argv or sys.argv[1:])]),
            model="the embedded tiny ChatGLM2 (not ChatGLM2-6B), fp16 variant only")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        curve = ServiceCurve.from_dict(record)
        peak = max(lv["requests_per_s"] for lv in levels)
        rates = ([float(r) for r in args.rates.split(",")] if args.rates
                 else [round(0.4 * peak, 2), round(0.75 * peak, 2)])
        rows = []
        for i, rate in enumerate(rates):
            measured = open_loop(asker, rate, args.requests, args.seed + i)
            predicted = simulate_fleet(curve, replicas=1, rate=rate,
                                       prompt_tokens=curve.prompt_tokens,
                                       output_tokens=curve.output_tokens, seed=args.seed)
            error = predicted.ttft_p95_s / measured["ttft_p95_s"] - 1
            rows.append((rate, measured, predicted, error))
            print(f"open loop {rate:g} req/s ({args.requests} requests): measured TTFT p50 "
                  f"{measured['ttft_p50_s'] * 1000:.1f} ms p95 {measured['ttft_p95_s'] * 1000:.1f} ms; "
                  f"simulated p50 {predicted.ttft_p50_s * 1000:.1f} ms p95 "
                  f"{predicted.ttft_p95_s * 1000:.1f} ms ({error:+.0%})", flush=True)
    print(f"wrote {args.out}; load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if all(abs(e) <= 0.25 for *_, e in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
