"""The bfloat16 linear layers of a model on the CPU: the output layer of every CPU variant (ChatGLM2
keeps it in 16 bits) and every projection of the fp16 variant.

**Row inputs.** ``GlmForCausalLM`` computes the logits of the last position as
``lm_head(hidden[:, -1:, :])``: a ``[1, 1, hidden]`` view whose batch stride is the whole prompt.
torch counts it as contiguous (a size-1 dimension's stride does not matter to it), but its bfloat16
CPU matmul does not: with the 6B's ``[65024, 4096]`` output layer it copies the weight (+508 MB
resident) and takes 2.3 s instead of 22 ms for the same row as ``[1, hidden]``. Every ``nn.Linear``
becomes a :class:`RowsLinear`, which reshapes its input to ``[tokens, in]`` first (a view).

**Decode steps.** oneDNN's bfloat16 matmul reads a one-row call's weight at well under the memory's
speed (the 6B's output layer: 24-41 ms for 532 MB where the memory streams it in 18-25). glm-build's
GEMV reads a bfloat16 weight as it reads int8 codes (:func:`cpu_kernels.bf16_mm`), and where the CPU
has AMX its tile unit reads the weight's rows as they are (:func:`cpu_kernels.bf16_dense_mm`: 8 rows
cost what one does). Up to 8 rows take whichever the decode probe (:func:`cpu_quant.probe_decode`)
finds fastest for the shape and rows bucket; more rows (a prefill) take oneDNN's matmul, in bfloat16
where the CPU multiplies it natively, else on blocks of the weight widened to float32
(:func:`cpu_kernels.bf16_dense_mm`: a 98-token prefill of the 6B's shapes 3.1x faster under AVX2).

>>> use_row_inputs(model)   # in place, on a model loaded on the CPU
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels, cpu_quant
from .cpu_runtime import onednn_matmuls


def onednn_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with oneDNN on (the process may have turned it off for attention)."""
    with onednn_matmuls():
        return F.linear(rows, weight, bias)


class RowsLinear(torch.nn.Linear):
    """``nn.Linear`` that calls the matmul on ``[tokens, in_features]`` rows: a decode step's few rows
    on the faster GEMV for this host, more on oneDNN's matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [tokens, in]: strides (in, 1)
        candidates = self.decode_paths(rows)
        if candidates is not None:
            key = cpu_quant.decode_key(16, self.out_features, self.in_features, None, candidates, rows.shape[0])
            y = candidates[cpu_quant.probe_decode(key, candidates, rows)](rows)
        elif self.widened(rows):
            y = cpu_kernels.bf16_dense_mm(rows, self.weight)
        else:
            return onednn_linear(rows, self.weight, self.bias).view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def kernels_read(self, rows: torch.Tensor) -> bool:
        """Whether glm-build's kernels can take this call at all: bfloat16 rows and a contiguous
        bfloat16 weight on the CPU, no autograd, the kernels built."""
        weight = self.weight
        return (rows.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and weight.is_contiguous()
                and weight.device.type == "cpu" and not (torch.is_grad_enabled() and weight.requires_grad)
                and cpu_kernels.available())

    def widened(self, rows: torch.Tensor) -> bool:
        """Whether a call of more rows than a decode step takes float32 blocks of the weight: one the
        kernels read, on a CPU that does not multiply bfloat16 natively."""
        return (rows.shape[0] > cpu_quant.ROW_BUCKETS[-1] and self.kernels_read(rows)
                and not cpu_kernels.native_bf16())

    def decode_paths(self, rows: torch.Tensor) -> dict | None:
        """The GEMVs a call of ``rows`` may take (:data:`cpu_quant.DECODE_PATHS` names), or None
        where it is not a decode step on bfloat16 that glm-build's kernel reads."""
        if not 0 < rows.shape[0] <= cpu_quant.ROW_BUCKETS[-1] or not self.kernels_read(rows):
            return None
        weight = self.weight
        paths = {"glm_kernel": lambda r: cpu_kernels.bf16_mm(r, weight),
                 "torch_kernel": lambda r: onednn_linear(r, weight)}
        if cpu_kernels.has_amx():
            paths["dense"] = lambda r: cpu_kernels.bf16_dense_mm(r, weight)
        return paths


def use_row_inputs(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every plain ``nn.Linear`` in ``model`` into a :class:`RowsLinear`, in place (same
    parameters, same state_dict)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = RowsLinear
    return model
