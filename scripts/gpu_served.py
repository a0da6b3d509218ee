#!/usr/bin/env python3
"""The served table of ``scripts/gpu_check.sh``: glm-serve on the GPU, streamed chats at several
concurrencies, per precision, with CUDA graphs on and off (issue 22).

    python scripts/gpu_served.py run --repo DIR --graphs on --out served-on.json
    python scripts/gpu_served.py run --repo DIR --graphs off --out served-off.json
    python scripts/gpu_served.py table served-on.json served-off.json

``run`` starts ``glm-serve REPO`` (``GLM_BUILD_CUDA_GRAPHS=0`` in its environment for ``--graphs
off``: every variant's batcher decodes eagerly), waits until it is ready, then for each target
(the streaming router, which routes a short chat to the highest precision, and each variant's own
model) and each concurrency runs :func:`builder.client.loadtest.run_load` with greedy chats of
``--max-token`` tokens, counting answer tokens with the model's tokenizer, and stops the server.
The repository is the 28-layer random-weight checkpoint built with ``--quantize-at build``, so
loading fits the check's time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["3只鸡和2只兔子一共有几条腿？", "What is 2 plus 3?", "你好", "鸡兔同笼，共有10个头，28只脚，鸡和兔子各有几只？"]
LEVELS = (1, 8, 32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_served.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve a repository and measure each concurrency")
    run.add_argument("--repo", type=Path, required=True, help="repository glm-build wrote")
    run.add_argument("--graphs", choices=("on", "off"), default="on",
                     help="CUDA graphs in the variants' batchers (off: GLM_BUILD_CUDA_GRAPHS=0)")
    run.add_argument("--levels", default=",".join(map(str, LEVELS)),
                     help="concurrencies (default: %(default)s)")
    run.add_argument("--quant", default="fp16,int8,int4",
                     help="variants measured on their own model besides the router "
                     "(default: %(default)s; 'none' for the router only)")
    run.add_argument("--max-token", type=int, default=32,
                     help="answer tokens per chat (default: %(default)s)")
    run.add_argument("--timeout", type=float, default=240, help="seconds to wait for readiness")
    run.add_argument("--out", type=Path, help="write the results here as JSON")
    table = sub.add_parser("table", help="print the served table from run's JSON files")
    table.add_argument("results", type=Path, nargs="*", help="run's JSON files")
    return parser


def levels_of(text: str) -> list[int]:
    """``"1,8,32"`` → ``[1, 8, 32]``; each a positive integer."""
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or any(level < 1 for level in levels):
        raise ValueError(f"--levels takes positive integers such as 1,8,32, got {text!r}")
    return levels


def requests_at(concurrency: int) -> int:
    """Chats sent at one concurrency: two rounds of the clients (at least 4)."""
    return max(4, 2 * concurrency)


def server_env(graphs: bool, base: dict | None = None) -> dict:
    """glm-serve's environment: CUDA graphs off through the switch the batchers read."""
    from builder.model.generation import GRAPHS_ENV

    env = dict(os.environ if base is None else base)
    env.pop(GRAPHS_ENV, None)
    if not graphs:
        env[GRAPHS_ENV] = "0"
    return env


@contextmanager
def serving(repo: Path, *, graphs: bool, timeout: float, log: Path | None = None):
    """``glm-serve REPO`` on loopback ports until ready; yields its gRPC ``host:port``."""
    from builder.serving.server import free_port

    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    http, grpc, metrics = sorted(ports)
    command = [shutil.which("glm-serve") or "glm-serve", str(repo), "--address", "127.0.0.1",
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    if log is not None:
        command += ["--log-file", str(log)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=server_env(graphs))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"glm-serve exited {server.returncode}: "
                                   + (server.stderr.read().strip().splitlines() or ["?"])[-1][:200])
            try:
                with opener.open(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"glm-serve not ready after {timeout:.0f} s")
            time.sleep(2)
        yield f"127.0.0.1:{grpc}"
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


def targets(precisions: list[str]) -> list[tuple[str, str]]:
    """``(label, Triton model)`` pairs: the streaming router, then each variant's own model."""
    from builder.client.chat import STREAM_ROUTER
    from builder.plan.placement import MODEL_NAME

    return [("router", STREAM_ROUTER)] + [(p, f"{MODEL_NAME}-{p}") for p in precisions]


def measure(url: str, precisions: list[str], levels: list[int], max_token: int,
            graphs: bool) -> list[dict]:
    """One row per (target, concurrency): :meth:`LoadResult.as_dict` plus what was measured."""
    from builder import TINY_CHECKPOINT
    from builder.client.loadtest import run_load
    from builder.model.tokenizer import ChatGLM2Tokenizer

    tokenizer = ChatGLM2Tokenizer(TINY_CHECKPOINT / "tokenizer.model")  # the same vocabulary
    rows = []
    for label, model in targets(precisions):
        for level in levels:
            result = run_load(url, PROMPTS, concurrency=level, requests=requests_at(level),
                              max_token=max_token, temperature=0.0, model=model,
                              count_tokens=lambda text: len(tokenizer.encode(text)))
            row = {"target": label, "model": model, "graphs": graphs, **result.as_dict(),
                   "errors": result.errors[:3]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def format_served(rows: list[dict]) -> str:
    """The served table (markdown): a row per target, graphs setting and concurrency.

    >>> print(format_served([{"target": "int4", "graphs": True, "concurrency": 8, "requests": 16,
    ...     "lost": 0, "tokens_per_s": 812.5, "ttft_p50_s": 0.05, "ttft_p95_s": 0.12,
    ...     "tpot_p50_s": 0.0081}]))
    | target | graphs | c | tokens/s | TTFT p50 / p95 ms | ms per output token | lost |
    |---|---|---|---|---|---|---|
    | int4 | on | 8 | 812.5 | 50 / 120 | 8.1 | 0/16 |
    """
    lines = ["| target | graphs | c | tokens/s | TTFT p50 / p95 ms | ms per output token | lost |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["target"] != "router", r["target"], not r["graphs"],
                                         r.get("concurrency", 0))):
        if "error" in r:
            lines.append(f"| {r['target']} | {'on' if r['graphs'] else 'off'} | – | "
                         f"{r['error'][:60]} | – | – | – |")
            continue
        lines.append(f"| {r['target']} | {'on' if r['graphs'] else 'off'} | {r['concurrency']} | "
                     f"{r['tokens_per_s']:.1f} | {r['ttft_p50_s'] * 1000:.0f} / "
                     f"{r['ttft_p95_s'] * 1000:.0f} | {r['tpot_p50_s'] * 1000:.1f} | "
                     f"{r['lost']}/{r['requests'] + r['lost']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "table":
        rows = []
        for path in args.results:
            if path.is_file():
                rows += json.loads(path.read_text())
        print(format_served(rows) if rows else "served: not run")
        return 0
    levels = levels_of(args.levels)
    precisions = [] if args.quant == "none" else [p for p in args.quant.split(",") if p]
    graphs = args.graphs == "on"
    try:
        with serving(args.repo, graphs=graphs, timeout=args.timeout,
                     log=args.out.with_suffix(".log") if args.out else None) as url:
            rows = measure(url, precisions, levels, args.max_token, graphs)
    except Exception as err:  # noqa: BLE001 — reported in the table
        rows = [{"target": "glm-serve", "graphs": graphs, "error": f"{type(err).__name__}: {err}"}]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all("error" not in r and r["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
