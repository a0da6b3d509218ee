"""The templates stage of a build: the Triton models (``config.pbtxt`` and ``1/model.py`` of every
variant and router) from the Jinja2 templates in ``builder/assets/variants/``.

A missing value fails the build (``StrictUndefined``), and every value that reaches a
``config.pbtxt`` goes through a filter that validates it (names, paths, integers) or escapes it, so
nothing can break the file's syntax. Paths are relative to each model's folder (Triton's Python
backend passes it as ``args["model_repository"]``), so the repository moves: a variant's weights are
where the weights stage put them, a router's tokenizer is ``<router>/1/<tokenizer file>``.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from ..plan.placement import MODEL_NAME, Plan
from .report import glm_build_version

if TYPE_CHECKING:  # the weights stage imports this one's path filter
    from .weights import PlacedWeights

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "assets" / "variants"
ROUTER_FILES = "1"  # a router's tokenizer file sits here, relative to its model folder


def routers(plan: Plan) -> tuple[tuple[str, bool], ...]:
    """``(name, decoupled)`` of the plan's two routers: ``glm-4-9b-chat``, ``glm-4-9b-chat-stream``."""
    return ((plan.model_name, False), (f"{plan.model_name}-stream", True))


# Triton instances per router: the one-response router answers from execute(), so one instance
# serves one request at a time; the streaming router answers from a thread per request.
ROUTER_INSTANCES = {False: 8, True: 2}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class TemplateValueError(ValueError):
    """A value cannot go into a generated file safely."""


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
    """A path relative to the model's folder (no ``..``: it stays inside the repository), or an
    absolute one the deployment mounts; one line. Quotes and backslashes are the file system's
    business: ``pbtxt_string`` escapes them where the path is written, and ``glm-serve`` hands the
    Python-backend stub a plain-ASCII alias of any path it cannot take (serving.stub_paths)."""
    text = str(value)
    if not isinstance(value, (str, os.PathLike)) or not text:
        raise TemplateValueError(f"path {value!r} must be a path")
    if not os.path.isabs(text) and ".." in Path(text).parts:
        raise TemplateValueError(f"path {text!r} must stay inside the model's folder (no '..')")
    if _CONTROL.search(text):
        raise TemplateValueError(f"path {text!r} must not hold newlines or control characters "
                                 f"(it goes into config.pbtxt)")
    return text


def pbtxt_int(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TemplateValueError(f"expected an integer, got {value!r}")
    return str(value)


def one_line(value) -> str:
    """Free text for comments and docstrings: one line, with backslashes and double quotes
    escaped, so a folder named like ``my "odd" dir`` keeps a generated docstring valid."""
    text = str(value)
    if _CONTROL.search(text):
        raise TemplateValueError(f"text {text!r} must be one line")
    return text.replace("\\", "\\\\").replace('"', '\\"')


def template_environment(templates_dir: Path | None = None,
                         filters: dict | None = None) -> jinja2.Environment:
    """Jinja2 over ``templates_dir`` (default :data:`TEMPLATES_DIR`), strict about undefined, with
    ``filters`` (default: the pbtxt ones the model templates use)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir or TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True)
    env.filters.update(filters if filters is not None else dict(
        pbtxt_string=pbtxt_string, pbtxt_name=pbtxt_name, pbtxt_path=pbtxt_path,
        pbtxt_int=pbtxt_int, pbtxt_comment=one_line))
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


def _write(env: jinja2.Environment, template: str, path: Path, context: dict) -> None:
    text = env.get_template(template).render(**context)
    if path.name == "config.pbtxt":
        check_config(text, str(path.relative_to(path.parents[1])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def render_models(plan: Plan, staging: Path, *, checkpoint: Path, weights: PlacedWeights,
                  quantize_at: str, model_label: str, templates_dir: Path | None = None,
                  fallback: str = "lower", family: str = MODEL_NAME) -> None:
    """The variant and router models (config.pbtxt + 1/model.py, the routers' tokenizer) into
    ``staging``, each variant reading its weights where the weights stage put them
    (:class:`~.weights.PlacedWeights`)."""
    from ..model.family import get_family

    env = template_environment(templates_dir)
    tokenizer_file = get_family(family).tokenizer_file
    common = {"glm_build_version": glm_build_version(), "model_label": model_label,
              "profile_label": plan.profile.label, "seq_length": plan.config.seq_length,
              "family": family}
    for p in plan.placements:
        quantized_here = p.variant.precision in weights.quantized
        location = weights.locations[p.variant.precision]
        context = dict(common, variant=p.variant, device=p.device, dtype=p.dtype,
                       max_tokens=p.max_tokens, kv_blocks=p.kv_blocks, kv_page_size=p.kv_page_size,
                       max_batch_tokens=p.max_batch_tokens, checkpoint=location,
                       tokenizer=f"{location}/{tokenizer_file}",
                       # fp16 has nothing to quantize: it always loads the checkpoint as it is
                       quantize_at=quantize_at if quantized_here else "initialize")
        folder = staging / p.variant.name
        _write(env, "variant.config.pbtxt.j2", folder / "config.pbtxt", context)
        _write(env, "variant.model.py.j2", folder / "1" / "model.py", context)
    for name, decoupled in routers(plan):
        context = dict(common, name=name, decoupled=decoupled, fallback=fallback,
                       tokenizer=f"{ROUTER_FILES}/{tokenizer_file}",
                       routing=plan.routing_table().to_json(), instances=ROUTER_INSTANCES[decoupled])
        _write(env, "router.config.pbtxt.j2", staging / name / "config.pbtxt", context)
        _write(env, "router.model.py.j2", staging / name / "1" / "model.py", context)
        shutil.copyfile(checkpoint / tokenizer_file, staging / name / ROUTER_FILES / tokenizer_file)
