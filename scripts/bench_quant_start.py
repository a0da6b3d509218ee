#!/usr/bin/env python3
"""Start-up of pre-quantized (``--quantize-at build``) repositories against a warm read of their bytes.

For each checkpoint, in a fresh process per round: seconds to read its weight files from a warm page
cache (best of two passes after one to warm it, as ``scripts/bench_peer.py``), then seconds until
``load_chatglm2`` returns the model ready, counted with the imports (transformers' GLM, ours: what
``bench_peer``'s figure includes) and without them, and seconds until its first token (one forward
of one token after the load: a memory-mapped weight is read there, not in the load). min / median
over ``--rounds``.

The imports cost the same whatever the weights (~2 s), so a checkpoint of 2 or 4 layers says little
about the 6B's ratio: with ``--project-layers 28``, checkpoints of one precision at two layer counts
give the read, ready and first-token seconds (without the imports) as fixed + per-layer seconds; at
28 layers the median of every round's imports is added back, and the ratios printed.

    .venv/bin/python scripts/bench_quant_start.py /tmp/glm-q8-2l-bf16 /tmp/glm-q8-4l-bf16 --project-layers 28

Make the checkpoints with ``save_quantized(src, dst, bits)`` (float16, THUDM's) or
``save_quantized(src, dst, bits, dtype=torch.bfloat16)`` (the CPU variants' dtype).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_round(path: str, threads: int) -> dict:
    start = time.perf_counter()
    import torch

    import transformers.models.glm.modeling_glm  # noqa: F401
    from builder.model.checkpoint import load_chatglm2, weight_files
    imports = time.perf_counter() - start
    torch.set_num_threads(threads)

    def read() -> int:
        size = 0
        for file in weight_files(Path(path)):
            with open(file, "rb", buffering=0) as f:
                while chunk := f.read(64 << 20):
                    size += len(chunk)
        return size

    size, best = read(), float("inf")
    for _ in range(2):
        t = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - t)
    t = time.perf_counter()
    model, _ = load_chatglm2(path, dtype=torch.bfloat16)
    ready = time.perf_counter() - t
    with torch.inference_mode():
        model(torch.tensor([[1]]))
    first = time.perf_counter() - t
    return {"read_s": best, "ready_s": ready, "first_token_s": first, "imports_s": imports,
            "bytes": size, "isa": torch.backends.cpu.get_cpu_capability()}


def project(rows: list[dict], layers: int) -> None:
    """Each figure as fixed + per-layer seconds from two layer counts of one precision, at ``layers``."""
    groups: dict[tuple, dict[int, dict]] = {}
    for row in rows:
        groups.setdefault((row["bits"], row["dtype"]), {})[row["layers"]] = row
    print(f"\nprojected to {layers} layers (min of the rounds, plus the imports' median):")
    print("| precision | float dtype | read s | ready s | ratio | first token s | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (bits, dtype), by_layers in sorted(groups.items()):
        if len(by_layers) < 2:
            continue
        (l1, a), (l2, b) = sorted(by_layers.items())[:2]

        def at(key):
            slope = (b[key] - a[key]) / (l2 - l1)
            return a[key] + slope * (layers - l1)
        imports = statistics.median(a["imports"] + b["imports"])
        read, ready, first = at("read"), imports + at("ready"), imports + at("first")
        print(f"| int{bits} | {dtype} | {read:.2f} | {ready:.2f} | {ready / read:.1f}× | "
              f"{first:.2f} | {first / read:.1f}× |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", help="pre-quantized checkpoint folders")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per checkpoint")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--project-layers", type=int, metavar="N",
                        help="project each precision's figures to N layers (needs two layer counts)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(one_round(args.one, args.threads)))
        return
    print("| checkpoint | float dtype | weight bytes | read s | ready s (no imports) | ratio | "
          "ready s with imports | ratio | first token s with imports | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for path in args.checkpoints:
        runs = []
        for _ in range(args.rounds):
            out = subprocess.run([sys.executable, __file__, "--one", path, "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True, cwd=ROOT).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        read = min(r["read_s"] for r in runs)
        ready = [r["ready_s"] for r in runs]
        full = [r["ready_s"] + r["imports_s"] for r in runs]
        first = [r["first_token_s"] + r["imports_s"] for r in runs]
        config = json.loads((Path(path) / "config.json").read_text())
        dtype = config.get("torch_dtype")
        print(f"| {Path(path).name} | {dtype} | {runs[0]['bytes'] / 1e6:,.0f} MB | {read:.2f} | "
              f"{min(ready):.2f} / {statistics.median(ready):.2f} | {min(ready) / read:.1f}× | "
              f"{min(full):.2f} / {statistics.median(full):.2f} | {min(full) / read:.1f}× | "
              f"{min(first):.2f} / {statistics.median(first):.2f} | {min(first) / read:.1f}× |", flush=True)
        rows.append({"bits": config.get("quantization_bit"), "dtype": dtype,
                     "layers": config["num_layers"], "read": read, "ready": min(ready),
                     "first": min(r["first_token_s"] for r in runs), "imports": [r["imports_s"] for r in runs]})
    print(f"capability {runs[0]['isa']}")
    if args.project_layers:
        project(rows, args.project_layers)


if __name__ == "__main__":
    main()
