"""Render a :class:`~builder.plan.Plan` into a Triton model repository, all or nothing.

The Jinja2 templates live in ``builder/assets/variants/`` (``variants/`` at the top of the
repository links there). A missing value fails the build (``StrictUndefined``), and every value
that reaches a ``config.pbtxt`` goes through a filter that validates it (names, absolute paths,
integers) or escapes it, so nothing can break the file's syntax.

Everything is written into a temporary folder beside ``out`` and moved into place only when it all
succeeded; an existing output is replaced only with ``force``, by renaming it aside first, so a
failed build leaves it untouched.

>>> from builder import TINY_CHECKPOINT, load_profile
>>> from builder.checkpoint import check_checkpoint
>>> from builder.plan import make_plan
>>> plan = make_plan(check_checkpoint(TINY_CHECKPOINT), "fp16,int4", load_profile("cpu"))
>>> render_repository(plan, checkpoint=TINY_CHECKPOINT, out=Path("generated_repo"), force=True)
PosixPath('generated_repo')
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import jinja2

from .checkpoint import TOKENIZER_FILE
from .plan import KV_PAGE_SIZE, MODEL_NAME, Plan
from .report import ModelSource, build_record, glm_build_version, write_report

TEMPLATES_DIR = Path(__file__).resolve().parent / "assets" / "variants"
QUANTIZE_AT = ("initialize", "build")
ROUTERS = ((MODEL_NAME, False), (f"{MODEL_NAME}-stream", True))  # (name, decoupled)
# Router processes per router model: {decoupled: count}. The one-response router answers from
# execute(), so each of its instances carries one request at a time; the streaming router
# answers from threads and takes any number with two.
ROUTER_INSTANCES = {False: 8, True: 2}
# What may sit in an output folder that is not a build: the README kept in git.
_PLACEHOLDERS = {"README.md"}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class TemplateValueError(ValueError):
    """A value cannot go into a generated file safely."""


class OutputExistsError(FileExistsError):
    """The output folder exists and may not be replaced."""


# -- filters: every value a template writes passes one ------------------------------------------
def pbtxt_string(value) -> str:
    """The inside of a protobuf text-format string: ``\\`` and ``"`` escaped, one line.

    >>> pbtxt_string('[{"name": "chatglm2-6b-int4"}]')
    '[{\\\\"name\\\\": \\\\"chatglm2-6b-int4\\\\"}]'
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TemplateValueError(f"config.pbtxt string values must be text, got {value!r}")
    text = str(value)
    if _CONTROL.search(text):
        raise TemplateValueError(f"config.pbtxt string value has a newline or control "
                                 f"character: {text!r}")
    return text.replace("\\", "\\\\").replace('"', '\\"')


def pbtxt_name(value) -> str:
    """A model, parameter or precision name: ``[A-Za-z0-9_.-]+`` only."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise TemplateValueError(f"name {value!r} must match [A-Za-z0-9_.-]+")
    return value


def pbtxt_path(value) -> str:
    """An absolute path with no quote, backslash or control character."""
    text = str(value)
    if not isinstance(value, (str, os.PathLike)) or not os.path.isabs(text):
        raise TemplateValueError(f"path {text!r} must be absolute")
    if '"' in text or "\\" in text or _CONTROL.search(text):
        raise TemplateValueError(f"path {text!r} must not hold quotes, backslashes or newlines "
                                 f"(it goes into config.pbtxt)")
    return text


def pbtxt_int(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TemplateValueError(f"expected an integer, got {value!r}")
    return str(value)


def one_line(value) -> str:
    """Free text for comments and docstrings: one line, no quotes or backslashes."""
    text = str(value)
    if _CONTROL.search(text) or '"' in text or "\\" in text:
        raise TemplateValueError(f"text {text!r} must be one line without quotes or backslashes")
    return text


def template_environment(templates_dir: Path | None = None) -> jinja2.Environment:
    """Jinja2 over ``templates_dir`` (default :data:`TEMPLATES_DIR`), strict about undefined."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir or TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pbtxt_string=pbtxt_string, pbtxt_name=pbtxt_name, pbtxt_path=pbtxt_path,
                       pbtxt_int=pbtxt_int, pbtxt_comment=one_line)
    return env


def check_config(text: str, name: str = "config.pbtxt"):
    """Parse ``text`` as Triton's ``ModelConfig``; raise ``ValueError`` naming ``name`` if it is not.

    Skipped (returns None) where tritonclient is not installed.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise ValueError(f"generated {name} is not a valid Triton ModelConfig: {err}") from err


# -- the output folder --------------------------------------------------------------------------
def check_output(out: Path, force: bool) -> None:
    """Refuse an existing output without ``force``, and anything not a build even with it."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise OutputExistsError(f"--out {out} exists and is not a folder; choose another --out")
    entries = sorted(p.name for p in out.iterdir())
    if set(entries) <= _PLACEHOLDERS:
        return  # empty, or only the README kept in git: nothing to lose
    if not force:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputExistsError(f"--out {out} already exists ({shown}); pass --force to "
                                f"replace it, or choose another --out")
    if "build.json" not in entries:
        raise OutputExistsError(f"--out {out} holds files but no build.json, so it is not a "
                                f"glm-build output; refusing to replace it even with --force")


