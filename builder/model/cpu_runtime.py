"""A quirk of torch's CPU kernels that the loaded model works around (the other, row inputs to the
bfloat16 linear layers, is :mod:`builder.model.cpu_linear`'s).

**Attention below the CPU's own capability.** With ``ATEN_CPU_CAPABILITY=avx2`` (or ``default``) on a
CPU with AVX-512 bfloat16/AMX, torch 2.13's bfloat16 flash-attention kernel still picks oneDNN's
packed path, which only its AVX-512 build has ("pack_vnni2 is only supported when avx512 is
supported"). A one-off probe finds that case, and the process then runs with oneDNN off (a
process-wide switch: transformers' continuous batching runs its own paged attention, so a
per-call wrapper would not reach it), except around the model's own matmuls
(:func:`onednn_matmuls`): without oneDNN a bfloat16 matmul runs on torch's own GEMM, ~25x slower
for a prefill and 4x for the output layer's GEMV. A real AVX2 host never needs any of it.

>>> prepare_attention(torch.bfloat16)
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F

# Toggling oneDNN off warns once about an Intel-GPU feature this torch build lacks: not ours to act on.
warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")


@contextlib.contextmanager
def onednn_matmuls():
    """oneDNN on inside the ``with``, where the process turned it off for attention (above); the
    matmuls inside do not take the attention's failing path. One thread runs the model, so the
    process-wide switch is safe."""
    if torch.backends.mkldnn.enabled:
        yield
        return
    torch.backends.mkldnn.enabled = True
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = False


@functools.lru_cache(maxsize=None)
def bf16_attention_needs_onednn_off() -> bool:
    """Whether this process's bfloat16 CPU attention fails the way described above."""
    q = torch.zeros(1, 2, 64, 128, dtype=torch.bfloat16)  # long enough for the packed path
    try:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return False
    except RuntimeError as err:
        if "only supported when avx512" not in str(err):
            raise
        with torch.backends.mkldnn.flags(enabled=False):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return True


def prepare_attention(dtype: torch.dtype) -> None:
    """Turn oneDNN off for this process where a model in ``dtype`` needs it for attention (above)."""
    if dtype == torch.bfloat16 and bf16_attention_needs_onednn_off():
        torch.backends.mkldnn.enabled = False
