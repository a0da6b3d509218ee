#!/usr/bin/env python3
"""The Python half of ``scripts/gpu_check.sh``: decode speed and peak memory per precision on one
CUDA GPU, and the one table the check prints.

    python scripts/gpu_bench.py detect [--fallback a100-80gb]        # the GPU profile of cuda:0
    python scripts/gpu_bench.py checkpoint --cache DIR               # 28 layers, random weights
    python scripts/gpu_bench.py bench --checkpoint DIR --quant fp16,int8,int4 --out bench.json
    python scripts/gpu_bench.py serve --repo DIR --out serve.json    # glm-serve, one request
    python scripts/gpu_bench.py table --profile DIR [DIR...] --bench bench.json [--tests FILE]
                                      [--serve FILE]

``bench`` runs each precision in a fresh process (its own CUDA context, so peaks do not mix):
greedy decode of ``--new-tokens`` from a 16-token prompt (ms/token: the median gap between
tokens), for int8/int4 once with the fused kernel and once with row-block extraction
(``builder.model.cuda_quant``), then ``--batch`` sequences decoded together (tokens/s), and the peak
(CUDA context + caching allocator's peak reserved) beside the plan's need for that batch
(``builder.plan.placement.phase_need`` with the detected GPU profile's per-process overhead).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT_TOKENS = 16
FALLBACK_PROFILE = "a100-80gb"  # THUDM's table's card; a GPU no profile matches is compared with it
MIB, GIB = 2**20, 2**30


# -- arguments ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The four subcommands.

    >>> build_parser().parse_args(["bench", "--checkpoint", "ckpt"]).quant
    'fp16,int8,int4'
    """
    parser = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    detect = sub.add_parser("detect", help="print the GPU profile matching cuda:0")
    detect.add_argument("--fallback", default=FALLBACK_PROFILE,
                        help="printed when no profile matches (default: %(default)s)")
    ckpt = sub.add_parser("checkpoint", help="write the 28-layer random-weight checkpoint once")
    ckpt.add_argument("--cache", type=Path, required=True, help="folder that holds it")
    ckpt.add_argument("--layers", type=int, default=28, help="decoder layers (default: %(default)s)")
    bench = sub.add_parser("bench", help="decode ms/token, batched tokens/s and peak memory")
    bench.add_argument("--checkpoint", type=Path, required=True, help="THUDM-layout checkpoint")
    bench.add_argument("--quant", default="fp16,int8,int4", help="precisions (default: %(default)s)")
    bench.add_argument("--new-tokens", type=int, default=64, help="tokens decoded (default: %(default)s)")
    bench.add_argument("--batch", type=int, default=8, help="sequences decoded together (default: %(default)s)")
    bench.add_argument("--gpu", help="GPU profile to plan with (default: detected, else "
                       f"{FALLBACK_PROFILE})")
    bench.add_argument("--out", type=Path, help="write the results here as JSON")
    one = sub.add_parser("bench-one", help=argparse.SUPPRESS)
    for action in bench._actions[1:]:
        if action.dest not in ("quant", "out"):
            one._add_action(action)
    one.add_argument("--precision", required=True)
    serve = sub.add_parser("serve", help="start glm-serve on a repository, ask once, stop it")
    serve.add_argument("--repo", type=Path, required=True, help="repository glm-build wrote")
    serve.add_argument("--prompt", default="3只鸡和2只兔子一共有几条腿？",
                       help="the question; the default is one the tiny model was trained to answer "
                       "(default: %(default)s)")
    serve.add_argument("--timeout", type=float, default=240,
                       help="seconds to wait for the server to be ready (default: %(default)s)")
    serve.add_argument("--out", type=Path, help="write the result here as JSON")
    table = sub.add_parser("table", help="print the check's one table")
    table.add_argument("--profile", type=Path, nargs="*", default=[],
                       help="folders holding a glm-build profile.json")
    table.add_argument("--bench", type=Path, help="bench's JSON")
    table.add_argument("--tests", type=Path, help="pytest's output (its last line is used)")
    table.add_argument("--serve", type=Path, help="the serving round trip's JSON")
    return parser


