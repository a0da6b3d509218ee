"""Render a :class:`~builder.plan.placement.Plan` into a Triton model repository, all or nothing.

The Jinja2 templates live in ``builder/assets/variants/`` (``variants/`` at the top of the
repository links there). A missing value fails the build (``StrictUndefined``), and every value
that reaches a ``config.pbtxt`` goes through a filter that validates it (names, paths, integers)
or escapes it, so nothing can break the file's syntax.

The repository moves: no generated file names a path of the build machine. Each model folder
holds what it loads, and its parameters name it relative to that folder (Triton's Python backend
passes the folder as ``args["model_repository"]``): a variant's weights are in
``<variant>/1/weights/`` (the checkpoint hard-linked or copied there, ``weights="link"|"copy"``, or
the quantized weights of ``quantize_at="build"``), a router's tokenizer is
``<router>/1/tokenizer.model``. Triton refuses a repository with any other folder at its top
(``weights/`` there fails every start with "failed to load all models"), and skips a model's
non-numeric subfolders, hence ``1/``. Variants that load the same checkpoint share its files as
hard links inside the repository. ``weights_uri`` instead names a path the deployment mounts (a
volume holding the checkpoint); nothing is copied then.

Everything is written into a temporary folder beside ``out`` and moved into place only when it all
succeeded; an existing output is replaced only with ``force``, by renaming it aside first, so a
failed build leaves it untouched.

>>> from builder import TINY_CHECKPOINT, load_profile
>>> from builder.model.checkpoint import check_checkpoint
>>> from builder.plan.placement import make_plan
>>> plan = make_plan(check_checkpoint(TINY_CHECKPOINT), "fp16,int4", load_profile("cpu"))
>>> render_repository(plan, checkpoint=TINY_CHECKPOINT, out=Path("generated_repo"), force=True)
PosixPath('generated_repo')
"""
from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable

import jinja2

from ..plan.placement import KV_PAGE_SIZE, MODEL_NAME, Plan
from .report import ModelSource, build_record, glm_build_version, write_report

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "assets" / "variants"
QUANTIZE_AT = ("initialize", "build")
WEIGHTS = ("link", "copy")  # how the checkpoint gets into the repository (unless weights_uri)
WEIGHTS_DIR = "1/weights"  # a variant's weights, relative to its model folder
ROUTER_FILES = "1"  # a router's tokenizer file sits here, relative to its model folder


def routers(plan: Plan) -> tuple[tuple[str, bool], ...]:
    """``(name, decoupled)`` of the plan's two routers: ``glm-4-9b-chat``, ``glm-4-9b-chat-stream``."""
    return ((plan.model_name, False), (f"{plan.model_name}-stream", True))
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


def swap_into_place(staging: Path, out: Path, keep: Iterable[str] = _PLACEHOLDERS) -> None:
    """Move ``staging`` to ``out``; an old ``out`` is renamed aside first (and put back if the
    move fails) and deleted last. Files named in ``keep`` that only the old ``out`` has are
    carried over (the README git tracks in the default output)."""
    for name in keep:
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


def _quantize_weights(plan: Plan, checkpoint: Path, staging: Path, progress: bool) -> set[str]:
    """Quantize each int variant's weights into ``staging/<variant>/1/weights``; return the
    precisions done."""
    from tqdm import tqdm

    from ..model.checkpoint import save_quantized

    done = set()
    for placement in plan.placements:
        variant = placement.variant
        if variant.bits == 16:
            continue
        # the bar is handed over whole: save_quantized sets its total and updates it per tensor
        with tqdm(desc=f"quantizing {variant.name}", unit="tensor", disable=not progress) as bar:
            save_quantized(checkpoint, staging / variant.name / WEIGHTS_DIR, variant.bits,
                           group_size=variant.group_size, progress=bar)
        done.add(variant.precision)
    return done


def checkpoint_files(checkpoint: Path, family: str = MODEL_NAME) -> list[Path]:
    """What loading ``checkpoint`` reads: config, its family's tokenizer file (and
    ``tokenizer_config.json`` where there is one), index files and weight shards."""
    from ..model.checkpoint import CONFIG_FILE, weight_files
    from ..model.family import TOKENIZER_CONFIG_FILE, get_family

    names = [CONFIG_FILE, get_family(family).tokenizer_file]
    names += [TOKENIZER_CONFIG_FILE] if (checkpoint / TOKENIZER_CONFIG_FILE).is_file() else []
    names += sorted(p.name for p in checkpoint.glob("*.index.json"))
    return [checkpoint / n for n in names] + weight_files(checkpoint)


def _put(src: Path, dst: Path, mode: str) -> str:
    """Hard-link (``mode="link"``) or copy ``src`` to ``dst``; "linked" or "copied". A link that
    the file system refuses (another device, no hard links) is a copy."""
    if mode == "link":
        try:
            os.link(src, dst)  # follows a symlink (the Hugging Face cache's snapshot files)
            return "linked"
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    shutil.copyfile(src, dst)
    return "copied"


def _place_checkpoint(plan: Plan, checkpoint: Path, staging: Path, mode: str,
                      quantized: set[str], family: str) -> dict:
    """Put the checkpoint into ``<variant>/1/weights`` of every variant that loads it as it is
    (fp16, or quantized at initialize): linked or copied from ``checkpoint`` once, then hard-linked
    between the variants. Returns what build.json records."""
    counts = {"linked": 0, "copied": 0, "shared": 0}
    files = checkpoint_files(checkpoint, family)  # listed once (it reads the index)
    first = None
    for placement in plan.placements:
        if placement.variant.precision in quantized:
            continue
        folder = staging / placement.variant.name / WEIGHTS_DIR
        folder.mkdir(parents=True)
        for src in files:
            if first is None:
                counts[_put(src, folder / src.name, mode)] += 1
            else:  # inside the repository: the same files, no more bytes
                _put(first / src.name, folder / src.name, "link")
                counts["shared"] += 1
        first = first or folder
    return counts


