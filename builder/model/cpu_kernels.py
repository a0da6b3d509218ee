"""glm-build's own int8/int4 CPU kernels (``csrc/``), built once per torch version
with torch's C++ extension tooling (and OpenMP: without it ``at::parallel_for`` runs on one thread),
and torch's kernels where they cannot be built.

- **Decode steps** (a few rows): a weight-only GEMV that must stream the codes at memory speed. It
  reads THUDM's codes as they are (int8 ``[N, K]``; int4 ``[N, K/2]``, element 2j in the high
  nibble), widens them to float32 in registers and accumulates in float32:
  ``y = bf16(sum_k x[m, k] * q[n, k] * scale[n, k / group])``. One build runs on any x86-64 host with
  AVX2+FMA; an AVX-512 variant is picked from cpuid at run time (not from ``ATEN_CPU_CAPABILITY``).
  Where the CPU has AVX512-BF16 the codes become bfloat16 and meet x in its dot products; elsewhere
  per-row-scaled int4 (and int8 with 5-8 rows of x) meets x held as 16-bit integers (a power of two
  per 64 inputs) in AVX2's.
- **Many rows** (:func:`dense_mm`: a prefill, a batch of sequences): each thread converts a block of
  weight rows to bfloat16 in its own cache (the codes are exact there) and multiplies it there: with
  the AMX tile unit where the CPU and OS grant it (up to 128 rows; the codes are read once, so 16 rows
  cost about what one does), otherwise with oneDNN's matmul on the block.

Built at ``make setup`` (``python -m builder.model.cpu_kernels``) or at first use, into
``$GLM_CPU_KERNELS_CACHE`` (default ``~/.cache/glm-build/cpu-kernels/<torch version>``); needs a C++
compiler (g++) and ninja. If the build fails, one warning is logged and the callers keep torch's
kernels. ``GLM_CPU_KERNELS=0`` turns it off; ``GLM_CPU_KERNEL_ISA`` names one form and leaves AMX
out (:data:`ISAS`; ``avx2i16`` is what an AVX2-only host gets).

int8 weights are in THUDM's layout for every path, and a probe per projection shape and row bucket
picks the fastest (:func:`cpu_quant.probe_decode`). int4 weights are stored once, in THUDM's layout
where this library is built (the default) or in torch's for torch's kernel: :func:`int4_wins`
(``GLM_CPU_INT4_LAYOUT``).

>>> if cpu_kernels.available():
...     y = cpu_kernels.int8_mm(x, codes, scale)      # x [M, K] bf16, codes [N, K] int8 -> [M, N] bf16
...     y = cpu_kernels.dense_mm(x, codes, scale, 8)  # the same, for many rows
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
"""The library's files (``csrc/glm_cpu.h`` says which holds what), compiled into one library."""
ISAS = {"": 0, "auto": 0, "avx2": 2, "avx2i16": 3, "avx512": 5, "avx512bf16": 6}
"""``GLM_CPU_KERNEL_ISA`` -> the ops' code: 0 is the best the CPU has, AMX included (``dense_mm``'s
tile path). The others leave AMX out and name one form of the GEMVs: ``avx512bf16`` bfloat16 dot
products (the best where the CPU has them); ``avx2i16`` int4, and int8 from 5 rows, as 16-bit integer
dot products and the rest in float32 (what a CPU without AVX512-BF16 runs); ``avx512`` and ``avx2``
float32 throughout."""


def cache_dir() -> Path:
    """Where the built library is kept: one folder per torch version (its C++ ABI)."""
    root = os.environ.get("GLM_CPU_KERNELS_CACHE") or Path.home() / ".cache" / "glm-build" / "cpu-kernels"
    version = torch.__version__.replace("+", "-")
    return Path(root) / f"torch-{version}"


def enabled() -> bool:
    """``GLM_CPU_KERNELS`` is not ``0``/``off`` (read at every call: tests switch it)."""
    return os.environ.get("GLM_CPU_KERNELS", "1").strip().lower() not in ("0", "off", "false", "no")


