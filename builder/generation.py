"""``chat()`` and ``stream_chat()``: ChatGLM2's ``model.chat`` on a ``GlmForCausalLM``.

>>> response, history = chat(model, tokenizer, "3只鸡和2只兔子一共有几条腿？", temperature=0)
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

History = Sequence[tuple[str, str]]


class PromptTooLongError(ValueError):
    """The query alone does not fit in ``max_length``."""


def fit_history(tokenizer, query: str, history: History, max_length: int) -> tuple[list[int], list]:
    """The prompt ids, dropping the oldest rounds until at least one new token fits."""
    history = [tuple(pair) for pair in history]
    while True:
        ids = tokenizer.build_chat_input(query, history)
        if len(ids) < max_length:
            return ids, history
        if not history:
            raise PromptTooLongError(
                f"the query alone is {len(ids)} tokens, which leaves no room to answer within "
                f"max_length={max_length}")
        history = history[1:]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> int:
    """Next token from last-position logits [vocab]: greedy when temperature ≤ 0, else top-p."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the top token
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


def decode_answer(tokenizer, new_ids: Sequence[int], *, final: bool = True) -> str | None:
    """The answer text of ``new_ids`` as ``stream_chat`` shows it (stripped); ``None`` for a partial
    answer that ends inside a multi-byte character (wait for the next token).

    >>> decode_answer(tokenizer, tokenizer.encode("你好"), final=False)
    '你好'
    """
    text = tokenizer.decode(new_ids)
    if not final and text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
        return None
    return text.strip()


@torch.inference_mode()
def generate_ids(model, input_ids: list[int], *, max_length: int, temperature: float,
                 top_p: float, stop_ids: Sequence[int],
                 generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids until a stop id or ``max_length`` tokens in total (prompt included)."""
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    cache = DynamicCache()
    tokens = torch.tensor([input_ids], device=device)  # [1, seq]
    for _ in range(max_length - len(input_ids)):
        out = model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1)
        next_id = sample_next(out.logits[0, -1], temperature, top_p, generator)
        if next_id in stop_ids:
            return
        yield next_id
        tokens = torch.tensor([[next_id]], device=device)


def stream_chat(model, tokenizer, query: str, history: History = (), *, max_length: int = 8192,
                temperature: float = 0.8, top_p: float = 0.8,
                generator: torch.Generator | None = None) -> Iterator[tuple[str, list]]:
    """Yield ``(response_so_far, history)`` as the answer grows; the last one is final."""
    prompt_ids, _ = fit_history(tokenizer, query, history, max_length)
    history = [tuple(pair) for pair in history]
    new_ids: list[int] = []
    response = ""
    for token in generate_ids(model, prompt_ids, max_length=max_length, temperature=temperature,
                              top_p=top_p, stop_ids=tokenizer.stop_ids, generator=generator):
        new_ids.append(token)
        partial = decode_answer(tokenizer, new_ids, final=False)
        if partial is None:
            continue
        response = partial
        yield response, history + [(query, response)]
    response = decode_answer(tokenizer, new_ids)
    yield response, history + [(query, response)]


def chat(model, tokenizer, query: str, history: History = (), *, max_length: int = 8192,
         temperature: float = 0.8, top_p: float = 0.8,
         generator: torch.Generator | None = None) -> tuple[str, list]:
    """Answer ``query`` after ``history`` (query/response pairs); returns ``(response, history)``.

    ``max_length`` counts prompt and answer tokens; the oldest rounds are dropped when the prompt
    does not fit. ``temperature`` ≤ 0 is greedy. The returned history is the input history plus
    ``(query, response)``.
    """
    response, new_history = "", list(history) + [(query, "")]
    for response, new_history in stream_chat(model, tokenizer, query, history, max_length=max_length,
                                             temperature=temperature, top_p=top_p,
                                             generator=generator):
        pass
    return response, new_history
