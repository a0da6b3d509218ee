"""Which variant serves a request: the router's rule, as a pure function and a small table.

The plan (:mod:`builder.plan.placement`) gives every variant a routing limit, its longest request (prompt +
``max_token``, in tokens) that fits its memory headroom. The router model sends each request to
the highest-precision variant whose limit covers it, and refuses a request no variant can serve.
The table travels to the router as the ``routing`` parameter of its ``config.pbtxt`` (JSON).

This module imports nothing heavy (no torch): the router process loads only it and the tokenizer.

>>> table = RoutingTable.from_json(
...     '[{"name": "chatglm2-6b-fp16", "precision": "fp16", "bits": 16, "max_tokens": 2048},'
...     ' {"name": "chatglm2-6b-int4", "precision": "int4", "bits": 4, "max_tokens": 32768}]')
>>> table.choose(1500).name, table.choose(9000).name, table.choose(40000)
('chatglm2-6b-fp16', 'chatglm2-6b-int4', None)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence, Union

Limits = Union[Mapping[str, int], Sequence[tuple[str, int]]]


def choose_variant(limits: Limits, tokens: int) -> str | None:
    """The first (highest-precision) variant whose limit covers ``tokens``; None when none does.

    ``limits``: ``(name, max_tokens)`` pairs, or a mapping in insertion order, highest precision
    first. ``tokens``: the request's total length, prompt plus the answer it may grow to.

    >>> choose_variant([("fp16", 2048), ("int8", 6000), ("int4", 32768)], 4096)
    'int8'
    >>> choose_variant({"fp16": 2048}, 2049) is None
    True
    """
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    pairs = limits.items() if isinstance(limits, Mapping) else limits
    for name, max_tokens in pairs:
        if tokens <= max_tokens:
            return name
    return None


@dataclass(frozen=True)
class Route:
    """One variant as the router sees it."""

    name: str  # Triton model name: "chatglm2-6b-int4"
    precision: str  # "fp16", "int8", "int4" (or "int4-g128")
    bits: int  # 16, 8 or 4
    max_tokens: int  # routing limit: the longest request (prompt + max_token) it serves

    def __post_init__(self):
        for field in ("name", "precision"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"route field {field!r} must be a non-empty string, got {value!r}")
        if self.bits not in (16, 8, 4) or isinstance(self.bits, bool):
            raise ValueError(f"route {self.name!r}: bits must be 16, 8 or 4, got {self.bits!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) \
                or self.max_tokens <= 0:
            raise ValueError(f"route {self.name!r}: max_tokens must be a positive integer, "
                             f"got {self.max_tokens!r}")


@dataclass(frozen=True)
class RoutingTable:
    """The routes, highest precision first (the order the router tries them in).

    >>> t = RoutingTable((Route("chatglm2-6b-int4", "int4", 4, 8192),))
    >>> t.refusal(9000)
    'the request needs 9000 tokens (prompt + max_token), more than any variant serves: the longest is 8192 (chatglm2-6b-int4)'
    """

    routes: tuple[Route, ...]

    def __post_init__(self):
        object.__setattr__(self, "routes", tuple(self.routes))
        if not self.routes:
            raise ValueError("a routing table needs at least one route")
        names = [r.name for r in self.routes]
        if len(set(names)) != len(names):
            raise ValueError(f"route names must be unique, got {names}")

    @property
    def limits(self) -> list[tuple[str, int]]:
        """``(name, max_tokens)`` pairs, highest precision first."""
        return [(r.name, r.max_tokens) for r in self.routes]

    @property
    def longest(self) -> Route:
        """The route with the largest limit (the first of them on ties)."""
        return max(self.routes, key=lambda r: r.max_tokens)

    def choose(self, tokens: int) -> Route | None:
        """The route for a request of ``tokens`` in total, or None when no variant serves it."""
        name = choose_variant(self.limits, tokens)
        return None if name is None else next(r for r in self.routes if r.name == name)

    def candidates(self, tokens: int, fallback: str = "lower") -> list[Route]:
        """The routes to try for a request of ``tokens``, in order: the one :meth:`choose` picks,
        then (``fallback`` ``"lower"``) every lower precision whose limit covers the request, or
        (``"any"``) every other route that covers it, lower precisions first; ``"none"``: just
        the first. With the tables the planner writes (highest precision first), no higher
        precision than the chosen one covers the request, so ``any`` adds routes only to a table
        whose order was changed by hand.

        >>> [r.precision for r in table.candidates(300, "lower")]
        ['int8', 'int4']
        """
        check_fallback(fallback)
        first = self.choose(tokens)
        if first is None:
            return []
        covering = [r for r in self.routes if r.max_tokens >= tokens and r is not first]
        if fallback == "none":
            return [first]
        lower = [r for r in covering if r.bits < first.bits or (r.bits == first.bits and
                                                               self.routes.index(r) > self.routes.index(first))]
        higher = [r for r in covering if r not in lower] if fallback == "any" else []
        return [first, *lower, *reversed(higher)]

    def refusal(self, tokens: int) -> str:
        """The error the router returns for a request no variant serves."""
        longest = self.longest
        return (f"the request needs {tokens} tokens (prompt + max_token), more than any variant "
                f"serves: the longest is {longest.max_tokens} ({longest.name})")

    # -- the router's `routing` parameter --------------------------------------------------------
    def to_json(self) -> str:
        """One line of JSON: ``[{"name", "precision", "bits", "max_tokens"}, ...]``."""
        return json.dumps([asdict(r) for r in self.routes], separators=(", ", ": "))

    @classmethod
    def from_json(cls, text: str) -> "RoutingTable":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"routing parameter is not valid JSON: {err}") from err
        if not isinstance(raw, list):
            raise ValueError(f"routing parameter must be a JSON list, got {type(raw).__name__}")
        return cls(tuple(_route(item) for item in raw))

    @classmethod
    def from_routes(cls, routes: Iterable[Route]) -> "RoutingTable":
        return cls(tuple(routes))


FALLBACKS = ("none", "lower", "any")
"""Where the router sends a request whose variant is full, down or reloading: nowhere (``none``),
a lower precision that covers it (``lower``, the default), or any variant that covers it."""


def check_fallback(fallback: str) -> None:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")


def _route(item) -> Route:
    keys = {"name", "precision", "bits", "max_tokens"}
    if not isinstance(item, dict) or set(item) != keys:
        raise ValueError(f"each route must be an object with keys {sorted(keys)}, got {item!r}")
    return Route(**item)