# -- on the GPU ------------------------------------------------------------------------------------
def detect_profile(fallback: str | None = FALLBACK_PROFILE) -> str | None:
    """The name of the GPU profile matching cuda:0, else ``fallback``."""
    import torch

    from builder.plan.profiles import match_device

    index = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    found = match_device(torch.cuda.get_device_name(index),
                         torch.cuda.get_device_capability(index), total)
    return found.name if found else fallback


def _decode_ms(model, vocab: int, new_tokens: int) -> float:
    """Median ms between greedy tokens of one sequence (its prefill excluded)."""
    import torch

    from builder.model.generation import generate_ids

    prompt = torch.randint(3, vocab, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0))
    stamps = [time.perf_counter()]
    for _ in generate_ids(model, prompt.tolist(), max_length=PROMPT_TOKENS + new_tokens + 1,
                          temperature=0, top_p=1.0, stop_ids=()):
        stamps.append(time.perf_counter())  # sampling reads the logits: the GPU is done
    gaps = [b - a for a, b in zip(stamps[2:], stamps[3:])]
    return 1000 * statistics.median(gaps)


def _batched_tokens_per_s(model, vocab: int, batch: int, new_tokens: int) -> float:
    """Greedy decoding of ``batch`` sequences together; generated tokens per second."""
    import torch
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, vocab, (batch, PROMPT_TOKENS), generator=g).to(device)  # [batch, 16]
    cache = DynamicCache()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        out = model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1)
        sync()
        start = time.perf_counter()
        for _ in range(new_tokens):
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)  # [batch, 1]
            out = model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1)
        tokens.tolist()  # waits for the last step
        sync()
    return batch * new_tokens / (time.perf_counter() - start)


def bench_one(checkpoint: Path, precision: str, new_tokens: int, batch: int,
              gpu: str | None) -> dict:
    """One precision in this process: speeds, the peak, and the plan's need beside it."""
    import torch

    from builder.model import cuda_quant
    from builder.profile import measure
    from builder.model.checkpoint import check_checkpoint, load_chatglm2
    from builder.plan.memory import weight_bytes
    from builder.plan.placement import Variant, phase_need
    from builder.plan.profiles import load_profile

    variant = Variant(precision)
    config = check_checkpoint(checkpoint)
    index = torch.cuda.current_device()
    used_before = measure._device_used_by_pci(measure._cuda_pci_bus_id(index))
    profile = load_profile(gpu or detect_profile())
    start = time.perf_counter()
    model, _ = load_chatglm2(checkpoint, device="cuda", dtype=torch.float16, bits=variant.bits,
                             group_size=variant.group_size)
    torch.cuda.synchronize()
    load_seconds = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    vocab = config.padded_vocab_size
    _decode_ms(model, vocab, 4)  # warm-up: kernels compiled and loaded, cuBLAS handles made
    result = {"precision": precision, "gpu": torch.cuda.get_device_name(index),
              "profile": profile.name, "load_seconds": round(load_seconds, 1),
              "kernel": cuda_quant.kernel_in_use() if variant.bits < 16 else "cuBLAS fp16",
              "decode_ms": round(_decode_ms(model, vocab, new_tokens), 2)}
    if variant.bits < 16:
        cuda_quant.use_fused(False)
        result["decode_ms_extract"] = round(_decode_ms(model, vocab, new_tokens), 2)
        cuda_quant.use_fused(True)
    _batched_tokens_per_s(model, vocab, batch, 2)  # warm-up at this batch size
    result["batch"] = batch
    result["batched_tokens_per_s"] = round(_batched_tokens_per_s(model, vocab, batch, new_tokens), 1)
    # batching's gain like for like: one sequence through the same loop as the batch
    _batched_tokens_per_s(model, vocab, 1, 2)
    result["batch1_tokens_per_s"] = round(_batched_tokens_per_s(model, vocab, 1, new_tokens), 1)
    result["batching_gain"] = round(result["batched_tokens_per_s"] / result["batch1_tokens_per_s"], 2)
    free, total = torch.cuda.mem_get_info(index)
    context = total - free - (used_before or 0) - torch.cuda.memory_reserved()
    result["peak_bytes"] = context + torch.cuda.max_memory_reserved()
    result["plan_bytes"] = phase_need(config, variant, PROMPT_TOKENS + new_tokens + 1, profile,
                                      batch)
    read = weight_bytes(config, variant.bits) - config.padded_vocab_size * config.hidden_size * 2
    result["bandwidth_share"] = round(read / (result["decode_ms"] / 1000)
                                      / profile.bandwidth_bytes_per_s, 3)
    return result


