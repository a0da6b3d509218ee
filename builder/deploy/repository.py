"""A built repository as a deployment sees it: its plan, weights and name, read back from build.json.

The deployment is made from the same :class:`~builder.plan.placement.Plan` the repository was rendered from
(not a new plan on this machine: a ``cpu`` plan's budget is the host it was built on), so the pod asks
for the GPUs the variants were placed on and the memory they were sized for.

>>> built = BuiltRepository.read("generated_repo")
>>> built.plan.profile.label, built.gpu_count
('p40x2', 2)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..model.config import ChatGLM2Config
from ..plan.placement import MODEL_NAME, Placement, Plan, Variant
from ..plan.profiles import GpuProfile


class RepositoryError(ValueError):
    """The folder is not a glm-build repository this version can deploy."""


@dataclass(frozen=True)
class BuiltRepository:
    """What ``glm-build`` wrote into ``path``, as far as a deployment needs it."""

    path: Path  # the repository folder on this machine (never written into a manifest)
    plan: Plan
    quantize_at: str  # "initialize" | "build"
    weights: dict  # build.json "weights": mode, uri, per-variant location and bytes
    glm_build_version: str  # the version that built it
    checkpoint_files: dict  # {name: {"sha256", "bytes"}} of the source checkpoint

    @classmethod
    def read(cls, path: str | Path) -> "BuiltRepository":
        path = Path(path)
        record_file = path / "build.json"
        if not record_file.is_file():
            raise RepositoryError(f"{path} has no build.json: not a glm-build repository "
                                  f"(build one with glm-build first)")
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if "weights" not in record:
            raise RepositoryError(f"{path} was built by glm-build {record.get('glm_build')}, "
                                  f"before repositories moved (no 'weights' in build.json): "
                                  f"rebuild it")
        return cls(path=path, plan=plan_from_record(record), quantize_at=record["inputs"]["quantize_at"],
                   weights=record["weights"], glm_build_version=record["glm_build"],
                   checkpoint_files=record["inputs"]["model"].get("files", {}))

    @property
    def gpu_count(self) -> int:
        """GPUs the pod needs: the variants' ``gpus: [i]`` index the pod's own GPUs from 0."""
        devices = [p.device for p in self.plan.placements if p.device is not None]
        return max(devices) + 1 if devices else 0

    @property
    def external_weights(self) -> str | None:
        """The path the deployment must mount the checkpoint at (``--weights-uri``), or None."""
        return self.weights.get("uri")

    def read_bytes(self, placement: Placement) -> int:
        """Bytes a variant reads at start: its weights in the repository, else the checkpoint's."""
        entry = self.weights["variants"][placement.variant.name]
        if entry["bytes"] is not None:
            return entry["bytes"]
        return sum(f["bytes"] for f in self.checkpoint_files.values())

    def largest_file_bytes(self, placement: Placement) -> int:
        """The largest file a variant reads (a shard being copied sits in host memory)."""
        entry = self.weights["variants"][placement.variant.name]
        if entry["largest_file_bytes"] is not None:
            return entry["largest_file_bytes"]
        return max((f["bytes"] for f in self.checkpoint_files.values()), default=0)


def plan_from_record(record: dict) -> Plan:
    """The :class:`Plan` that build.json recorded (``Plan.as_dict`` read back)."""
    raw = record["plan"]
    known = {f.name for f in dataclasses.fields(GpuProfile)}  # a field a later version dropped
    profile = {k: v for k, v in record["inputs"]["profile"].items() if k in known}
    if profile.get("compute_capability") is not None:
        profile["compute_capability"] = tuple(profile["compute_capability"])
    if "gpu_products" in profile:
        profile["gpu_products"] = tuple(profile["gpu_products"])
    elif profile.get("kind") == "gpu":  # a build.json from before profiles carried node labels
        from ..plan.profiles import PROFILES_DIR, list_profiles, load_profile

        if profile.get("name") in list_profiles(PROFILES_DIR):
            profile["gpu_products"] = load_profile(profile["name"]).gpu_products
    placements = tuple(Placement(
        variant=Variant(p["precision"], raw.get("model_name", MODEL_NAME)), device=p["device"],
        max_tokens=p["max_tokens"],
        need_bytes=p["need_bytes"], min_need_bytes=p["min_need_bytes"],
        weights_bytes=p["weights_bytes"], dtype=p["dtype"], kv_blocks=p["kv_blocks"],
        max_batch_tokens=p["max_batch_tokens"]) for p in raw["placements"])
    return Plan(config=ChatGLM2Config.from_dict(record["inputs"]["model"]["config"]),
                profile=GpuProfile(**profile), placements=placements,
                max_tokens=raw["max_tokens"], min_tokens=raw["min_tokens"])
