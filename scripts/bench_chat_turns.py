#!/usr/bin/env python3
"""Time to first token of each turn of a chat, with the KV cache's blocks of each page size.

A chat resends its whole history at every turn. The continuous batcher shares the KV blocks of an
identical prefix (transformers' prefix sharing), but only whole blocks: with 256-token pages (a GPU
plan's) a history under 256 tokens is prefilled again at every turn; with 16-token pages (a CPU
plan's, ``builder.plan.placement.CPU_KV_PAGE_SIZE``) all of it but the last partial block is found
in the pool. This runs ``--chats`` chats of the same ``--turns`` questions through
``builder.serving.batcher.Batcher`` (the serving path, in-process, off the main thread), one turn
at a time, each chat on its own, with each page size in turn (alternated over ``--rounds``, after
a warm-up chat), and prints per turn: the prompt's tokens, the tokens found in the pool (the
batcher's ``reused_prompt_tokens``), and the TTFT min / median.

    .venv/bin/python scripts/bench_chat_turns.py --checkpoint /tmp/glm-synthetic-2l --bits 8
    .venv/bin/python scripts/bench_chat_turns.py --checkpoint /tmp/glm-synthetic-2l --bits 8 --served

``--served`` asks a live Triton instead: for each page size it builds a CPU repository of the one
variant (the plan sizing its pool in blocks of that size), then runs the chats through the
streaming router, each repository's server in turn over ``--rounds``. There "found" is not
printed (the variants publish ``glm_prompt_tokens_reused_total`` once a second, not per request),
and TTFT is until the first streamed piece.

Each chat starts with its own number, so no chat finds another's blocks: only its own history.
With a synthetic checkpoint (random weights) the answers are noise; when the history is re-encoded
their tokens may differ from the ones generated, so reuse stops at the last whole block before the
answer there. A trained model's answers re-encode mostly as generated.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder import TINY_CHECKPOINT  # noqa: E402
from builder.model.checkpoint import load_chatglm2  # noqa: E402
from builder.serving.batcher import Batcher, BatcherConfig  # noqa: E402

TURNS = ["鸡兔同笼，共有10个头，28只脚，鸡和兔子各有几只？请一步一步地解释你的推理过程。",
         "如果把头的数量换成20个，脚的数量换成56只呢？", "用一句话总结上面的两个答案。",
         "再出一道类似的题目给我。", "谢谢！再见。"]


def one_chat(batcher: Batcher, tok, number: int, turns: list[str],
             new_tokens: int) -> list[tuple[int, int, float]]:
    """``(prompt tokens, tokens found in the pool, TTFT s)`` of each turn of one chat."""
    history, rows = [], []
    for index, query in enumerate(turns):
        query = f"[{number}] {query}" if index == 0 else query
        answer: dict = {}
        prompt = len(tok.build_chat_input(query, history))
        before = batcher.stats().reused_prompt_tokens
        handle = batcher.submit(query, history, max_length=prompt + new_tokens, temperature=0,
                                on_update=lambda text, h, finished, error: answer.update(h=h))
        handle.wait()
        if handle.error is not None:
            raise handle.error
        rows.append((prompt, batcher.stats().reused_prompt_tokens - before, handle.time_to_first_token_s))
        history = answer["h"]
    return rows


def served_chat(client, tok, number: int, turns: list[str], new_tokens: int) -> list[tuple[int, int, float]]:
    """``(prompt tokens, 0, TTFT s)`` of each turn of one chat through the streaming router."""
    history, rows = [], []
    for index, query in enumerate(turns):
        query = f"[{number}] {query}" if index == 0 else query
        prompt = len(tok.build_chat_input(query, history))
        client.max_token = prompt + new_tokens  # ChatGLM2's max_length: the prompt and the answer
        start, first, last = time.perf_counter(), None, None
        for last in client.stream(query, history):
            if first is None and last.response:
                first = time.perf_counter() - start
        rows.append((prompt, 0, first if first is not None else time.perf_counter() - start))
        history = last.history
    return rows


def served(args, pages: list[int], rows: dict) -> None:
    """The chats through a live Triton, a repository per page size (built with the plan's pool)."""
    from builder.build.pipeline import BuildOptions, build
    from builder.client.chat import ChatGLMClient
    from builder.model.family import detect_family
    from builder.plan import placement
    from builder.serving.server import ServerOptions, TritonServer

    precision = {16: "fp16", 8: "int8", 4: "int4"}[args.bits]
    tok = detect_family(args.checkpoint).load_tokenizer(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        repos = {}
        for page in pages:  # the plan as it would be with CPU blocks of this size
            placement.CPU_KV_PAGE_SIZE, default = page, placement.CPU_KV_PAGE_SIZE
            try:
                repos[page] = Path(tmp) / f"repo-{page}"
                build(BuildOptions(quant=(precision,), gpu="cpu", model=str(args.checkpoint),
                                   out=repos[page]), progress=False)
            finally:
                placement.CPU_KV_PAGE_SIZE = default
        number = 0
        for _ in range(args.rounds):
            for page in pages:  # alternated: the host's speed drifts
                options = ServerOptions.on_loopback(repos[page], log_file=Path(tmp) / f"server-{page}.log")
                with TritonServer(options, ready_timeout=600) as server:
                    client = ChatGLMClient(server.urls["grpc"], "grpc", 0.0, 64)
                    try:
                        served_chat(client, tok, 0, TURNS[:2], args.new_tokens)  # warm-up
                        for _ in range(args.chats):
                            number += 1
                            rows[page].append(served_chat(client, tok, number, TURNS[:args.turns],
                                                          args.new_tokens))
                    finally:
                        client.close()


def in_process(args, pages: list[int], rows: dict) -> None:
    """The chats through a Batcher per page size, in this process, off the main thread."""
    model, tok = load_chatglm2(args.checkpoint, bits=args.bits, dtype=torch.bfloat16)
    number = 0

    def run():
        nonlocal number
        with Batcher(model, tok, BatcherConfig(num_blocks=-(-8192 // pages[0]), block_size=pages[0])) as batcher:
            one_chat(batcher, tok, 0, TURNS[:2], args.new_tokens)  # warm-up, not counted
        for _ in range(args.rounds):
            for page in pages:  # alternated: the host's speed drifts
                blocks = -(-8192 // page)
                with Batcher(model, tok, BatcherConfig(num_blocks=blocks, block_size=page)) as batcher:
                    for _ in range(args.chats):
                        number += 1
                        rows[page].append(one_chat(batcher, tok, number, TURNS[:args.turns],
                                                   args.new_tokens))

    worker = threading.Thread(target=run)  # as the batcher's loop runs: off the main thread
    worker.start()
    worker.join()
    print(f"{args.bits}-bit, {model.config.num_hidden_layers} layers, {torch.get_num_threads()} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=TINY_CHECKPOINT)
    parser.add_argument("--bits", type=int, default=8, choices=(4, 8, 16))
    parser.add_argument("--page-sizes", default="256,16", help="tokens per KV block, compared")
    parser.add_argument("--turns", type=int, default=len(TURNS), choices=range(2, len(TURNS) + 1))
    parser.add_argument("--chats", type=int, default=2, help="chats per page size and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48, help="answer tokens per turn (at most)")
    parser.add_argument("--served", action="store_true", help="through a live Triton (see above)")
    args = parser.parse_args()
    pages = [int(p) for p in args.page_sizes.split(",")]
    rows: dict[int, list[list[tuple[int, int, float]]]] = {p: [] for p in pages}
    (served if args.served else in_process)(args, pages, rows)
    print(f"{args.checkpoint.name}, {'served through the streaming router' if args.served else 'in-process'}; "
          f"{args.chats} chats x {args.rounds} rounds per page size")
    found = "" if args.served else "found / "
    print("turn | " + " | ".join(f"page {p}: prompt / {found}TTFT ms min, median" for p in pages))
    for turn in range(args.turns):
        cells = []
        for page in pages:
            chats = [chat[turn] for chat in rows[page]]
            ttft = [t * 1000 for _, _, t in chats]
            cells.append(f"{statistics.median(p for p, _, _ in chats):.0f} / "
                         + ("" if args.served else f"{statistics.median(f for _, f, _ in chats):.0f} / ")
                         + f"{min(ttft):.0f}, {statistics.median(ttft):.0f}")
        print(f"{turn + 1} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
