"""Fit, placement and routing limits: which variant goes on which device, and how long a request
each one can take.

Every variant is one Triton Python-backend instance, so one process with its own CUDA context (the
profile's ``process_overhead_bytes``). A variant serving a request of ``T`` tokens (prompt +
``max_token``) needs the larger of its ``encode`` (prefill) and ``generate`` estimates at ``T``.

1. **Placement**: the variants, largest first, each sized at ``min_tokens``, onto the profile's
   ``count`` devices: each on the device with the most memory left (spreading the headroom), or,
   when that leaves one out, first fit (packing tighter). If one cannot be placed,
   :class:`PlacementError` says what fits instead.
2. **Routing limits**: on each device the headroom left goes to the lowest precision first (long
   requests to int4, short ones to fp16 when memory is tight): each variant's limit is the largest
   ``T ≤ max_tokens`` whose need fits while the others keep what they were given (at least
   ``min_tokens``).

>>> from builder import CHATGLM2_6B, load_profile
>>> plan = make_plan(CHATGLM2_6B, ["fp16", "int8", "int4"], load_profile("p40x2"))
>>> [(p.variant.precision, p.device) for p in plan.placements]
[('fp16', 0), ('int8', 1), ('int4', 1)]
>>> plan.limits()["chatglm2-6b-int4"]
32768
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from ..model.config import CHATGLM2_6B, ChatGLM2Config
from .memory import (GIB, PHASES, MemoryEstimate, cuda_graph_bytes, estimate_breakdown,
                     kv_cache_bytes)
from .profiles import GpuProfile, list_profiles, load_profile
from .routing import Route, RoutingTable

MODEL_NAME = "chatglm2-6b"  # the router's name; variants are MODEL_NAME-<precision>

PRECISIONS: dict[str, tuple[int, int | None]] = {
    "fp16": (16, None),
    "int8": (8, None),
    "int4-g128": (4, 128),  # group-wise int4: one scale per 128 inputs, closer to fp16 than int4
    "int4": (4, None),  # ChatGLM's per-row int4 (THUDM's chatglm2-6b-int4 format)
}
"""precision → (bits, group_size), highest precision first: the order the router tries them in."""

CPU_DTYPES = ("bfloat16", "float16")
"""What the fp16 variant may compute in on a CPU (:meth:`Variant.dtype`), the default first."""

ALL_LOGITS = False
"""Whether the serving runtime computes logits for every prompt position. ``builder.chat`` passes
``logits_to_keep=1``, so it does not; THUDM's code (the published table's) did, which is why the
report compares against the table with ``all_logits=True`` but plans with this."""

# -- the KV pool each variant's continuous batcher gets (builder.serving.batcher) ---------------------
KV_PAGE_SIZE = 256
"""Tokens per KV block on a GPU: transformers' ``ContinuousBatchingConfig.page_size`` default, and a
size flash attention's paged kernels take (their blocks are multiples of 256 tokens)."""
CPU_KV_PAGE_SIZE = 16
"""Tokens per KV block on a CPU. Prefix sharing reuses whole blocks only, so a chat's next turn
reuses its history down to 16 tokens instead of 256: on the CPU, where a prefill is compute-bound,
that is most of the next turn's time to first token. CPU attention reads the cache token by token,
so smaller blocks cost nothing measurable (``docs/benchmarks.md``, issue 25's eighth round)."""
KV_POOL_SHARE = 0.8
"""Of a device's headroom at the routing limits, the part split among its variants' KV pools. The
rest absorbs what grows with a running batch besides its KV cache: one row per request through
every decode step (``estimate_memory(..., concurrency=N)`` counts it)."""
MAX_RUNNING = 32
"""No pool is sized for more than this many requests at the routing limit, and on a CPU for no
more than this many of :data:`CPU_POOL_REQUEST_TOKENS` (see :func:`kv_pool_cap`)."""
CPU_POOL_REQUEST_TOKENS = 2048
"""On a CPU a pool holds at most :data:`MAX_RUNNING` requests of this many tokens (and always one
at the routing limit). A CPU profile's budget is the whole host, and a CPU's batch is compute-bound
long before 32 requests: sized for 32 requests at ChatGLM2's 32768-token limit, a single int8
6B variant got a 327,664-token pool, 21 GiB when full, and transformers refuses at load a pool whose
buffers exceed the memory then free."""
MAX_BATCH_TOKENS = 512
"""Tokens one batcher step processes at most (longer prompts are prefilled in chunks of this)."""
CONCURRENCY_LENGTHS = (512, 2048)
"""Request lengths at which reports print how many requests a pool holds (and at the limit)."""


