"""The CUDA forward of an int8/int4 ``QuantizedLinear``: THUDM's codes and fp16 scales in, fp16 out.

Two ways, chosen per call:

- **fused** (decode steps, at most :data:`FUSED_MAX_TOKENS` rows): one weight-only GEMV kernel
  reads the codes once (1 byte per weight for int8, half a byte for int4), scales them and
  accumulates in float32, so a decode step reads fewer bytes than fp16's 2 per weight. The kernel
  is compiled at run time for the GPU at hand through NVRTC, by CuPy's ``RawKernel``: it runs on
  Pascal (sm_61, the P40) as on Hopper, where OpenAI Triton does not support Pascal and the
  maintained fused kernels (torch's ``_weight_int4pack_mm``, Marlin, exllama v2) want sm_75/sm_80
  or use half arithmetic, which GP102 runs at 1/64 rate. CuPy is optional: without it (or without
  a GPU) the second way runs.
- **extract** (prefills, or no CuPy): dequantize a block of rows at a time straight into one fp16
  buffer (``torch.mul`` of the codes by the broadcast scales with ``out=``: no int-to-fp16 copy,
  no ``repeat_interleave``), then one cuBLAS matmul per block. Temporaries are bounded by
  :data:`.extraction.CUDA_EXTRACT_BLOCK_BYTES` and counted by
  :func:`builder.plan.memory.cuda_extract_bytes`.

Both are plain torch ops or a CuPy launch on torch's current stream; :func:`extract_linear` runs
on any device (the tests run it on the CPU).

>>> y = linear(x_fp16, layer.weight, layer.weight_scale, bits=4, group_size=None)  # [tokens, out]
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from .extraction import cuda_extract_rows

log = logging.getLogger("glm-build.cuda_quant")

FUSED_MAX_TOKENS = 8
"""Rows of input the fused kernel takes (a decode step of up to 8 requests); longer inputs are
compute-bound and go to cuBLAS after extraction."""

FUSED_ENV = "GLM_BUILD_CUDA_KERNEL"
"""``torch`` turns the fused kernel off (the GPU check compares both); anything else: automatic."""

_THREADS = 256  # 8 warps a block, one output row each

KERNEL_SOURCE = r"""
// y[t, r] = sum_c q[r, c] * s(r, c) * x[t, c], float32 accumulation; halves as raw 16-bit values
// (converted with PTX: no header, any architecture NVRTC targets).
// q: THUDM's codes, row-major, read 32 bits at a time: int8 (4 codes a word) or int4 packed two a
// byte, element 2j in the high nibble (8 codes a word). s: fp16 [rows] (group == 0) or
// [rows, cols / group]. One warp per output row.
#define MAX_TOKENS 8

__device__ __forceinline__ float h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}

