"""GPU profiles: what a target device offers, one small TOML file per GPU.

The files live in ``builder/assets/profiles/`` (package data, so a wheel has them too; the
repository's top-level ``profiles/`` links there). A name may carry a count: ``p40x2`` is two
P40s. ``cpu`` means CPU instances with this host's memory as the budget.

>>> p = load_profile("P40x2")
>>> p.name, p.count, p.compute_capability, p.supports_bf16
('p40', 2, (6, 1), False)
>>> list_profiles()[0]
'p40'
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

PROFILES_DIR = Path(__file__).resolve().parents[1] / "assets" / "profiles"

# Listing order: the P40 this project is aimed at first, then roughly by generation.
_ORDER = ("p40", "t4", "v100-16gb", "v100-32gb", "a10", "a100-40gb", "a100-80gb", "l4",
          "rtx3090", "rtx4090", "h100-80gb", "h200-141gb", "cpu")
_KINDS = ("gpu", "cpu")
_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")  # also safe inside config.pbtxt and file names
_GIB, _MIB, _GB = 2**30, 2**20, 10**9


class ProfileError(ValueError):
    """A profile name is unknown, or a profile's values are invalid."""


@dataclass(frozen=True)
class GpuProfile:
    """One device kind, as the planner sees it; ``count`` identical devices of it.

    Memory and overhead are bytes per device. A Python-backend instance is its own process, so
    each one placed on a device costs ``process_overhead_bytes`` there.
    """

    name: str  # the profile file's stem, lower case: "p40"
    description: str  # for reports: "NVIDIA Tesla P40, 24 GB GDDR5 (Pascal)"
    memory_bytes: int  # per device; the host's total for "cpu"
    compute_capability: tuple[int, int] | None  # (6, 1) for the P40; None for "cpu"
    supports_bf16: bool  # bfloat16 arithmetic (compute capability >= 8.0 on NVIDIA GPUs)
    bandwidth_bytes_per_s: int | None  # memory bandwidth; None where unknown (CPU hosts)
    process_overhead_bytes: int  # per process: CUDA context + allocator reserve, or base RSS
    kind: str = "gpu"  # "gpu" or "cpu"
    count: int = 1  # identical devices: "p40x2" → 2
    # Kubernetes node labels of this GPU: the values of nvidia.com/gpu.product (GPU feature
    # discovery: the nvidia-smi name with dashes); () on a cpu profile
    gpu_products: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            self._fail("name", "must be lower-case letters, digits and '-'")
        if not isinstance(self.description, str) or not self.description.strip():
            self._fail("description", "must be a non-empty string")
        if self.kind not in _KINDS:
            self._fail("kind", f"must be one of {', '.join(_KINDS)}")
        if not _positive_int(self.memory_bytes):
            self._fail("memory_bytes", "must be a positive integer")
        if not isinstance(self.supports_bf16, bool):
            self._fail("supports_bf16", "must be true or false")
        cc = self.compute_capability
        if self.kind == "cpu":
            if cc is not None:
                self._fail("compute_capability", "must be unset for a cpu profile")
            if self.count != 1:
                self._fail("count", "must be 1 for a cpu profile (the host is one budget)")
        else:
            if not (isinstance(cc, tuple) and len(cc) == 2
                    and all(_non_negative_int(v) for v in cc) and cc[0] >= 3):
                self._fail("compute_capability", "must be (major, minor), major >= 3")
            if self.supports_bf16 and cc < (8, 0):
                self._fail("supports_bf16", f"cannot be true with compute capability "
                                            f"{cc[0]}.{cc[1]} (bfloat16 needs 8.0)")
            if self.bandwidth_bytes_per_s is None:
                self._fail("bandwidth_bytes_per_s", "must be set for a gpu profile")
        bw = self.bandwidth_bytes_per_s
        if bw is not None and not _positive_int(bw):
            self._fail("bandwidth_bytes_per_s", "must be a positive integer (or unset on cpu)")
        overhead = self.process_overhead_bytes
        if not _non_negative_int(overhead):
            self._fail("process_overhead_bytes", "must be a non-negative integer")
        elif overhead >= self.memory_bytes:
            self._fail("process_overhead_bytes", f"must be below memory_bytes ({self.memory_bytes})")
        if not _positive_int(self.count):
            self._fail("count", "must be a positive integer")
        if not (isinstance(self.gpu_products, tuple)
                and all(isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v)
                        for v in self.gpu_products)):
            self._fail("gpu_products", "must be node label values ([A-Za-z0-9._-]+)")
        if self.kind == "cpu" and self.gpu_products:
            self._fail("gpu_products", "must be empty for a cpu profile")

    def _fail(self, field: str, why: str):
        raise ProfileError(f"GPU profile {self.name!r}: field {field!r} {why}, "
                           f"got {getattr(self, field)!r}")

    @property
    def label(self) -> str:
        """The name a user types: ``p40`` or ``p40x2``."""
        return self.name if self.count == 1 else f"{self.name}x{self.count}"

    @property
    def total_memory_bytes(self) -> int:
        return self.memory_bytes * self.count

    def with_count(self, count: int) -> "GpuProfile":
        return dataclasses.replace(self, count=count)


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive_int(value: Any) -> bool:
    return _non_negative_int(value) and value > 0


# -- files --------------------------------------------------------------------------------------
_TOML_KEYS = {"name", "description", "kind", "memory_gib", "compute_capability", "supports_bf16",
              "bandwidth_gb_per_s", "process_overhead_mib", "gpu_product"}