def kv_page_size(device: str) -> int:
    """Tokens per KV block where the batcher runs: ``device`` is a torch device type (``"cpu"``,
    ``"cuda"``) or a profile's kind (``"cpu"``, ``"gpu"``).

    >>> kv_page_size("cpu"), kv_page_size("gpu")
    (16, 256)
    """
    return CPU_KV_PAGE_SIZE if device == "cpu" else KV_PAGE_SIZE


def kv_blocks_for(tokens: int, page_size: int) -> int:
    """KV blocks of ``page_size`` tokens that one request of ``tokens`` in total holds."""
    return -(-tokens // page_size)


MAX_SUGGESTED_COUNT = 16  # the largest NAMExN a PlacementError suggests


class PlacementError(ValueError):
    """The asked variants do not fit on the profile's devices; the message says what would."""

    def __init__(self, message: str, *, fitting: Sequence[tuple[str, ...]] = (),
                 suggested_gpu: str | None = None):
        super().__init__(message)
        self.fitting = list(fitting)  # maximal subsets of the asked precisions that fit
        self.suggested_gpu = suggested_gpu  # the smallest NAMExN holding them all, or None


@dataclass(frozen=True)
class Variant:
    """One precision of the model, served by its own Triton model ``<model>-<precision>``.

    >>> v = Variant("int4")
    >>> v.bits, v.group_size, v.name
    (4, None, 'chatglm2-6b-int4')
    >>> Variant("int4", "glm-4-9b-chat").name
    'glm-4-9b-chat-int4'
    """

    precision: str  # a key of PRECISIONS
    model: str = MODEL_NAME  # the model's name (its family's, builder.model.family): the router's
    bits: int = field(init=False)  # 16 (not quantized), 8 or 4
    group_size: int | None = field(init=False)  # None: one scale per output row

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; known: "
                             f"{', '.join(PRECISIONS)}")
        bits, group_size = PRECISIONS[self.precision]
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "group_size", group_size)

    @property
    def name(self) -> str:
        return f"{self.model}-{self.precision}"

    @property
    def rank(self) -> int:
        """0 for the highest precision; larger is lower."""
        return list(PRECISIONS).index(self.precision)

    def dtype(self, profile: GpuProfile, cpu_dtype: str = "bfloat16") -> str:
        """The dtype weights and activations compute in. On a GPU, float16 (the P40 too: torch's
        fp16 matmuls accumulate in fp32 there, profiles/p40.toml says why). On a CPU, bfloat16 for
        int8/int4 (torch's fused int8/int4 CPU kernels are 11× slower with other activations) and
        ``cpu_dtype`` for fp16: bfloat16 by default, because both are 2 bytes but on CPUs with AMX
        or AVX-512 BF16 torch's bfloat16 matmuls are 3-5× faster than its float16 ones (a 98-token
        prefill of the 2-layer checkpoint with the 6B's shapes: 177 against 567 ms; a decode step
        of 8 sequences: 60 against 122 ms), and on AVX2-only CPUs the two cost the same. The price:
        the weights are rounded from float16's 11-bit significand to bfloat16's 8 bits as they
        load; ``cpu_dtype="float16"`` keeps them exact."""
        if cpu_dtype not in CPU_DTYPES:
            raise ValueError(f"cpu_dtype must be one of {', '.join(CPU_DTYPES)}, got {cpu_dtype!r}")
        if profile.kind == "gpu":
            return "float16"
        return cpu_dtype if self.bits == 16 else "bfloat16"


