#!/usr/bin/env python3
"""Generated tokens/s: N chats at once through the continuous batcher vs one at a time.

One at a time is today's path (``generate_ids``, what ``stream_chat`` runs); at once is
``builder.serving.batcher.Batcher`` (transformers' continuous batching). Both decode greedily, each
request up to ``--new-tokens`` new tokens (``max_length`` = prompt + new tokens), and both run off
the main thread, as the batcher's generation loop does: on a busy machine the main thread's OpenMP
team can be many times slower, which would flatter the batcher. Prints min and median of
``--repeats`` timed runs after one warm-up run each.

    .venv/bin/python scripts/bench_batcher.py                      # the embedded tiny model
    .venv/bin/python scripts/bench_batcher.py --layers 2 --bits 4  # 2 layers, ChatGLM2-6B shapes
    .venv/bin/python scripts/bench_batcher.py --layers 2 --bits 8 --steps --serving-prompts \
        --checkpoint /tmp/glm-synthetic-2l

``--steps`` also splits each path's model time into steps that carry a prompt (prefills, with any
decode rows batched beside them) and steps of decode rows only, and prints what that implies. A
prompt's prefill is compute-bound: batched with others it saves little. So N chats at once can be
at most ``N (P1 + T t1) / (N PN + T tN)`` times as fast as one at a time (P1 / PN: prefill seconds
per chat alone / in the batcher, T: its decode steps, t1 / tN: a decode step of 1 / N rows), and no
more than ``N (P1 + T t1) / (N PN + T t1)`` even if N rows cost what one does.

A synthetic checkpoint has random weights and the tiny model's tokenizer: its answers are noise
(and may stop early at a stop id), so tokens are counted, not assumed.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder import TINY_CHECKPOINT  # noqa: E402
from builder.model.checkpoint import load_chatglm2  # noqa: E402
from builder.model.generation import fit_history, generate_ids  # noqa: E402
from builder.serving.batcher import Batcher, BatcherConfig  # noqa: E402

QUESTIONS = ["你好", "Who are you?", "3只鸡和2只兔子一共有几条腿？", "What is 2 plus 3?",
             "4加5等于多少？", "2乘以3等于多少？", "鸡兔同笼，共有10个头，28只脚，鸡和兔子各有几只？",
             "How many legs do 5 chickens and 3 rabbits have?"]


class StepTimer:
    """Wraps ``model.forward`` (keeping its signature: transformers inspects it) and adds each call's
    seconds to ``prefill`` when it carries more than ``decode_rows`` tokens, else to ``decode``."""

    def __init__(self, model, decode_rows: int):
        self.model, self.decode_rows = model, decode_rows
        self.prefill = self.decode = 0.0
        self.prefill_steps = self.decode_steps = 0

    @contextlib.contextmanager
    def timing(self):
        forward = self.model.forward

        @functools.wraps(forward)
        def timed(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            seconds = time.perf_counter() - start
            if ids is not None and ids.shape[-1] > self.decode_rows:
                self.prefill, self.prefill_steps = self.prefill + seconds, self.prefill_steps + 1
            else:
                self.decode, self.decode_steps = self.decode + seconds, self.decode_steps + 1
            return out

        self.model.forward = timed
        try:
            yield self
        finally:
            del self.model.forward  # the class's method again

    def per_decode_step(self) -> float:
        return self.decode / max(self.decode_steps, 1)


def off_main_thread(fn):
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def one_at_a_time(model, tok, questions, new_tokens) -> tuple[int, float]:
    """(tokens, seconds) for ``questions`` answered in turn."""
    def run():
        start, tokens = time.perf_counter(), 0
        for q in questions:
            ids, _ = fit_history(tok, q, [], 10**9)
            tokens += sum(1 for _ in generate_ids(model, ids, max_length=len(ids) + new_tokens,
                                                  temperature=0, top_p=1.0, stop_ids=tok.stop_ids))
        return tokens, time.perf_counter() - start
    return off_main_thread(run)


def at_once(batcher, tok, questions, new_tokens) -> tuple[int, float]:
    """(tokens, seconds) for ``questions`` submitted together, until the last one ends."""
    before = batcher.stats().generated_tokens
    start = time.perf_counter()
    handles = [batcher.submit(q, max_length=len(tok.build_chat_input(q)) + new_tokens,
                              temperature=0, on_update=lambda *update: None) for q in questions]
    for handle in handles:
        handle.wait()
        if handle.error is not None:
            raise handle.error
    seconds = time.perf_counter() - start
    return batcher.stats().generated_tokens - before, seconds


def report(label: str, runs: list[tuple[int, float]]) -> list[float]:
    rates = [tokens / seconds for tokens, seconds in runs]
    tokens = sorted({t for t, _ in runs})
    print(f"  {label:<14} tokens/s min {min(rates):8.1f}  median {statistics.median(rates):8.1f}  "
          f"(seconds {', '.join(f'{s:.2f}' for _, s in runs)}; tokens {tokens})", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=0,
                        help="0: the embedded tiny model; else a synthetic checkpoint with "
                             "ChatGLM2-6B's shapes and this many layers")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/glm-2l-per-layer"),
                        help="where the synthetic checkpoint is (written there if missing)")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8, 16), help="weight bits")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="the model's dtype (activations, KV cache, unquantized weights)")
    parser.add_argument("--requests", type=int, default=8, help="chats per run")
    parser.add_argument("--new-tokens", type=int, default=24, help="new tokens per chat (at most)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--serving-prompts", action="store_true",
                        help="scripts/bench_serving.py's prompts (about 28, 70 and 196 tokens, in turn) "
                             "instead of short questions")
    parser.add_argument("--steps", action="store_true",
                        help="split model time into prefill and decode steps, and print the bound they set")
    args = parser.parse_args()

    path = TINY_CHECKPOINT
    if args.layers:
        from builder.model.synthetic import write_synthetic_checkpoint

        path = args.checkpoint
        if not (path / "config.json").exists():
            write_synthetic_checkpoint(path, num_layers=args.layers)
    start = time.perf_counter()
    model, tok = load_chatglm2(path, bits=args.bits, dtype=getattr(torch, args.dtype))
    if args.serving_prompts:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_serving import mixed_prompts

        questions = [prompt for prompt, _ in mixed_prompts(tok, 0, args.requests)]
    else:
        questions = (QUESTIONS * args.requests)[:args.requests]
    longest = max(len(tok.build_chat_input(q)) for q in questions) + args.new_tokens
    blocks = args.requests * -(-longest // args.block_size)  # every chat at its longest, at once
    # No prefix sharing: the chats repeat a few prompts, and found in the pool they would measure
    # the cache, not the batching (chat() one at a time has none). bench_chat_turns.py measures it.
    config = BatcherConfig(num_blocks=blocks, block_size=args.block_size,
                           max_batch_tokens=args.requests * longest, prefix_sharing=False)
    print(f"{path.name}: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
          f"{args.bits}-bit {args.dtype}, loaded in {time.perf_counter() - start:.1f} s; "
          f"{args.requests} chats x <= {args.new_tokens} new tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {config}", flush=True)

    one_at_a_time(model, tok, questions[:2], args.new_tokens)  # warm-up
    alone, together = StepTimer(model, 1), StepTimer(model, args.requests)
    with alone.timing() if args.steps else contextlib.nullcontext():
        serial = [one_at_a_time(model, tok, questions, args.new_tokens) for _ in range(args.repeats)]
    serial_rates = report("one at a time", serial)
    with Batcher(model, tok, config) as batcher:
        at_once(batcher, tok, questions[:2], args.new_tokens)  # warm-up
        with together.timing() if args.steps else contextlib.nullcontext():
            batched = [at_once(batcher, tok, questions, args.new_tokens) for _ in range(args.repeats)]
    batched_rates = report("batcher", batched)
    speedup = statistics.median(batched_rates) / statistics.median(serial_rates)
    print(f"  speed-up (median) x{speedup:.1f}")
    if args.steps:
        steps_report(alone, together, serial, args.requests, args.repeats)


def steps_report(alone: StepTimer, together: StepTimer, serial, requests: int, repeats: int) -> None:
    """The split of model time, and the bound it sets on the batcher's speed-up (see the docstring)."""
    chats = requests * repeats
    prefill, batched = alone.prefill / chats, together.prefill / chats  # P1, PN: one chat's prompt
    t1, tn = alone.per_decode_step(), together.per_decode_step()
    steps = alone.decode_steps / chats  # T: decode steps per chat
    for label, timer in (("one at a time", alone), ("batcher", together)):
        print(f"  {label:<14} prefill steps {timer.prefill_steps:4d}: {timer.prefill:6.2f} s; decode steps "
              f"{timer.decode_steps:4d}: {timer.decode:6.2f} s, {timer.per_decode_step() * 1e3:.1f} ms each")
    one = prefill + steps * t1
    print(f"  P1 {prefill * 1e3:.0f} ms, P{requests} {batched * 1e3:.0f} ms a prompt, T {steps:.1f} decode steps, "
          f"t1 {t1 * 1e3:.1f} ms, t{requests} {tn * 1e3:.1f} ms ({tn / t1:.2f}x t1): model time alone sets "
          f"x{requests * one / (requests * batched + steps * tn):.2f}, and x{requests * one / (requests * batched + steps * t1):.2f} "
          f"if {requests} rows cost what one does")


if __name__ == "__main__":
    main()