def serve_round_trip(repo: Path, prompt: str, timeout: float, log: Path | None = None) -> dict:
    """glm-serve's server (``TritonServer``) on loopback ports, one chat request once it is ready,
    then stopped.

    The result: ``ok``, ``seconds`` (the request), ``answer`` and ``variant``, or ``error``."""
    from builder.client.chat import ChatGLMClient
    from builder.serving.server import ServerOptions, TritonServer

    try:
        options = ServerOptions.on_loopback(repo, log_file=log)
        with TritonServer(options, ready_timeout=timeout) as server:
            client = ChatGLMClient(url=server.urls["grpc"], temperature=0.0, max_token=64)
            try:
                result = client.chat(prompt)
            finally:
                client.close()
    except Exception as err:  # noqa: BLE001 — reported in the table
        return {"ok": False, "error": f"{type(err).__name__}: {err}"[:200]}
    return {"ok": True, "seconds": result.latency_s, "answer": result.response,
            "variant": result.variant}


def _gib(value) -> str:
    return "–" if value is None else f"{value / GIB:.2f}"


def profile_cells(records: list[dict]) -> dict[tuple[str, str], str]:
    """(precision, "phase:tokens") → "measured / estimated / published" GiB, the estimate with
    the measured card's profile overhead (``details["profile_overhead_bytes"]``) in place of the
    A100's that ``glm-build profile`` uses.

    >>> from builder.plan.memory import DEFAULT_CUDA_PROCESS_OVERHEAD as A100
    >>> r = {"precision": "int4", "phase": "encode", "tokens": 2048, "measured_bytes": 5 * GIB,
    ...      "estimated_bytes": 5 * GIB + A100, "published_bytes": None,
    ...      "details": {"profile_overhead_bytes": 0}}
    >>> profile_cells([r])
    {('int4', 'encode:2048'): '5.00 / 5.00 / –'}
    """
    from builder.plan.memory import DEFAULT_CUDA_PROCESS_OVERHEAD

    cells = {}
    for r in records:
        overhead = r.get("details", {}).get("profile_overhead_bytes", DEFAULT_CUDA_PROCESS_OVERHEAD)
        estimate = r["estimated_bytes"] - DEFAULT_CUDA_PROCESS_OVERHEAD + overhead
        cells[(r["precision"], f"{r['phase']}:{r['tokens']}")] = (
            f"{_gib(r['measured_bytes'])} / {_gib(estimate)} / {_gib(r.get('published_bytes'))}")
    return cells


