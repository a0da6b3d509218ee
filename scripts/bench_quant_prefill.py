#!/usr/bin/env python3
"""Prefill and decode of the quantized CPU variants, before and after the dense path, beside bfloat16.

Loads a synthetic checkpoint with ChatGLM2-6B's real layer shapes (``builder.model.synthetic``, 2 layers by
default: ~1.9 GB of fp16, written under /tmp if missing) once per precision (bf16, int8, int4; one
model resident at a time) and times, in the same process with the paths interleaved:

- a prefill of ``--prompt`` tokens (98: the serving bench's mean prompt) and of 512;
- a decode step of 1 sequence and of 8 sequences (8 rows: a batched step);

*weight-only* sends every quantized projection through torch's int8/int4 kernels (as before issue
25: ``DENSE_ROWS`` 0), *now* through what ``builder.model.cpu_quant`` chooses (the dense path from its row
threshold, the decode probe below it). min / median of ``--repeats`` in ms. Also prints which path
each projection shape took at one row (the decode probe).

    .venv/bin/python scripts/bench_quant_prefill.py
    ATEN_CPU_CAPABILITY=avx2 .venv/bin/python scripts/bench_quant_prefill.py
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.model import cpu_quant  # noqa: E402
from builder.model.checkpoint import load_chatglm2  # noqa: E402
from builder.model.synthetic import write_synthetic_checkpoint  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def cases(model, prompt: int):
    """name -> a function that runs it once (a fresh cache each time)."""
    from transformers import DynamicCache

    vocab = 60000
    g = torch.Generator().manual_seed(0)

    def prefill(tokens: int):
        ids = torch.randint(3, vocab, (1, tokens), generator=g)
        return lambda: model(input_ids=ids, cache=DynamicCache(), use_cache=True, logits_to_keep=1)

    def step(batch: int):
        ids = torch.randint(3, vocab, (batch, 16), generator=g)
        cache = DynamicCache()
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = torch.randint(3, vocab, (batch, 1), generator=g)

        def run():
            model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            cache.crop(-1)  # back to the prompt: every step costs the same
        return run

    return {f"prefill {prompt}": prefill(prompt), "prefill 512": prefill(512),
            "decode step, 1 sequence": step(1), "decode step, 8 sequences": step(8)}


def set_paths(name: str) -> None:
    cpu_quant.DENSE_ROWS = ORIGINAL_ROWS if name == "now" else {c: {8: 0, 4: 0} for c in ORIGINAL_ROWS}
    cpu_quant.dense_rows.cache_clear()


ORIGINAL_ROWS = cpu_quant.DENSE_ROWS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/tmp/glm25-2l", help="synthetic checkpoint (written if missing)")
    parser.add_argument("--layers", type=int, default=2, help="layers, when the checkpoint is written")
    parser.add_argument("--prompt", type=int, default=98, help="prompt tokens of the first prefill")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each case and path")
    parser.add_argument("--precisions", default="bf16,int8,int4", help="bf16, int8, int4")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.checkpoint)
    if not (path / "config.json").exists():
        write_synthetic_checkpoint(path, num_layers=args.layers)
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, {path}; dense path from int8 {cpu_quant.dense_rows(8)} / int4 {cpu_quant.dense_rows(4)} rows; ms min / median of {args.repeats}")
    print("| precision | case | weight-only kernels | now | now / weight-only |")
    print("|---|---|---:|---:|---:|")
    results = {}
    for precision in args.precisions.split(","):
        bits = 16 if precision == "bf16" else int(precision[3:])
        model, _ = load_chatglm2(path, bits=bits, dtype=torch.bfloat16)
        with torch.inference_mode():
            for case, fn in cases(model, args.prompt).items():
                times = {"weight-only": [], "now": []}
                for _ in range(args.repeats):  # the two paths interleaved
                    for name in times if bits < 16 else ("now",):
                        set_paths(name)
                        times[name] += timed(fn, 1)
                cell = {k: f"{min(v):.0f} / {statistics.median(v):.0f}" if v else "" for k, v in times.items()}
                ratio = f"{min(times['now']) / min(times['weight-only']):.2f}" if times["weight-only"] else ""
                results[(precision, case)] = min(times["now"])
                print(f"| {precision} | {case} | {cell['weight-only']} | {cell['now']} | {ratio} |", flush=True)
        set_paths("now")
        del model
        gc.collect()
    for precision in args.precisions.split(","):
        if precision != "bf16" and ("bf16", f"prefill {args.prompt}") in results:
            print(f"{precision} prefill {args.prompt} now / bf16: "
                  f"{results[(precision, f'prefill {args.prompt}')] / results[('bf16', f'prefill {args.prompt}')]:.2f}; "
                  f"prefill 512: {results[(precision, 'prefill 512')] / results[('bf16', 'prefill 512')]:.2f}")
    print("decode probe (one row):", cpu_quant.decode_paths())


if __name__ == "__main__":
    main()
