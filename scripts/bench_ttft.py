#!/usr/bin/env python3
"""Time to first token on CPU: one prefill (last-position logits) per precision and prompt length,
with the output layer fed plain rows (``builder.model.cpu_linear.RowsLinear``, what the loader does now)
and, side by side in the same process, fed the ``hidden[:, -1:, :]`` view as before.

    .venv/bin/python scripts/bench_ttft.py [--checkpoint /tmp/glm-2l-per-layer] [--lengths 16,256,2048]
        [--repeats 3] [--out docs/benchmarks.md]

The checkpoint has ChatGLM2-6B's real layer shapes and 2 layers (written there if missing); the
28-layer figure adds 13 × the per-layer cost measured as (2 layers − 1 layer).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchdoc import machine, publish  # noqa: E402
from builder.model.checkpoint import load_chatglm2  # noqa: E402
from builder.model.cpu_linear import RowsLinear  # noqa: E402
from builder.plan.placement import Variant  # noqa: E402
from builder.plan.profiles import load_profile  # noqa: E402

# (bits, dtype) as each variant serves on the `cpu` profile by default (builder.plan.placement.Variant.dtype)
VARIANTS = {name: (Variant(name).bits, getattr(torch, Variant(name).dtype(load_profile("cpu"))))
            for name in ("fp16", "int8", "int4")}


def prefill_s(model, tokens: int, repeats: int) -> float:
    """Median seconds of one prefill of ``tokens`` keeping the last position's logits."""
    ids = torch.randint(3, 800, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    times = []
    with torch.inference_mode():
        model(input_ids=ids[:, :8], logits_to_keep=1)  # warm
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/glm-2l-per-layer"))
    parser.add_argument("--lengths", default="16,256,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.checkpoint / "config.json").is_file():
        from builder.model.synthetic import write_synthetic_checkpoint

        write_synthetic_checkpoint(args.checkpoint, num_layers=2)
    lengths = [int(n) for n in args.lengths.split(",")]
    rows = []
    for name, (bits, dtype) in VARIANTS.items():
        model, _ = load_chatglm2(args.checkpoint, bits=bits, dtype=dtype)
        cells = []
        for tokens in lengths:
            model.lm_head.__class__ = torch.nn.Linear  # as before: the 3-D view reaches the matmul
            before = prefill_s(model, tokens, args.repeats)
            model.lm_head.__class__ = RowsLinear
            after = prefill_s(model, tokens, args.repeats)
            layers = model.model.layers
            model.model.layers = layers[:1]
            model.config.num_hidden_layers = 1
            one = prefill_s(model, tokens, args.repeats)
            model.model.layers = layers
            model.config.num_hidden_layers = 2
            full = after + 26 * (after - one)  # 28 layers: 26 more than the 2 measured
            cells.append((tokens, before, after, full))
            print(f"{name} {tokens}: before {before * 1000:.0f} ms, now {after * 1000:.0f} ms "
                  f"(28 layers ≈ {full:.2f} s)", flush=True)
        rows.append((name, cells))
        del model
    lines = [f"Machine: {machine()}; {args.threads} threads; median of {args.repeats}. "
             f"{args.checkpoint.name}: ChatGLM2-6B's layer shapes, 2 layers. *before*: `lm_head` "
             "gets the `hidden[:, -1:, :]` view (torch's bf16 matmul copies the 65024×4096 weight "
             "for it); *now*: plain rows. *28 layers*: now + 26 × (2 layers − 1 layer).", "",
             "| variant | prompt tokens | before ms | now ms | speed-up | 28 layers, now (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, cells in rows:
        for tokens, before, after, full in cells:
            lines.append(f"| {name} | {tokens} | {before * 1000:,.0f} | {after * 1000:,.0f} "
                         f"| {before / after:.1f}× | {full:.2f} |")
    publish("\n".join(lines), args.out, "ttft", "Time to first token (CPU, one prefill)")


if __name__ == "__main__":
    main()