def format_table(records: list[dict], bench: list[dict], tests: str | None = None,
                 serve: dict | None = None) -> str:
    """The check's one table (markdown), a row per precision, then the tests and the round trip.

    >>> print(format_table([], [{"precision": "int4", "decode_ms": 9.5, "decode_ms_extract": 21.0,
    ...     "batched_tokens_per_s": 640.0, "batch": 8, "peak_bytes": 5 * GIB, "plan_bytes": 6 * GIB,
    ...     "bandwidth_share": 0.41, "kernel": "fused", "gpu": "G", "profile": "p"}]))
    ... # doctest: +NORMALIZE_WHITESPACE
    GPU: G (profile p)
    | precision | encode:2048 GiB meas / est / pub | generate:8192 GiB meas / est / pub | decode ms/token (kernel) | extract ms/token | % bandwidth | tokens/s ×8 | peak / plan GiB |
    |---|---|---|---|---|---|---|---|
    | int4 | – | – | 9.50 (fused) | 21.00 | 41% | 640.0 | 5.00 / 6.00 |
    """
    cells = profile_cells(records)
    by_precision = {b["precision"]: b for b in bench}
    precisions = list(dict.fromkeys([r["precision"] for r in records] + list(by_precision)))
    batch = next((b["batch"] for b in bench if "batch" in b), 8)
    gpu = next((f"{b['gpu']} (profile {b['profile']})" for b in bench if "gpu" in b),
               next((r["details"].get("gpu") for r in records if r.get("details", {}).get("gpu")),
                    "?"))
    lines = [f"GPU: {gpu}",
             "| precision | encode:2048 GiB meas / est / pub | generate:8192 GiB meas / est / pub "
             f"| decode ms/token (kernel) | extract ms/token | % bandwidth | tokens/s ×{batch} "
             "| peak / plan GiB |", "|---|---|---|---|---|---|---|---|"]
    for p in precisions:
        b = by_precision.get(p, {})
        decode = f"{b['decode_ms']:.2f} ({b.get('kernel', '?')})" if "decode_ms" in b else \
            b.get("error", "–")
        extract = f"{b['decode_ms_extract']:.2f}" if "decode_ms_extract" in b else "–"
        share = f"{b['bandwidth_share']:.0%}" if "bandwidth_share" in b else "–"
        tps = f"{b['batched_tokens_per_s']:.1f}" if "batched_tokens_per_s" in b else "–"
        if "batching_gain" in b:  # over one sequence through the same loop
            tps += f" ({b['batching_gain']:.1f}× one)"
        peak = f"{_gib(b['peak_bytes'])} / {_gib(b['plan_bytes'])}" if "peak_bytes" in b else "–"
        lines.append(f"| {p} | {cells.get((p, 'encode:2048'), '–')} | "
                     f"{cells.get((p, 'generate:8192'), '–')} | {decode} | {extract} | {share} | "
                     f"{tps} | {peak} |")
    if tests is not None:
        lines.append(f"CUDA tests: {tests}")
    if serve is not None:
        lines.append("glm-serve round trip (KIND_GPU): " + (
            f"ok in {serve['seconds']:.1f} s ({serve.get('variant', '?')}): "
            f"{serve.get('answer', '')[:60]!r}" if serve.get("ok") else "not run"
            if serve.get("error") == "not run" else f"FAILED: {serve.get('error', '?')}"))
    return "\n".join(lines)


def _last_line(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None if path is None else "not run"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "no output"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "table":
        records = []
        for folder in args.profile:
            path = folder / "profile.json"
            if path.is_file():
                records += json.loads(path.read_text())
        bench = json.loads(args.bench.read_text()) if args.bench and args.bench.is_file() else []
        serve = json.loads(args.serve.read_text()) if args.serve and args.serve.is_file() else (
            None if args.serve is None else {"ok": False, "error": "not run"})
        print(format_table(records, bench, _last_line(args.tests), serve))
        return 0
    if args.command == "serve":
        result = serve_round_trip(args.repo, args.prompt, args.timeout,
                                  args.out.with_suffix(".log") if args.out else None)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    if args.command == "checkpoint":  # the same folder `glm-build profile --spec` looks in
        from builder.profile.run import SYNTHETIC_DIR
        from builder.model.synthetic import write_synthetic_checkpoint

        path = args.cache / SYNTHETIC_DIR.format(layers=args.layers)
        if not (path / "config.json").is_file():
            write_synthetic_checkpoint(path, num_layers=args.layers)
        print(path)
        return 0
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_bench.py: {args.command} needs a CUDA GPU; torch {torch.__version__} sees "
              "none", file=sys.stderr)
        return 2
    if args.command == "detect":
        print(detect_profile(args.fallback))
    elif args.command == "bench-one":
        print(json.dumps(bench_one(args.checkpoint, args.precision, args.new_tokens, args.batch,
                                   args.gpu)))
    else:
        results = []
        for precision in args.quant.split(","):
            run = subprocess.run([sys.executable, __file__, "bench-one", "--precision", precision,
                                  "--checkpoint", str(args.checkpoint), "--new-tokens",
                                  str(args.new_tokens), "--batch", str(args.batch)]
                                 + (["--gpu", args.gpu] if args.gpu else []),
                                 capture_output=True, text=True)
            if run.returncode == 0:
                results.append(json.loads(run.stdout.strip().splitlines()[-1]))
            else:
                tail = (run.stderr.strip().splitlines() or ["?"])[-1]
                results.append({"precision": precision, "error": f"failed: {tail}"[:80]})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
