"""ChatGLM2's weight-only INT8/INT4 quantization, on transformers' ``GlmForCausalLM``.

THUDM's scheme, per output row: ``scale = max|w| / (2^(bits-1) - 1)``, ``q = round(w / scale)``;
int4 packs two values per byte, element 2j in the high nibble (so ``chatglm2-6b-int4`` checkpoints
load as they are). The four projections of every decoder layer are replaced (GLM names ``q/k/v_proj``,
``o_proj``, ``gate_up_proj``, ``down_proj``); embeddings, ``lm_head`` and norms are not. Group-wise
int4 (``group_size`` 32/64/128: one scale per row per group) is offered beside it.

Kernels: on CPU, for decode steps, glm-build's own weight-only GEMV (:mod:`builder.model.cpu_kernels`,
where it is built) or torch's fused weight-only kernels (``_weight_int8pack_mm`` with bfloat16
activations, ``_weight_int4pack_mm_for_cpu``), whichever a one-row probe finds faster per shape; and for a prefill or a large batch (from
:func:`cpu_quant.dense_rows` rows) a block of weight rows dequantized to bfloat16 and oneDNN's matmul
(:mod:`builder.model.cpu_quant`: those kernels cost linearly in rows, the matmul does not); on CUDA :mod:`builder.model.cuda_quant` (a fused weight-only GEMV for
decode steps where CuPy is installed, else fp16 extraction by row blocks then cuBLAS); anywhere else
(or for shapes the CPU kernels refuse) dequantize, then matmul. Quantizing runs where the float
weight is, a block of rows at a time: at load that is the CPU, and only finished codes, scales and
bias move to a GPU.

>>> model = quantize(model, 4)                  # in place, and returned
>>> hook = make_load_hook(model, 8)            # or quantize while a checkpoint streams in
>>> load_weights(model, path, config, device=device, dtype=dtype, hook=hook); hook.check_complete()
"""
from __future__ import annotations

import functools
import re
from typing import Callable

import torch
import torch.nn.functional as F

from . import cpu_kernels
from . import cpu_quant
from . import cuda_quant

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
# The decoder-layer projections ChatGLM2 quantizes (query_key_value, dense, dense_h_to_4h,
# dense_4h_to_h in THUDM's names), matched on a module's dotted name.
_PROJECTION = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.gate_up_proj|mlp\.down_proj)$")

FilterFn = Callable[[torch.nn.Module, str], bool]


def check_bits(bits, group_size=None) -> None:
    """Fail at once, naming the argument and its value."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be 4 or 8 (16 means no quantization), got bits={bits!r}")
    if group_size is not None:
        if bits != 4:
            raise ValueError(f"group_size applies to int4 only, got group_size={group_size!r} with bits={bits}")
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} or None (one scale per row), "
                             f"got group_size={group_size!r}")


# -- the math: small pure functions ---------------------------------------------------------------
def qmax(bits: int) -> int:
    """The largest magnitude a ``bits``-bit symmetric code holds: 127 for int8, 7 for int4."""
    return 2 ** (bits - 1) - 1


def row_scales(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """``max|w| / qmax`` per output row, or per row per group of ``group_size`` inputs (float32).

    >>> row_scales(torch.tensor([[1.0, -2.54], [0.0, 0.0]]), 8)    # tensor([0.0200, 0.0000])
    """
    w = weight.float()  # [out, in]
    if group_size is not None:
        w = w.reshape(w.shape[0], -1, group_size)  # [out, groups, group_size]
    return w.abs().amax(dim=-1) / qmax(bits)  # [out] or [out, groups]


def _per_column(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """A row's (or a group's) scale beside every weight it scales: [out] / [out, groups] -> [out, in]."""
    if scale.dim() == 1:
        return scale[:, None]  # [out, 1], broadcasts
    return scale.repeat_interleave(in_features // scale.shape[1], dim=1)  # [out, in]


def quantize_rows(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``round(w / scale)`` as int8, clamped to ``[-qmax, qmax]``; a zero scale (all-zero row) gives 0."""
    w = weight.float()  # [out, in]
    s = _per_column(scale.float(), w.shape[1])
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.round(w / s).clamp_(-qmax(bits), qmax(bits)).to(torch.int8)  # [out, in]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two int4 values per byte, element 2j in the HIGH nibble: [out, in] int8 -> [out, in/2] int8."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of inputs per row, got {q.shape[-1]}")
    u = q.to(torch.int16) & 0xF  # two's-complement nibbles, [out, in]
    packed = (u[..., 0::2] << 4) | u[..., 1::2]  # [out, in/2], 0..255
    return packed.to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: [out, in/2] int8 -> [out, in] int8 in [-8, 7]."""
    b = packed.view(torch.int8)
    high = b >> 4  # arithmetic shift keeps the sign, [out, in/2]
    low = (b << 4) >> 4  # sign-extend the low nibble, [out, in/2]
    return torch.stack([high, low], dim=-1).flatten(-2)  # [out, in]


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in float32: [out, in] int8 and [out] / [out, groups] -> [out, in]."""
    return q.float() * _per_column(scale.float(), q.shape[1])


