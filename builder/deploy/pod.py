"""One replica = one pod running the whole plan: what it asks Kubernetes for, from the plan.

- **GPUs**: exactly the devices the plan placed variants on (``nvidia.com/gpu: 2`` for ``p40x2``);
  the variants' ``gpus: [i]`` index the pod's own GPUs from 0.
- **Nodes**: by the GPU product label of NVIDIA's GPU Feature Discovery (``nvidia.com/gpu.product``,
  the ``nvidia-smi`` name with dashes), one or more values per profile (its TOML's ``gpu_product``).
- **Host memory**: on a ``cpu`` profile, each variant's need with its KV pool full (the plan's own
  figure); on a GPU, each variant process's host side plus the largest weight file it streams to the
  GPU; then the server, the router processes and ``/dev/shm``. Request = limit: the pod is never
  squeezed for memory it was planned to have.
- **/dev/shm**: Triton's Python backend passes every tensor through shared memory, one region per
  stub process (:data:`SHM_PER_STUB_BYTES` each); a memory ``emptyDir`` (Docker's 64 MB default is
  too small) whose bytes count against the pod's memory.
- **Start-up budget**: reading every variant's weights at :data:`READ_BYTES_PER_S`, quantizing at
  load where it happens on a CPU, times :data:`STARTUP_SAFETY`; the startup probe allows that long
  before liveness takes over.

>>> from builder.deploy.repository import BuiltRepository
>>> pod = pod_plan(BuiltRepository.read("generated_repo"))
>>> pod.gpus, pod.memory_bytes > pod.shm_bytes
(0, True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..plan.memory import plain_parameters, weight_bytes
from ..plan.placement import MAX_BATCH_TOKENS, Placement, batch_bytes, pool_lengths
from ..build.templates import ROUTER_INSTANCES
from .repository import BuiltRepository

MIB, GIB = 2**20, 2**30

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
"""The node label the pod's affinity selects on; each GPU profile lists its values (``gpu_product``
in its TOML: GPU Feature Discovery writes the ``nvidia-smi`` product name with spaces as dashes; SXM
and PCIe boards of one profile are both accepted)."""

SERVER_HOST_BYTES = 512 * MIB
"""``tritonserver`` itself with the Python backend loaded (~50 MiB measured on this CPU machine; its
CUDA context's host side adds a few hundred MiB on a GPU node)."""
ROUTER_STUB_HOST_BYTES = 64 * MIB
"""One router stub process: Python, numpy, sentencepiece, no torch (45 MiB RSS measured here)."""
GPU_VARIANT_HOST_BYTES = 2 * GIB
"""A variant's stub on a GPU node before any weights: Python with CUDA torch and transformers
imported and a CUDA context (the CPU build measures 0.4 GiB; CUDA's libraries add ~1 GiB)."""
SHM_PER_STUB_BYTES = 64 * MIB
"""Shared memory per Python-backend stub (Triton grows each region from 1 MiB as tensors need;
our tensors are text, so 64 MiB leaves room for long histories)."""
READ_BYTES_PER_S = 200e6
"""Weights read at start, conservatively a network volume's throughput (a local NVMe is 10× this)."""
CPU_QUANTIZE_S_PER_PARAMETER = {8: 72 / 5.71e9, 4: 123 / 5.71e9}
"""Quantizing at load on a CPU (docs/benchmarks.md, peak host memory while loading: 72 s for int8
and 123 s for int4 over ChatGLM2-6B's 5.71e9 projection weights, 2 cores). On a GPU it is fast."""
SERVER_START_S = 30  # tritonserver up, stubs spawned, before any weights are read
STARTUP_SAFETY = 2.0  # the budget is twice the estimate: a slow volume must not kill the pod
MIN_STARTUP_S = 120
PROBE_PERIOD_S = 10


@dataclass(frozen=True)
class PodPlan:
    """What one replica asks for; every figure comes from the built repository's plan."""

    gpus: int  # nvidia.com/gpu
    gpu_products: tuple[str, ...]  # node label values; () on a cpu profile
    memory_bytes: int  # host memory, request = limit
    memory_parts: dict  # {what: bytes}, summing to memory_bytes (for the manifests' comments)
    cpu_request: int  # cores
    shm_bytes: int  # /dev/shm size limit
    load_estimate_s: float  # estimated time from start to every model ready
    startup_budget_s: int  # what the startup probe allows (a multiple of PROBE_PERIOD_S)
    stubs: int  # Python-backend processes: variants + router instances

    @property
    def startup_failure_threshold(self) -> int:
        return self.startup_budget_s // PROBE_PERIOD_S


def variant_host_bytes(built: BuiltRepository, p: Placement) -> int:
    """Host memory of one variant's process."""
    plan = built.plan
    if plan.profile.kind == "gpu":
        return GPU_VARIANT_HOST_BYTES + built.largest_file_bytes(p)
    # CPU: the variant with its KV pool full, at every length the plan checked it at
    step = p.max_batch_tokens or min(p.max_tokens, MAX_BATCH_TOKENS)
    return max(batch_bytes(plan.config, p.variant, plan.profile, tokens, p.kv_blocks, step)
               for tokens in pool_lengths(p.max_tokens))


def load_seconds(built: BuiltRepository, p: Placement) -> float:
    """Estimated seconds for one variant to read (and, on a CPU, quantize) its weights."""
    seconds = built.read_bytes(p) / READ_BYTES_PER_S
    quantized_at_load = p.variant.bits != 16 and not built.weights["variants"][
        p.variant.name]["quantized_at_build"] and not built.plan.config.quantization_bit
    if quantized_at_load and built.plan.profile.kind == "cpu":
        parameters = weight_bytes(built.plan.config, 16) // 2 - plain_parameters(built.plan.config)
        seconds += parameters * CPU_QUANTIZE_S_PER_PARAMETER[p.variant.bits]
    return seconds


def pod_plan(built: BuiltRepository, gpu_products: tuple[str, ...] | None = None) -> PodPlan:
    """The pod for ``built``; ``gpu_products`` overrides the profile's node labels."""
    plan = built.plan
    routers = sum(ROUTER_INSTANCES.values())
    stubs = len(plan.placements) + routers
    shm = stubs * SHM_PER_STUB_BYTES
    parts = {f"variant {p.variant.name}": variant_host_bytes(built, p) for p in plan.placements}
    parts |= {"tritonserver": SERVER_HOST_BYTES,
              f"{routers} router processes": routers * ROUTER_STUB_HOST_BYTES,
              "/dev/shm": shm}
    memory = math.ceil(sum(parts.values()) / MIB) * MIB
    if plan.profile.kind == "gpu":
        products = tuple(gpu_products or plan.profile.gpu_products)
        if not products:
            raise ValueError(f"no GPU product label is known for profile {plan.profile.name!r}; "
                             f"give the {GPU_PRODUCT_LABEL} value(s) of its nodes (--gpu-product)")
    else:
        products = ()
    load = SERVER_START_S + sum(load_seconds(built, p) for p in plan.placements)
    budget = max(MIN_STARTUP_S, math.ceil(STARTUP_SAFETY * load / PROBE_PERIOD_S) * PROBE_PERIOD_S)
    return PodPlan(gpus=built.gpu_count, gpu_products=products, memory_bytes=memory,
                   memory_parts=parts, cpu_request=len(plan.placements) + 1, shm_bytes=shm,
                   load_estimate_s=load, startup_budget_s=budget, stubs=stubs)


def quantity(n_bytes: int) -> str:
    """A Kubernetes memory quantity in whole MiB: ``"1536Mi"``."""
    return f"{math.ceil(n_bytes / MIB)}Mi"
