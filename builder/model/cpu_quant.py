"""Weight-only int8/int4 on the CPU for many rows: dequantize a block of weight rows to bfloat16 and
run oneDNN's dense matmul, then scale.

torch's weight-only CPU kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are GEMV
kernels: their cost grows linearly with the rows (one 6B ``dense_h_to_4h``, int8: ~2 ms for 1 row,
~65-130 ms for 98), where oneDNN's bfloat16 matmul (AMX or AVX-512-BF16 where the CPU has them,
whatever ``ATEN_CPU_CAPABILITY`` says) costs about the same for 1 row as for 100. So a prefill (or a
large decode batch) goes through here, a block of weight rows at a time: the block's codes become
bfloat16 (int8 codes and int4 nibbles are exact in bfloat16), one matmul, then the per-row scale on
the output columns. Decode steps of a few rows stay on the weight-only kernels, which read 2-4× fewer
bytes. Nothing is cached: the only memory is one block's bfloat16 weight and its output.

For int4 the weight is read in torch's own prepacked layout (``_convert_weight_to_int4pack_for_cpu``),
which for a full block of ``BLOCK_N`` rows (64 with AVX-512, 32 with AVX2) stores, for each input k,
``BLOCK_N / 2`` bytes whose low nibbles are rows 0..BLOCK_N/2-1 and high nibbles the other half: a
k-major layout, which is what ``x @ wᵀ`` wants. :func:`int4pack_layout` checks that against the
packer itself once per process (the layout is torch's private business) and returns None when it
does not hold, and callers keep the weight-only kernel.

This module is the fallback where glm-build's own kernels are not built: where they are
(:mod:`builder.model.cpu_kernels`), int8 codes and int4 in THUDM's layout (``[N, K/2]``, element 2j in
the high nibble) go through ``cpu_kernels.dense_mm`` for many rows instead, which converts a block
per thread in its own cache and multiplies it there (the tile unit where the CPU has AMX).

>>> y = int8_rows(x, codes, scale_bf16)              # x [M, K] bf16, codes [N, K] int8 -> [M, N]
>>> y = int4_rows(x, int4pack, scale_bf16, layout)    # layout = int4pack_layout()
"""
from __future__ import annotations

import functools
import os

import torch

from . import cpu_kernels
from .cpu_runtime import onednn_matmuls

DENSE_BLOCK_ELEMENTS = 1 << 21
"""Weights dequantized at once (4 MiB of bfloat16): large enough that a block's matmul is efficient,
small enough that the block is still in cache when the matmul reads it."""


