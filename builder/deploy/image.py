"""The container: NVIDIA's Triton image, torch built for the target GPU, this package, ``glm-serve``.

- **Triton**: ``nvcr.io/nvidia/tritonserver:24.10-py3`` carries Triton 2.51.0, the server every
  test here runs against (Python 3.10, CUDA 12.6.2; R560 driver, or R470/R525/R535/R550 data-center
  drivers through its forward-compatibility libraries, which ``/opt/nvidia/nvidia_entrypoint.sh``
  sets up: so the entrypoint keeps it in front of ``glm-serve``).
- **torch**: 2.13.0, the version tested here, from PyTorch's CUDA 12.6 wheels. They are the last
  PyTorch builds with Pascal in them (SASS for sm_50, sm_60, sm_70, sm_75, sm_80, sm_86, sm_90; the
  CUDA 12.8+/13 builds start at sm_75, and PyTorch 2.14 is the last release that publishes cu126
  wheels). A P40 (sm_61) runs the sm_60 code, which is binary compatible within Pascal; CUDA 12.6
  also matches the Triton image's own. The ``cpu`` profile gets torch's CPU wheel.
- **this package** at the version that wrote the repository, installed from its own source copied
  beside the Dockerfile.
- **entrypoint**: ``glm-serve`` (which always restricts model control, shared memory, trace and log
  settings to its per-start secret), listening on every address of the pod, as a non-root user.

>>> torch_build(load_profile("p40")).tag, runs_as(torch_build(load_profile("p40")), (6, 1))
('cu126', (6, 0))
"""
from __future__ import annotations

from dataclasses import dataclass

from ..plan.profiles import GpuProfile

TRITON_RELEASE = "24.10"  # Triton 2.51.0
TRITON_VERSION = "2.51.0"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3"
TRITON_PYTHON = "3.10"  # the image's python3, which the Python-backend stub embeds
TRITON_USER = "triton-server"  # the image's non-root user
TRITON_UID = 1000
NVIDIA_ENTRYPOINT = "/opt/nvidia/nvidia_entrypoint.sh"
TORCH_VERSION = "2.13.0"
REPOSITORY_IN_IMAGE = "/opt/glm-build/repository"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002,  # Triton's defaults, glm-serve's too
         "openai": 9000}  # glm-serve's OpenAI-compatible /v1 (builder.serving.openai)


@dataclass(frozen=True)
class TorchBuild:
    """One of PyTorch's wheel builds."""

    tag: str  # local version and index name: "cu126", "cpu"
    cuda: str | None  # torch.version.cuda of the build
    archs: tuple[tuple[int, int], ...]  # compute capabilities it has SASS for

    @property
    def index_url(self) -> str:
        return f"https://download.pytorch.org/whl/{self.tag}"

    @property
    def sm_list(self) -> str:
        return " ".join(f"sm_{a}{b}" for a, b in self.archs)


CU126 = TorchBuild("cu126", "12.6", ((5, 0), (6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (9, 0)))
CPU = TorchBuild("cpu", None, ())
TORCH_BUILDS = (CU126,)  # GPU builds, preferred first


def runs_as(build: TorchBuild, capability: tuple[int, int]) -> tuple[int, int] | None:
    """The architecture of ``build`` whose code a GPU of ``capability`` runs: SASS runs on the same
    major version at the same or a higher minor one (sm_60 code on a 6.1 P40); None if none."""
    fitting = [a for a in build.archs if a[0] == capability[0] and a[1] <= capability[1]]
    return max(fitting) if fitting else None


def torch_build(profile: GpuProfile) -> TorchBuild:
    """The torch wheel for ``profile``'s devices."""
    if profile.kind == "cpu":
        return CPU
    for build in TORCH_BUILDS:
        if runs_as(build, profile.compute_capability):
            return build
    major, minor = profile.compute_capability
    raise ValueError(f"no torch {TORCH_VERSION} build here runs compute capability "
                     f"{major}.{minor} ({profile.name}); known: "
                     + ", ".join(f"{b.tag} ({b.sm_list})" for b in TORCH_BUILDS))


def serve_args(repository: str, *, http_port: int = PORTS["http"], grpc_port: int = PORTS["grpc"],
               metrics_port: int = PORTS["metrics"], openai_port: int = PORTS["openai"]) -> list[str]:
    """``glm-serve``'s arguments in a pod: every address (the pod's network is the boundary),
    Triton's ports and the OpenAI endpoint's (its key, if any, from ``GLM_OPENAI_API_KEY``).

    >>> serve_args("/mnt/models", http_port=8080)[:4]
    ['/mnt/models', '--address', '0.0.0.0', '--http-port']
    """
    return [repository, "--address", "0.0.0.0", "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
            "--openai-port", str(openai_port)]


def default_image(version: str, build: TorchBuild) -> str:
    """``glm-build:0.1.0-cu126``: a local name; push it and pass ``--image`` for a cluster."""
    return f"glm-build:{version.split()[0]}-{build.tag}"
