#!/usr/bin/env python3
"""Our CPU decode and prefill beside chatglm.cpp's, on the same checkpoint, prompts and threads.

chatglm.cpp is what a ChatGLM2 user without a GPU picks, so it is the bar for our CPU speed. This
writes random-weight checkpoints with ChatGLM2-6B's real layer shapes (``--family glm-4-9b-chat``:
GLM-4-9B-chat's, its 151,552-row embedding and output layer and its tiktoken tokenizer file) at two
depths (default 2 and 4 layers, `builder.model.synthetic`), converts each with chatglm.cpp's own
converter for the family (q4_0, q8_0, f16), and times both engines in fresh processes, interleaved,
per precision:

- decode: ms/token, the median step of a greedy run after a short prompt (best of the rounds);
- prefill: seconds to the first token of a 256- and a 2048-token prompt (best of the rounds);
- per layer = (deep − shallow) / (layer difference), fixed = shallow − layers × per layer,
  28 layers = fixed + 28 × per layer: ChatGLM2-6B extrapolated (GLM-4-9B-chat: 40 layers).

    .venv/bin/pip install '.[peer]'     # chatglm-cpp builds from source (needs
                                        # CMAKE_POLICY_VERSION_MINIMUM=3.5 with CMake ≥ 4)
    .venv/bin/python scripts/bench_peer.py [--layers 2,4] [--rounds 2] [--out docs/benchmarks.md]
    .venv/bin/python scripts/bench_peer.py --family glm-4-9b-chat --out docs/benchmarks.md
    ATEN_CPU_CAPABILITY=avx2 .venv/bin/python scripts/bench_peer.py --peer-path /opt/chatglm-avx2 ...

Ours runs at torch's CPU capability (``ATEN_CPU_CAPABILITY`` lowers it); chatglm.cpp runs the
instruction set its build was compiled for (PyPI's source build: AVX2+FMA+F16C; AVX-512 needs
``CMAKE_ARGS="-DGGML_AVX512=ON ..."``); ``--peer-path`` puts another build first on its path. The
table names both. chatglm.cpp picks its own thread count (the machine's cores, up to 4); keep
``--threads`` equal to it. Not part of ``make test``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

FULL_LAYERS = 28  # ChatGLM2-6B; --family sets args.full_layers from the family's config
# ours: (bits, `glm-build --cpu-dtype`, output-layer bits) and chatglm.cpp's type for the same bits
# (which quantizes its output layer too); "-o8": our opt-in int8 output layer; "fp16-float16": fp16
# as `--cpu-dtype float16` serves it. The model's dtype is the variant's (served_dtype).
PRECISIONS = {"int4": (4, "bfloat16", 16, "q4_0"), "int8": (8, "bfloat16", 16, "q8_0"),
              "fp16": (16, "bfloat16", 16, "f16"), "fp16-float16": (16, "float16", 16, "f16"),
              "int4-o8": (4, "bfloat16", 8, "q4_0"), "int8-o8": (8, "bfloat16", 8, "q8_0"),
              "fp16-o8": (16, "bfloat16", 8, "f16")}
GOALS = {"int4": 0.8, "int8": 0.8, "fp16": 1.0}  # decode, ours / chatglm.cpp, 28 layers
PEER_MAX_LENGTH = 4096  # chatglm.cpp sizes its KV cache for this many tokens


def served_dtype(precision: str):
    """The torch dtype the variant of ``precision`` computes in on the `cpu` profile
    (builder.plan.placement.Variant.dtype with the table's ``--cpu-dtype``)."""
    import torch

    from builder.plan.placement import Variant
    from builder.plan.profiles import load_profile

    cpu_dtype = PRECISIONS[precision][1]
    return getattr(torch, Variant(precision.split("-")[0]).dtype(load_profile("cpu"), cpu_dtype))


# -- files ----------------------------------------------------------------------------------------
def checkpoint(cache: Path, layers: int, family: str = "chatglm2-6b") -> Path:
    """A random-weight checkpoint of ``family`` with its real layer shapes and ``layers`` layers
    (``glm-4l`` for ChatGLM2-6B as before, ``glm-4-9b-chat-4l`` for the others)."""
    from builder.model.family import get_family
    from builder.model.synthetic import write_synthetic_checkpoint

    spec = get_family(family)
    path = cache / (f"glm-{layers}l" if family == "chatglm2-6b" else f"{family}-{layers}l")
    if not (path / "config.json").is_file():
        print(f"writing {path} ({spec.display_name} shapes, {layers} layers)", flush=True)
        write_synthetic_checkpoint(path, num_layers=layers, config=spec.spec, family=family)
    return path


CONVERTERS = {"chatglm2": "ChatGLM2Converter", "chatglm3": "ChatGLM3Converter",
              "glm4": "ChatGLM4Converter"}  # family kind -> chatglm.cpp's converter class


def ggml_file(ckpt: Path, ggml_type: str, family: str = "chatglm2-6b") -> Path:
    """chatglm.cpp's model file for ``ckpt``, written by chatglm.cpp's own converter for
    ``family`` (``ChatGLM2Converter``, ``ChatGLM3Converter``, ``ChatGLM4Converter``).

    The converter wants a THUDM model object (``.config``, ``.state_dict()``) and tokenizer
    (ChatGLM2/3: ``.tokenizer.sp_model``; GLM-4: ``.vocab_file``, the tiktoken ``tokenizer.model``
    it copies as text); our checkpoint is in THUDM's layout, so thin stand-ins read it without
    running THUDM's remote code. As chatglm.cpp's ``convert()`` does for GLM-4, the config's
    ``eos_token_id`` becomes the tokenizer's ``<|endoftext|>`` (THUDM's config lists three).
    """
    out = ckpt.parent / f"{ckpt.name}-{ggml_type}.ggml"
    if out.is_file():
        return out
    from chatglm_cpp import convert

    from builder.model.checkpoint import iter_checkpoint_tensors
    from builder.model.family import get_family

    kind = get_family(family).kind
    config = SimpleNamespace(**json.loads((ckpt / "config.json").read_text()))
    model = SimpleNamespace(config=config, state_dict=lambda: dict(iter_checkpoint_tensors(ckpt)))
    if kind == "glm4":
        tokenizer = SimpleNamespace(vocab_file=str(ckpt / "tokenizer.model"))
        config.eos_token_id = get_family(family).load_tokenizer(ckpt).eos_id
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
        tokenizer = SimpleNamespace(tokenizer=SimpleNamespace(sp_model=sp))
    print(f"converting {ckpt.name} to {ggml_type}", flush=True)
    partial = out.with_suffix(".partial")
    with open(partial, "wb") as f:
        getattr(convert, CONVERTERS[kind]).convert(f, model, tokenizer, convert.GGMLType[ggml_type.upper()])
    partial.rename(out)
    return out


# -- one measurement, in its own process ------------------------------------------------------------
def prompt_ids(tokens: int) -> list[int]:
    """Deterministic ids inside the tiny tokenizer's vocabulary (both engines only compute)."""
    return [3 + (i * 7919) % 797 for i in range(tokens)]


def timings(run, prompts: list[int], new_tokens: int) -> dict:
    """The same sequence for both engines; ``run(ids, new_tokens)`` -> (prefill s, median step s)."""
    short = prompt_ids(16)
    run(short, 4)  # warm-up
    decode = run(short, new_tokens)[1]
    prefill = {}
    for n in prompts:
        run(prompt_ids(n)[:8], 1)
        prefill[n] = run(prompt_ids(n), 1)[0]
    return {"decode_s": decode, "prefill_s": prefill}


def ours(path: Path, precision: str, prompts: list[int], new_tokens: int, threads: int,
         family: str = "chatglm2-6b") -> dict:
    import torch

    from bench_decode import decode_seconds
    from builder.model.checkpoint import load_chatglm2

    torch.set_num_threads(threads)
    bits, _, output_bits, _ = PRECISIONS[precision]
    model, _ = load_chatglm2(path, bits=bits, dtype=served_dtype(precision), output_bits=output_bits,
                             family=family)
    # decode_seconds counts the prefill's token: one more for ``steps`` decode steps
    result = timings(lambda ids, steps: decode_seconds(model, ids, steps + 1), prompts, new_tokens)
    from builder.model import cpu_kernels, cpu_quant

    # which path each projection shape's decode steps took (the probe's choice), and our kernel's ISA
    return {**result, "isa": torch.backends.cpu.get_cpu_capability(), "decode_paths": cpu_quant.decode_paths(),
            "glm_kernel_isa": cpu_kernels.isa()}


def load(path: Path, precision: str, threads: int, family: str = "chatglm2-6b") -> dict:
    """Seconds to read a pre-quantized checkpoint's weight bytes from a warm page cache (the best
    of two passes after one to warm it), and seconds for ``load_chatglm2`` to make it ready."""
    import torch

    from builder.model.checkpoint import load_chatglm2, weight_files

    torch.set_num_threads(threads)
    files = weight_files(path)
    def read() -> int:
        size = 0
        for file in files:
            with open(file, "rb", buffering=0) as f:
                while chunk := f.read(64 << 20):
                    size += len(chunk)
        return size

    size, best = read(), float("inf")  # the first pass warms the page cache
    for _ in range(2):
        start = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - start)
    bits = PRECISIONS[precision][0]
    start = time.perf_counter()
    load_chatglm2(path, bits=bits, dtype=served_dtype(precision), family=family)
    return {"read_s": best, "load_s": time.perf_counter() - start, "bytes": size,
            "isa": torch.backends.cpu.get_cpu_capability()}


