"""``glm-build deploy``: a built repository in, a container and its Kubernetes / KServe manifests out.

Written from the repository's own plan (``build.json``) through the Jinja2 templates in
``builder/assets/deploy/`` (``StrictUndefined``, every YAML value quoted or a checked number), into a
temporary folder first and moved into place only when everything rendered and parsed:

    deploy/
    ├─ Dockerfile                       NVIDIA's Triton image + torch for the GPU + this package
    ├─ glm-build/                       this package's source (what the Dockerfile installs)
    ├─ kubernetes/                      Deployment, Service, PodDisruptionBudget, HPA (autoscaling/v2)
    ├─ kserve/inferenceservice.yaml     serving.kserve.io/v1beta1, custom Triton container
    ├─ prometheus-adapter/values.yaml   the HPA's per-pod "busy" metric
    ├─ README.md                        the commands, filled in
    └─ deploy.json                      what was asked, and the figures used

>>> result = deploy(DeployOptions(repo=Path("generated_repo"), out=Path("deploy"), replicas=2))
>>> sorted(p.name for p in (result.out / "kubernetes").iterdir())[:2]
['deployment.yaml', 'horizontalpodautoscaler.yaml']
"""
from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import jinja2
import yaml

from ..plan.placement import CONCURRENCY_LENGTHS, MODEL_NAME
from ..build.output import swap_into_place
from ..build.templates import template_environment as strict_environment
from ..build.report import glm_build_version
from . import image as img
from .pod import GPU_PRODUCT_LABEL, PROBE_PERIOD_S, PodPlan, pod_plan, quantity
from .repository import BuiltRepository

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "assets" / "deploy"
DEFAULT_OUT = Path("deploy")
BUSY_METRIC = "glm_requests_in_flight"
KSERVE_HTTP_PORT = 8080  # Knative's default user port
KSERVE_REPOSITORY = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
TARGET_SHARE = 0.8  # default HPA target: this share of what the top variant's KV pool holds at once
MARKER = "deploy.json"
FILES = ("Dockerfile", "README.md", "kubernetes/deployment.yaml", "kubernetes/service.yaml",
         "kubernetes/poddisruptionbudget.yaml", "kubernetes/horizontalpodautoscaler.yaml",
         "kserve/inferenceservice.yaml", "prometheus-adapter/values.yaml")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")


class DeployError(ValueError):
    """Bad input: an option, a repository that cannot be deployed, an output that may not go."""


@dataclass(frozen=True)
class DeployOptions:
    """What ``glm-build deploy`` is asked; validated on creation, naming the field."""

    repo: Path = Path("generated_repo")  # a repository glm-build wrote (its build.json)
    out: Path = DEFAULT_OUT
    image: Optional[str] = None  # default: glm-build:<version>-<torch build>, a local name
    runtime_image: Optional[str] = None  # KServe's image, without the repository (default: image-runtime)
    replicas: int = 1  # the Deployment's replicas, the HPA's and KServe's minimum
    max_replicas: Optional[int] = None  # the HPA's and KServe's maximum (default: 2 × replicas)
    namespace: str = "default"
    name: str = MODEL_NAME  # of every resource
    target_in_flight: Optional[float] = None  # HPA/KServe target per pod (default: from the plan)
    storage_uri: Optional[str] = None  # KServe STORAGE_URI (default: pvc://<name>-repository/<repo>)
    weights_claim: Optional[str] = None  # PVC holding the checkpoint of a --weights-uri build
    gpu_products: tuple[str, ...] = ()  # node labels overriding the GPU profile's gpu_product
    force: bool = False  # replace an existing deploy folder

    def __post_init__(self):
        object.__setattr__(self, "repo", Path(self.repo))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "gpu_products", tuple(self.gpu_products))
        for key in ("name", "namespace"):
            value = getattr(self, key)
            if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
                raise DeployError(f"{key}: {value!r} must be a DNS label (a-z, 0-9, '-', at most "
                                  f"63 characters)")
        for key in ("image", "runtime_image"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not _IMAGE.fullmatch(value)):
                raise DeployError(f"{key}: {value!r} is not an image reference")
        if not _count(self.replicas):
            raise DeployError(f"replicas: must be a positive integer, got {self.replicas!r}")
        if self.max_replicas is not None and (not _count(self.max_replicas)
                                              or self.max_replicas < self.replicas):
            raise DeployError(f"max_replicas: must be an integer >= replicas ({self.replicas}), "
                              f"got {self.max_replicas!r}")
        if self.target_in_flight is not None and not (
                isinstance(self.target_in_flight, (int, float)) and self.target_in_flight > 0):
            raise DeployError(f"target_in_flight: must be a positive number, got "
                              f"{self.target_in_flight!r}")
        for key in ("storage_uri", "weights_claim"):
            value = getattr(self, key)
            if value is not None and (not value or any(c.isspace() or c in "\"'\\" for c in value)):
                raise DeployError(f"{key}: {value!r} must be one word without quotes")
        if self.weights_claim is not None and not _DNS_LABEL.fullmatch(self.weights_claim):
            raise DeployError(f"weights_claim: {self.weights_claim!r} must be a claim name")


