"""The weights stage of a build: each variant's weights into the staged repository.

A variant's weights are in ``<variant>/1/weights/``: the checkpoint hard-linked or copied there
(``weights="link"|"copy"``), or the int8/int4 weights quantized now (``quantize_at="build"``).
Triton refuses a repository with any other folder at its top (``weights/`` there fails every start
with "failed to load all models") and skips a model's non-numeric subfolders, hence ``1/``.
Variants that load the same checkpoint share its files as hard links inside the repository.
``weights_uri`` instead names a path the deployment mounts (a volume holding the checkpoint);
nothing is copied then.
"""
from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..plan.placement import MODEL_NAME, Plan
from .templates import pbtxt_path

QUANTIZE_AT = ("initialize", "build")
WEIGHTS = ("link", "copy")  # how the checkpoint gets into the repository (unless weights_uri)
WEIGHTS_DIR = "1/weights"  # a variant's weights, relative to its model folder


@dataclass(frozen=True)
class PlacedWeights:
    """What the weights stage did: where each variant reads its weights, which precisions were
    quantized now, and how the checkpoint's files got in (build.json's ``weights``)."""

    locations: dict[str, str]  # precision -> WEIGHTS_DIR (inside its folder) or the weights_uri
    quantized: frozenset[str] = frozenset()  # precisions quantize_at="build" wrote
    counts: dict[str, int] = field(default_factory=lambda: {"linked": 0, "copied": 0, "shared": 0})


def place_weights(plan: Plan, checkpoint: Path, staging: Path, *, quantize_at: str, mode: str,
                  weights_uri: str | None, family: str, progress: bool) -> PlacedWeights:
    """Quantize (``quantize_at="build"``) or place each variant's weights into ``staging``."""
    quantized = frozenset(quantize_weights(plan, checkpoint, staging, progress)
                          if quantize_at == "build" else ())
    counts = ({"linked": 0, "copied": 0, "shared": 0} if weights_uri else
              place_checkpoint(plan, checkpoint, staging, mode, quantized, family))
    locations = {p.variant.precision: (weights_uri if weights_uri and p.variant.precision not in quantized
                                       else WEIGHTS_DIR) for p in plan.placements}
    return PlacedWeights(locations, quantized, counts)


def quantize_weights(plan: Plan, checkpoint: Path, staging: Path, progress: bool) -> set[str]:
    """Quantize each int variant's weights into ``staging/<variant>/1/weights``, its float tensors
    stored in the dtype it computes in (bfloat16 on a CPU: they then load from the file's memory map
    unconverted); return the precisions done."""
    import torch
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
                           group_size=variant.group_size, progress=bar,
                           dtype=getattr(torch, placement.dtype))
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


def place_checkpoint(plan: Plan, checkpoint: Path, staging: Path, mode: str,
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
    pbtxt_path(text)  # it goes into config.pbtxt: one line
    return text.rstrip("/") or "/"


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
