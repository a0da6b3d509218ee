#!/usr/bin/env python3
"""Peak host memory (RSS) and time of `load_chatglm2`, float and quantized-while-loading.

Each measurement runs in a fresh subprocess: it imports everything the load needs, records its RSS
(the baseline), loads, and reports its peak RSS (`ru_maxrss`), the model's resident bytes and the
load time. Cases: the embedded tiny model, and synthetic checkpoints with ChatGLM2-6B's real layer
shapes (`builder.model.synthetic`, one shard per layer) at a few depths; peak RSS is fitted as
a + b × layers and extrapolated to 28 layers.

    .venv/bin/python scripts/measure_load_rss.py [--layers 2,4] [--repeats 3] [--out docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchdoc import OtherCpu, machine, publish, wait_for_quiet  # noqa: E402

FULL_LAYERS = 28
VARIANTS = {"fp32": (16, "float32"), "fp16": (16, "float16"), "int8": (8, "bfloat16"), "int4": (4, "bfloat16")}


def child(case: dict) -> None:
    """Runs in the fresh subprocess: load once, print one JSON line."""
    import resource
    import time

    import psutil
    import safetensors.torch  # noqa: F401  (everything the load imports, before the baseline)
    import torch
    import transformers.models.glm.modeling_glm  # noqa: F401

    from builder.model.checkpoint import load_chatglm2
    from builder.model.quantization import QuantizedLinear  # noqa: F401

    torch.set_num_threads(case["threads"])
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    model, _ = load_chatglm2(case["path"], bits=case["bits"], dtype=getattr(torch, case["dtype"]))
    load_s = time.perf_counter() - start
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    tensors = list(model.parameters()) + list(model.buffers())
    # A float checkpoint whose dtype needs no cast stays memory-mapped from its shards: nothing is
    # resident until it is read. Read every weight once, as the first forward passes would.
    with torch.inference_mode():
        for t in tensors:
            t.sum()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    print(json.dumps({"baseline": baseline, "peak_load": peak_load,
                      "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "after": psutil.Process().memory_info().rss,
                      "model": sum(storages.values()), "load_s": load_s}))


def run_case(path: Path, variant: str, threads: int, wait: float) -> dict:
    bits, dtype = VARIANTS[variant]
    case = {"path": str(path), "bits": bits, "dtype": dtype, "threads": threads}
    wait_for_quiet(wait)
    probe = OtherCpu()
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], check=True,
                         capture_output=True, text=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "others": probe.cores()}


def largest_shard(path: Path) -> int:
    return max(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def measure(label: str, path: Path, layers: int, variant: str, repeats: int, threads: int,
            wait: float) -> dict:
    runs = [run_case(path, variant, threads, wait) for _ in range(repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("baseline", "peak_load", "peak", "after", "model")}
    row = {"checkpoint": label, "layers": layers, "variant": variant, "shard": largest_shard(path),
           **med, "load_min": min(r["load_s"] for r in runs),
           "load_med": statistics.median(r["load_s"] for r in runs),
           "peaks": [r["peak"] for r in runs], "others": statistics.median(r["others"] for r in runs)}
    print(f"{label} {variant}: peak " + " ".join(f"{p / 1e6:.0f}" for p in row["peaks"]) + " MB, load "
          + " ".join(f"{r['load_s']:.1f}" for r in runs) + " s", flush=True)
    return row


def report(rows: list[dict], depths: list[int], repeats: int, machine_before: str) -> str:
    mb = 1e-6
    lines = [
        f"Peak RSS (`ru_maxrss`) of a fresh process per load, median of {repeats}; baseline = RSS after "
        "importing torch, transformers' GLM and builder, before loading; *peak RSS in load_chatglm2* is the "
        "high-water mark when it returns, *peak RSS* the one after every weight has also been read once "
        "(a float checkpoint loaded in its own dtype stays memory-mapped from the shards and becomes "
        "resident only as it is read). MB = 10^6 bytes, GB = 10^9. "
        "Quantized variants load with bfloat16 activations and quantize each projection as its shard is "
        "read; the synthetic checkpoints are fp16 safetensors, one shard per decoder layer (408 MB) plus "
        "the embedding and the output layer (533 MB each). The page cache is warm after the first run.",
        f"Machine: {machine_before}.",
        "",
        "| checkpoint | layers | variant | largest shard | baseline RSS | peak RSS in load_chatglm2 "
        "| peak RSS | peak − baseline | model resident | peak − baseline − model | load s (min / median) "
        "| other processes' CPU (cores) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['checkpoint']} | {r['layers']} | {r['variant']} | {r['shard'] * mb:,.1f} MB "
            f"| {r['baseline'] * mb:,.0f} MB | {r['peak_load'] * mb:,.0f} MB | {r['peak'] * mb:,.0f} MB "
            f"| {(r['peak'] - r['baseline']) * mb:,.0f} MB "
            f"| {r['model'] * mb:,.1f} MB | {(r['peak'] - r['baseline'] - r['model']) * mb:,.0f} MB "
            f"| {r['load_min']:.2f} / {r['load_med']:.2f} | {r['others']:.2f} |")
    lo, hi = min(depths), max(depths)
    synthetic = {(r["layers"], r["variant"]): r for r in rows if r["checkpoint"] == "synthetic"}
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["checkpoint"] == "synthetic"))
    if lo != hi:
        lines += [
            "",
            f"**Extrapolated to {FULL_LAYERS} layers**, fitting value = a + b × layers through the {lo}- and "
            f"{hi}-layer medians; the overhead above the model (quantization temporaries, the shard being "
            "read) does not grow with depth, so *baseline + model + overhead* (the larger of the two measured "
            "overheads) is a second, steadier estimate of the peak:",
            "",
            "| variant | peak RSS: a + b × layers | peak RSS at 28 layers (fit) | model resident at 28 layers "
            "| baseline + model + overhead at 28 layers | load time at 28 layers |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for v in variants:
            a_peak, b_peak = fit(synthetic[lo, v]["peak"], synthetic[hi, v]["peak"], lo, hi)
            a_model, b_model = fit(synthetic[lo, v]["model"], synthetic[hi, v]["model"], lo, hi)
            a_time, b_time = fit(synthetic[lo, v]["load_med"], synthetic[hi, v]["load_med"], lo, hi)
            peak, model = a_peak + FULL_LAYERS * b_peak, a_model + FULL_LAYERS * b_model
            overhead = max(synthetic[n, v]["peak"] - synthetic[n, v]["baseline"] - synthetic[n, v]["model"]
                           for n in (lo, hi))
            steady = synthetic[hi, v]["baseline"] + model + overhead
            lines.append(f"| {v} | {a_peak / 1e9:.2f} GB + {b_peak * mb:,.0f} MB × layers | {peak / 1e9:.2f} GB "
                         f"| {model / 1e9:.2f} GB | {steady / 1e9:.2f} GB "
                         f"| {a_time + FULL_LAYERS * b_time:.0f} s |")
    lines += ["", "Load average after the runs: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + "."]
    return "\n".join(lines)


def fit(y_lo: float, y_hi: float, lo: int, hi: int) -> tuple[float, float]:
    """(a, b) of the line a + b × layers through two points."""
    b = (y_hi - y_lo) / (hi - lo)
    return y_lo - b * lo, b


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="2,4", help="comma-separated depths of the synthetic checkpoints")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each process")
    parser.add_argument("--wait", type=float, default=30, help="before each load, wait up to this many seconds "
                        "for other processes to leave the CPU idle (load times only)")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the synthetic checkpoints are cached (glm-synthetic-<N>l)")
    parser.add_argument("--out", type=Path, help="write the table into this markdown file's load section")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))

    from bench_decode import synthetic_checkpoint
    from builder import TINY_CHECKPOINT

    depths = sorted(int(n) for n in args.layers.split(","))
    machine_before = machine()
    rows = [measure("tiny", TINY_CHECKPOINT, json.loads((TINY_CHECKPOINT / "config.json").read_text())["num_layers"],
                    v, args.repeats, args.threads, args.wait) for v in ("fp32", "int8", "int4")]
    for n in depths:
        path = synthetic_checkpoint(args.tmp / f"glm-synthetic-{n}l", n)
        rows += [measure("synthetic", path, n, v, args.repeats, args.threads, args.wait)
                 for v in ("fp16", "int8", "int4")]
    table = report(rows, depths, args.repeats, machine_before)
    publish(table, args.out, "load", "Peak host memory while loading")


if __name__ == "__main__":
    main()
