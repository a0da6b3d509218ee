"""``glm-build`` as a library call: options in, a plan (and a written repository) out.

The build reads top to bottom: :func:`build` makes the plan, then :func:`write_repository` runs
the stages, each in its own module, into a staging folder: weights (:mod:`.weights`: placed or
quantized) → templates (:mod:`.templates`: the Triton models) → records (:mod:`.report`:
build.json, report.md, memory.png) → swap into place (:mod:`.output`), all or nothing.

>>> from builder.build.pipeline import BuildOptions, build
>>> result = build(BuildOptions(quant="int4", gpu="p40", spec="chatglm2-6b", dry_run=True))
>>> result.plan.limits()
{'chatglm2-6b-int4': 32768}
>>> result = build(BuildOptions(quant="fp16,int4", gpu="cpu", out=Path("/tmp/repo"), force=True))
>>> print(result.summary())
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from ..model.family import FAMILIES, SPECS, FamilyError, detect_family
from ..plan.placement import CPU_DTYPES, PRECISIONS, Plan, make_plan
from ..plan.profiles import load_profile
from ..plan.routing import FALLBACKS
from .output import check_output, swap_into_place
from .report import ModelSource, build_record, format_summary, portable, portable_record, write_report
from .templates import TEMPLATES_DIR, render_models
from .weights import QUANTIZE_AT, WEIGHTS, check_weights_uri, place_weights, weights_record

DEFAULT_OUT = Path("generated_repo")


class BuildError(ValueError):
    """Bad input: an option, a model that cannot be found."""


def parse_limits(text: str) -> dict[str, int]:
    """``"int4=32768,fp16=2048"`` → ``{"int4": 32768, "fp16": 2048}``.

    >>> parse_limits("int4=32768, fp16=2048")
    {'int4': 32768, 'fp16': 2048}
    """
    limits: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise BuildError(f"limits: {item!r} must look like PRECISION=TOKENS, e.g. int4=32768")
        if key.strip() in limits:
            raise BuildError(f"limits: {key.strip()!r} given twice")
        limits[key.strip()] = int(value)
    return limits


@dataclass(frozen=True)
class BuildOptions:
    """Everything ``glm-build`` is asked to do; validated on creation, naming the field."""

    quant: tuple[str, ...]  # precisions, one variant each; "fp16,int4" is accepted too
    gpu: str  # a profile name, with xN for N GPUs: "p40", "p40x2", "cpu"
    model: Optional[str] = None  # checkpoint folder or hub id; None: the embedded demo model
    spec: Optional[str] = None  # "chatglm2-6b": plan the real model from its config (dry run)
    out: Path = DEFAULT_OUT
    max_tokens: Optional[int] = None  # cap on every routing limit (default: seq_length)
    min_tokens: int = 2048  # every variant must take requests at least this long
    quantize_at: str = "initialize"  # or "build": quantize the weights now, into out/weights/
    dry_run: bool = False  # plan and report only; write nothing
    force: bool = False  # replace an existing output
    limits: Mapping[str, int] = field(default_factory=dict)  # {precision: tokens} overrides
    profile_dir: Optional[Path] = None  # a `glm-build profile` output to link from report.md
    fallback: str = "lower"  # where the router sends a request its variant cannot take now
    weights: str = "link"  # the checkpoint into the repository: hard links where possible, or "copy"
    weights_uri: Optional[str] = None  # or: the path where the deployment mounts the checkpoint
    cpu_dtype: str = "bfloat16"  # what the fp16 variant computes in on a CPU (plan.Variant.dtype)
    family: Optional[str] = None  # a GLM family name instead of detecting it (builder.model.family)

    def __post_init__(self):
        quant = self.quant.split(",") if isinstance(self.quant, str) else list(self.quant)
        quant = tuple(q.strip().lower() for q in quant if q.strip())
        unknown = [q for q in quant if q not in PRECISIONS]
        if not quant or unknown:
            raise BuildError(f"quant: unknown precision {', '.join(unknown) or '(none given)'}; "
                             f"known: {', '.join(PRECISIONS)}")
        if len(set(quant)) != len(quant):
            raise BuildError(f"quant: {','.join(quant)} names a precision twice")
        object.__setattr__(self, "quant", quant)
        if not isinstance(self.gpu, str) or not self.gpu.strip():
            raise BuildError(f"gpu: a profile name is required, got {self.gpu!r}")
        if self.model is not None and self.spec is not None:
            raise BuildError(f"model and spec are exclusive: --model {self.model} reads a "
                             f"checkpoint, --spec {self.spec} plans from a config alone")
        if self.spec is not None:
            if self.spec not in SPECS:
                raise BuildError(f"spec: unknown {self.spec!r}; known: {', '.join(SPECS)}")
            if not self.dry_run:
                raise BuildError(f"spec: --spec {self.spec} plans from the config alone (no "
                                 f"weights to build from), so only with --dry-run; to build, "
                                 f"give --model")
        object.__setattr__(self, "out", Path(self.out))
        for name in ("max_tokens", "min_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value <= 0):
                raise BuildError(f"{name}: must be a positive integer of tokens, got {value!r}")
        if self.quantize_at not in QUANTIZE_AT:
            raise BuildError(f"quantize_at: must be one of {', '.join(QUANTIZE_AT)}, "
                             f"got {self.quantize_at!r}")
        limits = parse_limits(self.limits) if isinstance(self.limits, str) else dict(self.limits)
        object.__setattr__(self, "limits", limits)
        if self.weights not in WEIGHTS:
            raise BuildError(f"weights: must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.weights_uri is not None:
            try:
                object.__setattr__(self, "weights_uri", check_weights_uri(self.weights_uri))
            except ValueError as err:
                raise BuildError(str(err)) from None
        if self.fallback not in FALLBACKS:
            raise BuildError(f"fallback: must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}")
        if self.family is not None and self.family not in FAMILIES:
            raise BuildError(f"family: unknown {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.cpu_dtype not in CPU_DTYPES:
            raise BuildError(f"cpu_dtype: must be one of {', '.join(CPU_DTYPES)}, got {self.cpu_dtype!r}")

    def as_dict(self) -> dict:
        """For build.json."""
        return {"quant": list(self.quant), "gpu": self.gpu, "model": self.model,
                "spec": self.spec, "out": str(self.out), "max_tokens": self.max_tokens,
                "min_tokens": self.min_tokens, "quantize_at": self.quantize_at,
                "limits": dict(self.limits), "force": self.force, "fallback": self.fallback,
                "weights": self.weights, "weights_uri": self.weights_uri, "cpu_dtype": self.cpu_dtype,
                "family": self.family,
                "profile_dir": None if self.profile_dir is None else str(self.profile_dir)}


@dataclass(frozen=True)
class BuildResult:
    plan: Plan
    source: ModelSource
    out: Optional[Path]  # None for a dry run

    def summary(self) -> str:
        text = format_summary(self.plan, self.source)
        if self.out is None:
            return text + "\n\nDry run: nothing written."
        return text + f"\n\nWrote {self.out}/ (report.md, build.json, memory.png)."


# -- the model --------------------------------------------------------------------------------
def hub_cache_dir() -> Optional[str]:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot of ``repo_id`` in the Hugging Face cache; never downloads.

    >>> resolve_hub_id("THUDM/chatglm2-6b")   # after `huggingface-cli download THUDM/chatglm2-6b`
    PosixPath('/root/.cache/huggingface/hub/models--THUDM--chatglm2-6b/snapshots/...')
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError as err:
        where = cache or "the default Hugging Face cache"
        raise BuildError(
            f"model: {repo_id!r} is not a folder and not in {where}; glm-build never downloads. "
            f"Fetch it first (huggingface-cli download {repo_id}) or pass a checkpoint folder"
        ) from err
    except ValueError as err:  # huggingface_hub rejects ids it cannot parse
        raise BuildError(f"model: {repo_id!r} is not a folder nor a valid hub id: {err}") from err


def resolve_model(options: BuildOptions) -> ModelSource:
    """The checkpoint folder (checked, no weights read) and config the options point at."""
    from .. import TINY_CHECKPOINT
    from ..model.checkpoint import check_checkpoint

    if options.spec is not None:
        return ModelSource.spec(options.spec)
    if options.model is None:
        config = check_checkpoint(TINY_CHECKPOINT)
        return ModelSource(config, "the embedded demo model (a tiny ChatGLM2, not ChatGLM2-6B)",
                           "", Path(TINY_CHECKPOINT).resolve(), is_demo=True)
    path = Path(options.model).expanduser()
    if path.is_dir():
        folder = path.resolve()
    elif "/" in options.model and not path.exists() and not options.model.startswith((".", "/")):
        folder = resolve_hub_id(options.model)
    else:
        raise BuildError(f"model: {options.model!r} is not a checkpoint folder (nor a hub id "
                         f"like THUDM/chatglm2-6b)")
    try:
        family = detect_family(folder, options.family)
    except FamilyError as err:
        raise BuildError(f"model: {err}") from None
    config = check_checkpoint(folder, family.name)
    label = (family.display_name if config == family.spec
             else f"the {family.display_name} checkpoint {options.model}")
    return ModelSource(config, label, options.model, folder, family=family.name)


def _check_prequantized(source: ModelSource, options: BuildOptions) -> None:
    """A THUDM pre-quantized checkpoint (chatglm2-6b-int4) serves only its own precision; weights
    are quantized at build time only in THUDM's layout (the format ``save_quantized`` writes)."""
    from ..model.family import get_family

    if (options.quantize_at == "build" and any(PRECISIONS[q][0] < 16 for q in options.quant)
            and get_family(source.family).layout != "thudm"):
        raise BuildError(f"quantize_at: {source.source or source.label} is in transformers' layout "
                         f"({source.family}); --quantize-at build writes THUDM's format only, so "
                         f"quantize it at initialize (--quantize-at initialize, the default)")
    bits = source.config.quantization_bit
    if bits and any(PRECISIONS[q] != (bits, None) for q in options.quant):
        raise BuildError(f"quant: {source.source} is already quantized to int{bits} "
                         f"(config.json quantization_bit={bits}); it can serve only "
                         f"--quant int{bits}")
    if bits and options.quantize_at == "build":
        raise BuildError(f"quantize_at: {source.source} is already quantized; use "
                         f"--quantize-at initialize")