def _blocks(rows: int, cols: int, multiple: int = 1):
    step = max(multiple, DENSE_BLOCK_ELEMENTS // max(cols, 1) // multiple * multiple)
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


def int8_rows(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (codes * scale)ᵀ`` through bfloat16 matmuls, a block of weight rows at a time.

    x [M, K] bfloat16, codes [N, K] int8, scale [N] bfloat16 -> [M, N] bfloat16.
    """
    out_features, in_features = codes.shape
    y = x.new_empty(x.shape[0], out_features)
    weight = torch.empty(min(out_features, DENSE_BLOCK_ELEMENTS // in_features + 1), in_features,
                         dtype=torch.bfloat16)  # one reused block
    with onednn_matmuls():
        for start, stop in _blocks(out_features, in_features):
            w = weight[:stop - start]
            w.copy_(codes[start:stop])  # int8 -> bfloat16, exact
            y[:, start:stop] = x @ w.t()  # (w @ x.t() into [N, M] rows is ~20x slower under 16 rows)
    y *= scale
    return y


@functools.lru_cache(maxsize=None)
def int4pack_layout() -> int | None:
    """``BLOCK_N`` of this process's int4 CPU packing, if it is the k-major layout described above
    (also for a last block of 16, 32 or 48 rows: alternate rows in the low and high nibble); None if
    torch packs some other way."""
    g = torch.Generator().manual_seed(0)
    for block_n in (64, 32):
        rows, cols = 3 * block_n + 16, 256  # full blocks and a short last one
        nibbles = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
        try:
            unpacked = _int4pack_nibbles(packed, rows, cols, block_n)  # [cols, rows]
        except RuntimeError:
            continue
        if torch.equal(unpacked.t().to(torch.int32), nibbles):
            return block_n
    return None


def _int4pack_nibbles(packed: torch.Tensor, rows: int, cols: int, block_n: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """The unsigned nibbles (q + 8) of ``rows`` prepacked rows as a contiguous uint8 [cols, rows]
    (into ``out`` when given: uint8, ``cols * rows`` elements or more)."""
    flat = packed.view(torch.uint8).flatten()
    out = torch.empty(cols * rows, dtype=torch.uint8) if out is None else out
    nibbles = out.view(-1)[:cols * rows].view(cols, rows)
    full = rows // block_n * block_n
    if full:
        half = block_n // 2
        # [blocks, K, BLOCK_N/2] bytes read k-major, written as [K, blocks, BLOCK_N] (contiguous rows)
        p = flat[:full * cols // 2].view(full // block_n, cols, half).transpose(0, 1)
        o = nibbles[:, :full].view(cols, full // block_n, block_n) if full == rows else \
            nibbles[:, :full].unflatten(1, (full // block_n, block_n))
        o[..., :half] = p & 0xF  # (the out= forms of these two take a slow path: ~10x)
        o[..., half:] = p >> 4
    if rows > full:
        n = rows - full
        p = flat[full * cols // 2:rows * cols // 2].view(cols, n // 2)  # rows 2j low, 2j+1 high
        o = nibbles[:, full:].unflatten(1, (n // 2, 2))
        o[..., 0] = p & 0xF
        o[..., 1] = p >> 4
    return nibbles


def int4_rows(x: torch.Tensor, int4pack: torch.Tensor, scale: torch.Tensor, block_n: int
              ) -> torch.Tensor:
    """``x @ ((nibble - 8) * scale)ᵀ`` through bfloat16 matmuls, from torch's prepacked int4.

    x [M, K] bfloat16; int4pack [N, K/2] uint8 (prepacked); scale [N] (one per row) or [K/g, N]
    (group-wise) bfloat16 -> [M, N] bfloat16.
    """
    out_features, in_features = int4pack.shape[0], int4pack.shape[1] * 2
    y = x.new_empty(x.shape[0], out_features)
    flat = int4pack.view(torch.uint8).flatten()
    blocks = list(_blocks(out_features, in_features, block_n))
    with onednn_matmuls():
        _int4_blocks(x, flat, scale, block_n, blocks, y)
    if scale.dim() == 1:
        y *= scale
    return y


def _int4_blocks(x, flat, scale, block_n, blocks, y) -> None:
    in_features = x.shape[1]
    size = in_features * max(stop - start for start, stop in blocks)
    nibbles = torch.empty(size, dtype=torch.uint8)  # reused: [K, rows] of each block
    weight = torch.empty(size, dtype=torch.bfloat16)
    for start, stop in blocks:
        n = stop - start
        q = _int4pack_nibbles(flat[start * in_features // 2:stop * in_features // 2], n,
                              in_features, block_n, out=nibbles)
        codes = q.view(torch.int8)
        codes -= 8  # q in [-8, 7]
        w = weight[:in_features * n].view(in_features, n)  # [K, rows]
        w.copy_(codes)  # exact in bfloat16
        if scale.dim() == 2:  # group-wise: scale the weight, [K/g, n] over [K, n]
            w.view(scale.shape[0], -1, n).mul_(scale[:, None, start:stop])
        y[:, start:stop] = x @ w


# -- when to take the dense path ----------------------------------------------------------------------
DENSE_ROWS = {"AVX512": {8: 16, 4: 32}, "AVX2": {8: 12, 4: 24}}
"""From this many rows on, a quantized projection runs :func:`int8_rows` / :func:`int4_rows` instead of
the weight-only kernel, per ``torch.backends.cpu.get_cpu_capability()`` (others: AVX2's). Measured
with ``scripts/bench_quant_kernels.py`` on the 6B's four projection shapes, 2 threads, on an AMX host
at both capabilities (docs/benchmarks.md, "Quantized CPU kernels by rows"): the smallest row count
at which the dense path wins on most shapes. ``GLM_CPU_DENSE_ROWS=int8:N,int4:M`` overrides it
(``0`` keeps the weight-only kernels)."""


@functools.lru_cache(maxsize=None)
def dense_rows(bits: int, layout: str = "torch") -> int:
    """The row count from which ``bits``-bit projections take the dense path (0: never); ``layout``:
    where int4 codes are, ``"torch"`` (its prepacked layout) or ``"thudm"``."""
    capability = torch.backends.cpu.get_cpu_capability()
    rows = dict(DENSE_ROWS.get(capability, DENSE_ROWS["AVX2"]))
    for item in filter(None, os.environ.get("GLM_CPU_DENSE_ROWS", "").split(",")):
        name, _, value = item.partition(":")
        if name.strip() not in ("int8", "int4") or not value.strip().isdigit():
            raise ValueError(f"GLM_CPU_DENSE_ROWS: expected int8:N,int4:M, got {item!r}")
        rows[int(name.strip()[3:])] = int(value)
    if bits == 4 and layout == "torch" and int4pack_layout() is None:
        return 0  # torch packs int4 in a layout this module does not read: kernels only
    return rows[bits]


# -- decode: which path is faster on this host ---------------------------------------------------------
PROBE_MARGIN = 1.25
"""The dense path must beat the weight-only kernels by this factor before decode steps of that many
rows use it, so that a noisy probe on a busy machine does not flip a memory-bound kernel over. (On
AMX hosts ``cpu_kernels.dense_mm`` reads the codes once at any row count and wins from ~5 rows; the
oneDNN form reads a bfloat16 copy and wins only where the kernels are badly compute-bound.) Between
the two weight-only kernels (glm-build's own, torch's) the faster wins."""

DECODE_PATHS = ("glm_kernel", "torch_kernel", "dense")
"""A decode step's candidates: glm-build's kernel (:mod:`cpu_kernels`, where built), torch's
weight-only kernel (where the weight is in a layout it reads), the dense path."""


def decode_choice() -> str:
    """``GLM_CPU_DECODE``: ``probe`` (the default: time the candidates on each projection shape once),
    ``kernel`` (a weight-only kernel: glm-build's where built, else torch's), ``torch`` (torch's where
    the weight's layout has one), ``glm`` or ``dense``."""
    choice = os.environ.get("GLM_CPU_DECODE", "probe")
    if choice not in ("probe", "kernel", "torch", "glm", "dense"):
        raise ValueError(f"GLM_CPU_DECODE must be probe, kernel, torch, glm or dense, got {choice!r}")
    return choice


_decode_paths: dict[tuple, str] = {}
"""Per process: (bits, out, in, group, candidates, rows bucket) -> a name of :data:`DECODE_PATHS`, from
the first decode call of that shape with that many rows."""

ROW_BUCKETS = (1, 4, 8)
"""Decode calls are probed apart by rows: 1, 2-4, 5-8, more (a kernel that wins at one row, a batch
of one sequence, can lose at eight: glm-build's reuses each code for at most 8 rows of x)."""


def rows_bucket(rows: int) -> int:
    """The first of :data:`ROW_BUCKETS` at or above ``rows`` (9 and up: one bucket, 9)."""
    return next((bucket for bucket in ROW_BUCKETS if rows <= bucket), ROW_BUCKETS[-1] + 1)


def probe_rows(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """The rows a probe times for ``bucket``: its largest count (x's rows repeated), so that a bucket
    first seen with fewer rows (5 sequences while a batch of 8 fills) is decided for the count its
    later calls mostly have; the open bucket (9+) times ``x`` as it is."""
    if bucket not in ROW_BUCKETS or x.shape[0] >= bucket:
        return x
    return x.repeat((bucket + x.shape[0] - 1) // x.shape[0], 1)[:bucket]


def forced_path(candidates) -> str | None:
    """The path ``GLM_CPU_DECODE`` names among ``candidates`` (None: probe)."""
    choice = decode_choice()
    if choice == "probe":
        return None
    if choice == "dense":
        return "dense"
    order = {"kernel": ("glm_kernel", "torch_kernel"), "glm": ("glm_kernel", "torch_kernel"),
             "torch": ("torch_kernel", "glm_kernel")}[choice]
    return next(name for name in order if name in candidates)


def decode_key(bits: int, out_features: int, in_features: int, group: int | None, candidates,
               rows: int = 1) -> tuple:
    return (bits, out_features, in_features, group, tuple(name for name in DECODE_PATHS if name in candidates),
            rows_bucket(rows))


def probe_decode(key: tuple, candidates: dict, x: torch.Tensor, repeats: int = 3) -> str:
    """The fastest path for a call of this shape and rows bucket, timed on the layer's own weight and on
    ``x``'s rows (:func:`probe_rows`; min of ``repeats`` interleaved calls each, after a warm-up);
    decided once per shape and rows bucket per process. ``candidates``: name (of :data:`DECODE_PATHS`) -> function of bfloat16 rows."""
    if key in _decode_paths:
        return _decode_paths[key]
    forced = forced_path(candidates)
    if forced is not None:
        return forced
    import time

    row = probe_rows(x, key[-1])
    best = {name: float("inf") for name in candidates}
    for fn in candidates.values():
        fn(row)  # warm-up: first-call allocations and oneDNN's primitive cache
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn(row)
            best[name] = min(best[name], time.perf_counter() - start)
    kernels = [name for name in candidates if name != "dense"]
    path = min(kernels, key=best.__getitem__)
    if "dense" in best and best["dense"] * PROBE_MARGIN < best[path]:
        path = "dense"
    _decode_paths[key] = path
    return path


def decode_paths() -> dict[str, str]:
    """What the probes chose in this process: ``{"int8 27392x4096": "glm_kernel", "int8 27392x4096
    5-8 rows": "torch_kernel", "bf16 65024x4096": ...}`` (one-row calls unlabelled; bf16: the
    :mod:`cpu_linear` layers)."""
    labels = {1: "", 4: " 2-4 rows", 8: " 5-8 rows", 9: " 9+ rows"}
    return {("bf16" if bits == 16 else f"int{bits}") + f" {out}x{inp}" + (f" g{group}" if group else "")
            + labels[bucket]: path
            for (bits, out, inp, group, _, bucket), path in sorted(_decode_paths.items())}