@dataclass(frozen=True)
class DeployResult:
    out: Path
    files: tuple[str, ...]  # relative paths of the manifests, the Dockerfile and the README
    pod: PodPlan
    image: str
    target_in_flight: float

    def summary(self) -> str:
        lines = [f"Wrote {self.out}/: " + ", ".join(self.files),
                 f"  pod: {self.pod.gpus} GPU(s), {quantity(self.pod.memory_bytes)} memory, "
                 f"/dev/shm {quantity(self.pod.shm_bytes)}, start-up allowed "
                 f"{self.pod.startup_budget_s} s (estimated {self.pod.load_estimate_s:.0f} s)",
                 f"  image: {self.image}; autoscaling target {self.target_in_flight:g} requests "
                 f"in flight per pod",
                 f"  next: see {self.out / 'README.md'}"]
        return "\n".join(lines)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# -- filters ------------------------------------------------------------------------------------
def yaml_quoted(value) -> str:
    """Any scalar as a double-quoted YAML string (JSON's escaping is YAML's)."""
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list, tuple)):
        raise ValueError(f"expected a scalar for a YAML string, got {value!r}")
    return json.dumps(str(value), ensure_ascii=False)


def template_environment(templates_dir: Path | None = None) -> jinja2.Environment:
    """The model templates' strict environment (``builder.build.templates``) with the YAML filters."""
    return strict_environment(templates_dir or TEMPLATES_DIR, filters={"q": yaml_quoted, "mib": quantity})


# -- what the templates get -------------------------------------------------------------------------
def default_target(built: BuiltRepository) -> float:
    """Requests in flight per pod the autoscaler aims at without a measurement: a share of what the
    highest-precision variant's KV pool holds at once at 2048 tokens (short requests go there)."""
    top = built.plan.placements[0]
    tokens = min(max(CONCURRENCY_LENGTHS), top.max_tokens)
    return max(1.0, math.floor(TARGET_SHARE * top.concurrency(tokens)))