def build(options: BuildOptions, *, progress: bool = True) -> BuildResult:
    """Plan, then (unless ``dry_run``) render the repository; see :class:`BuildOptions`.

    Raises :class:`~builder.plan.placement.PlacementError` before anything is written when the variants do
    not fit, :class:`BuildError` (a ``ValueError``) for bad input, and
    :class:`~builder.build.output.OutputExistsError` for an existing output without ``force``.
    """
    profile = load_profile(options.gpu)
    source = resolve_model(options)
    _check_prequantized(source, options)
    plan = make_plan(source.config, options.quant, profile, max_tokens=options.max_tokens,
                     min_tokens=options.min_tokens, limits_override=options.limits,
                     model_label=source.label, cpu_dtype=options.cpu_dtype,
                     model_name=source.family)
    if options.dry_run:
        return BuildResult(plan, source, None)
    out = write_repository(plan, checkpoint=source.checkpoint, out=options.out,
                            force=options.force, quantize_at=options.quantize_at, source=source,
                            options=options.as_dict(), profile_dir=options.profile_dir,
                            progress=progress, fallback=options.fallback,
                            weights=options.weights, weights_uri=options.weights_uri)
    return BuildResult(plan, source, out)


def write_repository(plan: Plan, *, checkpoint: str | Path, out: str | Path, force: bool = False,
                      quantize_at: str = "initialize", source: ModelSource | None = None,
                      options: dict | None = None, profile_dir: str | Path | None = None,
                      templates_dir: str | Path | None = None, progress: bool = True,
                      fallback: str = "lower", weights: str = "link",
                      weights_uri: str | None = None) -> Path:
    """Write the Triton repository for ``plan`` to ``out``, all or nothing; returns ``out``.

    ``checkpoint``: the checkpoint folder the variants load (its ``tokenizer.model`` serves the
    routers too). ``quantize_at="build"`` quantizes the int8/int4 weights now, into
    ``out/<variant>/1/weights/``; ``"initialize"`` leaves it to each variant as it loads.
    ``weights``: ``"link"`` (hard links where the file system allows, else copies) or ``"copy"``
    puts the checkpoint into the repository; ``weights_uri`` instead names where the deployment
    mounts it. ``source`` names the model in the reports; ``options`` are recorded in build.json;
    ``profile_dir`` holding profile.md/profile.json is linked from report.md.
    """
    out = Path(out)
    checkpoint = Path(checkpoint).resolve()
    if quantize_at not in QUANTIZE_AT:
        raise ValueError(f"quantize_at must be one of {', '.join(QUANTIZE_AT)}, "
                         f"got {quantize_at!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights_uri is not None:
        weights_uri = check_weights_uri(weights_uri)
    source = source or ModelSource(plan.config, f"the checkpoint {checkpoint.name}",
                                   str(checkpoint), checkpoint, family=plan.model_name)
    from ..model.family import get_family

    tokenizer_file = get_family(source.family).tokenizer_file
    if not (checkpoint / tokenizer_file).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} has no {tokenizer_file}")
    check_output(out, force)
    # the reports name what the user gave, not where it lies on this machine
    label = source.label
    for path in (source.source, str(checkpoint)):
        if path and os.path.isabs(path):
            label = label.replace(path, Path(path).name)
    reported = dataclasses.replace(source, source=portable(source.source, out) or "", label=label)
    templates_dir = Path(templates_dir or TEMPLATES_DIR)
    out.parent.mkdir(parents=True, exist_ok=True)
    final = out.resolve()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        placed = place_weights(plan, checkpoint, staging, quantize_at=quantize_at, mode=weights,
                               weights_uri=weights_uri, family=source.family, progress=progress)
        render_models(plan, staging, checkpoint=checkpoint, weights=placed, quantize_at=quantize_at,
                      model_label=reported.label, templates_dir=templates_dir, fallback=fallback,
                      family=source.family)
        record = build_record(plan, reported, quantize_at=quantize_at, options=options,
                              templates_dir=templates_dir)
        record["weights"] = weights_record(plan, staging, mode=weights, weights_uri=weights_uri,
                                           quantized=placed.quantized, counts=placed.counts)
        write_report(staging, plan, reported, portable_record(record, final), out=final,
                     profile_dir=Path(profile_dir) if profile_dir else None)
        swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