extern "C" __global__ void weight_only_gemv(
        const int* __restrict__ q, const unsigned short* __restrict__ scale,
        const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
        int rows, int cols, int tokens, int bits, int group) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const int per_word = 32 / bits;
    const int words = cols / per_word;
    const int* q_row = q + (long long)row * words;
    const int groups = group ? cols / group : 1;
    float acc[MAX_TOKENS];
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) acc[t] = 0.0f;
    for (int i = lane; i < words; i += 32) {
        const int word = __ldg(q_row + i);
        const int c0 = i * per_word;  // a word never straddles a group: groups are 32/64/128
        const float s = group ? h2f(__ldg(scale + (long long)row * groups + c0 / group)) : 1.0f;
        for (int k = 0; k < per_word; ++k) {
            int code;
            if (bits == 8) {
                code = (signed char)((word >> (8 * k)) & 0xFF);  // byte k is element c0 + k
            } else {
                const int byte = (word >> (8 * (k >> 1))) & 0xFF;  // elements c0 + k, k even: high
                code = (k & 1) ? ((signed char)(byte << 4) >> 4) : ((signed char)byte >> 4);
            }
            const float w = (float)code * s;
#pragma unroll
            for (int t = 0; t < MAX_TOKENS; ++t)
                if (t < tokens) acc[t] += w * h2f(__ldg(x + (long long)t * cols + c0 + k));
        }
    }
    const float row_scale = group ? 1.0f : h2f(__ldg(scale + row));
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        float v = acc[t];
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
        if (lane == 0 && t < tokens) y[(long long)t * rows + row] = f2h(v * row_scale);
    }
}
"""


# -- extract: dequantize by row blocks, then cuBLAS --------------------------------------------------
def extract_block(codes: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None,
                  out: torch.Tensor) -> torch.Tensor:
    """``out`` [rows, in] (fp16) = codes × scales, for one block of rows.

    ``codes``: int8 [rows, in] or int4 packed [rows, in/2]; ``scale``: fp16 [rows] or [rows, groups].
    The multiply writes into ``out`` directly, scales broadcast over their row or group; int4 makes
    one ``[rows, in/2]`` int8 nibble plane at a time beside it.
    """
    rows, cols = out.shape
    if bits == 8:
        _scaled_into(out, codes, scale, group_size)
        return out
    pairs = out.view(rows, cols // 2, 2)  # [rows, in/2, (element 2j: high nibble, 2j+1: low)]
    _scaled_into(pairs[..., 0], codes >> 4, scale, group_size)  # arithmetic shift keeps the sign
    low = codes << 4
    low >>= 4  # sign-extended in place
    _scaled_into(pairs[..., 1], low, scale, group_size)
    return out


def _scaled_into(target: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 group_size: int | None) -> None:
    """``target`` [rows, n] = ``codes`` [rows, n] × the row's (or the group's) scale, in one pass."""
    rows = target.shape[0]
    if group_size is None:
        torch.mul(codes, scale[:, None], out=target)
    else:  # [rows, groups, per group] against [rows, groups, 1]
        per_group = target.shape[1] // scale.shape[1]
        torch.mul(codes.view(rows, -1, per_group), scale[:, :, None],
                  out=target.view(rows, -1, per_group))


def extract_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int,
                   group_size: int | None) -> torch.Tensor:
    """``x`` [tokens, in] (fp16) times the dequantized weight, a row block at a time: [tokens, out]."""
    rows, cols = codes.shape[0], x.shape[1]
    block = cuda_extract_rows(rows, cols)
    buffer = torch.empty(block, cols, dtype=torch.float16, device=x.device)  # reused by every block
    if block == rows:
        return F.linear(x, extract_block(codes, scale, bits, group_size, buffer))
    y = x.new_empty(x.shape[0], rows)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        weight = extract_block(codes[start:stop], scale[start:stop], bits, group_size,
                               buffer[:stop - start])
        y[:, start:stop] = F.linear(x, weight)  # [tokens, block], then into place
    return y


# -- fused: one weight-only GEMV compiled through NVRTC ------------------------------------------------
@functools.lru_cache(maxsize=1)
def _cupy():
    """CuPy, or None where it is not installed or :data:`FUSED_ENV` turns the kernel off."""
    if os.environ.get(FUSED_ENV, "").strip().lower() == "torch":
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy


@functools.lru_cache(maxsize=1)
def _kernel():
    return _cupy().RawKernel(KERNEL_SOURCE, "weight_only_gemv")


def fused_applies(x: torch.Tensor, codes: torch.Tensor, bits: int, group_size: int | None) -> bool:
    """Whether :func:`fused_linear` takes this call (CuPy present, a CUDA input, a decode-sized
    one, whole 32-bit words of codes per row)."""
    tokens, cols = x.shape
    return (x.is_cuda and 0 < tokens <= FUSED_MAX_TOKENS and cols % (32 // bits) == 0
            and (group_size is None or group_size % 8 == 0) and _cupy() is not None)


def fused_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int,
                 group_size: int | None) -> torch.Tensor:
    """The fused kernel: ``x`` [tokens ≤ 8, in] fp16, contiguous, on CUDA → [tokens, out] fp16."""
    import numpy as np

    cupy = _cupy()
    tokens, cols = x.shape
    rows = codes.shape[0]
    x = x.contiguous()
    y = torch.empty(tokens, rows, dtype=torch.float16, device=x.device)
    warps_per_block = _THREADS // 32
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with cupy.cuda.Device(x.device.index), cupy.cuda.ExternalStream(stream):
        _kernel()(((rows + warps_per_block - 1) // warps_per_block,), (_THREADS,),
                  (np.uint64(codes.data_ptr()), np.uint64(scale.data_ptr()),
                   np.uint64(x.data_ptr()), np.uint64(y.data_ptr()), np.int32(rows),
                   np.int32(cols), np.int32(tokens), np.int32(bits), np.int32(group_size or 0)))
    return y


_fused_failed = False
_fused_loaded: set[int] = set()  # devices where the kernel has run once (compiled and loaded)
_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


def capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s device is capturing a CUDA graph on the current stream."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int,
           group_size: int | None) -> torch.Tensor:
    """``x`` [tokens, in] fp16 → [tokens, out] fp16: fused where it applies, else extract.

    ``codes`` / ``scale`` as ``QuantizedLinear`` keeps them (contiguous, on ``x``'s device). If
    the kernel does not compile (no NVRTC, say), that is said once and extraction runs instead.

    Both ways can be captured in a CUDA graph: plain torch ops (allocations come from the graph's
    pool, no host synchronisation) or one CuPy launch on torch's current stream, the capturing
    one, with the pointers of tensors the graph keeps. Compiling and loading the kernel cannot
    happen during a capture, so a capture that meets it first takes the extraction instead (said
    once); the batcher and ``generate_ids`` run each step eagerly before capturing it, which
    loads the kernel then.
    """
    global _fused_failed
    if not _fused_failed and fused_applies(x, codes, bits, group_size):
        if x.device.index not in _fused_loaded and capturing(x):
            _say_once(f"the fused int{bits} kernel was not loaded before a CUDA graph capture: "
                      "this graph dequantizes by row blocks instead")
        else:
            try:
                y = fused_linear(x, codes, scale, bits, group_size)
                _fused_loaded.add(x.device.index)
                return y
            except Exception as err:  # compiling (NVRTC) or loading the kernel; then never again
                if capturing(x):
                    raise  # the capture is broken either way: its caller falls back to eager
                _fused_failed = True
                _say_once(f"the fused int{bits} CUDA kernel is unavailable ({type(err).__name__}: "
                          f"{err}); dequantizing by row blocks instead")
    return extract_linear(x, codes, scale, bits, group_size)


def use_fused(enabled: bool) -> None:
    """Turn the fused kernel on (where CuPy is) or off, as :data:`FUSED_ENV` does at start-up."""
    global _fused_failed
    os.environ[FUSED_ENV] = "auto" if enabled else "torch"
    _cupy.cache_clear()
    _fused_failed = False


def kernel_in_use(device: torch.device | str = "cuda") -> str:
    """``fused`` or ``extract``: what a decode step on ``device`` runs (for reports)."""
    device = torch.device(device)
    return "fused" if device.type == "cuda" and _cupy() is not None and not _fused_failed \
        else "extract"