def peer(path: Path, prompts: list[int], new_tokens: int) -> dict:
    import chatglm_cpp

    pipeline = chatglm_cpp.Pipeline(str(path), max_length=PEER_MAX_LENGTH)
    model = pipeline.model
    config = chatglm_cpp._C.GenerationConfig(max_length=PEER_MAX_LENGTH, do_sample=False)

    def run(ids: list[int], steps: int) -> tuple[float, float]:
        """(prefill seconds, median seconds per decode step), as chatglm.cpp's generate() loops."""
        ids = list(ids)
        n_ctx, n_past = len(ids), 0
        stamps = [time.perf_counter()]
        for _ in range(steps + 1):
            ids.append(model.generate_next_token(ids, None, config, n_past, n_ctx))
            n_past = len(ids) - 1
            stamps.append(time.perf_counter())
        per_step = [b - a for a, b in zip(stamps[1:], stamps[2:])]
        return stamps[1] - stamps[0], statistics.median(per_step)

    return timings(run, prompts, new_tokens)


def peer_isa(module) -> str:
    """The instruction set chatglm.cpp's extension was compiled for: ggml's AVX-512 kernels use zmm
    registers, which an AVX2 build never touches (read with binutils' objdump)."""
    import glob

    ext = glob.glob(str(Path(module.__file__).parent / "_C*.so"))
    try:
        code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", ext[0]], capture_output=True,
                              text=True, timeout=300).stdout
    except (IndexError, OSError, subprocess.TimeoutExpired):
        return "unknown"
    return "avx512" if "%zmm" in code else "avx2" if "%ymm" in code else "sse"