QUANTIZE_BLOCK_BYTES = 8 * 2**20
"""float32 bytes of weight quantized at once. Whole-layer temporaries (a 6B ``gate_up_proj`` is 449
MB in float32) would be freed into the C heap between live tensors and stay resident after loading;
blocks this small are reused from one block to the next."""


def row_blocks(rows: int, row_bytes: int, multiple: int = 1):
    """``(start, stop)`` spans of at most :data:`QUANTIZE_BLOCK_BYTES` (a multiple of ``multiple``
    rows, at least ``multiple``) covering ``rows``.

    >>> list(row_blocks(10, QUANTIZE_BLOCK_BYTES // 4))
    [(0, 4), (4, 8), (8, 10)]
    """
    step = max(multiple, QUANTIZE_BLOCK_BYTES // max(row_bytes, 1) // multiple * multiple)
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's tensors for a float weight [out, in], a block of rows at a time: int8 codes [out, in]
    (int4: packed [out, in/2]) and fp16 scales [out] (or [out, groups]).

    >>> codes, scale = quantize_weight(torch.randn(8, 64), 4)     # [8, 32] int8, [8] fp16
    """
    out_features, in_features = weight.shape
    groups = () if group_size is None else (in_features // group_size,)
    scale = torch.empty(out_features, *groups, dtype=torch.float16, device=weight.device)
    codes = torch.empty(out_features, in_features * bits // 8, dtype=torch.int8, device=weight.device)
    for start, stop in row_blocks(out_features, in_features * 4):
        block_scale = row_scales(weight[start:stop], bits, group_size).to(torch.float16)  # as THUDM stores it
        q = quantize_rows(weight[start:stop], block_scale, bits)
        scale[start:stop] = block_scale
        codes[start:stop] = pack_int4(q) if bits == 4 else q
    return codes, scale


# -- torch's CPU int4 kernel format -----------------------------------------------------------------
def _cpu_int4_group(in_features: int, group_size: int | None) -> int | None:
    """The group size the CPU int4 kernel runs with, or None when it cannot take this shape.

    Per-row scales are given to every group of a row, so any group size is the same math; the
    kernel accepts 32/64/128 only, dividing ``in_features``. The tiny test model's 344 inputs have
    none, and those projections fall back to dequantize-then-matmul.
    """
    if group_size is not None:
        return group_size if in_features % group_size == 0 else None
    return next((g for g in (128, 64, 32) if in_features % g == 0), None)


def _cpu_int4pack(q: torch.Tensor) -> torch.Tensor:
    """[out, in] int8 in [-8, 7] -> the kernel's prepacked uint8 [out, in/2] (its unsigned nibble is q + 8)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)


_PACK_ROWS = 64  # the kernel packs blocks of 32 (AVX2) or 64 (AVX-512) rows into contiguous bytes


def _cpu_int4pack_thudm(packed: torch.Tensor) -> torch.Tensor:
    """THUDM's packed int4 [out, in/2] -> the kernel's prepacked uint8 [out, in/2], by row blocks.

    THUDM's nibble is q in two's complement and the kernel's is q + 8, so the kernel's code is the
    nibble with its top bit flipped: written straight into one reused int32 block (what the packer
    takes), with no signed unpacking and no fresh block-sized temporaries (each would be new pages
    to fault in: that, not the arithmetic, was most of a pre-quantized int4 start-up). Blocks of
    whole 64-row groups pack to the same contiguous bytes as the whole matrix.
    """
    out_features, half = packed.shape
    result = torch.empty(out_features, half, dtype=torch.uint8, device=packed.device)
    nibbles = packed.view(torch.uint8)
    blocks = list(row_blocks(out_features, half * 2 * 4, multiple=_PACK_ROWS))
    rows = max(stop - start for start, stop in blocks)
    codes = torch.empty(rows, half, 2, dtype=torch.int32, device=packed.device)  # [rows, in/2, 2]
    for start, stop in blocks:
        block, n = nibbles[start:stop], stop - start
        torch.bitwise_xor(block >> 4, 8, out=codes[:n, :, 0])  # element 2j: the high nibble
        torch.bitwise_xor(block & 0xF, 8, out=codes[:n, :, 1])
        result[start:stop] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes[:n].view(n, half * 2), 1).view(n, half)
    return result