@functools.lru_cache(maxsize=None)
def build(verbose: bool = False) -> str | None:
    """Build (or find already built) and load the library; the ISA it runs (``"avx512"``,
    ``"avx2"``) or None when it cannot run here, after one logged warning."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        from torch.utils import cpp_extension

        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(folder)
        with _our_ninja():
            cpp_extension.load(name="glm_cpu_kernels", sources=[str(path) for path in SOURCES],
                               build_directory=str(folder), extra_cflags=["-O3", "-fopenmp"],
                               extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)
        isa = torch.ops.glm_cpu.isa(0)
    except Exception as err:  # no compiler, no ninja, a failed compile: torch's kernels do the work
        log.warning("glm-build's CPU decode kernel is not available (%s: %s); using torch's "
                    "weight-only kernels", type(err).__name__, str(err).strip().splitlines()[-1:] or "")
        return None
    if isa == "none":
        log.warning("glm-build's CPU decode kernel needs AVX2+FMA, which this CPU lacks; "
                    "using torch's weight-only kernels")
        return None
    return isa


@contextlib.contextmanager
def _our_ninja():
    """The ``ninja`` package's binary first on PATH while torch builds: every process then checks the
    build with the same ninja. ninja 1.12 changed the command hash it logs, so where PATH finds another
    ninja first in some processes (the system's 1.11 from a plain ``.venv/bin/python``; the venv's 1.13
    in Triton's stubs, whose PATH starts with the venv), each saw the other's build as stale and
    rebuilt it: ~16 s at every variant start after any other process had loaded the library."""
    try:
        import ninja
    except ImportError:  # torch finds whatever ninja PATH has
        yield
        return
    old = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(filter(None, (ninja.BIN_DIR, old)))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


STALE_LOCK_SECONDS = 600
"""torch's build lock (a file in the build folder) left by a process killed mid-build would make every
later process wait forever; a compile takes well under this."""


def _clear_stale_lock(folder: Path) -> None:
    import time

    lock = folder / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
            log.warning("removed a stale build lock %s", lock)
    except FileNotFoundError:
        pass


def available() -> bool:
    """Whether decode steps can use this kernel in this process (built, loaded, CPU has AVX2)."""
    return enabled() and build() is not None


def isa_code() -> int:
    """``GLM_CPU_KERNEL_ISA`` (``avx2``, ``avx2i16``, ``avx512``, ``avx512bf16``; default: the best the
    CPU has) as the ops' code."""
    name = os.environ.get("GLM_CPU_KERNEL_ISA", "").strip().lower()
    if name not in ISAS:
        raise ValueError(f"GLM_CPU_KERNEL_ISA must be avx2, avx2i16, avx512 or avx512bf16, got {name!r}")
    return ISAS[name]


def isa() -> str | None:
    """The variant the ops run in this process (``"avx512"``/``"avx2"``), or None if unavailable."""
    return _isa_name(isa_code()) if available() else None


@functools.lru_cache(maxsize=None)
def _isa_name(code: int) -> str:
    """The op's answer for an ISA code: fixed for the process (cpuid), and asked on every decode call
    of a bfloat16 layer (:func:`has_amx`), so asked once."""
    return torch.ops.glm_cpu.isa(code)


def has_amx() -> bool:
    """Whether ``dense_mm`` / ``bf16_dense_mm`` run on the AMX tile unit in this process."""
    return isa() == "avx512+amx"


def native_bf16() -> bool:
    """Whether this process multiplies bfloat16 natively (AVX512-BF16 or AMX, and an ISA that uses
    them). Where not, ``dense_mm`` / ``bf16_dense_mm`` widen their blocks to float32: oneDNN's own
    bfloat16 matmul runs at a fraction of float32's speed there."""
    return isa() in ("avx512bf16", "avx512+amx")


INT4_PROBE_SHAPE = (4096, 4096)  # ChatGLM2-6B's attention output projection: 8 MiB of int4


def int4_wins() -> bool:
    """Whether this process keeps int4 weights in THUDM's layout for this kernel rather than in
    torch's prepacked one for torch's kernel (a weight is stored in one layout only, chosen before
    any is stored). ``GLM_CPU_INT4_LAYOUT``: ``thudm`` (the default where this kernel is built),
    ``torch``, or ``probe``: one-row calls of both kernels on random codes of
    :data:`INT4_PROBE_SHAPE`, once per process (~0.1 s).

    THUDM's layout by default: built with OpenMP, this kernel beats torch's int4 kernel at 1-4 rows on
    the 6B's real layers (docs/benchmarks.md), and the dense path (``dense_mm``: the tile unit where
    the CPU has AMX, else oneDNN) reads it for more rows. Not probed by default: a probe cheap enough
    for a load has a weight that stays in cache, and there it measures compute, not memory."""
    forced = os.environ.get("GLM_CPU_INT4_LAYOUT", "thudm").strip().lower() or "thudm"
    if forced not in ("thudm", "torch", "probe"):
        raise ValueError(f"GLM_CPU_INT4_LAYOUT must be torch, thudm or probe, got {forced!r}")
    if forced != "probe":
        return forced == "thudm"
    return _int4_probe()


@functools.lru_cache(maxsize=None)
def _int4_probe() -> bool:
    import time

    if build() is None:
        return False

    out_features, in_features = INT4_PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(-128, 128, (out_features, in_features // 2), generator=g, dtype=torch.int8)
    scale = torch.rand(out_features, generator=g).to(torch.float16)
    nibbles = torch.stack([(packed >> 4) & 0xF, packed & 0xF], dim=-1).flatten(1).to(torch.int32)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles ^ 8, 1)
    zeros = torch.stack([scale.float(), torch.zeros(out_features)], dim=-1)
    scales_and_zeros = zeros.expand(in_features // 128, -1, -1).to(torch.bfloat16).contiguous()
    x = torch.randn(1, in_features, generator=g).to(torch.bfloat16)
    calls = {"glm": lambda: int4_mm(x, packed, scale),
             "torch": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, theirs, 128, scales_and_zeros)}
    best = dict.fromkeys(calls, float("inf"))
    for fn in calls.values():
        fn()
    for _ in range(5):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    log.info("int4 decode probe, %dx%d one row: glm %.2f ms, torch %.2f ms", out_features, in_features,
             best["glm"] * 1e3, best["torch"] * 1e3)
    return best["glm"] <= best["torch"]


def int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16, codes [N, K] int8, scale [N] (any float dtype) -> bfloat16 [M, N]."""
    return torch.ops.glm_cpu.int8_mm(x, codes, scale, isa_code())


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16, THUDM's packed int4 [N, K/2] int8, scale [N] or [N, K/group]
    -> bfloat16 [M, N]. Groups must be whole multiples of 32 inputs (AVX-512: of 32, AVX2: of 16)."""
    return torch.ops.glm_cpu.int4_mm(x, packed, scale, isa_code())


def bf16_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16, weight [N, K] bfloat16 (contiguous) -> [M, N] bfloat16: the same GEMV on a
    16-bit weight (the output layer, the fp16 variant's projections) for a few rows."""
    return torch.ops.glm_cpu.bf16_mm(x, weight, isa_code())


def bf16_dense_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same for many rows: the AMX tile unit reads the weight's rows as they are (up to 128 rows),
    where the CPU has it; oneDNN's bfloat16 matmul where the CPU multiplies bfloat16 natively
    (:func:`native_bf16`); elsewhere blocks of the weight widened to float32 in each thread's cache."""
    from .cpu_runtime import onednn_matmuls

    with onednn_matmuls():
        return torch.ops.glm_cpu.bf16_dense_mm(x, weight, isa_code())


def dense_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Many rows (a prefill, a large batch): x [M, K] bfloat16, int8 codes [N, K] or THUDM's packed
    int4 [N, K/2], scale [N] (int4 also [N, K/group]) -> bfloat16 [M, N]. Each thread converts a block
    of weight rows to bfloat16 (float32 where not :func:`native_bf16`) in its own cache and multiplies
    it with oneDNN's matmul there."""
    from .cpu_runtime import onednn_matmuls

    with onednn_matmuls():
        return torch.ops.glm_cpu.dense_mm(x, codes, scale, bits, dense_block(), isa_code())


def dense_block() -> int:
    """``GLM_CPU_DENSE_BLOCK``: weight rows a thread converts at once on the oneDNN path (default 0:
    what fills 1 MiB of bfloat16, at least 64 rows; the AMX path converts 16 at a time)."""
    value = os.environ.get("GLM_CPU_DENSE_BLOCK", "0").strip() or "0"
    if not value.isdigit():
        raise ValueError(f"GLM_CPU_DENSE_BLOCK must be a number of rows, got {value!r}")
    return int(value)


def main() -> None:
    """``python -m builder.model.cpu_kernels``: build now (``make setup`` runs it) and say how it went."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    found = build(verbose=False)
    if found:
        print(f"glm-build CPU decode kernel: built in {cache_dir()}, runs {found}")
    else:
        print("glm-build CPU decode kernel: not built; CPU decode uses torch's weight-only kernels")


if __name__ == "__main__":
    main()
