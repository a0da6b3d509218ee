"""Time one quantized projection by rows: torch's weight-only CPU kernel, the dense path of
builder.model.cpu_quant (a block of weight rows dequantized to bfloat16, oneDNN's matmul) and a plain
bfloat16 matmul of the same shape, side by side in one process (interleaved, min / median of
``--repeats``). Prints where the dense path starts to win: the row threshold of cpu_quant.DENSE_ROWS.

    .venv/bin/python scripts/bench_quant_kernels.py
    ATEN_CPU_CAPABILITY=avx2 .venv/bin/python scripts/bench_quant_kernels.py

Random weights with ChatGLM2-6B's projection shapes; ~0.9 GB resident at most.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from builder.model import cpu_quant
from builder.model.quantization import QuantizedLinear

SHAPES = {"query_key_value": (4608, 4096), "dense": (4096, 4096),
          "dense_h_to_4h": (27392, 4096), "dense_4h_to_h": (4096, 13696)}


def paths(layer: QuantizedLinear):
    """The two CPU paths of ``layer`` as functions of bfloat16 rows."""
    if layer.bits == 8:
        scale = layer.weight_scale.to(torch.bfloat16)
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x, layer.weight, scale),
                lambda x: cpu_quant.int8_rows(x, layer.weight, scale))
    scale = layer.weight_scale.to(torch.bfloat16)
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, layer.weight_int4pack, layer.kernel_group_size, layer.scales_and_zeros),
            lambda x: cpu_quant.int4_rows(x, layer.weight_int4pack, scale, cpu_quant.int4pack_layout()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,12,16,24,32,98,512", help="row counts, comma-separated")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="projections, comma-separated")
    parser.add_argument("--bits", default="8,4", help="8, 4 or both")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each path per row count")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, int4 layout block {cpu_quant.int4pack_layout()}; ms min / median "
          f"of {args.repeats}")
    print("| projection | bits | rows | weight-only kernel | dense (dequantize + bf16 matmul) | "
          "bf16 matmul | dense / bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    for name in args.shapes.split(","):
        out_features, in_features = SHAPES[name]
        weight = torch.randn(out_features, in_features, generator=g) * 0.02
        dense_weight = weight.to(torch.bfloat16)
        for bits in (int(b) for b in args.bits.split(",")):
            layer = QuantizedLinear.from_float(weight, None, bits)
            kernel, dense = paths(layer)
            crossover = None
            for rows in rows_list:
                x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
                fns = {"kernel": kernel, "dense": dense, "bf16": lambda x: x @ dense_weight.t()}
                times = {key: [] for key in fns}
                for fn in fns.values():
                    fn(x)  # warm-up
                for _ in range(args.repeats):
                    for key, fn in fns.items():
                        start = time.perf_counter()
                        fn(x)
                        times[key].append((time.perf_counter() - start) * 1e3)
                cell = {k: f"{min(v):.1f} / {statistics.median(v):.1f}" for k, v in times.items()}
                ratio = min(times["dense"]) / min(times["bf16"])
                print(f"| {name} | {bits} | {rows} | {cell['kernel']} | {cell['dense']} | {cell['bf16']} "
                      f"| {ratio:.2f} |", flush=True)
                if crossover is None and min(times["dense"]) < min(times["kernel"]):
                    crossover = rows
            print(f"<!-- {name} int{bits}: dense path faster from {crossover} rows -->", flush=True)
        del weight, dense_weight


if __name__ == "__main__":
    main()