@functools.lru_cache(maxsize=8)  # a 6B model has two block shapes: [64, 4096] and [64, 13696]
def _int4pack_gather_index(rows: int, cols: int) -> torch.Tensor:
    """Where each weight of a [rows, cols] block sits among the nibbles of its prepacked bytes
    (nibble i of the block is byte i // 2, high nibble first): [rows * cols] int64.

    Found by asking the kernel's own packer where each flat index goes, 4 index bits at a time,
    so no CPU-capability-specific layout (AVX2, AVX-512, ...) is written down here.
    """
    count = rows * cols
    index = torch.arange(count, dtype=torch.int64).view(rows, cols)
    sources = torch.zeros(count, dtype=torch.int64)  # nibble -> flat index of its weight
    for shift in range(0, max(count - 1, 1).bit_length(), 4):
        digits = ((index >> shift) & 0xF).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits, 1).flatten()
        sources |= torch.stack([packed >> 4, packed & 0xF], dim=1).flatten().to(torch.int64) << shift
    if not torch.bincount(sources, minlength=count).eq(1).all():
        raise RuntimeError("torch's int4 CPU packing is not a permutation of nibbles; "
                           "thudm_state() does not support this torch version's layout")
    gather = torch.empty_like(sources)
    gather[sources] = torch.arange(count)
    return gather


