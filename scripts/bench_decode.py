#!/usr/bin/env python3
"""Greedy decode speed on CPU against the memory-bandwidth roofline, per precision.

Batch-1 decode reads every weight once per token, so its floor is (weight bytes read per token) /
(memory read bandwidth). This loads a synthetic checkpoint with ChatGLM2-6B's real layer shapes
(`builder.model.synthetic`, default 2 layers) as fp32, bf16, fp16, int8 and int4, measures ms/token after
warm-up, then measures the same model with its decoder layers removed (the fixed part: embedding
row, final norm, the 65024×4096 output layer, sampling, Python) to split the time into per-layer and
fixed costs and extrapolate to 28 layers.

    .venv/bin/python scripts/bench_decode.py [--layers 2] [--new-tokens 32] [--out docs/benchmarks.md]

A variant is `fp32`, `bf16`, `fp16`, `int8` or `int4` (quantized ones run with bfloat16 activations,
the CPU kernels' fast path); `int8@fp16` / `int4@fp16` keep the model (norms, output layer) in
float16 instead.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchdoc import OtherCpu, machine, publish, wait_for_quiet  # noqa: E402
from builder.model.generation import generate_ids  # noqa: E402
from builder.model.checkpoint import load_chatglm2  # noqa: E402
from builder.model.quantization import QuantizedLinear  # noqa: E402
from builder.model.synthetic import write_synthetic_checkpoint  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL_LAYERS = 28  # ChatGLM2-6B


@dataclass(frozen=True)
class Variant:
    name: str
    bits: int  # 16: unquantized
    dtype: torch.dtype  # the model's dtype: activations, norms, embedding, output layer

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """`fp16`, `int4` (bfloat16 activations) or `int4@fp16` (float16 model)."""
        name, _, act = spec.partition("@")
        if name in DTYPES and not act:
            return cls(spec, 16, DTYPES[name])
        if name in ("int8", "int4") and (not act or act in DTYPES):
            return cls(spec, int(name[3:]), DTYPES[act or "bf16"])
        raise argparse.ArgumentTypeError(f"unknown variant {spec!r}: use fp32, bf16, fp16, int8, int4, "
                                         "or int8/int4@fp32|bf16|fp16")


# -- what one decode step reads ---------------------------------------------------------------------
def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def weight_bytes_read(module: torch.nn.Module) -> int:
    """Bytes of the weights a batch-1 forward through ``module`` reads, in the kernel's own format."""
    total = 0
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            if getattr(m, "int4_layout", None) == "torch":  # torch's kernel: prepacked codes, scales
                total += tensor_bytes([m.weight_int4pack, m.scales_and_zeros, m.bias])
            else:
                total += tensor_bytes([m.weight, m.weight_scale, m.bias])
        else:
            total += tensor_bytes(m.parameters(recurse=False))  # not the rotary buffers
    return total


def bytes_per_token(model) -> tuple[int, int]:
    """(bytes of all decoder layers, bytes of the fixed part: one embedding row, final norm, output layer)."""
    embed = model.get_input_embeddings().weight
    layers = weight_bytes_read(model.model.layers)
    fixed = embed[0].numel() * embed.element_size() + weight_bytes_read(model.model.norm) + \
        weight_bytes_read(model.lm_head)
    return layers, fixed


# -- measurements -------------------------------------------------------------------------------------
def read_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Read bandwidth in bytes/s over ``gib`` GiB of float32: the best of ``x.sum()`` and a float32
    GEMV ``[rows, 4096] @ [4096]`` (either can be the faster reader), each best of ``repeats``."""
    x = torch.ones(int(gib * 2**30) // 4)
    matrix, vector = x.view(-1, 4096), torch.ones(4096)
    best = float("inf")
    for read in (x.sum, lambda: matrix @ vector):
        read()
        for _ in range(repeats):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return x.nbytes / best


def decode_seconds(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decoded token) for one greedy generation of ``new_tokens``.

    Per token is the median of the decode steps (each a forward of one token plus its argmax), so a
    step stalled by another process on this shared 2-core machine does not count.
    """
    stamps = [time.perf_counter()]
    for _ in generate_ids(model, prompt, max_length=len(prompt) + new_tokens, temperature=0, top_p=1,
                          stop_ids=()):
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return stamps[1] - stamps[0], statistics.median(steps)


def timed_runs(model, prompt: list[int], new_tokens: int, repeats: int,
               wait: float) -> tuple[list[float], list[float]]:
    """Seconds per token of each run, and the cores other processes used during it."""
    decode_seconds(model, prompt, 8)  # warm-up: kernels, allocator, caches
    times, others = [], []
    for _ in range(repeats):
        wait_for_quiet(wait)
        probe = OtherCpu()
        times.append(decode_seconds(model, prompt, new_tokens)[1])
        others.append(probe.cores())
    return times, others