def variants_of(precisions: Iterable[str] | str, model: str = MODEL_NAME) -> tuple[Variant, ...]:
    """``"fp16,int4"`` or ``["int4", "fp16"]`` → variants of ``model``, highest precision first.

    >>> [v.name for v in variants_of("int4,fp16")]
    ['chatglm2-6b-fp16', 'chatglm2-6b-int4']
    """
    names = precisions.split(",") if isinstance(precisions, str) else list(precisions)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if not names:
        raise ValueError(f"no precision asked; known: {', '.join(PRECISIONS)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"precision {', '.join(duplicates)} asked more than once")
    return tuple(sorted((Variant(n, model) for n in names), key=lambda v: v.rank))


def phase_breakdown(config: ChatGLM2Config, variant: Variant, tokens: int, phase: str,
                    profile: GpuProfile, concurrency: int = 1) -> MemoryEstimate:
    """One phase's estimate for ``variant`` on ``profile``'s device kind, in this runtime
    (``concurrency`` such requests at once)."""
    return estimate_breakdown(config, variant.bits, tokens, phase, group_size=variant.group_size,
                              dtype_bytes=2, device="cuda" if profile.kind == "gpu" else "cpu",
                              process_overhead=profile.process_overhead_bytes,
                              all_logits=ALL_LOGITS, concurrency=concurrency)


def need_breakdown(config: ChatGLM2Config, variant: Variant, tokens: int,
                   profile: GpuProfile, concurrency: int = 1) -> MemoryEstimate:
    """The estimate of the phase that needs more at ``tokens``: a request of ``tokens`` may be
    one long prefill (encode) or a short prompt decoded that far (generate)."""
    return max((phase_breakdown(config, variant, tokens, phase, profile, concurrency)
                for phase in PHASES), key=lambda e: e.total)


def need_bytes(config: ChatGLM2Config, variant: Variant, tokens: int, profile: GpuProfile) -> int:
    """Bytes one instance of ``variant`` needs to serve a request of ``tokens`` in total.

    >>> from builder import CHATGLM2_6B, load_profile
    >>> round(need_bytes(CHATGLM2_6B, Variant("int4"), 2048, load_profile("p40")) / GIB, 2)
    5.0
    """
    return need_breakdown(config, variant, tokens, profile).total


def largest_fit(config: ChatGLM2Config, variant: Variant, available: int, profile: GpuProfile,
                max_tokens: int) -> int:
    """The largest ``T ≤ max_tokens`` whose need fits in ``available`` bytes; 0 when none does.

    Binary search: the need grows with ``T`` (both phases do).
    """
    lo, hi = 0, max_tokens  # need(lo) fits (or lo == 0), need(hi + 1) does not matter
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need_bytes(config, variant, mid, profile) <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class Placement:
    """One variant on one device, with its routing limit."""

    variant: Variant
    device: int | None  # GPU index (instance_group gpus); None: a CPU instance
    max_tokens: int  # routing limit: the longest request (prompt + max_token) it takes
    need_bytes: int  # estimated need at max_tokens
    min_need_bytes: int  # estimated need at the plan's min_tokens (what placement used)
    weights_bytes: int  # the variant's parameters in their stored format
    dtype: str  # activations' dtype ("float16" / "bfloat16")
    kv_blocks: int = 0  # KV pool of its continuous batcher: blocks of kv_page_size tokens
    max_batch_tokens: int = 0  # tokens one batcher step may process (prefill chunk + decode rows)

    @property
    def kv_page_size(self) -> int:
        """Tokens per block of its KV pool (:func:`kv_page_size` of its device)."""
        return kv_page_size("cpu" if self.device is None else "cuda")

    def concurrency(self, tokens: int) -> int:
        """How many requests of ``tokens`` in total its KV pool holds at once."""
        return self.kv_blocks // kv_blocks_for(tokens, self.kv_page_size)

    @property
    def device_label(self) -> str:
        return "CPU" if self.device is None else f"GPU {self.device}"


@dataclass(frozen=True)
class DeviceUse:
    """One device's budget and what the plan puts on it."""

    index: int | None  # None: the host (cpu profile)
    budget_bytes: int
    used_bytes: int  # sum of its variants' needs at their limits
    variants: tuple[str, ...]

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    @property
    def label(self) -> str:
        return "CPU" if self.index is None else f"GPU {self.index}"


@dataclass(frozen=True)
class Plan:
    """Where each variant runs and how long a request it takes; see :func:`make_plan`."""

    config: ChatGLM2Config
    profile: GpuProfile
    placements: tuple[Placement, ...]  # highest precision first
    max_tokens: int  # no limit goes above this (default: the config's seq_length)
    min_tokens: int  # every variant's limit is at least this (unless overridden lower)

    @property
    def devices(self) -> tuple[DeviceUse, ...]:
        """Every device of the profile, used or not."""
        indices: list[int | None] = [None] if self.profile.kind == "cpu" \
            else list(range(self.profile.count))
        return tuple(DeviceUse(
            index=i, budget_bytes=self.profile.memory_bytes,
            used_bytes=sum(p.need_bytes for p in self.placements if p.device == i),
            variants=tuple(p.variant.name for p in self.placements if p.device == i))
            for i in indices)

    @property
    def model_name(self) -> str:
        """The model's name: the router's; variants are ``<model_name>-<precision>``."""
        return self.placements[0].variant.model if self.placements else MODEL_NAME

    def limits(self) -> dict[str, int]:
        """{model name: routing limit in tokens}, highest precision first."""
        return {p.variant.name: p.max_tokens for p in self.placements}

    def routing_table(self) -> RoutingTable:
        return RoutingTable(tuple(Route(p.variant.name, p.variant.precision, p.variant.bits,
                                        p.max_tokens) for p in self.placements))

    def as_dict(self) -> dict:
        """For build.json (bytes as integers)."""
        return {
            "model_name": self.model_name, "profile": self.profile.label, "max_tokens": self.max_tokens,
            "min_tokens": self.min_tokens,
            "placements": [{"name": p.variant.name, "precision": p.variant.precision,
                            "bits": p.variant.bits, "group_size": p.variant.group_size,
                            "device": p.device, "dtype": p.dtype, "max_tokens": p.max_tokens,
                            "need_bytes": p.need_bytes, "min_need_bytes": p.min_need_bytes,
                            "weights_bytes": p.weights_bytes, "kv_blocks": p.kv_blocks,
                            "kv_page_size": p.kv_page_size, "max_batch_tokens": p.max_batch_tokens,
                            "concurrency": {str(t): p.concurrency(t) for t in
                                            (*CONCURRENCY_LENGTHS, p.max_tokens)}}
                           for p in self.placements],
            "devices": [{"index": d.index, "budget_bytes": d.budget_bytes,
                         "used_bytes": d.used_bytes, "headroom_bytes": d.headroom_bytes,
                         "variants": list(d.variants)} for d in self.devices],
        }


# -- placement ------------------------------------------------------------------------------------
def pack_decreasing(needs: Mapping[Variant, int], budget: int, count: int, *,
                    spread: bool = True) -> dict[Variant, int] | None:
    """{variant: device index}, the largest need first; None when one does not fit.

    ``spread=True`` (worst fit) puts each variant on the device with the most memory left, so the
    headroom, and with it the routing limits, is shared out; ``spread=False`` is first fit, which
    packs tighter. :func:`place` tries the first and falls back on the second.

    >>> needs = {Variant("fp16"): 6, Variant("int8"): 4, Variant("int4"): 3}
    >>> sorted((v.precision, d) for v, d in pack_decreasing(needs, 10, 2, spread=False).items())
    [('fp16', 0), ('int4', 1), ('int8', 0)]
    >>> sorted((v.precision, d) for v, d in pack_decreasing(needs, 10, 2).items())
    [('fp16', 0), ('int4', 1), ('int8', 1)]
    """
    used = [0] * count
    placed: dict[Variant, int] = {}
    for variant in sorted(needs, key=lambda v: (-needs[v], v.rank)):
        free = [d for d in range(count) if used[d] + needs[variant] <= budget]
        if not free:
            return None
        device = min(free, key=lambda d: (used[d], d)) if spread else free[0]
        used[device] += needs[variant]
        placed[variant] = device
    return dict(sorted(placed.items(), key=lambda item: item[0].rank))


def place(needs: Mapping[Variant, int], budget: int, count: int) -> dict[Variant, int] | None:
    """Worst-fit decreasing, or first-fit decreasing when spreading leaves one out."""
    return (pack_decreasing(needs, budget, count, spread=True)
            or pack_decreasing(needs, budget, count, spread=False))


def _needs(config, variants, tokens, profile) -> dict[Variant, int]:
    return {v: need_bytes(config, v, tokens, profile) for v in variants}


def _fits(config, variants, tokens, profile) -> bool:
    count = 1 if profile.kind == "cpu" else profile.count
    return place(_needs(config, variants, tokens, profile), profile.memory_bytes,
                 count) is not None


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB ({n / 1e9:.2f} GB)"


def _joined(variants: Iterable[Variant]) -> str:
    return "+".join(v.precision for v in variants)


def placement_error(config: ChatGLM2Config, variants: Sequence[Variant], profile: GpuProfile,
                    tokens: int, model_label: str) -> PlacementError:
    """The refusal, with every maximal subset that fits and the smallest NAMExN that fits all."""
    needs = _needs(config, variants, tokens, profile)
    where = "this host" if profile.kind == "cpu" else (
        f"{profile.label} ({profile.count} × {_size(profile.memory_bytes)})")
    lines = [f"cannot place {_joined(variants)} of {model_label} on {where}.",
             f"Each variant is its own Triton process; its need for a {tokens}-token request "
             f"(weights + KV cache + activations + per-process overhead):"]
    width = max(len(v.name) for v in variants)
    lines += [f"  {v.name:<{width}}  {_size(needs[v])}" for v in variants]
    lines.append(f"  {'together':<{width}}  {_size(sum(needs.values()))}; budget "
                 f"{_size(profile.memory_bytes)} per {'host' if profile.kind == 'cpu' else 'GPU'}")
    too_big = [v for v in variants if needs[v] > profile.memory_bytes]
    if too_big:
        lines.append(f"{_joined(too_big)} alone is larger than one device: no number of "
                     f"{profile.name} GPUs fits {'it' if len(too_big) == 1 else 'them'}.")
    fitting = [s for n in range(len(variants) - 1, 0, -1)
               for s in itertools.combinations(variants, n) if _fits(config, s, tokens, profile)]
    maximal = [s for s in fitting if not any(set(s) < set(t) for t in fitting)]
    if maximal:
        lines.append(f"What fits on {profile.label}: " + ", ".join(
            f"{_joined(s)} (--quant {','.join(v.precision for v in s)})" for s in maximal))
    else:
        lines.append(f"None of the asked variants fits on {profile.label}.")
    suggested = None
    if profile.kind == "gpu" and not too_big:
        suggested = next((profile.with_count(n).label for n in range(profile.count + 1,
                                                                        MAX_SUGGESTED_COUNT + 1)
                          if _fits(config, variants, tokens, profile.with_count(n))), None)
    larger = [name for name in list_profiles() if name != profile.name
              and (other := load_profile(name)).kind == "gpu"
              and _fits(config, variants, tokens, other)]
    if suggested or larger:
        options = ([f"--gpu {suggested}"] if suggested else []) + (
            [f"one GPU of {', '.join(larger)}"] if larger else [])
        lines.append(f"All of {_joined(variants)} fit on " + " or ".join(options) + ".")
    return PlacementError("\n".join(lines), fitting=[tuple(v.precision for v in s)
                                                     for s in maximal],
                          suggested_gpu=suggested)


# -- the plan -------------------------------------------------------------------------------------
def make_plan(config: ChatGLM2Config, precisions: Iterable[str] | str, profile: GpuProfile, *,
              max_tokens: int | None = None, min_tokens: int = 2048,
              limits_override: Mapping[str, int] | None = None,
              model_label: str | None = None, cpu_dtype: str = "bfloat16",
              model_name: str = MODEL_NAME) -> Plan:
    """Place the variants of ``precisions`` on ``profile`` and give each a routing limit.

    ``max_tokens``: no limit above it (default ``config.seq_length``). ``min_tokens``: every
    variant must take requests this long (capped at ``max_tokens``). ``limits_override``:
    {precision or model name: tokens} replacing computed limits; each must fit with the others
    at their floor. ``model_label`` names the model in errors. ``cpu_dtype``: what the fp16 variant
    computes in on a CPU (:meth:`Variant.dtype`). ``model_name`` names the router and the variants
    (``glm-4-9b-chat`` → ``glm-4-9b-chat-int4``).

    >>> from builder import CHATGLM2_6B, load_profile
    >>> make_plan(CHATGLM2_6B, "int4", load_profile("p40")).devices[0].headroom_bytes > 10 * GIB
    True
    >>> make_plan(CHATGLM2_6B, "fp16,int8,int4", load_profile("p40"))
    Traceback (most recent call last):
    builder.plan.placement.PlacementError: cannot place fp16+int8+int4 of ChatGLM2-6B on p40 ...
    """
    variants = variants_of(precisions, model_name)
    if model_label is None:
        model_label = "ChatGLM2-6B" if config == CHATGLM2_6B else "this model"
    if max_tokens is None:
        max_tokens = config.seq_length
    _check_tokens("max_tokens", max_tokens)
    _check_tokens("min_tokens", min_tokens)
    if max_tokens > config.seq_length:
        raise ValueError(f"max_tokens {max_tokens} exceeds the model's seq_length "
                         f"{config.seq_length}")
    floor = min(min_tokens, max_tokens)
    overrides = _normalize_overrides(limits_override or {}, variants, max_tokens)

    floor_needs = _needs(config, variants, floor, profile)
    count = 1 if profile.kind == "cpu" else profile.count
    devices = place(floor_needs, profile.memory_bytes, count)
    if devices is None:
        raise placement_error(config, variants, profile, floor, model_label)

    limits: dict[Variant, int] = {}
    for device in sorted(set(devices.values())):
        group = [v for v in variants if devices[v] == device]
        limits.update(_device_limits(config, group, device, profile, floor, max_tokens,
                                     overrides))
    placements = tuple(Placement(
        variant=v, device=None if profile.kind == "cpu" else devices[v],
        max_tokens=limits[v], need_bytes=need_bytes(config, v, limits[v], profile),
        min_need_bytes=floor_needs[v], weights_bytes=need_breakdown(
            config, v, 1, profile).weights, dtype=v.dtype(profile, cpu_dtype))
        for v in variants)
    plan = Plan(config=config, profile=profile, max_tokens=max_tokens, min_tokens=floor,
                placements=placements)
    return dataclasses.replace(plan, placements=tuple(kv_pools(plan)))


def batch_pool(tokens: int, concurrency: int, page_size: int) -> tuple[int, int]:
    """``(blocks, max_batch_tokens)`` of a batcher with blocks of ``page_size`` tokens, sized for
    ``concurrency`` requests of ``tokens`` (what ``glm-build profile`` runs ``generate:512x8`` with)."""
    return concurrency * kv_blocks_for(tokens, page_size), min(tokens, MAX_BATCH_TOKENS)


def batcher_buffer_bytes(config: ChatGLM2Config, pool_tokens: int, step: int) -> int:
    """What transformers' continuous batching holds beside a KV pool of ``pool_tokens``: an
    attention mask of ``step × (pool + step)`` float32s and, measured (``glm-build profile
    --workloads generate:512x8`` was 9-10% above the estimate without it), about one batch step's
    float32 logits, ``step × vocab``. ``step``: tokens per batch step."""
    return (step * (pool_tokens + step) + step * config.padded_vocab_size) * 4


def kv_pools(plan: Plan) -> list[Placement]:
    """Each placement with its KV pool: the most blocks such that a batch filling them with
    requests of any length in :data:`CONCURRENCY_LENGTHS` (or the routing limit) still fits its
    need at the limit plus its share of :data:`KV_POOL_SHARE` of the device's headroom, counting
    every request's KV cache and decode row (``estimate_memory(..., concurrency=N)``); at least one
    request at the limit, at most :func:`kv_pool_cap`'s. ``max_batch_tokens`` is
    :data:`MAX_BATCH_TOKENS` (or the limit, if shorter): prefills run in chunks no longer than the
    one the need already counts.

    >>> from builder import CHATGLM2_6B, load_profile
    >>> plan = make_plan(CHATGLM2_6B, "int4", load_profile("p40"))
    >>> plan.placements[0].concurrency(2048) > 8
    True
    """
    headroom = {d.index: max(d.headroom_bytes, 0) for d in plan.devices}
    sharing = {d.index: len(d.variants) for d in plan.devices}
    pools = []
    for p in plan.placements:
        available = p.need_bytes + KV_POOL_SHARE * headroom[p.device] / sharing[p.device]
        step = min(p.max_tokens, MAX_BATCH_TOKENS)

        def fits(blocks: int) -> bool:
            return all(blocks // kv_blocks_for(tokens, p.kv_page_size) <= 1
                       or batch_bytes(plan.config, p.variant, plan.profile, tokens, blocks, step) <= available
                       for tokens in pool_lengths(p.max_tokens))

        lo, hi = kv_pool_cap(p)
        while lo < hi:  # the largest pool that fits: the need grows with the blocks
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        pools.append(dataclasses.replace(p, kv_blocks=lo, max_batch_tokens=step))
    return pools


def kv_pool_cap(p: Placement) -> tuple[int, int]:
    """``(fewest, most)`` blocks a placement's pool may have: one request at its routing limit, and
    :data:`MAX_RUNNING` requests at the limit on a GPU or of :data:`CPU_POOL_REQUEST_TOKENS` (at
    most the limit) on a CPU, if more than one at the limit.

    >>> from builder import CHATGLM2_6B, load_profile
    >>> (p,) = make_plan(CHATGLM2_6B, "int8", load_profile("cpu")).placements
    >>> kv_pool_cap(p), p.kv_page_size
    ((2048, 4096), 16)
    """
    per_request = kv_blocks_for(p.max_tokens, p.kv_page_size)
    if p.device is not None:
        return per_request, MAX_RUNNING * per_request
    longest = min(p.max_tokens, CPU_POOL_REQUEST_TOKENS)
    return per_request, max(per_request, MAX_RUNNING * kv_blocks_for(longest, p.kv_page_size))


def pool_lengths(max_tokens: int) -> list[int]:
    """The request lengths a pool is checked at: :data:`CONCURRENCY_LENGTHS` and the limit."""
    return sorted({min(t, max_tokens) for t in CONCURRENCY_LENGTHS} | {max_tokens})


def batch_bytes(config: ChatGLM2Config, variant: Variant, profile: GpuProfile, tokens: int,
                blocks: int, step: int) -> int:
    """Bytes of ``variant`` with a pool of ``blocks`` full of requests of ``tokens``: their
    :func:`phase_need` plus the batcher's buffers (:func:`batcher_buffer_bytes`) and, on a GPU,
    its CUDA graphs' pool and async batching's second inputs (``memory.cuda_graph_bytes``)."""
    page = kv_page_size(profile.kind)
    requests = max(1, blocks // kv_blocks_for(tokens, page))
    graphs = 0
    if profile.kind == "gpu":  # the batcher captures its steps in CUDA graphs there
        graphs = cuda_graph_bytes(config, variant.bits, step, tokens, blocks * page)
    return (phase_need(config, variant, tokens, profile, requests)
            + batcher_buffer_bytes(config, blocks * page, step) + graphs)


def phase_need(config: ChatGLM2Config, variant: Variant, tokens: int, profile: GpuProfile,
               concurrency: int) -> int:
    """Bytes for ``concurrency`` requests of ``tokens`` running together (generate: every KV cache
    and decode row; encode: one prefill beside the others' KV caches)."""
    return need_breakdown(config, variant, tokens, profile, concurrency).total


def _device_limits(config, group: list[Variant], device: int, profile, floor: int,
                   max_tokens: int, overrides: Mapping[Variant, int]) -> dict[Variant, int]:
    """Routing limits on one device: overrides first (checked), then lowest precision first."""
    budget = profile.memory_bytes
    limits = {v: overrides.get(v, floor) for v in group}
    reserved = {v: need_bytes(config, v, limits[v], profile) for v in group}
    for v in [v for v in group if v in overrides]:
        others = sum(reserved[o] for o in group if o != v)
        allowed = largest_fit(config, v, budget - others, profile, max_tokens)
        if limits[v] > allowed:
            where = "the host" if profile.kind == "cpu" else f"GPU {device}"
            raise ValueError(
                f"--limits {v.precision}={limits[v]}: {v.name} would need "
                f"{_size(reserved[v])} at {limits[v]} tokens, but on {where} of {profile.label} "
                f"({_size(budget)}) the others keep {_size(others)}; the most it can take "
                f"there is {allowed} tokens")
    for v in sorted((v for v in group if v not in overrides), key=lambda v: -v.rank):
        others = sum(reserved[o] for o in group if o != v)
        limits[v] = largest_fit(config, v, budget - others, profile, max_tokens)
        reserved[v] = need_bytes(config, v, limits[v], profile)
    return limits


def _normalize_overrides(raw: Mapping[str, int], variants: Sequence[Variant],
                         max_tokens: int) -> dict[Variant, int]:
    by_key = {v.precision: v for v in variants} | {v.name: v for v in variants}
    out: dict[Variant, int] = {}
    for key, value in raw.items():
        variant = by_key.get(str(key).strip().lower())
        if variant is None:
            raise ValueError(f"--limits names {key!r}, which is not among the asked variants "
                             f"({', '.join(v.precision for v in variants)})")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"--limits {key}={value!r}: the limit must be a positive integer "
                             f"of tokens")
        if value > max_tokens:
            raise ValueError(f"--limits {key}={value}: above max_tokens {max_tokens} "
                             f"(the model's seq_length unless --max-tokens says less)")
        out[variant] = value
    return out


def _check_tokens(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer of tokens, got {value!r}")