def _swap_into_place(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``; an old ``out`` is renamed aside first and deleted last."""
    for name in _PLACEHOLDERS:  # keep the README that git tracks in the default output
        if (out / name).is_file() and not (staging / name).exists():
            shutil.copy2(out / name, staging / name)
    if not out.exists():
        os.rename(staging, out)
        return
    aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


# -- rendering ----------------------------------------------------------------------------------
def _write(env: jinja2.Environment, template: str, path: Path, context: dict) -> None:
    text = env.get_template(template).render(**context)
    if path.name == "config.pbtxt":
        check_config(text, str(path.relative_to(path.parents[1])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _quantize_weights(plan: Plan, checkpoint: Path, staging: Path, out: Path,
                      progress: bool) -> dict[str, Path]:
    """Quantize each int variant's weights into ``staging/weights/<precision>``; return where
    they will be once ``staging`` is ``out``."""
    from tqdm import tqdm

    from .checkpoint import save_quantized

    final = {}
    for placement in plan.placements:
        variant = placement.variant
        if variant.bits == 16:
            continue
        # the bar is handed over whole: save_quantized sets its total and updates it per tensor
        with tqdm(desc=f"quantizing {variant.name}", unit="tensor", disable=not progress) as bar:
            save_quantized(checkpoint, staging / "weights" / variant.precision, variant.bits,
                           group_size=variant.group_size, progress=bar)
        final[variant.precision] = out / "weights" / variant.precision
    return final


def render_models(plan: Plan, staging: Path, *, checkpoint: Path, tokenizer: Path,
                  quantize_at: str, model_label: str, weights: dict[str, Path] | None = None,
                  templates_dir: Path | None = None, fallback: str = "lower") -> None:
    """The variant and router models (config.pbtxt + 1/model.py) into ``staging``."""
    env = template_environment(templates_dir)
    common = {"glm_build_version": glm_build_version(), "model_label": model_label,
              "profile_label": plan.profile.label, "seq_length": plan.config.seq_length,
              "tokenizer": tokenizer}
    weights = weights or {}
    for p in plan.placements:
        context = dict(common, variant=p.variant, device=p.device, dtype=p.dtype,
                       max_tokens=p.max_tokens, kv_blocks=p.kv_blocks, kv_page_size=KV_PAGE_SIZE,
                       max_batch_tokens=p.max_batch_tokens,
                       checkpoint=weights.get(p.variant.precision, checkpoint),
                       # fp16 has nothing to quantize: it always loads the checkpoint as it is
                       quantize_at=quantize_at if p.variant.precision in weights else "initialize")
        folder = staging / p.variant.name
        _write(env, "variant.config.pbtxt.j2", folder / "config.pbtxt", context)
        _write(env, "variant.model.py.j2", folder / "1" / "model.py", context)
    for name, decoupled in ROUTERS:
        context = dict(common, name=name, decoupled=decoupled, fallback=fallback,
                       routing=plan.routing_table().to_json(), instances=ROUTER_INSTANCES[decoupled])
        _write(env, "router.config.pbtxt.j2", staging / name / "config.pbtxt", context)
        _write(env, "router.model.py.j2", staging / name / "1" / "model.py", context)


def render_repository(plan: Plan, *, checkpoint: str | Path, out: str | Path, force: bool = False,
                      quantize_at: str = "initialize", source: ModelSource | None = None,
                      options: dict | None = None, profile_dir: str | Path | None = None,
                      templates_dir: str | Path | None = None, progress: bool = True,
                      fallback: str = "lower") -> Path:
    """Write the Triton repository for ``plan`` to ``out``, all or nothing; returns ``out``.

    ``checkpoint``: the checkpoint folder the variants load (its ``tokenizer.model`` serves the
    routers too). ``quantize_at="build"`` quantizes the int8/int4 weights now, into
    ``out/weights/<precision>/``; ``"initialize"`` leaves it to each variant as it loads.
    ``source`` names the model in the reports; ``options`` are recorded in build.json;
    ``profile_dir`` holding profile.md/profile.json is linked from report.md.
    """
    out = Path(out)
    checkpoint = Path(checkpoint).resolve()
    if quantize_at not in QUANTIZE_AT:
        raise ValueError(f"quantize_at must be one of {', '.join(QUANTIZE_AT)}, "
                         f"got {quantize_at!r}")
    tokenizer = checkpoint / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} has no {TOKENIZER_FILE}")
    check_output(out, force)
    source = source or ModelSource(plan.config, f"the checkpoint {checkpoint.name}",
                                   str(checkpoint), checkpoint)
    templates_dir = Path(templates_dir or TEMPLATES_DIR)
    out.parent.mkdir(parents=True, exist_ok=True)
    final = out.resolve()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        weights = (_quantize_weights(plan, checkpoint, staging, final, progress)
                   if quantize_at == "build" else {})
        render_models(plan, staging, checkpoint=checkpoint, tokenizer=tokenizer,
                      quantize_at=quantize_at, model_label=source.label, weights=weights,
                      templates_dir=templates_dir, fallback=fallback)
        record = build_record(plan, source, quantize_at=quantize_at, options=options,
                              templates_dir=templates_dir)
        write_report(staging, plan, source, record, out=final,
                     profile_dir=Path(profile_dir) if profile_dir else None)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