def measure(variant: Variant, path: Path, prompt: list[int], new_tokens: int, repeats: int,
            wait: float) -> dict:
    model, _ = load_chatglm2(path, bits=variant.bits, dtype=variant.dtype)
    num_layers = len(model.model.layers)
    layer_bytes, fixed_bytes = bytes_per_token(model)
    prefill = decode_seconds(model, prompt, 2)[0]
    full, others = timed_runs(model, prompt, new_tokens, repeats, wait)
    model.model.layers = model.model.layers[:0]  # the fixed part alone
    fixed, fixed_others = timed_runs(model, prompt, new_tokens, repeats, wait)
    del model
    gc.collect()
    return {"variant": variant.name, "bits": variant.bits, "dtype": str(variant.dtype).removeprefix("torch."),
            "layers": num_layers, "layer_bytes": layer_bytes / num_layers, "fixed_bytes": fixed_bytes,
            "prefill_s": prefill, "full_s": full, "fixed_s": fixed, "others": others + fixed_others}


# -- the report -------------------------------------------------------------------------------------
def summarize(r: dict, bandwidth: float) -> dict:
    L = r["layers"]
    full, fixed = min(r["full_s"]), min(r["fixed_s"])  # the least disturbed runs
    per_layer = (full - fixed) / L
    total_bytes = r["fixed_bytes"] + L * r["layer_bytes"]
    big_bytes = r["fixed_bytes"] + FULL_LAYERS * r["layer_bytes"]
    big = fixed + FULL_LAYERS * per_layer
    return {**r, "total_bytes": total_bytes, "full_min": full, "full_med": statistics.median(r["full_s"]),
            "fixed_min": fixed, "per_layer": per_layer,
            "roof_min": total_bytes / bandwidth / full,
            "roof_med": total_bytes / bandwidth / statistics.median(r["full_s"]),
            "roof_layer": r["layer_bytes"] / bandwidth / per_layer,
            "roof_fixed": r["fixed_bytes"] / bandwidth / fixed,
            "big_bytes": big_bytes, "big": big, "roof_big": big_bytes / bandwidth / big}


