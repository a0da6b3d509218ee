"""Time one quantized projection by rows: glm-build's own weight-only GEMV (builder.model.cpu_kernels,
where built), torch's weight-only CPU kernel, the dense path of builder.model.cpu_quant (a block of
weight rows dequantized to bfloat16, oneDNN's matmul) and a plain bfloat16 matmul of the same shape,
side by side in one process (interleaved, min / median of ``--repeats``). Prints where the dense path
starts to win over the faster weight-only kernel: the row threshold of cpu_quant.DENSE_ROWS.

    .venv/bin/python scripts/bench_quant_kernels.py
    ATEN_CPU_CAPABILITY=avx2 .venv/bin/python scripts/bench_quant_kernels.py --glm-isa avx2

Random weights with ChatGLM2-6B's projection shapes; ~1 GB resident at most. int4 is built twice:
in THUDM's layout (what glm-build's kernel and, with it, the dense path read) and in torch's.
``--bits 16`` times a bfloat16 layer's paths (builder.model.cpu_linear: glm-build's GEMV on the
bfloat16 weight, oneDNN's matmul, and where the CPU has AMX the tile unit reading the weight), e.g.
the output layer: ``--bits 16 --shapes output_layer --rows 1,4,8``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from builder.model import cpu_kernels, cpu_quant
from builder.model.cpu_linear import use_row_inputs
from builder.model.quantization import QuantizedLinear

SHAPES = {"query_key_value": (4608, 4096), "dense": (4096, 4096),
          "dense_h_to_4h": (27392, 4096), "dense_4h_to_h": (4096, 13696), "output_layer": (65024, 4096)}


def paths(weight: torch.Tensor, bits: int) -> dict:
    """The CPU paths of a ``bits``-bit layer of ``weight`` as functions of bfloat16 rows: glm-build's
    kernel (if built), torch's kernel, and the dense path of the layout in use (16 bits: the bfloat16
    layer's, the tile unit's as "dense" where the CPU has AMX)."""
    if bits == 16:
        layer = use_row_inputs(torch.nn.Sequential(torch.nn.Linear(*weight.shape[::-1], bias=False)))[0]
        layer.weight = torch.nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        return layer.decode_paths(torch.zeros(1, weight.shape[1], dtype=torch.bfloat16)) or {}
    layer = QuantizedLinear.from_float(weight, None, bits)
    found = layer._cpu_paths()
    if "torch_kernel" not in found:  # int4 in THUDM's layout: torch's kernel needs its own packing
        os.environ["GLM_CPU_KERNELS"] = "0"
        try:
            found["torch_kernel"] = QuantizedLinear.from_float(weight, None, bits)._cpu_paths()["torch_kernel"]
        finally:
            del os.environ["GLM_CPU_KERNELS"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,12,16,24,32,98,512", help="row counts, comma-separated")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="projections, comma-separated")
    parser.add_argument("--bits", default="8,4", help="8, 4 or both; 16: a bfloat16 layer's paths")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each path per row count")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--glm-isa", choices=("avx2", "avx2i16", "avx512", "avx512bf16"),
                        help="the variant of glm-build's kernel (default: the best the CPU has)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.glm_isa:
        os.environ["GLM_CPU_KERNEL_ISA"] = args.glm_isa
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, glm kernel {cpu_kernels.isa() or 'not built'}, torch int4 layout "
          f"block {cpu_quant.int4pack_layout()}; ms min / median of {args.repeats}; GB/s: the codes "
          "glm-build's kernel reads per second, at its min")
    print("| projection | bits | rows | glm kernel | torch kernel | dense (dequantize + bf16 matmul) | "
          "bf16 matmul | dense / bf16 | GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    for name in args.shapes.split(","):
        out_features, in_features = SHAPES[name]
        weight = torch.randn(out_features, in_features, generator=g) * 0.02
        dense_weight = weight.to(torch.bfloat16)
        for bits in (int(b) for b in args.bits.split(",")):
            found = paths(weight, bits)
            crossover = None
            for rows in rows_list:
                x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
                fns = {**found, "bf16": lambda x: x @ dense_weight.t()}
                times = {key: [] for key in fns}
                for fn in fns.values():
                    fn(x)  # warm-up
                for _ in range(args.repeats):
                    for key, fn in fns.items():
                        start = time.perf_counter()
                        fn(x)
                        times[key].append((time.perf_counter() - start) * 1e3)
                cell = {k: f"{min(v):.2f} / {statistics.median(v):.2f}" for k, v in times.items()}
                ratio = min(times["dense"]) / min(times["bf16"]) if "dense" in times else float("nan")
                kernel = min(min(times[k]) for k in ("glm_kernel", "torch_kernel") if k in times)
                gbs = out_features * in_features * bits / 8 / 1e6 / min(times.get("glm_kernel", [kernel]))
                print(f"| {name} | {bits} | {rows} | {cell.get('glm_kernel', '-')} | {cell['torch_kernel']} "
                      f"| {cell.get('dense', '-')} | {cell['bf16']} | {ratio:.2f} | {gbs:.1f} |", flush=True)
                if crossover is None and "dense" in times and min(times["dense"]) < kernel:
                    crossover = rows
            print(f"<!-- {name} int{bits}: dense path faster from {crossover} rows -->", flush=True)
        del weight, dense_weight


if __name__ == "__main__":
    main()
