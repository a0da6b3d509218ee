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
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder import TINY_CHECKPOINT  # noqa: E402
from builder.build.pipeline import BuildOptions, build  # noqa: E402
from builder.client.chat import STREAM_ROUTER  # noqa: E402
from builder.deploy.capacity import simulate_fleet  # noqa: E402
from builder.deploy.curves import ServiceCurve, curve_record  # noqa: E402
from builder.client.loadtest import run_arrivals, run_load  # noqa: E402
from builder.serving.server import ServerOptions, TritonServer  # noqa: E402
from builder.model.tokenizer import ChatGLM2Tokenizer  # noqa: E402

QUESTION = "3只鸡和2只兔子一共有几条腿？"
MAX_TOKEN = 64


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
    options = ServerOptions.on_loopback(repo, log_file=tmp / "server.log")
    load_before = os.getloadavg()
    tokenizer = ChatGLM2Tokenizer(TINY_CHECKPOINT / "tokenizer.model")
    load = dict(max_token=MAX_TOKEN, model=STREAM_ROUTER,
                count_tokens=lambda text: len(tokenizer.encode(text)))
    with TritonServer(options, ready_timeout=240) as server:
        url = server.urls["grpc"]
        run_load(url, [QUESTION], concurrency=1, requests=1, **load)  # warm the path
        levels = []
        for concurrency in (int(c) for c in args.levels.split(",")):
            per_client = max(1, args.curve_requests // concurrency)
            level = run_load(url, [QUESTION], concurrency=concurrency,
                             requests=per_client * concurrency, **load).as_level()
            levels.append(level)
            print(f"closed loop, concurrency {concurrency}: {level['tokens_per_s']} tokens/s, "
                  f"{level['requests_per_s']} req/s, TTFT p50 {level['ttft_s']['p50'] * 1000:.1f} ms "
                  f"p95 {level['ttft_s']['p95'] * 1000:.1f} ms", flush=True)
        output_tokens = sum(lv.pop("output_tokens") * lv["requests"] for lv in levels) / sum(
            lv["requests"] for lv in levels)
        record = curve_record(
            levels, target=STREAM_ROUTER, profile="cpu",
            prompt_tokens=len(tokenizer.build_chat_input(QUESTION)), output_tokens=round(output_tokens, 2),
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
            arrivals = run_arrivals(url, [QUESTION], rate=rate, requests=args.requests,
                                    seed=args.seed + i, **load)
            measured = {"ttft_p50_s": arrivals.ttft(0.5), "ttft_p95_s": arrivals.ttft(0.95)}
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
