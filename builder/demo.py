"""`make demo`: the main job on the embedded tiny model, start to finish.

    .venv/bin/python -m builder.demo
"""
from __future__ import annotations

import time

import psutil

from . import TINY_CHECKPOINT, chat, load_chatglm2

QUESTION = "3只鸡和2只兔子一共有几条腿？"


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def answer_locally() -> None:
    """Load the embedded model and answer one held-out question with chat()."""
    banner(f"Loading the embedded demo model (a tiny ChatGLM2, not ChatGLM2-6B): {TINY_CHECKPOINT}")
    start = time.perf_counter()
    model, tokenizer = load_chatglm2(TINY_CHECKPOINT)
    params = sum(p.numel() for p in model.parameters())
    print(f"loaded {params / 1e6:.2f} M parameters in {time.perf_counter() - start:.2f} s "
          f"(process RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB)")
    banner(f"chat(): {QUESTION}")
    start = time.perf_counter()
    response, history = chat(model, tokenizer, QUESTION, temperature=0)
    print(f"answer: {response}")
    print(f"history: {history}")
    print(f"({time.perf_counter() - start:.2f} s, greedy)")


def main() -> None:
    answer_locally()


if __name__ == "__main__":
    main()
