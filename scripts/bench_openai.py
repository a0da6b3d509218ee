#!/usr/bin/env python3
"""What the OpenAI endpoint adds over a direct gRPC stream to the router, side by side (live).

The tiny repository (fp16/int8/int4, ``cpu`` profile, the tests' routing limits) is served by
``glm-serve`` itself in a subprocess, so the gateway runs where it runs in production (beside
Triton, in glm-serve's process), and the clients here cannot slow it down through our GIL. Per
repeat, the same question (temperature 0, up to ``--max-tokens`` new tokens) is asked:

- c=1: ``--requests`` times each way, alternating: a gRPC stream to ``chatglm2-6b-stream``
  (tritonclient, the way glm-chat streams) and a streamed ``/v1/chat/completions`` (httpx).
  TTFT = the first piece of text; whole = the final response / ``data: [DONE]``.
- c=8: 8 clients each way at once (gRPC first, then the gateway), ``--requests`` each;
  tokens/s = completion tokens (the tokenizer's count of each answer) / wall time.

Prints each repeat, then min / median over the repeats.

    .venv/bin/python scripts/bench_openai.py --repeats 5
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

QUESTION = "3只鸡和2只兔子一共有几条腿？"


def start(base: Path):
    from builder.build.pipeline import BuildOptions, build
    from builder.serving.server import free_port
    from conftest import LIVE_LIMITS

    repo = build(BuildOptions(quant=("fp16", "int8", "int4"), gpu="cpu", out=base / "repo",
                              limits=LIVE_LIMITS), progress=False).out
    ports = {name: free_port() for name in ("http", "grpc", "metrics", "openai")}
    process = subprocess.Popen(
        [sys.executable, "-m", "builder.serving.cli", str(repo), "--address", "127.0.0.1",
         "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
         "--metrics-port", str(ports["metrics"]), "--openai-port", str(ports["openai"]),
         "--log-file", str(base / "server.log")], stdout=subprocess.PIPE, text=True)
    for _ in range(2):
        line = process.stdout.readline()
        print(line.strip(), flush=True)
    if not line.startswith("OpenAI endpoint ready"):
        process.kill()
        sys.exit("glm-serve did not start")
    return process, repo, ports


def grpc_inputs(prompt_tokens: int, max_tokens: int) -> list:
    values = {"prompt": [QUESTION], "history": [], "temperature": ["0.0"],
              "max_token": [str(prompt_tokens + max_tokens)], "history_len": ["0"]}
    out = []
    for name, items in values.items():
        tensor = grpcclient.InferInput(name, [len(items)], "BYTES")
        tensor.set_data_from_numpy(np.array([v.encode() for v in items], dtype=object).reshape(len(items)))
        out.append(tensor)
    return out


def via_grpc(url: str, inputs: list) -> tuple[float, float, str]:
    """(TTFT s, whole s, answer) of one gRPC stream to the stream router."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    started = time.perf_counter()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("chatglm2-6b-stream", inputs, enable_empty_final_response=True)
        first, text = None, ""
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise RuntimeError(error)
            response = result.as_numpy("response")
            if response is not None:
                text = response[0].decode()
                if first is None and text:
                    first = time.perf_counter() - started
            if result.get_response().parameters["triton_final_response"].bool_param:
                return first, time.perf_counter() - started, text
    finally:
        client.stop_stream()
        client.close()


def via_openai(http: httpx.Client, max_tokens: int) -> tuple[float, float, str]:
    """(TTFT s, whole s, answer) of one streamed chat completion."""
    body = {"model": "chatglm2-6b", "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True}
    started = time.perf_counter()
    first, parts = None, []
    with http.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                return first, time.perf_counter() - started, "".join(parts)
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:  # an error after the headers: OpenAI's body as an event
                    raise RuntimeError(f"the gateway's stream failed: {event['error']}")
                delta = event["choices"][0]["delta"].get("content")
                if delta:
                    parts.append(delta)
                    first = first or time.perf_counter() - started
    raise RuntimeError("the stream ended without [DONE]")


def concurrent_tokens(ask, clients: int, requests: int, count) -> float:
    """Completion tokens per second with ``clients`` asking ``requests`` times each."""
    def worker(_):
        return sum(count(ask()[2]) for _ in range(requests))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(worker, range(clients)))
    return tokens / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=20, help="requests per way and client, per round")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    args = parser.parse_args()
    from builder.model.tokenizer import ChatGLM2Tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-openai-") as tmp:
        process, repo, ports = start(Path(tmp))
        try:
            tokenizer = ChatGLM2Tokenizer(repo / "chatglm2-6b-stream" / "1" / "tokenizer.model")
            count = lambda text: len(tokenizer.encode(text))  # noqa: E731
            prompt_tokens = len(tokenizer.build_chat_input(QUESTION))
            grpc_url = f"127.0.0.1:{ports['grpc']}"
            inputs = grpc_inputs(prompt_tokens, args.max_tokens)
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            with httpx.Client(base_url=f"http://127.0.0.1:{ports['openai']}/v1", timeout=120,
                              trust_env=False, limits=limits) as http:
                ask_grpc = lambda: via_grpc(grpc_url, inputs)  # noqa: E731
                ask_openai = lambda: via_openai(http, args.max_tokens)  # noqa: E731
                g, o = ask_grpc(), ask_openai()  # warm up, and the same answer both ways
                assert g[2] == o[2], (g[2], o[2])
                rows = []
                for repeat in range(args.repeats):
                    samples = {"grpc": [], "openai": []}
                    for _ in range(args.requests):
                        samples["grpc"].append(ask_grpc())
                        samples["openai"].append(ask_openai())
                    row = {}
                    for way, got in samples.items():
                        row[f"{way}_ttft_ms"] = statistics.median(s[0] for s in got) * 1000
                        row[f"{way}_whole_ms"] = statistics.median(s[1] for s in got) * 1000
                    row["grpc_tok_s"] = concurrent_tokens(ask_grpc, args.clients, args.requests, count)
                    row["openai_tok_s"] = concurrent_tokens(ask_openai, args.clients, args.requests, count)
                    row["added_ttft_ms"] = row["openai_ttft_ms"] - row["grpc_ttft_ms"]
                    row["added_whole_ms"] = row["openai_whole_ms"] - row["grpc_whole_ms"]
                    row["tok_s_ratio"] = row["openai_tok_s"] / row["grpc_tok_s"]
                    rows.append(row)
                    print(f"repeat {repeat + 1}: " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()),
                          flush=True)
            print(f"\n{len(rows)} repeats, {args.requests} requests per way at c=1 and per client at "
                  f"c={args.clients}; answer: {count(g[2])} tokens; min / median:")
            for key in rows[0]:
                values = [r[key] for r in rows]
                print(f"  {key:16s} {min(values):9.2f} / {statistics.median(values):9.2f}")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
