#!/usr/bin/env python3
"""Measured vs estimated CPU memory for the same model cut into three shard layouts.

Writes a 2-layer checkpoint with ChatGLM2-6B's real shapes three ways (`builder.model.synthetic`):
one safetensors shard per layer, one 1.9 GB `model.safetensors`, and `.bin` shards named like
THUDM's (`pytorch_model-0000N-of-0000M.bin`), then runs `glm-build profile` on each and prints, per
variant and workload, measured and estimated peak memory and what stays resident after loading
beyond the model's tensors. The estimate must not depend on the layout, so neither may the
measurement.

    .venv/bin/python scripts/profile_layouts.py [--layers 2] [--quant fp16,int8,int4]
        [--workloads encode:512,encode:1024] [--out docs/memory.md]

Set ATEN_CPU_CAPABILITY=avx2 to measure torch's AVX2 kernels on an AVX-512 host.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchdoc import machine, publish  # noqa: E402

MIB = 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the checkpoints")
    parser.add_argument("--quant", default="fp16,int8,int4", help="precisions to profile")
    parser.add_argument("--workloads", default="encode:512,encode:1024", help="as glm-build profile takes them")
    parser.add_argument("--layouts", default="per-layer,single,bin", help="builder.model.synthetic layouts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each run")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the checkpoints are cached (glm-<layers>l-<layout>) and profiles written")
    parser.add_argument("--out", type=Path, help="write the table into this markdown file's layouts section")
    args = parser.parse_args(argv)

    import torch

    from builder.profile.run import ProfileOptions, run_profile
    from builder.model.synthetic import write_synthetic_checkpoint

    capability = torch.backends.cpu.get_cpu_capability()
    rows, worst = [], 0.0
    for layout in args.layouts.split(","):
        path = args.tmp / f"glm-{args.layers}l-{layout}"
        if not (path / "config.json").is_file():
            print(f"writing {path} ...", flush=True)
            write_synthetic_checkpoint(path, num_layers=args.layers, layout=layout)
        options = ProfileOptions(quant=args.quant, device="cpu", model=path, workloads=args.workloads,
                                 out=args.tmp / f"profile-{args.layers}l-{layout}-{capability.lower()}",
                                 threads=args.threads)
        for r in run_profile(options, progress=False):
            d = r.details
            left = d["loaded_bytes"] - d["model_tensor_bytes"]
            worst = max(worst, abs(r.error))
            rows.append(f"| {layout} | {r.variant} | {r.workload} | {r.measured_bytes / MIB:,.0f} "
                        f"| {r.estimated_bytes / MIB:,.0f} | {r.error:+.1%} | {d['model_tensor_bytes'] / MIB:,.0f} "
                        f"| {left / MIB:+,.0f} | {left / d['model_tensor_bytes']:+.1%} |")
            print(rows[-1], flush=True)
    table = "\n".join([
        f"Machine: {machine()}; ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '(unset)')}. "
        f"{args.layers}-layer checkpoint with ChatGLM2-6B's real shapes, random fp16 weights. "
        "*measured*: peak RSS over the baseline during the workload; *left after load*: resident bytes "
        "after loading minus the model's tensor bytes (goal: at most 5% + 64 MiB). MiB = 2^20 bytes.",
        "",
        "| layout | variant | workload | measured MiB | estimated MiB | error | tensors MiB "
        "| left after load MiB | left / tensors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Largest |error|: {worst:.1%}.",
    ])
    publish(table, args.out, f"layouts-{capability.lower()}",
            f"CPU estimate across shard layouts ({capability})")


if __name__ == "__main__":
    main()