def context(built: BuiltRepository, options: DeployOptions) -> dict:
    plan = built.plan
    profile = plan.profile
    version = glm_build_version()
    package_version = version.split()[0]
    torch = img.torch_build(profile)
    image = options.image or img.default_image(version, torch)
    pod = pod_plan(built, options.gpu_products or None)
    weights_mount = built.external_weights
    if weights_mount and not options.weights_claim:
        raise DeployError(f"{built.path} reads its checkpoint at {weights_mount} (built with "
                          f"--weights-uri): name the PersistentVolumeClaim that holds it "
                          f"(--weights-claim)")
    target = options.target_in_flight or default_target(built)
    source = ("--target-in-flight" if options.target_in_flight else
              f"default: {TARGET_SHARE:.0%} of what {plan.placements[0].variant.name}'s KV pool "
              f"holds at 2048 tokens; `glm-build capacity` measures one")
    capability = (f"{profile.compute_capability[0]}.{profile.compute_capability[1]}"
                  if profile.compute_capability else "")
    arch = img.runs_as(torch, profile.compute_capability) if profile.compute_capability else None
    selector = {"app.kubernetes.io/name": MODEL_NAME, "app.kubernetes.io/instance": options.name}
    labels = selector | {"app.kubernetes.io/component": "triton",
                         "app.kubernetes.io/part-of": "glm-build",
                         "app.kubernetes.io/version": package_version,
                         "glm-build/profile": profile.label}
    devices = "CPU instances" if pod.gpus == 0 else f"{pod.gpus} × {profile.description}"
    return {
        "glm_build_version": version, "package_version": package_version,
        "name": options.name, "namespace": options.namespace, "labels": labels,
        "selector": selector, "replicas": options.replicas,
        "max_replicas": options.max_replicas or 2 * options.replicas,
        "image": image, "runtime_image": options.runtime_image or f"{image}-runtime",
        "profile_label": profile.label, "profile_name": profile.name,
        "profile_description": profile.description, "capability": capability,
        "runs_as": f"sm_{arch[0]}{arch[1]}" if arch else "", "torch": torch,
        "torch_version": img.TORCH_VERSION, "triton_image": img.TRITON_IMAGE,
        "triton_release": img.TRITON_RELEASE, "triton_version": img.TRITON_VERSION,
        "triton_user": img.TRITON_USER, "triton_uid": img.TRITON_UID,
        "repository_in_image": img.REPOSITORY_IN_IMAGE, "ports": img.PORTS,
        "entrypoint": [img.NVIDIA_ENTRYPOINT, "glm-serve"],
        "cmd_runtime": img.serve_args(KSERVE_REPOSITORY),
        "serve_args": img.serve_args(img.REPOSITORY_IN_IMAGE),  # the image's CMD and the pod's args
        "kserve_args": img.serve_args(KSERVE_REPOSITORY, http_port=KSERVE_HTTP_PORT),
        "kserve_http_port": KSERVE_HTTP_PORT, "pod": pod, "memory": quantity(pod.memory_bytes),
        "shm": quantity(pod.shm_bytes), "probe_period": PROBE_PERIOD_S,
        "gpu_product_label": GPU_PRODUCT_LABEL, "weights_mount": weights_mount,
        "weights_claim": options.weights_claim, "busy_metric": BUSY_METRIC,
        "target_in_flight": f"{target:g}", "target_in_flight_int": max(1, round(target)),
        "target_source": source, "scale_up_period": max(60, pod.startup_budget_s // 2),
        "storage_uri": options.storage_uri or f"pvc://{options.name}-repository/{built.path.resolve().name}",
        "repository_name": built.path.resolve().name,
        "variants_line": " + ".join(f"{p.variant.name} on {p.device_label}"
                                    for p in plan.placements),
        "gpus_line": devices,
    }


# -- writing --------------------------------------------------------------------------------------
def package_source() -> Path:
    """The folder holding this package's ``pyproject.toml`` (a source checkout)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise DeployError(f"glm-build deploy puts this package's source into the image, but "
                          f"{root} has no pyproject.toml: run it from a source checkout")
    return root


def _copy_package(root: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, dest / name)
    shutil.copytree(root / "builder", dest / "builder",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def render(built: BuiltRepository, options: DeployOptions, staging: Path,
           templates_dir: Path | None = None) -> dict:
    """Every file of the deploy folder into ``staging``; returns the template context."""
    env = template_environment(templates_dir)
    values = context(built, options)
    for name in FILES:
        text = env.get_template(f"{name}.j2").render(**values)
        if name.endswith(".yaml"):
            try:
                documents = [d for d in yaml.safe_load_all(text) if d is not None]
            except yaml.YAMLError as err:
                raise ValueError(f"generated {name} is not valid YAML: {err}") from err
            if not documents:
                raise ValueError(f"generated {name} is empty")
        path = staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    _copy_package(package_source(), staging / "glm-build")
    pod = values["pod"]
    record = {"glm_build": values["glm_build_version"], "repository": values["repository_name"],
              "profile": built.plan.profile.label, "options": _options_record(options),
              "image": values["image"], "runtime_image": values["runtime_image"],
              "target_in_flight": float(values["target_in_flight"]), "pod": asdict(pod),
              "torch": f"{img.TORCH_VERSION}+{values['torch'].tag}", "triton": img.TRITON_IMAGE}
    (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return values


def _options_record(options: DeployOptions) -> dict:
    record = asdict(options)
    record["repo"], record["out"] = Path(options.repo).name, Path(options.out).name
    record["gpu_products"] = list(options.gpu_products)
    return record


def _check_out(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise DeployError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not force:
        raise DeployError(f"--out {out} already exists; pass --force to replace it")
    if not (out / MARKER).is_file():
        raise DeployError(f"--out {out} holds files but no {MARKER}: not a glm-build deploy "
                          f"folder; refusing to replace it even with --force")


def deploy(options: DeployOptions, *, templates_dir: Path | None = None) -> DeployResult:
    """Write the deploy folder for ``options.repo``, all or nothing; see :class:`DeployOptions`."""
    try:
        built = BuiltRepository.read(options.repo)
    except ValueError as err:
        raise DeployError(str(err)) from None
    _check_out(options.out, options.force)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{options.out.name}.partial-", dir=options.out.parent))
    try:
        try:
            values = render(built, options, staging, templates_dir)
        except ValueError as err:  # a profile with no torch build or no node label
            if isinstance(err, DeployError):
                raise
            raise DeployError(str(err)) from err
        swap_into_place(staging, options.out, keep=())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DeployResult(out=options.out, files=FILES, pod=values["pod"], image=values["image"],
                        target_in_flight=float(values["target_in_flight"]))
