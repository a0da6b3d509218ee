"""Two quirks of torch's CPU kernels that the loaded model works around.

**Row inputs.** ``GlmForCausalLM`` computes the logits of the last position as
``lm_head(hidden[:, -1:, :])``: a ``[1, 1, hidden]`` view whose batch stride is the whole prompt.
torch counts it as contiguous (a size-1 dimension's stride does not matter to it), but its bfloat16
CPU matmul does not: with the 6B's ``[65024, 4096]`` output layer it copies the weight (+508 MB
resident) and takes 2.3 s instead of 22 ms for the same row as ``[1, hidden]``. Every ``nn.Linear``
becomes a :class:`RowsLinear`, which reshapes its input to ``[tokens, in]`` first (a view).

**Attention below the CPU's own capability.** With ``ATEN_CPU_CAPABILITY=avx2`` (or ``default``) on a
CPU with AVX-512 bfloat16/AMX, torch 2.13's bfloat16 flash-attention kernel still picks oneDNN's
packed path, which only its AVX-512 build has ("pack_vnni2 is only supported when avx512 is
supported"). A one-off probe finds that case, and the process then runs with oneDNN off (a
process-wide switch: transformers' continuous batching runs its own paged attention, so a
per-call wrapper would not reach it), except around the model's own matmuls
(:func:`onednn_matmuls`): without oneDNN a bfloat16 matmul runs on torch's own GEMM, ~25x slower
for a prefill and 4x for the output layer's GEMV. A real AVX2 host never needs any of it.

>>> model = prepare_for_cpu(model, torch.bfloat16)
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


class RowsLinear(torch.nn.Linear):
    """``nn.Linear`` that calls the matmul on ``[tokens, in_features]`` rows, with oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [tokens, in]: strides (in, 1)
        with onednn_matmuls():
            y = F.linear(rows, self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def use_row_inputs(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every plain ``nn.Linear`` in ``model`` into a :class:`RowsLinear`, in place (same
    parameters, same state_dict)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = RowsLinear
    return model


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


def prepare_for_cpu(model, dtype: torch.dtype):
    """Apply both workarounds to a model loaded on the CPU in ``dtype``; returns it."""
    use_row_inputs(model)
    if dtype == torch.bfloat16 and bf16_attention_needs_onednn_off():
        torch.backends.mkldnn.enabled = False
    return model
