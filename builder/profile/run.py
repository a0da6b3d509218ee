"""Measured peak memory per variant and workload, beside the estimate and the published table.

``glm-build profile`` runs every variant × workload in a process of its own
(:mod:`builder.profile.measure` says how each run loads, warms up and reads its peak) and compares the
measured bytes with :func:`builder.estimate_memory` for the same device, counting the same things
(:func:`estimate_for`), and with THUDM's table where it has the cell (:func:`published_for`).
:mod:`builder.profile.report` writes ``profile.json``, ``profile.md`` and ``profile.png``.

- ``measured_bytes`` on a CPU: the resident set's peak while the workload runs minus the baseline
  before loading: what the model costs while serving. The load's own peak (quantizing at load
  holds float copies of one projection) is kept beside it, ``details["load_peak_bytes"]``.
- ``measured_bytes`` on CUDA: the CUDA context plus the caching allocator's peak reserved bytes
  during the workload, what ``nvidia-smi`` would show at the peak.

``--spec chatglm2-6b`` profiles the real model's shapes with random weights: a checkpoint with
``layers`` decoder layers (all 28 by default) is written once into ``cache_dir``.

>>> records = run_profile(ProfileOptions(quant="fp16,int4", device="cpu", spec="chatglm2-6b",
...                                      layers=2, workloads="encode:512,generate:256"))
>>> [(r.variant, r.workload, f"{r.error:+.1%}") for r in records]
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..model.config import CHATGLM2_6B, ChatGLM2Config
from ..plan.memory import PHASES, PUBLISHED_TABLE, MemoryEstimate, estimate_breakdown
from .measure import PROMPT_TOKENS, RunFailedError  # noqa: F401  (re-exported)
from ..model.family import SPECS  # --spec NAME: random weights with that model's shapes
from ..plan.placement import Variant, batch_pool, batcher_buffer_bytes, kv_page_size, variants_of

DEFAULT_WORKLOADS = "encode:2048,generate:8192"  # the published table's
DEFAULT_OUT = Path("profile")
DEVICES = ("cpu", "cuda")
SYNTHETIC_DIR = "glm-synthetic-{layers}l"  # under cache_dir; scripts/bench_decode.py shares it
# A profile kind whose Variant.dtype rule applies to the device (CPU: bf16 for int8/int4).
_DTYPE_PROFILE = {"cpu": "cpu", "cuda": "a100-80gb"}


class ProfilingError(ValueError):
    """Bad input: an option, a workload, a device that is not there."""


# -- workloads ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """``encode`` one prefill of ``tokens``, or ``generate`` until ``tokens`` in total; with
    ``xN``, N such requests at once through the variant's continuous batcher.

    >>> Workload.parse("generate:8192")
    Workload(phase='generate', tokens=8192, concurrency=1)
    >>> str(Workload.parse("generate:512x8"))
    'generate:512x8'
    """

    phase: str  # "encode" or "generate" (builder.plan.memory.PHASES)
    tokens: int  # prefill length, or total length with the prompt
    concurrency: int = 1  # requests at once (continuous batching)

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ProfilingError(f"workloads: phase must be one of {', '.join(PHASES)}, "
                                 f"got {self.phase!r} in {self}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens <= 0:
            raise ProfilingError(f"workloads: tokens must be a positive integer, got "
                                 f"{self.tokens!r} in {self.phase}:{self.tokens}")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) \
                or self.concurrency < 1:
            raise ProfilingError(f"workloads: concurrency must be a positive integer, got "
                                 f"{self.concurrency!r} in {self.phase}:{self.tokens}")
        if self.phase == "generate" and self.tokens <= PROMPT_TOKENS:
            raise ProfilingError(f"workloads: {self} must exceed the {PROMPT_TOKENS}-token "
                                 f"prompt it decodes from")

    @classmethod
    def parse(cls, text: str) -> "Workload":
        phase, sep, rest = text.strip().partition(":")
        tokens, times, concurrency = rest.strip().lower().partition("x")
        if not sep or not tokens.strip().isdigit() or (times and not concurrency.strip().isdigit()):
            raise ProfilingError(f"workloads: {text.strip()!r} must look like PHASE:TOKENS or "
                                 f"PHASE:TOKENSxREQUESTS, e.g. encode:2048 or generate:512x8")
        return cls(phase.strip().lower(), int(tokens), int(concurrency) if times else 1)

    def __str__(self) -> str:
        return f"{self.phase}:{self.tokens}" + (f"x{self.concurrency}" if self.concurrency > 1 else "")


def parse_workloads(text: str | Iterable[str | Workload]) -> tuple[Workload, ...]:
    """``"encode:2048,generate:8192"`` → workloads, in the order given, each once.

    >>> [str(w) for w in parse_workloads("encode:512, encode:1024")]
    ['encode:512', 'encode:1024']
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    workloads = tuple(w if isinstance(w, Workload) else Workload.parse(w)
                      for w in items if isinstance(w, Workload) or w.strip())
    if not workloads:
        raise ProfilingError(f"workloads: none given in {text!r}; e.g. {DEFAULT_WORKLOADS}")
    repeated = sorted({str(w) for w in workloads if workloads.count(w) > 1})
    if repeated:
        raise ProfilingError(f"workloads: {', '.join(repeated)} given more than once")
    return workloads


