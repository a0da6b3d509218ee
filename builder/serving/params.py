"""Read a generated model's ``parameters`` from its Triton model config into a typed dataclass.

>>> VariantParameters.from_model_config(json.loads(args["model_config"]))

Paths in a generated repository are relative to the model's own folder (what Triton's Python backend
passes as ``args["model_repository"]``), so the repository can move; an absolute path is a location
the deployment mounts (``glm-build --weights-uri``), used as it is.

>>> resolve_path(Path("1/weights"), Path("/models/repo/chatglm2-6b-int4"))
PosixPath('/models/repo/chatglm2-6b-int4/1/weights')
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, get_type_hints


class ParameterError(ValueError):
    """A generated config.pbtxt lacks a parameter or holds a bad value (a build bug or a hand edit)."""


ALIASES_ENV = "GLM_SERVE_PATH_ALIASES"  # {path the stub computes: its alias}, JSON, ASCII only


def alias_for(path: Path, aliases: Optional[dict[str, str]] = None) -> Path:
    """``path`` as the stub must open it: its alias when glm-serve made one, else itself.

    ``aliases`` defaults to what glm-serve put in :data:`ALIASES_ENV` (empty outside glm-serve).
    """
    if aliases is None:
        aliases = json.loads(os.environ.get(ALIASES_ENV) or "{}")
    return Path(aliases.get(str(path), path))


def resolve_path(path: Path, model_dir: Path) -> Path:
    """``path`` from a model's parameters, resolved against ``model_dir`` (the model's folder)
    unless it is absolute; under glm-serve, the plain-ASCII alias it made for a path the stub
    cannot open (:mod:`.stub_paths` makes them)."""
    path = Path(path)
    return alias_for(path if path.is_absolute() else Path(model_dir) / path)


def read_parameters(cls, model_config: dict[str, Any]):
    """Build dataclass ``cls`` from ``model_config["parameters"]``, converting each string value
    to its field's annotated type (str, int, Path, dict/list from JSON)."""
    raw = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
    hints = get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in raw:
            if field.default is not dataclasses.MISSING:
                continue
            raise ParameterError(f"model {model_config.get('name')!r}: parameter {field.name!r} missing "
                                 f"from config.pbtxt")
        text, kind = raw[field.name], hints[field.name]
        try:
            if kind is int:
                values[field.name] = int(text)
            elif kind is Path:
                values[field.name] = Path(text)
            elif kind in (list, dict):
                values[field.name] = json.loads(text)
            else:
                values[field.name] = text
        except ValueError as err:
            raise ParameterError(f"model {model_config.get('name')!r}: parameter {field.name!r} = "
                                 f"{text!r} is not a valid {getattr(kind, '__name__', kind)}: {err}") from None
    return cls(**values)


@dataclass(frozen=True)
class VariantParameters:
    checkpoint: Path  # a THUDM-layout checkpoint (pre-quantized when quantize_at == "build"),
    # relative to the model's folder ("1/weights"), or absolute where the deployment mounts it
    bits: int  # 16, 8 or 4
    group_size: int  # 0: ChatGLM2's per-row scales
    quantize_at: str  # "initialize" | "build"
    precision: str  # "fp16", "int8", "int4"
    dtype: str  # compute dtype of the unquantized parts: "float16", "bfloat16", "float32"
    seq_length: int  # longer max_token values are clamped to this
    kv_blocks: int = 0  # the batcher's KV pool from the memory plan (0: a config from before it)
    kv_page_size: int = 256  # tokens per KV block (a config from before the plan set it: 256)
    max_batch_tokens: int = 0  # tokens one batcher step may process
    max_running: int = 0  # requests in the running batch at once (0: no cap but the KV pool's)
    family: str = "chatglm2-6b"  # the model's GLM family (builder.model.family): tokenizer, format

    @classmethod
    def from_model_config(cls, model_config: dict) -> "VariantParameters":
        return read_parameters(cls, model_config)


@dataclass(frozen=True)
class RouterParameters:
    routing: str  # JSON [{"name", "precision", "bits", "max_tokens"}], highest precision first
    tokenizer: Path  # tokenizer.model, to count a request's tokens (relative to the model's folder)
    seq_length: int
    fallback: str = "lower"  # builder.plan.routing.FALLBACKS
    family: str = "chatglm2-6b"  # the model's GLM family: its tokenizer and chat format

    @classmethod
    def from_model_config(cls, model_config: dict) -> "RouterParameters":
        return read_parameters(cls, model_config)
