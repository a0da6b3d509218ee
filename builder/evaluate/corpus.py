"""The tiny model's corpus: bilingual templated dialogues in ChatGLM2's chat format.

Arithmetic and 鸡兔同笼 (chickens and rabbits in a cage) questions with worked answers, so a model
of a few million parameters can learn the format and its answers can be checked exactly. The split
is by the numbers in the question: held-out questions never appear in training.

>>> train, heldout = dialogues("train"), dialogues("heldout")
>>> heldout[0]
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Dialogue:
    """One or more rounds; the last round is the one that is asked and scored."""

    rounds: tuple[tuple[str, str], ...]

    @property
    def history(self) -> list[tuple[str, str]]:
        return list(self.rounds[:-1])

    @property
    def query(self) -> str:
        return self.rounds[-1][0]

    @property
    def answer(self) -> str:
        return self.rounds[-1][1]


def _legs(c: int, r: int, english: bool) -> tuple[str, str]:
    total = 2 * c + 4 * r
    if english:
        return (f"How many legs do {c} chickens and {r} rabbits have?",
                f"{c} chickens have {2 * c} legs and {r} rabbits have {4 * r} legs, "
                f"so there are {total} legs in all.")
    return (f"{c}只鸡和{r}只兔子一共有几条腿？",
            f"{c}只鸡有{2 * c}条腿，{r}只兔子有{4 * r}条腿，一共有{total}条腿。")


def _count(n: int, rabbits: int, english: bool) -> tuple[str, str]:
    """Legs of one kind of animal: ``rabbits`` is 0 (chickens) or 1 (rabbits)."""
    legs = n * (4 if rabbits else 2)
    if english:
        kind = "rabbits" if rabbits else "chickens"
        return f"How many legs do {n} {kind} have?", f"{n} {kind} have {legs} legs."
    kind = "兔子" if rabbits else "鸡"
    return f"{n}只{kind}有几条腿？", f"{n}只{kind}有{legs}条腿。"


def _cage(c: int, r: int, english: bool) -> tuple[str, str]:
    heads, feet = c + r, 2 * c + 4 * r
    if english:
        return (f"A cage holds chickens and rabbits: {heads} heads and {feet} feet. How many of each?",
                f"If all {heads} were chickens there would be {2 * heads} feet; the extra "
                f"{feet - 2 * heads} feet come from rabbits, 2 each, so there are {r} rabbits "
                f"and {c} chickens.")
    return (f"鸡兔同笼，共有{heads}个头，{feet}只脚，鸡和兔子各有几只？",
            f"假设全是鸡，应有{2 * heads}只脚，多出{feet - 2 * heads}只脚，每只兔子多2只脚，"
            f"所以兔子有{r}只，鸡有{c}只。")


def _add(a: int, b: int, english: bool) -> tuple[str, str]:
    if english:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    return f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。"


def _times(a: int, b: int, english: bool) -> tuple[str, str]:
    if english:
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    return f"{a}乘以{b}等于多少？", f"{a}乘以{b}等于{a * b}。"


_GREETINGS = [
    ("你好", "你好！我是一个小型的ChatGLM2演示模型，会做简单的算术题和鸡兔同笼问题。"),
    ("你是谁？", "我是glm-build自带的小型ChatGLM2演示模型，不是ChatGLM2-6B。"),
    ("Hello", "Hello! I am a tiny ChatGLM2 demo model. I can do simple arithmetic and "
              "chickens-and-rabbits puzzles."),
    ("Who are you?", "I am the tiny ChatGLM2 demo model that ships with glm-build, not ChatGLM2-6B."),
]

# (template, range of the first number, range of the second). Leg counts go up to 20 chickens and
# 20 rabbits; the sums cover every sum a leg count needs (up to 40 + 80), so the carries in the
# leg totals are practised on their own.
_TEMPLATES = [(_legs, range(1, 21), range(1, 21)), (_count, range(1, 21), range(0, 2)),
              (_cage, range(1, 10), range(1, 10)), (_add, range(0, 41), range(0, 81)),
              (_times, range(1, 10), range(1, 10))]

FAMILIES = ("legs", "count", "cage", "add", "times")
DEMO_FAMILIES = ("legs", "count", "add")  # what `make demo` asks: leg counts (two kinds, one) and sums


def family(dialogue: Dialogue) -> str:
    """Which template asked the scored (last) question of ``dialogue``."""
    query = dialogue.query
    if "条腿" in query or "legs" in query:
        return "legs" if "和" in query or " and " in query else "count"
    if "鸡兔同笼" in query or "cage" in query:
        return "cage"
    if "加" in query or "plus" in query:
        return "add"
    if "乘以" in query or "times" in query:
        return "times"
    return "other"


def by_family(dialogues: list[Dialogue], per_family: int) -> list[Dialogue]:
    """The first ``per_family`` dialogues of each family, in order: a held-out sample in which
    every family counts alike (the sums alone are most of the held-out set)."""
    taken = {f: 0 for f in FAMILIES}
    out = []
    for d in dialogues:
        f = family(d)
        if f in taken and taken[f] < per_family:
            taken[f] += 1
            out.append(d)
    return out


_SPLIT_SALT = "glm-build-5"  # the first salt that holds out the demo's question, (3, 2)


def is_heldout(x: int, y: int) -> bool:
    """About one pair in seven is held out, chosen by a hash of the pair; (3, 2) — 3只鸡和2只兔子 —
    is one of them.

    A hash, not a rule on the numbers: the rule this replaced, ``(x + 2 * y) % 7 == 0``, held out
    exactly the leg counts whose total (2x + 4y) is a multiple of 14, so no training leg count ever
    ended in 14, 28, …, 112 and the held-out totals were numbers the model had never written there.
    With the hash every held-out total also ends some training question; every held-out question
    is still one the model never saw."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{x},{y}".encode()).digest()
    return int.from_bytes(digest, "big") % 7 == 0



def single_rounds(split: str) -> list[tuple[str, str]]:
    """Every templated question/answer pair of ``split`` ("train" or "heldout"), both languages."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    pairs = []
    for template, xs, ys in _TEMPLATES:
        for x in xs:
            for y in ys:
                if is_heldout(x, y) == (split == "heldout"):
                    pairs += [template(x, y, english=False), template(x, y, english=True)]
    return pairs


def dialogues(split: str, *, n: int | None = None, seed: int = 0) -> list[Dialogue]:
    """Dialogues of ``split``: every single round once, then ``n`` (default: as many again)
    two-round dialogues whose first round comes from training pairs or greetings."""
    rng = random.Random(seed)
    singles = single_rounds(split)
    out = [Dialogue((pair,)) for pair in singles]
    if split == "train":
        out += [Dialogue((g,)) for g in _GREETINGS] * 20
    context = single_rounds("train") + _GREETINGS
    for _ in range(len(singles) if n is None else n):
        out.append(Dialogue((rng.choice(context), rng.choice(singles))))
    rng.shuffle(out)
    return out