_TOML_REQUIRED = _TOML_KEYS - {"compute_capability", "bandwidth_gb_per_s", "gpu_product"}


def profile_from_dict(raw: dict[str, Any], source: str = "<dict>") -> GpuProfile:
    """A profile from a TOML file's table (units as in the files: GiB, GB/s, MiB).

    ``memory_gib = "host"`` (cpu only) reads this host's memory with psutil.
    """
    unknown = sorted(set(raw) - _TOML_KEYS)
    if unknown:
        raise ProfileError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(_TOML_KEYS))}")
    missing = sorted(_TOML_REQUIRED - set(raw))
    if missing:
        raise ProfileError(f"{source}: missing key(s) {', '.join(missing)}")
    name = raw["name"]
    memory = raw["memory_gib"]
    if memory == "host" and raw["kind"] == "cpu":
        import psutil

        memory_bytes = psutil.virtual_memory().total
    elif isinstance(memory, (int, float)) and not isinstance(memory, bool) and memory > 0:
        memory_bytes = round(memory * _GIB)
    else:
        raise ProfileError(f"{source}: key 'memory_gib' must be a positive number of GiB "
                           f"(or \"host\" for a cpu profile), got {memory!r}")
    cc = raw.get("compute_capability")
    if cc is not None:
        match = re.fullmatch(r"(\d+)\.(\d+)", str(cc))
        if not match:
            raise ProfileError(f"{source}: key 'compute_capability' must look like \"6.1\", "
                               f"got {cc!r}")
        cc = (int(match.group(1)), int(match.group(2)))
    return GpuProfile(
        name=name,
        description=raw["description"],
        memory_bytes=memory_bytes,
        compute_capability=cc,
        supports_bf16=raw["supports_bf16"],
        bandwidth_bytes_per_s=_scaled(raw, "bandwidth_gb_per_s", _GB, source),
        process_overhead_bytes=_scaled(raw, "process_overhead_mib", _MIB, source),
        kind=raw["kind"],
        gpu_products=tuple(raw.get("gpu_product", ())),
    )


def _scaled(raw: dict[str, Any], key: str, unit: int, source: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ProfileError(f"{source}: key {key!r} must be a non-negative number, got {value!r}")
    return round(value * unit)


def profile_from_toml(path: str | Path) -> GpuProfile:
    """Read and validate one profile file; its ``name`` must be the file's stem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"{path}: not valid TOML: {err}") from err
    profile = profile_from_dict(raw, source=str(path))
    if profile.name != path.stem:
        raise ProfileError(f"{path}: key 'name' is {profile.name!r}, but the file is "
                           f"{path.name}; they must match")
    return profile


def list_profiles(directory: str | Path | None = None) -> list[str]:
    """Names of the known profiles, the P40 first.

    >>> "h100-80gb" in list_profiles()
    True
    """
    directory = Path(directory) if directory is not None else PROFILES_DIR
    stems = {p.stem for p in directory.glob("*.toml")}
    return [n for n in _ORDER if n in stems] + sorted(stems - set(_ORDER))


def load_profile(name: str, directory: str | Path | None = None) -> GpuProfile:
    """The profile called ``name``, case-insensitive; ``NAMExN`` means N devices of it.

    >>> load_profile("rtx3090").count, load_profile("RTX3090x4").count
    (1, 4)
    """
    directory = Path(directory) if directory is not None else PROFILES_DIR
    known = list_profiles(directory)
    wanted = str(name).strip().lower()
    base, count = wanted, 1
    if wanted not in known:
        match = re.fullmatch(r"(.+)x(\d+)", wanted)  # the last "xN": rtx3090x2 → rtx3090, 2
        if not match or match.group(1) not in known:
            raise ProfileError(f"unknown GPU profile {name!r}; known: {', '.join(known)} "
                               f"(add xN for N GPUs of one kind, e.g. p40x2)")
        base, count = match.group(1), int(match.group(2))
    profile = profile_from_toml(directory / f"{base}.toml")
    return profile if count == 1 else profile.with_count(count)


def match_device(device_name: str, compute_capability: tuple[int, int], memory_bytes: int,
                 directory: str | Path | None = None) -> GpuProfile | None:
    """The GPU profile of a device CUDA reports, or None when no profile fits it.

    A profile fits when its compute capability is the device's and its memory is within 10% of
    what CUDA reports (a board's total is a little below its nominal size); among several, the
    one whose name (less its memory suffix) appears in the device's name wins, e.g. "a10" in
    "NVIDIA A10" over the RTX 3090, which has the same capability and memory.

    >>> match_device("Tesla P40", (6, 1), 24 * 2**30 - 500 * 2**20).name
    'p40'
    >>> match_device("NVIDIA B200", (10, 0), 180 * 10**9) is None
    True
    """
    fits = []
    for name in list_profiles(directory):
        profile = load_profile(name, directory)
        if (profile.kind == "gpu" and profile.compute_capability == tuple(compute_capability)
                and abs(profile.memory_bytes - memory_bytes) <= 0.1 * profile.memory_bytes):
            fits.append(profile)
    device = re.sub(r"[^a-z0-9]", "", device_name.lower())
    named = [p for p in fits if re.sub(r"-?\d+gb$|[^a-z0-9]", "", p.name.replace("rtx", "")) in device]
    return (named or fits or [None])[0]