def worker(args) -> None:
    from benchdoc import OtherCpu

    prompts = [int(n) for n in args.prompts.split(",") if n]
    others = OtherCpu()
    if args.worker == "ours":
        result = ours(Path(args.path), args.precision, prompts, args.new_tokens, args.threads, args.family)
    elif args.worker == "load":
        result = load(Path(args.path), args.precision, args.threads, args.family)
    else:
        result = peer(Path(args.path), prompts, args.new_tokens)
    result["other_cores"] = others.cores()  # what other processes used meanwhile
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(engine: str, path: Path, precision: str, args, peer_path: str | None) -> dict:
    env = dict(os.environ)
    if engine == "peer" and peer_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [peer_path, env.get("PYTHONPATH")]))
    prompts = "" if precision.endswith("-o8") else args.prompts  # prefill: see report()
    command = [sys.executable, __file__, "--worker", engine, "--path", str(path), "--precision",
               precision, "--prompts", prompts, "--new-tokens", str(args.new_tokens),
               "--threads", str(args.threads), "--family", args.family]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{engine} {precision} on {path.name} failed (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# -- the report -----------------------------------------------------------------------------------
def extrapolate(shallow: float, deep: float, low: int, high: int, full: int = FULL_LAYERS
                ) -> tuple[float, float, float]:
    """(per layer, fixed, ``full`` layers) from the same figure at ``low`` and ``high`` layers."""
    per_layer = (deep - shallow) / (high - low)
    fixed = shallow - low * per_layer
    return per_layer, fixed, fixed + full * per_layer


def depth_fit(results: dict, engine: str, precision: str, figure, layers: tuple[int, int],
              full: int = FULL_LAYERS) -> tuple[float, float, float, float]:
    """(per layer, fixed, ``full`` layers, shallow measured) of ``figure(result)``, best of the rounds."""
    shallow, deep = (min(figure(r) for r in results[key(engine, precision, n)]) for n in layers)
    return (*extrapolate(shallow, deep, *layers, full), shallow)


def report(results: dict, args, isa: dict) -> str:
    low, high = layers = tuple(args.layer_counts)
    decode = lambda r: r["decode_s"]  # noqa: E731
    prompts = [int(n) for n in args.prompts.split(",") if n]
    ms = 1e3
    full, model = getattr(args, "full_layers", FULL_LAYERS), getattr(args, "model_name", "ChatGLM2-6B")
    others = [r["other_cores"] for rs in results.values() for r in rs]
    lines = [
        f"Machine: {machine()}. {args.threads} threads; other processes used "
        f"{min(others):.2f}–{max(others):.2f} cores during the measurements. Ours: torch at capability **{isa['ours']}**; "
        f"chatglm.cpp 0.4.2 built for **{isa['peer']}**. Random-weight checkpoints with {model}'s "
        f"real shapes at {low} and {high} layers, converted by chatglm.cpp's own converter. Each figure "
        f"is the best of {args.rounds} rounds (fresh processes, engines interleaved); decode = median "
        f"step of {args.new_tokens} greedy tokens; per layer = ({high} layers − {low} layers) / "
        f"{high - low}, fixed = the rest, {full} layers = fixed + {full} × per layer.",
        "",
        f"| precision | ours: per layer / fixed / {full} layers ms/token "
        f"| chatglm.cpp: per layer / fixed / {full} layers | ratio (goal) |",
        "|---|---|---|---:|",
    ]
    for precision in args.precision_list:
        ggml_type = PRECISIONS[precision][3]
        o, p = (depth_fit(results, engine, precision, decode, layers, full) for engine in ("ours", "peer"))
        ratio, goal = o[2] / p[2], GOALS[precision.split("-")[0]]
        lines.append(f"| {precision} vs {ggml_type} | {o[0] * ms:.1f} / {o[1] * ms:.1f} / {o[2] * ms:.0f} "
                     f"| {p[0] * ms:.1f} / {p[1] * ms:.1f} / {p[2] * ms:.0f} "
                     f"| {ratio:.2f}× ({'met' if ratio <= goal else 'not met'}: ≤ {goal}×) |")
    lines += ["", f"Prefill, seconds to the first token ({full} layers extrapolated; "
              f"measured at {low} layers in brackets):", "",
              "| precision | prompt tokens | ours s | chatglm.cpp s | ratio (goal ≤ 1.0×) |",
              "|---|---:|---:|---:|---:|"]
    for precision in args.precision_list:
        if precision.endswith("-o8"):
            continue  # the output layer is one row of a prefill: no change worth a line
        for n in prompts:
            o, p = (depth_fit(results, engine, precision, lambda r: r["prefill_s"][str(n)], layers, full)
                    for engine in ("ours", "peer"))
            lines.append(f"| {precision} | {n} | {o[2]:.2f} ({o[3]:.2f}) | {p[2]:.2f} ({p[3]:.2f}) "
                         f"| {o[2] / p[2]:.2f}× |")
    per_layer = {p: depth_fit(results, "ours", p, decode, layers, full)[0] for p in args.precision_list}
    lines += ["", "Decode per layer, ours: " + ", ".join(
        f"{p} {t * ms:.1f} ms" for p, t in per_layer.items()) + " (goal: int4 ≤ int8). `-o8`: our "
        "opt-in int8 output layer (`load_chatglm2(output_bits=8)`), beside the same chatglm.cpp file."]
    lines += ["", "Decode path per projection shape, ours (`cpu_quant.decode_paths()`, last round, "
              f"{high} layers; glm_kernel: glm-build's own GEMV, torch_kernel: torch's weight-only kernel):"]
    for precision in args.precision_list:
        last = results[key("ours", precision, high)][-1]
        paths = last.get("decode_paths") or {}
        if paths:
            lines.append(f"- {precision}: " + ", ".join(f"{shape} {path}" for shape, path in paths.items())
                         + f" (glm kernel ISA: {last.get('glm_kernel_isa') or 'not built'})")
    if getattr(args, "loads", None):
        lines += ["", f"Start-up from pre-quantized weights (`--quantize-at build`, {high} layers): "
                  "seconds to read the weight files from a warm page cache vs seconds until "
                  f"`load_chatglm2` returns the model ready, the first import of transformers' GLM "
                  f"included (best of {args.rounds}; goal ≤ 2×):", "",
                  "| precision | weight bytes | read s | ready s | ratio |", "|---|---:|---:|---:|---:|"]
        for precision, runs in args.loads.items():
            read, ready = min(r["read_s"] for r in runs), min(r["load_s"] for r in runs)
            lines.append(f"| {precision} | {runs[0]['bytes'] / 1e6:,.0f} MB | {read:.2f} | {ready:.2f} "
                         f"| {ready / read:.1f}× |")
    return "\n".join(lines)


def key(engine: str, precision: str, layers: int) -> tuple[str, str, int]:
    """What one measurement is: ours per precision; chatglm.cpp per file (its type), shared."""
    return (engine, precision if engine == "ours" else PRECISIONS[precision][3], layers)


def machine() -> str:
    from benchdoc import machine as describe

    return describe()


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked; ``args.full_layers`` and ``args.model_name`` come from
    ``--family``'s published config (ChatGLM2-6B: 28 layers, GLM-4-9B-chat: 40)."""
    from builder.model.family import FAMILIES

    convertible = [name for name, f in FAMILIES.items() if f.layout == "thudm"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="chatglm2-6b", choices=convertible,
                        help="whose real layer shapes and tokenizer file the synthetic checkpoints get "
                             "(THUDM's layout, which chatglm.cpp converts; default chatglm2-6b)")
    parser.add_argument("--layers", default="2,4", help="the two depths measured (default 2,4)")
    parser.add_argument("--precisions", default="int4,int8,fp16,int4-o8,int8-o8",
                        help=f"some of {', '.join(PRECISIONS)}")
    parser.add_argument("--prompts", default="256,2048", help="prefill lengths (default 256,2048)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="repeats of every measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4),
                        help="our torch threads; chatglm.cpp uses the machine's cores up to 4")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/glm-peer"),
                        help="where the checkpoints and chatglm.cpp files are kept between runs")
    parser.add_argument("--peer-path", help="a folder holding another chatglm_cpp build (first on its path)")
    parser.add_argument("--out", type=Path, help="also write the table into this markdown file")
    parser.add_argument("--section", default=None, help="section name in --out (default peer-<isa>)")
    parser.add_argument("--no-load", dest="load", action="store_false",
                        help="skip the start-up check of pre-quantized (--quantize-at build) weights")
    parser.add_argument("--worker", choices=("ours", "peer", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args

    family = FAMILIES[args.family]
    args.full_layers, args.model_name = family.spec.num_layers, family.display_name
    args.layer_counts = sorted(int(n) for n in args.layers.split(","))
    args.precision_list = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in args.precision_list if p not in PRECISIONS]
    if len(args.layer_counts) != 2 or args.layer_counts[0] == args.layer_counts[1] or unknown:
        parser.error(f"--layers takes two different depths and --precisions some of "
                     f"{', '.join(PRECISIONS)} (got --layers {args.layers!r}, unknown {unknown})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.peer_path:
        sys.path.insert(0, args.peer_path)
    try:
        import chatglm_cpp
    except ImportError:
        raise SystemExit("bench_peer needs chatglm.cpp: CMAKE_POLICY_VERSION_MINIMUM=3.5 "
                         ".venv/bin/pip install '.[peer]' (or --peer-path to a build)")
    args.cache.mkdir(parents=True, exist_ok=True)
    files = {}
    for layers in args.layer_counts:
        ckpt = checkpoint(args.cache, layers, args.family)
        for precision in args.precision_list:
            files[key("ours", precision, layers)] = ckpt
            files[key("peer", precision, layers)] = ggml_file(ckpt, PRECISIONS[precision][3], args.family)

    results: dict = {k: [] for k in files}
    isa = {"peer": peer_isa(chatglm_cpp)}  # the same build the workers import (--peer-path first)
    for round_ in range(args.rounds):
        for precision in args.precision_list:
            for layers in args.layer_counts:
                for engine in ("ours", "peer") if round_ % 2 == 0 else ("peer", "ours"):
                    k = key(engine, precision, layers)
                    if len(results[k]) > round_:
                        continue  # chatglm.cpp's file already measured this round
                    r = run_worker(engine, files[k], precision, args, args.peer_path)
                    if engine == "ours":
                        isa["ours"] = r["isa"]
                    results[k].append(r)
                    print(f"round {round_ + 1}: {engine:4s} {k[1]} {layers} layers: decode "
                          f"{r['decode_s'] * 1e3:.1f} ms/token, prefill "
                          + ", ".join(f"{n}: {s:.2f} s" for n, s in r["prefill_s"].items()), flush=True)
    if args.load:
        loads = {}
        for precision in ("int4", "int8"):
            bits = PRECISIONS[precision][0]
            deep = checkpoint(args.cache, args.layer_counts[1], args.family)
            dtype = served_dtype(precision)  # what a build for the cpu profile stores its floats in
            pre = deep.parent / f"{deep.name}-{precision}-{str(dtype).removeprefix('torch.')}"
            if not (pre / "config.json").is_file():
                from builder.model.checkpoint import save_quantized

                print(f"writing {pre} (quantized once, as --quantize-at build does)", flush=True)
                save_quantized(deep, pre, bits, dtype=dtype)
            loads[precision] = [run_worker("load", pre, precision, args, None) for _ in range(args.rounds)]
            print(f"{precision} start-up: " + ", ".join(f"read {r['read_s']:.2f} s, ready {r['load_s']:.2f} s"
                                                        for r in loads[precision]), flush=True)
        args.loads = loads
    table = report(results, args, isa)
    from benchdoc import publish

    default = args.family == "chatglm2-6b"
    section = args.section or (f"peer-{isa['ours']}" if default else f"peer-{args.family}-{isa['ours']}")
    shapes = "" if default else f"{args.model_name}'s layer shapes, "
    publish(table, args.out, section, f"CPU speed beside chatglm.cpp ({shapes}torch {isa['ours']}, "
                                      f"chatglm.cpp {isa['peer']})")


if __name__ == "__main__":
    main()
