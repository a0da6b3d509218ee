#!/usr/bin/env python3
"""Start-up of pre-quantized (``--quantize-at build``) repositories against a warm read of their bytes.

For each checkpoint, in a fresh process per round: seconds to read its weight files from a warm page
cache (best of two passes after one to warm it, as ``scripts/bench_peer.py``), then seconds until
``load_chatglm2`` returns the model ready, counted with the imports (transformers' GLM, ours: what
``bench_peer``'s figure includes) and without them. min / median over ``--rounds``.

    .venv/bin/python scripts/bench_quant_start.py /tmp/glm25-2l-int8 /tmp/glm25-2l-int8-bf16 ...

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
    load_chatglm2(path, dtype=torch.bfloat16)
    ready = time.perf_counter() - t
    return {"read_s": best, "ready_s": ready, "imports_s": imports, "bytes": size,
            "isa": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", help="pre-quantized checkpoint folders")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per checkpoint")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(one_round(args.one, args.threads)))
        return
    print("| checkpoint | float dtype | weight bytes | read s | ready s (no imports) | ratio | "
          "ready s with imports | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for path in args.checkpoints:
        runs = []
        for _ in range(args.rounds):
            out = subprocess.run([sys.executable, __file__, "--one", path, "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True, cwd=ROOT).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        read = min(r["read_s"] for r in runs)
        ready = [r["ready_s"] for r in runs]
        full = [r["ready_s"] + r["imports_s"] for r in runs]
        dtype = json.loads((Path(path) / "config.json").read_text()).get("torch_dtype")
        print(f"| {Path(path).name} | {dtype} | {runs[0]['bytes'] / 1e6:,.0f} MB | {read:.2f} | "
              f"{min(ready):.2f} / {statistics.median(ready):.2f} | {min(ready) / read:.1f}× | "
              f"{min(full):.2f} / {statistics.median(full):.2f} | {min(full) / read:.1f}× |", flush=True)
    print(f"capability {runs[0]['isa']}")


if __name__ == "__main__":
    main()
