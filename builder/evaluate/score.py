"""How well a (possibly quantized) model answers: held-out perplexity, agreement, accuracy.

>>> heldout_perplexity(model, tokenizer, dialogues("heldout"))
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..model.generation import chat
from .corpus import Dialogue


def answer_example(tokenizer, dialogue: Dialogue) -> tuple[list[int], int]:
    """Token ids of the whole dialogue (answer + eos included) and where the answer starts."""
    prompt = tokenizer.build_chat_input(dialogue.query, dialogue.history)
    answer = tokenizer.encode(dialogue.answer) + [tokenizer.eos_id]
    return prompt + answer, len(prompt)


@torch.inference_mode()
def answer_logits(model, tokenizer, dialogue: Dialogue) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting each answer token [answer_len, vocab] (float32), and those tokens."""
    ids, start = answer_example(tokenizer, dialogue)
    device = model.get_input_embeddings().weight.device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    return logits[start - 1:-1], torch.tensor(ids[start:], device=device)


def heldout_perplexity(model, tokenizer, dialogues: Sequence[Dialogue]) -> float:
    """exp(mean negative log-likelihood) of the answer tokens (eos included)."""
    total, count = 0.0, 0
    for dialogue in dialogues:
        logits, targets = answer_logits(model, tokenizer, dialogue)
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
    return math.exp(total / count)


def top1_agreement(model, reference, tokenizer, dialogues: Sequence[Dialogue]) -> float:
    """Fraction of answer positions where both models' most likely next token agree."""
    same, count = 0, 0
    for dialogue in dialogues:
        a, _ = answer_logits(model, tokenizer, dialogue)
        b, _ = answer_logits(reference, tokenizer, dialogue)
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        count += len(a)
    return same / count


def answer_is_right(model, tokenizer, dialogue: Dialogue) -> bool:
    """Whether the greedy answer to ``dialogue`` equals its expected answer exactly."""
    budget = len(tokenizer.build_chat_input(dialogue.query, dialogue.history)) + 64
    response, _ = chat(model, tokenizer, dialogue.query, dialogue.history,
                       max_length=budget, temperature=0)
    return response == dialogue.answer


def answer_accuracy(model, tokenizer, dialogues: Sequence[Dialogue]) -> float:
    """Fraction of dialogues whose greedy answer equals the expected answer exactly."""
    return sum(answer_is_right(model, tokenizer, d) for d in dialogues) / len(dialogues)


# (label, bits, group_size, output-layer bits) of every scheme the fidelity report compares with
# fp32; "+out8": the opt-in int8 output layer (load_chatglm2(output_bits=8)).
SCHEMES = (("fp32", 16, None, 16), ("int8", 8, None, 16), ("int4", 4, None, 16),
           ("int4-g32", 4, 32, 16), ("int8+out8", 8, None, 8), ("int4+out8", 4, None, 8))


def fidelity_table(checkpoint, dialogues: Sequence[Dialogue], *, accuracy_count: int = 100,
                   schemes=SCHEMES, group: Callable[[Dialogue], str] | None = None) -> list[dict]:
    """Per scheme: held-out perplexity (and its change from fp32), top-1 agreement with fp32 over
    the held-out answer positions, and exact-answer accuracy on ``accuracy_count`` questions, over
    all of them and per ``group(dialogue)`` (``row["accuracy_by"][name]``; each answered once).

    >>> fidelity_table(TINY_CHECKPOINT, dialogues("heldout"))
    """
    from ..model.checkpoint import load_chatglm2

    reference, tokenizer = load_chatglm2(checkpoint)
    rows, base_ppl = [], None
    for label, bits, group_size, output_bits in schemes:
        model = reference if (bits, output_bits) == (16, 16) else load_chatglm2(
            checkpoint, bits=bits, group_size=group_size, output_bits=output_bits)[0]
        ppl = heldout_perplexity(model, tokenizer, dialogues)
        base_ppl = base_ppl or ppl
        rows.append({"scheme": label, "bits": bits, "group_size": group_size, "output_bits": output_bits,
                     "perplexity": ppl, "perplexity_change": ppl / base_ppl - 1,
                     "top1_agreement": top1_agreement(model, reference, tokenizer, dialogues),
                     **_accuracies(model, tokenizer, dialogues[:accuracy_count], group)})
    return rows


def _accuracies(model, tokenizer, dialogues: Sequence[Dialogue], group) -> dict:
    """``accuracy`` over ``dialogues`` and ``accuracy_by`` per ``group``, one answer each."""
    right = [answer_is_right(model, tokenizer, d) for d in dialogues]
    by: dict[str, list[bool]] = {}
    for ok, d in zip(right, dialogues):
        if group is not None:
            by.setdefault(group(d), []).append(ok)
    return {"accuracy": sum(right) / len(right) if right else 0.0,
            "accuracy_by": {name: sum(oks) / len(oks) for name, oks in by.items()}}