def report(results: list[dict], probes: list[tuple[float, float]], args, load_before: str) -> str:
    bandwidth = max(bw for bw, _ in probes)
    rows = [summarize(r, bandwidth) for r in results]
    L = rows[0]["layers"]
    ms, mb = 1e3, 1e-6
    lines = [
        f"Synthetic checkpoint with ChatGLM2-6B's real shapes and {L} layers; greedy decode of "
        f"{args.new_tokens} tokens after a {args.prompt_tokens}-token prompt, {args.threads} threads, "
        f"ms/token = median decode step of a run, after warm-up; {args.repeats} runs each (min / median over runs).",
        f"Memory read bandwidth: **{bandwidth / 1e9:.1f} GB/s**, the best of {len(probes)} probes (one before "
        f"the runs and one after each variant, each the best of `x.sum()` and a float32 GEMV over 1 GiB, "
        f"{args.threads} threads); the probes ranged {min(bw for bw, _ in probes) / 1e9:.1f}–"
        f"{bandwidth / 1e9:.1f} GB/s, with other processes using {min(c for _, c in probes):.2f}–"
        f"{max(c for _, c in probes):.2f} cores. Roofline = weight bytes read per token / read bandwidth; "
        "% of roofline = roofline time / measured time.",
        f"Machine: {load_before}.",
        "",
        f"**Measured, {L} layers** (the 65024×4096 output layer is most of the bytes at this depth):",
        "",
        "| variant | model dtype | weights read / token | roofline | decode ms/token (min / median) "
        "| % of roofline (min / median) | prefill ms | other processes' CPU, cores (min–max over runs) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['dtype']} | {r['total_bytes'] * mb:,.0f} MB "
            f"| {r['total_bytes'] / bandwidth * ms:.1f} ms | {r['full_min'] * ms:.1f} / {r['full_med'] * ms:.1f} "
            f"| {r['roof_min']:.0%} / {r['roof_med']:.0%} | {r['prefill_s'] * ms:.0f} "
            f"| {min(r['others']):.2f}–{max(r['others']):.2f} |")
    lines += [
        "",
        f"**Per layer, fixed part, and extrapolated to {FULL_LAYERS} layers** (from the fastest run of each; "
        "fixed part = the "
        "same model with its decoder layers removed: embedding row, final norm, output layer, sampling; "
        f"per layer = (measured − fixed) / {L}; {FULL_LAYERS} layers = fixed + {FULL_LAYERS} × per layer):",
        "",
        "| variant | per layer: MB / ms / % roofline | fixed: MB / ms / % roofline "
        f"| {FULL_LAYERS} layers: GB / token | ms/token | tokens/s | % of roofline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['layer_bytes'] * mb:.0f} / {r['per_layer'] * ms:.1f} / {r['roof_layer']:.0%} "
            f"| {r['fixed_bytes'] * mb:.0f} / {r['fixed_min'] * ms:.1f} / {r['roof_fixed']:.0%} "
            f"| {r['big_bytes'] / 1e9:.2f} | {r['big'] * ms:.0f} | {1 / r['big']:.2f} | {r['roof_big']:.0%} |")
    lines += ["", *goals(rows), "", f"Load average after the runs: "
              + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + "."]
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals: int4 and int8 at ≥ 50% of the roofline; int4 faster than every float variant."""
    by_name = {r["variant"]: r for r in rows}
    out = []
    for name in ("int8", "int4"):
        if name in by_name:
            r = by_name[name]
            met = r["roof_big"] >= 0.5
            out.append(f"- {name} at ≥ 50% of the roofline ({FULL_LAYERS} layers): "
                       f"{'met' if met else 'NOT met'} ({r['roof_big']:.0%}; per layer {r['roof_layer']:.0%}, "
                       f"{r['layers']} layers measured {r['roof_med']:.0%}).")
    floats = [r for r in rows if r["bits"] == 16]
    if "int4" in by_name and floats:
        r = by_name["int4"]
        slower = [f["variant"] for f in floats if f["big"] <= r["big"] or f["full_min"] <= r["full_min"]]
        out.append(f"- int4 faster than every unquantized variant: {'NOT met' if slower else 'met'} "
                   f"(int4 {r['big'] * 1e3:.0f} ms/token at {FULL_LAYERS} layers vs "
                   + ", ".join(f"{f['variant']} {f['big'] * 1e3:.0f}" for f in floats)
                   + (f"; not faster than {', '.join(slower)}" if slower else "") + ").")
    return out


def synthetic_checkpoint(path: Path | None, num_layers: int) -> Path:
    """The cached synthetic checkpoint with ``num_layers`` layers, written if it is missing."""
    path = path or Path(tempfile.gettempdir()) / f"glm-synthetic-{num_layers}l"
    config = path / "config.json"
    if not (config.is_file() and json.loads(config.read_text())["num_layers"] == num_layers):
        print(f"writing a {num_layers}-layer synthetic checkpoint to {path}", flush=True)
        write_synthetic_checkpoint(path, num_layers=num_layers)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers in the synthetic checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="synthetic checkpoint folder (default: a cached one "
                        "in the temp dir, written when missing)")
    parser.add_argument("--variants", default="fp32,bf16,fp16,int8,int4",
                        help="comma-separated: fp32, bf16, fp16, int8, int4, int8@fp16, int4@fp16")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--wait", type=float, default=30, help="before each run, wait up to this many seconds "
                        "for other processes to leave the CPU idle")
    parser.add_argument("--out", type=Path, help="write the table into this markdown file's decode section")
    args = parser.parse_args(argv)
    variants = [Variant.parse(s) for s in args.variants.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = synthetic_checkpoint(args.checkpoint, args.layers)
    load_before = machine()
    probes: list[tuple[float, float]] = []  # (read bandwidth, other processes' cores meanwhile)

    def probe_bandwidth() -> None:
        wait_for_quiet(args.wait)
        others = OtherCpu()
        probes.append((read_bandwidth(), others.cores()))
        print(f"read bandwidth {probes[-1][0] / 1e9:.1f} GB/s (others: {probes[-1][1]:.2f} cores)", flush=True)

    probe_bandwidth()
    prompt = torch.randint(3, 60000, (args.prompt_tokens,)).tolist()
    results = []
    for variant in variants:
        r = measure(variant, path, prompt, args.new_tokens, args.repeats, args.wait)
        print(f"{variant.name}: " + " ".join(f"{t * 1e3:.1f}" for t in r["full_s"]) + " ms/token; fixed part "
              + " ".join(f"{t * 1e3:.1f}" for t in r["fixed_s"]), flush=True)
        results.append(r)
        probe_bandwidth()
    table = report(results, probes, args, load_before)
    publish(table, args.out, "decode", "Decode speed (CPU)")


if __name__ == "__main__":
    main()