def _cpu_int4unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`_cpu_int4pack`: prepacked uint8 -> [out, in] int8 in [-8, 7]."""
    flat = packed.flatten()
    nibbles = torch.stack([flat >> 4, flat & 0xF], dim=1).view(torch.int8).flatten()  # [out * in]
    q = torch.empty(out_features, in_features, dtype=torch.int8)
    full = out_features // _PACK_ROWS * _PACK_ROWS  # row blocks pack to contiguous bytes
    for start, stop in ((0, full), (full, out_features)):
        if stop > start:
            rows = min(_PACK_ROWS, stop - start)
            block = nibbles[start * in_features:stop * in_features].view(-1, rows * in_features)
            gather = _int4pack_gather_index(rows, in_features)
            q[start:stop] = block.index_select(1, gather).view(stop - start, in_features)
    q -= 8
    head = min(out_features, 2 * _PACK_ROWS)  # the row-block assumption, checked where it is cheap
    if not torch.equal(_cpu_int4pack(q[:head]).flatten(), flat[:head * in_features // 2]):
        raise RuntimeError("could not invert torch's int4 CPU packing (row blocks are not contiguous)")
    return q


# -- tensors the kernels read ------------------------------------------------------------------------
KERNEL_ALIGNMENT = 64  # bytes; torch's CPU allocator's own alignment (one AVX-512 register, one cache line)


def owned_aligned(tensor: torch.Tensor, *, mapped: bool = False) -> torch.Tensor:
    """``tensor`` itself when it is contiguous, starts on a 64-byte boundary and is all of its storage;
    otherwise a copy that is.

    Tensors read from a checkpoint are views at whatever offset the file put them (safetensors aligns
    data to 8 bytes only) or slices of a bigger one (q/k/v split from THUDM's fused
    ``query_key_value``). torch's AVX-512 ``_weight_int8pack_mm`` faults on a weight that is not
    16-byte aligned once a call has more than a few rows, and a slice would keep the whole fused
    tensor (or a shard's memory map) alive; a copy made by torch's allocator has neither problem.

    ``mapped``: ``tensor`` comes from a memory-mapped checkpoint whose every tensor the model keeps
    as it is (:func:`~builder.model.checkpoint.save_quantized`'s files in the model's dtype), so
    sharing the map keeps nothing alive that is not used: an aligned view is kept, and read from the
    page cache, instead of copied (a copy would be a second resident copy of the same bytes, the
    map's pages staying mapped too). ``save_quantized`` aligns its tensors for this.

    >>> owned_aligned(torch.zeros(72, dtype=torch.int8)[8:]).data_ptr() % 64
    0
    """
    if (tensor.is_contiguous() and tensor.data_ptr() % KERNEL_ALIGNMENT == 0
            and (mapped or tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


# -- the quantized layer ----------------------------------------------------------------------------
class QuantizedLinear(torch.nn.Module):
    """A ``Linear`` whose weight is held as ChatGLM2's int8/int4 codes with fp16 scales.

    Only the format the forward kernel reads stays resident: on CPU, int8 ``weight`` [out, in]
    (THUDM's format too) and int4 either THUDM's packed ``weight`` [out, in/2] (``int4_layout ==
    "thudm"``: where glm-build's own CPU kernel is built and chosen for int4,
    :func:`cpu_kernels.int4_wins`) or torch's prepacked ``weight_int4pack`` plus
    ``scales_and_zeros`` (``"torch"``); elsewhere THUDM's ``weight`` (int4: packed [out, in/2]). ``thudm_state()`` (and ``state_dict()``)
    always give THUDM's ``weight`` / ``weight_scale`` (/ ``bias``).

    >>> layer = QuantizedLinear.from_float(linear.weight, linear.bias, bits=4)
    >>> again = QuantizedLinear.from_thudm(**layer.thudm_state(), bits=4)
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 bits: int, *, mapped: bool = False):
        super().__init__()
        check_bits(bits)
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D int8 tensor in THUDM's format, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        self.bits = bits
        self._set_tensors(weight, weight_scale, bias, mapped=mapped)

    def _set_tensors(self, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, *, mapped: bool = False) -> None:
        """Keep THUDM's tensors in the format this device's kernel reads (and nothing else);
        ``mapped``: see :func:`owned_aligned`."""
        bits = self.bits
        self.out_features = weight.shape[0]
        self.in_features = weight.shape[1] * (8 // bits)
        if weight_scale.shape[0] != self.out_features or weight_scale.dim() not in (1, 2):
            raise ValueError(f"weight_scale must be [{self.out_features}] or [{self.out_features}, groups], "
                             f"got {tuple(weight_scale.shape)}")
        self.group_size = None if weight_scale.dim() == 1 else self.in_features // weight_scale.shape[1]
        check_bits(bits, self.group_size)
        device = weight.device
        for name in ("weight", "weight_int4pack", "scales_and_zeros"):
            self._buffers.pop(name, None)
        # Buffers, not parameters, and not persistent: state_dict() writes THUDM's format itself.
        self.register_buffer("weight_scale", owned_aligned(weight_scale.to(device, torch.float16),
                                                           mapped=mapped), persistent=False)
        self.register_buffer("bias", None if bias is None else owned_aligned(bias.detach().to(device),
                                                                             mapped=mapped),
                             persistent=False)
        self.kernel = "dequantize"  # how forward computes; see the module docstring
        if device.type == "cpu" and bits == 8 and self.in_features % 32 == 0:
            # (the kernel segfaults on in_features % 8 != 0 here; 32 also covers AVX-512 blocking)
            self.kernel = "cpu_int8"
        elif device.type == "cpu" and bits == 4 and self.out_features % 16 == 0 and \
                _cpu_int4_group(self.in_features, self.group_size) is not None:
            self.kernel = "cpu_int4"
        elif device.type == "cuda":
            self.kernel = "cuda_extract"
        self.int4_layout = None
        if self.kernel == "cpu_int4" and cpu_kernels.int4_wins() and cpu_kernels.available():
            # glm-build's kernel reads THUDM's packed int4 as it is; the dense path unpacks it too
            self.register_buffer("weight", owned_aligned(weight, mapped=mapped), persistent=False)
            self.int4_layout = "thudm"
        elif self.kernel == "cpu_int4":
            group = _cpu_int4_group(self.in_features, self.group_size)
            scales = self.weight_scale if self.group_size else self.weight_scale[:, None]  # [out, 1|groups]
            scales = scales.expand(-1, self.in_features // group).t()  # [groups, out]
            # w = (nibble - 8) * scale + zero, and the nibble is q + 8, so the zero is 0
            self.register_buffer("scales_and_zeros", torch.stack(
                [scales, torch.zeros_like(scales)], dim=-1).to(torch.bfloat16).contiguous(),
                persistent=False)  # [groups, out, 2]
            self.register_buffer("weight_int4pack", _cpu_int4pack_thudm(weight), persistent=False)
            self.kernel_group_size = group
            self.int4_layout = "torch"
        else:
            self.register_buffer("weight", owned_aligned(weight, mapped=mapped), persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() / .half(): the bias follows fn; the codes and scales keep THUDM's
        # dtypes, and a move to another device re-lays them out for that device's kernel.
        device = fn(self.weight_scale).device
        bias = None if self.bias is None else fn(self.bias)
        if device == self.weight_scale.device:
            self._buffers["bias"] = bias
            return self
        state = self.thudm_state()
        self._set_tensors(state["weight"].to(device), state["weight_scale"].to(device), bias)
        return self

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int,
                   group_size: int | None = None, *,
                   device: str | torch.device | None = None) -> "QuantizedLinear":
        """Quantize a float weight [out, in] with ChatGLM2's per-row scheme (or group-wise int4).

        ``device``: where the layer runs (default: the weight's). The weight is quantized where it
        is, a block of rows at a time; only the finished codes, scales and bias move.
        """
        check_bits(bits, group_size)
        weight = weight.detach()
        if group_size is not None and weight.shape[1] % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={weight.shape[1]}")
        codes, scale = quantize_weight(weight, bits, group_size)
        if device is not None:
            codes, scale = codes.to(device), scale.to(device)
            bias = None if bias is None else bias.to(device)
        return cls(codes, scale, bias, bits)

    @classmethod
    def from_thudm(cls, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                   bits: int, *, mapped: bool = False) -> "QuantizedLinear":
        """From THUDM's tensors: int8 ``weight`` [out, in] (int4: packed [out, in/2]), fp16
        ``weight_scale``; ``mapped``: see :func:`owned_aligned`."""
        return cls(weight, weight_scale, bias, bits, mapped=mapped)

    # -- THUDM format on demand ---------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The int8 codes q [out, in] (int4 unpacked to [-8, 7])."""
        if self.int4_layout == "torch":
            return _cpu_int4unpack(self.weight_int4pack, self.out_features, self.in_features)
        return unpack_int4(self.weight) if self.bits == 4 else self.weight

    def thudm_state(self) -> dict[str, torch.Tensor]:
        """``weight`` (int8; int4 packed [out, in/2]), ``weight_scale`` (fp16) and ``bias`` if any."""
        if self.int4_layout == "torch":
            weight = pack_int4(self.codes())
        else:
            weight = self.weight
        state = {"weight": weight, "weight_scale": self.weight_scale.to(torch.float16)}
        if self.bias is not None:
            state["bias"] = self.bias
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # state_dict() holds THUDM's tensors, never the CPU kernel's private layout
        for name, tensor in self.thudm_state().items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def resident_bytes(self) -> int:
        """Bytes of every tensor this module keeps."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [tokens, in], strides (in, 1): see builder.model.cpu_runtime
        if self.kernel in ("cpu_int8", "cpu_int4") and x.device.type != "cpu":
            raise RuntimeError(f"QuantizedLinear was built for the CPU kernels but got input on {x.device}; "
                               "rebuild it there with QuantizedLinear.from_thudm(**layer.thudm_state(), bits=...)")
        if x2.shape[0] == 0:
            y = x2.new_empty(0, self.out_features)
        elif self.kernel in ("cpu_int8", "cpu_int4"):
            y = self._cpu_forward(x2.to(torch.bfloat16).contiguous())  # bfloat16 activations: see below
        elif self.kernel == "cuda_extract":
            y = cuda_quant.linear(x2.to(torch.float16).contiguous(), self.weight, self.weight_scale,
                                  self.bits, self.group_size)
        else:
            y = F.linear(x2, dequantize(self.codes(), self.weight_scale).to(x2.dtype))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def cpu_path(self, rows: int) -> str:
        """Which CPU path a call with ``rows`` rows takes: ``"dense"`` (dequantize a block of weight
        rows to bfloat16, oneDNN's matmul: prefills and large batches), ``"glm_kernel"`` (glm-build's
        weight-only GEMV) or ``"torch_kernel"`` (torch's); below the threshold, what the decode probe
        chose for this shape (before it has run: the first weight-only kernel there is)."""
        candidates = self._cpu_paths()
        threshold = self._dense_rows()
        if threshold and rows >= threshold:
            return "dense"
        if not threshold:
            candidates.pop("dense")
        forced = cpu_quant.forced_path(candidates)
        default = forced or next(name for name in candidates if name != "dense")
        return cpu_quant._decode_paths.get(self._shape_key(candidates, rows), default)

    def _dense_rows(self) -> int:
        return cpu_quant.dense_rows(self.bits, self.int4_layout or "torch")

    def _shape_key(self, candidates, rows: int) -> tuple:
        return cpu_quant.decode_key(self.bits, self.out_features, self.in_features, self.group_size,
                                    candidates, rows)

    def _cpu_paths(self) -> dict:
        """The CPU paths this layer's layout allows, by name (:data:`cpu_quant.DECODE_PATHS`), each a
        function of bfloat16 rows [rows, in] -> [rows, out] bfloat16."""
        if self.kernel == "cpu_int8":
            scale = self.weight_scale.to(torch.bfloat16)

            def torch_kernel(x):
                return torch.ops.aten._weight_int8pack_mm(x, self.weight, scale)

            if not cpu_kernels.available():
                return {"torch_kernel": torch_kernel,
                        "dense": lambda x: cpu_quant.int8_rows(x, self.weight, scale)}
            return {"glm_kernel": lambda x: cpu_kernels.int8_mm(x, self.weight, self.weight_scale),
                    "torch_kernel": torch_kernel,
                    "dense": lambda x: cpu_kernels.dense_mm(x, self.weight, self.weight_scale, 8)}
        if self.int4_layout == "thudm":
            return {"glm_kernel": lambda x: cpu_kernels.int4_mm(x, self.weight, self.weight_scale),
                    "dense": lambda x: cpu_kernels.dense_mm(x, self.weight, self.weight_scale, 4)}
        scale = self.scales_and_zeros[..., 0] if self.group_size else self.weight_scale.to(torch.bfloat16)
        return {"torch_kernel": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x, self.weight_int4pack, self.kernel_group_size, self.scales_and_zeros),
                "dense": lambda x: cpu_quant.int4_rows(x, self.weight_int4pack, scale,
                                                       cpu_quant.int4pack_layout())}

    def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] bfloat16 (the int8 kernel is ~10x faster with bfloat16 activations than
        float32 ones) -> [rows, out] bfloat16."""
        candidates = self._cpu_paths()
        threshold = self._dense_rows()
        if threshold and x.shape[0] >= threshold:
            return candidates["dense"](x)
        if not threshold:
            del candidates["dense"]  # this int4 layout is not read by the dense path
        # a decode step: the path this host runs fastest, probed once per shape and rows bucket
        key = self._shape_key(candidates, x.shape[0])
        return candidates[cpu_quant.probe_decode(key, candidates, x)](x)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"
                f"{group}, bias={self.bias is not None}, kernel={self.kernel}")


# -- the layer swap ---------------------------------------------------------------------------------
def is_projection(module: torch.nn.Module, name: str) -> bool:
    """The default filter: a decoder layer's q/k/v/o, gate_up or down projection."""
    return isinstance(module, torch.nn.Linear) and _PROJECTION.search(name) is not None


def quantize(model: torch.nn.Module, bits: int, *, group_size: int | None = None,
             filter_fn: FilterFn | None = None) -> torch.nn.Module:
    """Replace the projections ``filter_fn(module, name)`` picks with :class:`QuantizedLinear`, in place.

    ``bits`` 16 leaves the model as it is. Each float weight is freed once its layer is replaced.

    >>> model = quantize(model, 8)
    >>> model = quantize(model, 4, group_size=128)              # group-wise int4, not THUDM's format
    """
    if bits == 16:
        return model
    check_bits(bits, group_size)
    _swap_children(model, "", bits, group_size, filter_fn or is_projection)
    return model


def _swap_children(parent: torch.nn.Module, prefix: str, bits: int, group_size: int | None,
                   filter_fn: FilterFn) -> None:
    for child_name, child in list(parent.named_children()):
        name = f"{prefix}.{child_name}" if prefix else child_name
        if filter_fn(child, name):
            try:
                layer = QuantizedLinear.from_float(child.weight, child.bias, bits, group_size)
            except ValueError as err:
                raise ValueError(f"cannot quantize {name}: {err}") from err
            setattr(parent, child_name, layer)
            child.to("meta")  # free the float weight even if something else still holds the module
        else:
            _swap_children(child, name, bits, group_size, filter_fn)


def quantize_output_layer(model: torch.nn.Module, bits: int = 8) -> torch.nn.Module:
    """Quantize ``lm_head`` alone, per row, in place (opt-in: ChatGLM2 keeps it in float)."""
    return quantize(model, bits, filter_fn=lambda module, name: name == "lm_head")


# -- quantizing while a checkpoint streams in ---------------------------------------------------------
class ProjectionLoader:
    """A ``load_weights`` hook: gathers each projection's tensors, then puts a QuantizedLinear in place.

    Called with each GLM-named tensor; returns True for the tensors it took. Tensors of one
    projection may come in any order (and from different shards); the first ones wait until the set
    is complete. ``check_complete()`` after loading names any projection left waiting.
    """

    def __init__(self, model: torch.nn.Module, bits: int, *, group_size: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 prequantized: bool = False, mapped: bool = False, filter_fn: FilterFn | None = None):
        check_bits(bits, group_size)
        if prequantized and group_size is not None:
            raise ValueError("group_size does not apply to a pre-quantized checkpoint (its scales say it)")
        self.model, self.bits, self.group_size = model, bits, group_size
        self.device = torch.device(device)
        self.dtype = dtype  # the bias's; None: the float layer's (float32 on a meta-built model)
        self.prequantized = prequantized
        self.mapped = mapped  # keep the checkpoint's aligned tensors as they are (owned_aligned)
        self.filter_fn = filter_fn or is_projection
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def _wanted(self, module_name: str) -> set[str] | None:
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError:
            return None
        if not self.filter_fn(module, module_name):
            return None
        wanted = {"weight", "weight_scale"} if self.prequantized else {"weight"}
        return wanted | ({"bias"} if module.bias is not None else set())

    def __call__(self, name: str, tensor: torch.Tensor) -> bool:
        module_name, _, attr = name.rpartition(".")
        wanted = self._wanted(module_name)
        if wanted is None or attr not in wanted:
            return False
        parts = self.pending.setdefault(module_name, {})
        parts[attr] = tensor
        if set(parts) == wanted:
            del self.pending[module_name]
            self._place(module_name, parts)
        return True

    def _place(self, module_name: str, parts: dict[str, torch.Tensor]) -> None:
        old = self.model.get_submodule(module_name)
        bias = parts.get("bias")
        if bias is not None:
            bias = bias.to(self.device, self.dtype or old.bias.dtype)  # the load dtype: no cast per call
        if self.prequantized:
            weight, scale = parts["weight"].to(self.device), parts["weight_scale"].to(self.device)
            if not self.mapped and self.device.type == "cpu":
                # copies: the file's float tensors are converted, so its memory map must not be
                # kept open by these (its converted pages would stay resident with it)
                weight, scale = weight.clone(), scale.clone()
            layer = QuantizedLinear.from_thudm(weight, scale, bias, self.bits, mapped=self.mapped)
        else:
            weight = parts["weight"]
            if tuple(weight.shape) != (old.out_features, old.in_features):
                raise ValueError(f"{module_name}.weight has shape {tuple(weight.shape)}, but the model "
                                 f"expects {(old.out_features, old.in_features)}")
            try:  # on the CPU, where the checkpoint's tensor is; finished tensors move to the device
                layer = QuantizedLinear.from_float(weight.cpu(), bias, self.bits, self.group_size,
                                                   device=self.device)
            except ValueError as err:
                raise ValueError(f"cannot quantize {module_name}: {err}") from err
        if (layer.out_features, layer.in_features) != (old.out_features, old.in_features):
            raise ValueError(f"{module_name}: the checkpoint's {self.bits}-bit weight is "
                             f"{layer.out_features}x{layer.in_features}, the model expects "
                             f"{old.out_features}x{old.in_features}")
        parent_name, _, child_name = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child_name, layer)

    def check_complete(self) -> None:
        """Raise if a projection got some of its tensors but not all of them."""
        if self.pending:
            first = next(iter(self.pending.items()))
            raise ValueError(f"{len(self.pending)} projections are incomplete in the checkpoint, e.g. "
                             f"{first[0]} has only {sorted(first[1])}")


def make_load_hook(model: torch.nn.Module, bits: int, group_size: int | None = None, *,
                   device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> ProjectionLoader:
    """Quantize each projection as its float weight is read (peak memory: one float layer at a time),
    on the CPU whatever ``device`` the layers go to; biases in ``dtype``, the model's.

    >>> hook = make_load_hook(model, 4, device="cpu", dtype=torch.bfloat16)
    >>> load_weights(model, path, config, device=..., dtype=..., hook=hook); hook.check_complete()
    """
    return ProjectionLoader(model, bits, group_size=group_size, device=device, dtype=dtype)


def make_prequantized_hook(model: torch.nn.Module, bits: int, *, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None, mapped: bool = False) -> ProjectionLoader:
    """Place THUDM's pre-quantized ``weight`` (int8) + ``weight_scale`` tensors as they are read;
    ``mapped``: the checkpoint's float tensors are in ``dtype`` already, so every tensor of its memory
    map is kept and the codes may stay in it too (:func:`owned_aligned`)."""
    return ProjectionLoader(model, bits, device=device, dtype=dtype, prequantized=True, mapped=mapped)