def check_weights_uri(uri: str) -> str:
    """``/mnt/models/chatglm2-6b`` or ``file:///mnt/models/chatglm2-6b`` → the absolute path the
    variants read; other schemes are refused (mount them, then name the mount)."""
    text = str(uri).strip()
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text or not text.startswith("/"):
        raise ValueError(f"weights_uri {uri!r}: must be an absolute path (or file:///path) where "
                         f"the deployment mounts the checkpoint; for object storage (s3://, gs://) "
                         f"mount it (a CSI driver, KServe's storage initializer) and name the mount")
    pbtxt_path(text)  # no quotes, backslashes or newlines
    return text.rstrip("/") or "/"


def render_models(plan: Plan, staging: Path, *, checkpoint: Path, quantize_at: str,
                  model_label: str, quantized: set[str] = frozenset(),
                  weights_uri: str | None = None, templates_dir: Path | None = None,
                  fallback: str = "lower", family: str = MODEL_NAME) -> None:
    """The variant and router models (config.pbtxt + 1/model.py, the routers' tokenizer) into
    ``staging``; ``quantized``: precisions whose weights ``quantize_at="build"`` wrote."""
    from ..model.family import get_family

    env = template_environment(templates_dir)
    tokenizer_file = get_family(family).tokenizer_file
    common = {"glm_build_version": glm_build_version(), "model_label": model_label,
              "profile_label": plan.profile.label, "seq_length": plan.config.seq_length,
              "family": family}
    for p in plan.placements:
        quantized_here = p.variant.precision in quantized
        weights = weights_uri if weights_uri and not quantized_here else WEIGHTS_DIR
        context = dict(common, variant=p.variant, device=p.device, dtype=p.dtype,
                       max_tokens=p.max_tokens, kv_blocks=p.kv_blocks, kv_page_size=KV_PAGE_SIZE,
                       max_batch_tokens=p.max_batch_tokens, checkpoint=weights,
                       tokenizer=f"{weights}/{tokenizer_file}",
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


def _portable(text: str | None, out: Path) -> str | None:
    """A path the user gave, without the build machine's folders: relative ones stay, absolute
    ones keep their last part."""
    if not text or not os.path.isabs(text):
        return text
    return Path(text).name


def _portable_record(record: dict, out: Path) -> dict:
    """build.json without absolute paths of the build machine (file hashes identify the inputs)."""
    model = record["inputs"]["model"]
    for key in ("checkpoint", "source"):
        model[key] = _portable(model.get(key), out)
    options = record["inputs"]["options"]
    for key in ("model", "out"):
        options[key] = _portable(options.get(key), out)
    if options.get("profile_dir"):
        options["profile_dir"] = os.path.relpath(Path(options["profile_dir"]).resolve(),
                                                 out.resolve())
    return record


def weights_record(plan: Plan, staging: Path, *, mode: str, weights_uri: str | None,
                   quantized: set[str], counts: dict) -> dict:
    """build.json's ``weights``: where each variant's weights are, and their bytes (what a
    deployment reads at start)."""
    variants = {}
    for p in plan.placements:
        inside = weights_uri is None or p.variant.precision in quantized
        folder = staging / p.variant.name / WEIGHTS_DIR
        files = sorted(f for f in folder.iterdir() if f.is_file()) if inside else []
        variants[p.variant.name] = {
            "location": WEIGHTS_DIR if inside else weights_uri,
            "inside_repository": inside, "quantized_at_build": p.variant.precision in quantized,
            "bytes": sum(f.stat().st_size for f in files) if inside else None,
            "largest_file_bytes": max((f.stat().st_size for f in files), default=0) if inside
            else None}
    return {"mode": "uri" if weights_uri else mode, "uri": weights_uri, "files": counts,
            "variants": variants}


def render_repository(plan: Plan, *, checkpoint: str | Path, out: str | Path, force: bool = False,
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
    reported = dataclasses.replace(source, source=_portable(source.source, out) or "", label=label)
    templates_dir = Path(templates_dir or TEMPLATES_DIR)
    out.parent.mkdir(parents=True, exist_ok=True)
    final = out.resolve()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        quantized = (_quantize_weights(plan, checkpoint, staging, progress)
                     if quantize_at == "build" else set())
        counts = ({"linked": 0, "copied": 0, "shared": 0} if weights_uri else
                  _place_checkpoint(plan, checkpoint, staging, weights, quantized, source.family))
        render_models(plan, staging, checkpoint=checkpoint, quantize_at=quantize_at,
                      model_label=reported.label, quantized=quantized, weights_uri=weights_uri,
                      templates_dir=templates_dir, fallback=fallback, family=source.family)
        record = build_record(plan, reported, quantize_at=quantize_at, options=options,
                              templates_dir=templates_dir)
        record["weights"] = weights_record(plan, staging, mode=weights, weights_uri=weights_uri,
                                           quantized=quantized, counts=counts)
        write_report(staging, plan, reported, _portable_record(record, final), out=final,
                     profile_dir=Path(profile_dir) if profile_dir else None)
        swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