# -- options --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileOptions:
    """What ``glm-build profile`` is asked to measure; validated on creation, naming the field."""

    quant: tuple[str, ...]  # precisions, one variant each; "fp16,int4" is accepted too
    device: str = "cpu"  # "cpu" or "cuda"
    model: Optional[Path] = None  # checkpoint folder; None and no spec: the embedded demo model
    spec: Optional[str] = None  # "chatglm2-6b": random weights with the real shapes
    layers: Optional[int] = None  # spec only: decoder layers (default: the spec's, 28)
    workloads: tuple[Workload, ...] = parse_workloads(DEFAULT_WORKLOADS)
    out: Path = DEFAULT_OUT  # gets profile.json, profile.md, profile.png
    cache_dir: Optional[Path] = None  # where --spec writes its checkpoint (default: temp dir)
    threads: Optional[int] = None  # torch threads in each run (default: torch's own)

    def __post_init__(self):
        try:
            variants = variants_of(self.quant)
        except ValueError as err:
            raise ProfilingError(f"quant: {err}") from err
        object.__setattr__(self, "quant", tuple(v.precision for v in variants))
        object.__setattr__(self, "workloads", parse_workloads(self.workloads))
        if self.device not in DEVICES:
            raise ProfilingError(f"device: must be one of {', '.join(DEVICES)}, "
                                 f"got {self.device!r}")
        if self.model is not None and self.spec is not None:
            raise ProfilingError(f"model and spec are exclusive: --model {self.model} reads a "
                                 f"checkpoint, --spec {self.spec} makes random weights")
        if self.spec is not None and self.spec not in SPECS:
            raise ProfilingError(f"spec: unknown {self.spec!r}; known: {', '.join(SPECS)}")
        if self.layers is not None:
            if self.spec is None:
                raise ProfilingError(f"layers: --layers {self.layers} applies to --spec only "
                                     f"(a checkpoint has its own)")
            if isinstance(self.layers, bool) or not isinstance(self.layers, int) \
                    or self.layers <= 0:
                raise ProfilingError(f"layers: must be a positive integer, got {self.layers!r}")
        if self.threads is not None and (isinstance(self.threads, bool)
                                         or not isinstance(self.threads, int) or self.threads <= 0):
            raise ProfilingError(f"threads: must be a positive integer, got {self.threads!r}")
        for name in ("model", "out", "cache_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))

    @property
    def variants(self) -> tuple[Variant, ...]:
        """The asked precisions, named after the model's family (``glm-4-9b-chat-int4``)."""
        from ..model.family import FamilyError, detect_family

        family = self.spec or "chatglm2-6b"
        if self.model is not None:
            try:
                family = detect_family(self.model).name
            except FamilyError:  # resolve_target's check_checkpoint says what is wrong
                pass
        return tuple(Variant(p, family) for p in self.quant)

    def command_line(self) -> str:
        """The ``glm-build profile`` command asking for exactly this (quoted in profile.md).

        >>> ProfileOptions(quant="int4", spec="chatglm2-6b", layers=2).command_line()
        'glm-build profile --spec chatglm2-6b --layers 2 --quant int4 --device cpu --workloads encode:2048,generate:8192 --out profile'
        """
        import shlex

        args = ["glm-build", "profile"]
        if self.spec is not None:
            args += ["--spec", self.spec] + ([] if self.layers is None
                                             else ["--layers", str(self.layers)])
        elif self.model is not None:
            args += ["--model", str(self.model)]
        args += ["--quant", ",".join(self.quant), "--device", self.device,
                 "--workloads", ",".join(map(str, self.workloads)), "--out", str(self.out)]
        if self.cache_dir is not None:
            args += ["--cache-dir", str(self.cache_dir)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        return shlex.join(args)


@dataclass(frozen=True)
class Target:
    """The model a profile runs: its config, its checkpoint folder, how reports name it."""

    config: ChatGLM2Config
    checkpoint: Path
    label: str  # "ChatGLM2-6B", "ChatGLM2-6B shapes, 2 of 28 layers (random weights)", ...
    synthetic: bool  # the checkpoint is written from the spec when missing
    family: str = "chatglm2-6b"  # its GLM family (builder.model.family)

    @property
    def is_6b(self) -> bool:
        """The real ChatGLM2-6B network, all layers (the published table's model)."""
        return dataclasses.replace(self.config, quantization_bit=0, torch_dtype="float16") \
            == CHATGLM2_6B


def resolve_target(options: ProfileOptions) -> Target:
    """The config and checkpoint folder the options point at (no weights read or written)."""
    from .. import TINY_CHECKPOINT
    from ..model.checkpoint import check_checkpoint

    if options.spec is not None:
        from ..model.family import get_family

        family = get_family(options.spec)
        spec = family.spec
        layers = options.layers or spec.num_layers
        config = dataclasses.replace(spec, num_layers=layers)
        cache = options.cache_dir or Path(tempfile.gettempdir())
        label = family.display_name if layers == spec.num_layers else \
            f"{family.display_name} shapes, {layers} of {spec.num_layers} layers"
        folder = SYNTHETIC_DIR.format(layers=layers)
        if family.name != "chatglm2-6b":
            folder = f"{family.name}-{folder}"
        return Target(config, cache / folder, f"{label} (random weights)", synthetic=True,
                      family=family.name)
    path = Path(options.model) if options.model is not None else Path(TINY_CHECKPOINT)
    config = check_checkpoint(path)
    if options.model is None:
        label = "the embedded demo model (a tiny ChatGLM2, not ChatGLM2-6B)"
    else:
        label = "ChatGLM2-6B" if Target(config, path, "", False).is_6b else f"checkpoint {path}"
    if config.quantization_bit and any(v.bits != config.quantization_bit or v.group_size
                                       for v in options.variants):
        raise ProfilingError(f"quant: {path} is already quantized to int{config.quantization_bit} "
                             f"(config.json quantization_bit); profile only "
                             f"--quant int{config.quantization_bit}")
    return Target(config, path.resolve(), label, synthetic=False)


def ensure_checkpoint(target: Target, say: Callable[[str], None] = print) -> Path:
    """The target's checkpoint folder, writing the synthetic one first when it is missing."""
    if not target.synthetic or _synthetic_ready(target.checkpoint, target.config):
        return target.checkpoint
    from ..plan.memory import weight_bytes
    from ..model.synthetic import write_synthetic_checkpoint

    size = weight_bytes(target.config, 16)
    say(f"writing a {target.config.num_layers}-layer checkpoint with random weights "
        f"({size / 1e9:.1f} GB) to {target.checkpoint}")
    return write_synthetic_checkpoint(target.checkpoint, num_layers=target.config.num_layers,
                                      config=target.config, family=target.family)


def _synthetic_ready(path: Path, config: ChatGLM2Config) -> bool:
    from ..model.checkpoint import CheckpointError, check_checkpoint

    try:
        found = check_checkpoint(path)
    except (CheckpointError, ValueError):
        return False
    return dataclasses.replace(found, torch_dtype=config.torch_dtype) == config


# -- records --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileRecord:
    """One variant running one workload: measured, estimated and (for the 6B) published bytes."""

    variant: str  # the Triton model name, chatglm2-6b-int4
    precision: str  # fp16, int8, int4, int4-g128
    bits: int  # 16, 8, 4
    phase: str  # encode or generate
    tokens: int
    concurrency: int  # requests at once (1: one request, as builder.chat runs it)
    device: str  # cpu or cuda
    measured_bytes: int  # CPU: workload peak RSS − baseline; CUDA: context + peak reserved
    estimated_bytes: int  # builder.estimate_memory for this device, like with like (see estimate_for)
    published_bytes: Optional[int]  # THUDM's table (A100 GPU memory); ChatGLM2-6B only
    dtype: str  # float16 / bfloat16, as the variant's initialize loads it
    layers: int  # decoder layers of the model profiled
    model: str  # how the report names the model
    baseline_bytes: int  # CPU: RSS after the imports; CUDA: device memory used before the context
    peak_bytes: int  # CPU: peak RSS during the workload; CUDA: peak reserved by the allocator
    load_seconds: float
    run_seconds: float
    estimate: dict = field(default_factory=dict)  # the estimate's terms (MemoryEstimate.as_dict)
    details: dict = field(default_factory=dict)  # the device's other readings, in bytes

    @property
    def error(self) -> float:
        """(estimated − measured) / measured."""
        return (self.estimated_bytes - self.measured_bytes) / self.measured_bytes

    @property
    def workload(self) -> str:
        return str(Workload(self.phase, self.tokens, self.concurrency))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "error": round(self.error, 4)}


def estimate_for(config: ChatGLM2Config, variant: Variant, workload: Workload,
                 device: str) -> MemoryEstimate:
    """The estimate a run is compared with, counting what the measurement counts.

    Both devices: last-position logits only (``all_logits=False``, like ``builder.chat``),
    2-byte activations (float16, or bfloat16 for int8/int4 on a CPU). On a CPU no process
    overhead: the measurement subtracts the baseline taken after the imports. On CUDA the
    default per-process overhead (CUDA context + allocator reserve), which the measurement holds.
    """
    estimate = estimate_breakdown(config, variant.bits, workload.tokens, workload.phase,
                                  group_size=variant.group_size, dtype_bytes=2, device=device,
                                  process_overhead=0 if device == "cpu" else None, all_logits=False,
                                  concurrency=workload.concurrency)
    if workload.concurrency == 1:
        return estimate
    # N requests at once run through the continuous batcher: prompts are prefilled in chunks of
    # its step, and it keeps buffers beside the pool
    page = kv_page_size(device)
    blocks, step = batch_pool(workload.tokens, workload.concurrency, page)
    activations = estimate.activations
    if workload.phase == "encode" and workload.tokens > step:
        activations = estimate_breakdown(config, variant.bits, step, "encode", group_size=variant.group_size,
                                         dtype_bytes=2, device=device, all_logits=False).activations
    buffers = batcher_buffer_bytes(config, blocks * page, step)
    return dataclasses.replace(estimate, activations=activations + buffers)


def published_for(target: Target, variant: Variant, workload: Workload) -> Optional[int]:
    """The table's cell when it has one: ChatGLM2-6B, its precision, its phase and length."""
    tokens, published = PUBLISHED_TABLE.get(variant.precision, {}).get(workload.phase,
                                                                       (None, None))
    return published if target.is_6b and tokens == workload.tokens else None


def variant_dtype(variant: Variant, device: str) -> str:
    """float16 for fp16; bfloat16 for int8/int4 on a CPU, float16 on a GPU (builder.plan.placement)."""
    from ..plan.profiles import load_profile

    return variant.dtype(load_profile(_DTYPE_PROFILE[device]))


# -- the profile ----------------------------------------------------------------------------------
def run_profile(options: ProfileOptions, progress: bool = True) -> list[ProfileRecord]:
    """Run every variant × workload in its own process; write profile.json/.md/.png to ``out``.

    Raises :class:`ProfilingError` for bad input before any run, :class:`RunFailedError` when a
    run's process fails (nothing is written then).
    """
    from tqdm import tqdm

    from .measure import Run, measure_in_fresh_process

    if options.device == "cuda":
        _check_cuda()
    target = resolve_target(options)
    for workload in options.workloads:
        if workload.tokens > target.config.seq_length:
            raise ProfilingError(f"workloads: {workload} is longer than the model's seq_length "
                                 f"{target.config.seq_length}")
    checkpoint = ensure_checkpoint(target, say=lambda m: print(m, file=sys.stderr, flush=True))
    runs = [(v, w) for v in options.variants for w in options.workloads]
    records = []
    with tqdm(total=len(runs), desc="profile", unit="run", disable=not progress) as bar:
        for variant, workload in runs:
            def stage(text: str, name=f"{variant.precision} {workload}") -> None:
                bar.set_postfix_str(f"{name}: {text}")

            run = Run(device=options.device, checkpoint=str(checkpoint), bits=variant.bits,
                      group_size=variant.group_size,
                      dtype=variant_dtype(variant, options.device), phase=workload.phase,
                      tokens=workload.tokens, vocab=target.config.padded_vocab_size,
                      threads=options.threads, concurrency=workload.concurrency)
            result = measure_in_fresh_process(run, stage)
            estimate = estimate_for(target.config, variant, workload, options.device)
            records.append(ProfileRecord(
                variant=variant.name, precision=variant.precision, bits=variant.bits,
                phase=workload.phase, tokens=workload.tokens, concurrency=workload.concurrency,
                device=options.device,
                measured_bytes=result.pop("measured_bytes"), estimated_bytes=estimate.total,
                published_bytes=published_for(target, variant, workload), dtype=run.dtype,
                layers=target.config.num_layers, model=target.label,
                baseline_bytes=result.pop("baseline_bytes"), peak_bytes=result.pop("peak_bytes"),
                load_seconds=round(result.pop("load_seconds"), 2),
                run_seconds=round(result.pop("run_seconds"), 2), estimate=estimate.as_dict(),
                details=result))
            bar.update(1)
    from .report import write_reports

    write_reports(records, options.out, command=options.command_line(), model=target.label)
    return records


def _check_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise ProfilingError(f"device: cuda asked, but torch sees no CUDA GPU here (torch "
                             f"{torch.__version__}, torch.cuda.is_available() is False); "
                             f"profile with --device cpu or run on a GPU host")
