"""How much device memory a ChatGLM2 variant needs, term by term, checked against THUDM's table.

One process serving one variant holds four things, each a small pure function below:

- **weights** (:func:`weight_bytes`): exact, from the config and the quantization scheme;
- **KV cache** (:func:`kv_cache_bytes`): K and V of every layer for every token so far;
- **activations** (:func:`activation_bytes`): the largest set of temporaries alive at once during
  the phase's biggest forward pass (:func:`activation_steps` lists them step by step);
- **overhead** (:func:`overhead_bytes`): the process itself — CUDA context and caching-allocator
  reserve on a GPU, the interpreter with torch and transformers on a CPU.

:func:`estimate_breakdown` returns them as a :class:`MemoryEstimate`; :func:`estimate_memory`
returns the total. On CUDA the activation and overhead terms follow THUDM's ChatGLM2
implementation (transformers 4.30, PyTorch 2.0 SDPA, ``cpm_kernels`` for int8/int4), the one that
produced :data:`PUBLISHED_TABLE`, and are calibrated so that every cell of that table comes out
within a few percent for :data:`builder.CHATGLM2_6B`. On a CPU they follow this package's runtime
and glibc's heap, calibrated with ``glm-build profile`` (docs/memory.md).

>>> from builder import CHATGLM2_6B
>>> round(estimate_memory(CHATGLM2_6B, 16, 2048, "encode") / TABLE_UNIT_BYTES, 1)
13.1
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..model.config import ChatGLM2Config
from ..model.extraction import cuda_extract_bytes

MIB = 2**20
GIB = 2**30

TABLE_UNIT_BYTES = GIB
"""The "GB" of THUDM's table is a GiB (2^30 bytes).

The fp16 weights of ChatGLM2-6B are 6.24e9 parameters × 2 bytes = 12.49e9 bytes = 11.63 GiB.
Read as 10^9 bytes, "generate 8192: 12.8 GB" would leave 0.31e9 bytes above the weights: barely
the 0.235e9-byte KV cache, with nothing for the CUDA context (≥ 0.3e9 on any GPU) nor for the
0.13e9 bytes of K/V that THUDM's code expands per step — and the int8 and int4 rows would then
need ~1e9 bytes beyond their weights that the fp16 row does not. Read as GiB, every row leaves
0.9–1.5e9 bytes above weights + KV cache + live temporaries: a torch process's CUDA context with
its allocator reserve (~0.9e9 on an A100), plus the dequantization buffers of the int8/int4
kernels. Only the GiB reading makes the six cells consistent with each other.
"""

PRECISION_BITS = {"fp16": 16, "int8": 8, "int4": 4}
"""Variant name → ``bits`` (16 means not quantized: weights stored at ``dtype_bytes`` each)."""

PUBLISHED_TABLE: dict[str, dict[str, tuple[int, int]]] = {
    precision: {
        "encode": (2048, round(encode_gb * TABLE_UNIT_BYTES)),
        "generate": (8192, round(generate_gb * TABLE_UNIT_BYTES)),
    }
    for precision, encode_gb, generate_gb in (
        ("fp16", 13.1, 12.8),
        ("int8", 8.2, 8.1),
        ("int4", 5.5, 5.1),
    )
}
"""ChatGLM2-6B README, "推理性能": precision → phase → (tokens, bytes).

Measured by THUDM on an A100-SXM4-80G with PyTorch 2.0.1 (SDPA attention), batch 1. The table says
"minimum memory to encode 2048 tokens" and "to generate 8192 tokens".
"""

PHASES = ("encode", "generate")
DEVICES = ("cuda", "cpu")

CUDA_CONTEXT_BYTES = 512 * MIB
"""CUDA context of a torch process on an Ampere/Hopper GPU with lazy module loading (the default
in PyTorch 2.x): the driver's context plus the kernels torch loads on first use, as nvidia-smi
shows it. Pascal is lower (~350 MiB); the GPU profiles carry a figure per architecture."""

ALLOCATOR_RESERVE_BYTES = 384 * MIB
"""Memory the caching allocator holds beyond live tensors (block rounding, cached free blocks,
cuBLAS workspaces). Calibrated on the fp16 row of the published table, which leaves 0.95e9 and
0.89e9 bytes above weights + KV cache + live temporaries: less the 0.54e9-byte context, ~0.4e9."""

DEFAULT_CUDA_PROCESS_OVERHEAD = CUDA_CONTEXT_BYTES + ALLOCATOR_RESERVE_BYTES
"""Per-process overhead on the table's A100; the ``a100-80gb`` profile carries the same figure."""



CPU_PROCESS_OVERHEAD = 400 * MIB
"""Resident set of a Python process that has imported torch 2.13 (CPU) and transformers 5 and
this package, before any weights: 397 MiB measured on the development machine."""

# The CPU terms follow this package's runtime (transformers' GlmForCausalLM, torch's CPU kernels,
# glibc's malloc) as `glm-build profile` measures it on ChatGLM2-6B's real shapes; docs/memory.md
# has the figures. The CUDA terms keep THUDM's runtime: they are calibrated on its table.

CPU_RESIDUAL_COPIES = 4
"""``[q, hidden]`` tensors alive through a CPU forward: the decoder layer's input (the loop over
layers holds it), its post-attention sum, the MLP's normed input, and the embeddings
``GlmModel.forward`` keeps for the whole pass. torch.profiler's live-bytes peak of a 512- and a
1024-token prefill (70.6 and 141.3 MiB) is the SwiGLU step plus exactly four of them."""

GLIBC_MMAP_THRESHOLD_MAX = 32 * MIB
"""glibc's malloc serves blocks this large or larger with ``mmap`` and unmaps them when freed (its
dynamic threshold rises to this after the first large free); smaller blocks come from its heap,
where a freed block stays resident while a live one lies above it."""

@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one serving process needs, by term; ``total`` is their sum.

    >>> from builder import CHATGLM2_6B
    >>> e = estimate_breakdown(CHATGLM2_6B, 4, 8192, "generate")
    >>> e.total == e.weights + e.kv_cache + e.activations + e.overhead
    True
    """

    weights: int  # parameters in their stored format, scales included
    kv_cache: int  # K and V of every layer for every token of the request
    activations: int  # peak of the temporaries alive at once in the phase's largest forward
    overhead: int  # the process: CUDA context + allocator reserve (+ dequant block), or RSS base

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


# -- weights ----------------------------------------------------------------------------------
def quantized_projections(config: ChatGLM2Config) -> dict[str, tuple[int, int]]:
    """(rows, cols) = (out_features, in_features) of the four projections quantized per layer.

    >>> from builder import CHATGLM2_6B
    >>> quantized_projections(CHATGLM2_6B)["dense_h_to_4h"]
    (27392, 4096)
    """
    h, ffn = config.hidden_size, config.ffn_hidden_size
    return {
        "query_key_value": (config.qkv_size, h),  # heads×kv + 2×groups×kv rows
        "dense": (h, h),
        "dense_h_to_4h": (2 * ffn, h),  # gate and up fused (SwiGLU)
        "dense_4h_to_h": (h, ffn),
    }


def plain_parameters(config: ChatGLM2Config) -> int:
    """Parameters never quantized: embedding, output layer, RMSNorm weights, the QKV bias.

    >>> from builder import CHATGLM2_6B
    >>> plain_parameters(CHATGLM2_6B)
    533039104
    """
    h = config.hidden_size
    per_layer = 2 * h + (config.qkv_size if config.add_qkv_bias else 0)  # two norms, QKV bias
    return 2 * config.padded_vocab_size * h + config.num_layers * per_layer + h  # + final norm


def weight_bytes(config: ChatGLM2Config, bits: int, *, group_size: int | None = None,
                 dtype_bytes: int = 2, device: str = "cuda") -> int:
    """Bytes of all parameters in the format the variant keeps them in.

    ``bits=16``: every parameter at ``dtype_bytes`` (2 for fp16/bf16, 4 for fp32 on a CPU).
    ``bits=8|4``: the four projections of every layer at ``bits/8`` bytes per weight plus their
    scales; everything else at ``dtype_bytes``. Scales on CUDA (THUDM's ``QuantizedLinear``): one
    per output row, or per ``group_size`` inputs for group-wise int4, in the model dtype. On a CPU
    the kernels' formats: int8 with one bf16 scale per row; int4 in THUDM's layout (glm-build's CPU
    kernel, the default where it is built: ``builder.model.cpu_kernels``), packed at half a byte per
    weight (0.25× fp16) with THUDM's fp16 scales, one per row or per ``group_size`` inputs.

    >>> from builder import CHATGLM2_6B
    >>> weight_bytes(CHATGLM2_6B, 16)
    12487168000
    """
    _check_scheme(bits, group_size, dtype_bytes, device)
    plain = plain_parameters(config) * dtype_bytes
    total = 0
    for rows, cols in quantized_projections(config).values():
        if bits == 16:
            total += rows * cols * dtype_bytes
        elif device == "cuda":
            groups = 1 if group_size is None else math.ceil(cols / group_size)
            total += rows * math.ceil(cols * bits / 8) + rows * groups * dtype_bytes
        elif bits == 8:
            total += rows * cols + rows * 2  # int8 + bf16 scale per row
        else:
            groups = 1 if group_size is None else math.ceil(cols / group_size)
            total += rows * math.ceil(cols / 2) + groups * rows * 2  # packed + fp16 scales
    return config.num_layers * total + plain


# -- KV cache ---------------------------------------------------------------------------------
def kv_cache_bytes(config: ChatGLM2Config, tokens: int, *, dtype_bytes: int = 2) -> int:
    """K and V of every layer for ``tokens`` positions: layers × 2 × groups × kv_channels × tokens.

    Multi-query attention keeps only ``multi_query_group_num`` K/V heads (2 for the 6B), so 8192
    tokens of the 6B take 235 MB — small beside its weights.

    >>> from builder import CHATGLM2_6B
    >>> kv_cache_bytes(CHATGLM2_6B, 8192)
    234881024
    """
    return config.num_layers * 2 * config.kv_size * tokens * dtype_bytes


# -- activations ------------------------------------------------------------------------------
def activation_steps(config: ChatGLM2Config, bits: int, tokens: int, phase: str, *,
                     dtype_bytes: int = 2, device: str = "cuda", sdpa: bool = True,
                     all_logits: bool = True, batch: int = 1) -> dict[str, int]:
    """Temporaries alive at once at each step of the phase's largest forward, in bytes.

    The largest forward of ``encode`` is the prefill: ``tokens`` queries over ``tokens`` keys.
    That of ``generate`` is its last step: one query over ``tokens`` keys. The residual stream is
    counted separately by :func:`activation_bytes`. Steps, as THUDM's code allocates them:

    - a projection: its input and output; on CUDA with int8/int4, ``cpm_kernels`` first
      dequantizes the whole weight to fp16 (``extract_weight_to_half``), a transient as large as
      the fp16 weight (224 MB for the 6B's ``dense_h_to_4h``), which dominates ``generate``.
      This package's CUDA path dequantizes by row blocks instead (:func:`cuda_extract_bytes`);
      the larger of the two is counted, so the estimate holds for either runtime;
    - attention: Q/K/V after rotary, K and V expanded from the groups to all heads for every
      cached key (THUDM's ``expand(...).contiguous()``), the context; plus, without SDPA (torch
      < 2), the ``[heads, q, k]`` scores in the model dtype and their fp32 softmax (two copies);
    - SwiGLU: the ``[q, 2·ffn]`` projection output with its SiLU half and the product;
    - logits: ``output_layer`` for every prompt position and the ``transpose().contiguous()``
      copy THUDM's forward makes — ``[q, vocab]`` twice, the peak of ``encode``. Pass
      ``all_logits=False`` for runtimes that keep only the last position (transformers'
      ``generate`` with ``logits_to_keep=1``).
    """
    _check_phase(tokens, phase)
    _check_scheme(bits, None, dtype_bytes, device)
    d = dtype_bytes
    # query positions in the largest forward: a decode step of a running batch has one per request
    q = tokens if phase == "encode" else batch
    k = tokens  # key positions each attends to
    h, ffn, heads = config.hidden_size, config.ffn_hidden_size, config.num_attention_heads
    dequantize = bits < 16 and device == "cuda"

    def project(rows: int, cols: int) -> int:  # input [q, cols] + dequantized weight + output [q, rows]
        extract = max(rows * cols * d, cuda_extract_bytes(rows, cols, bits, q)) if dequantize else 0
        return q * cols * d + extract + q * rows * d

    scores = 0 if sdpa else heads * q * k * (d + 4 + 4)  # [heads, q, k]: dtype, fp32, softmax
    proj = quantized_projections(config)
    return {
        "query_key_value": project(*proj["query_key_value"]),
        "attention": q * config.qkv_size * d + (q if phase == "generate" else 1) * 2 * k * h * d
                     + q * h * d + scores,
        "dense": project(*proj["dense"]),
        "dense_h_to_4h": project(*proj["dense_h_to_4h"]),
        "swiglu": q * 4 * ffn * d,  # [q, 2ffn] + silu [q, ffn] + product [q, ffn]
        "dense_4h_to_h": project(*proj["dense_4h_to_h"]),
        "logits": (q if all_logits else 1) * config.padded_vocab_size * 2 * d,
    }


def activation_bytes(config: ChatGLM2Config, bits: int, tokens: int, phase: str, *,
                     dtype_bytes: int = 2, device: str = "cuda", sdpa: bool = True,
                     all_logits: bool = True, batch: int = 1) -> int:
    """The phase's activation peak: the residual stream plus the largest step.

    The residual stream is the hidden states and the residual, ``[q, hidden]`` each
    (:data:`CPU_RESIDUAL_COPIES` of them on a CPU, plus :func:`cpu_heap_bytes` there); steps are
    sequential, so only the largest one adds to it (see :func:`activation_steps`). This is why
    the table's ``generate`` cells are *smaller* than its ``encode`` ones: encoding 2048 tokens
    peaks on 0.53e9 bytes of logits, while at 8192 tokens the multi-query KV cache is only
    0.235e9 bytes and one decoding step's temporaries at most 0.22e9.
    """
    steps = activation_steps(config, bits, tokens, phase, dtype_bytes=dtype_bytes,
                             device=device, sdpa=sdpa, all_logits=all_logits, batch=batch)
    q = tokens if phase == "encode" else batch
    if device == "cpu":
        residual = CPU_RESIDUAL_COPIES * q * config.hidden_size * dtype_bytes
        return residual + max(steps.values()) + cpu_heap_bytes(config, tokens, phase,
                                                               dtype_bytes=dtype_bytes)
    return 2 * q * config.hidden_size * dtype_bytes + max(steps.values())


def cpu_heap_bytes(config: ChatGLM2Config, tokens: int, phase: str, *,
                   dtype_bytes: int = 2) -> int:
    """What glibc's heap holds beyond the live tensors at a CPU forward's peak: one freed block,
    a ``[q, ffn]`` SwiGLU half, at most :data:`GLIBC_MMAP_THRESHOLD_MAX`.

    Blocks below the mmap threshold come from the heap, and a layer's freed ones are still
    resident when the next layer allocates its own above them: the resident set peaks above the
    live bytes by about one SwiGLU half (the SiLU output or the product, ``[q, ffn]`` each) while
    that is heap-sized, and by about the threshold once larger blocks are mmapped and returned
    on free. Measured over torch.profiler's live bytes on the 6B's shapes: 18.4 MiB at 512 tokens,
    29.7 at 1024, 37 at 2048 (this gives 13.4, 26.8 and 32).

    >>> from builder import CHATGLM2_6B
    >>> cpu_heap_bytes(CHATGLM2_6B, 1024, "encode") == 1024 * 13696 * 2
    True
    >>> cpu_heap_bytes(CHATGLM2_6B, 8192, "encode") == GLIBC_MMAP_THRESHOLD_MAX
    True
    """
    q = tokens if phase == "encode" else 1
    return min(q * config.ffn_hidden_size * dtype_bytes, GLIBC_MMAP_THRESHOLD_MAX)


# -- overhead ---------------------------------------------------------------------------------
def overhead_bytes(config: ChatGLM2Config, bits: int, *, dtype_bytes: int = 2,
                   device: str = "cuda", process_overhead: int | None = None) -> int:
    """What the process costs beyond tensors in use.

    On CUDA: ``process_overhead`` (a GPU profile's figure; default
    :data:`DEFAULT_CUDA_PROCESS_OVERHEAD`, the table's A100), and for int8/int4 one more block the
    size of the largest dequantized fp16 weight: the caching allocator keeps the freed
    dequantization buffer cached, and once later allocations split it the next dequantization
    needs a fresh one. That block is calibrated, not derived: the published int8/int4 cells need
    0.17–0.54e9 bytes (0.41e9 on average) more overhead than the fp16 ones; this block (0.22e9
    for the 6B) is the part with an explanation, and the rest is why those rows come out 1–3.5%
    low. This package's CUDA path keeps less cached (its row blocks, :func:`cuda_extract_bytes`);
    the larger of the two is counted. Loading leaves nothing reserved: int8/int4 are quantized
    on the CPU and only finished tensors move to the GPU, and ``load_chatglm2`` empties the
    caching allocator afterwards (``builder.model.checkpoint.release_free_memory``).

    On a CPU: ``process_overhead`` or :data:`CPU_PROCESS_OVERHEAD`, the interpreter's resident
    set; glibc returns freed blocks of 32 MiB and more to the system, so there is no allocator
    reserve to speak of. Quantizing at load leaves none either: it works a block of rows at a
    time and the loader hands the heap's free pages back (``malloc_trim``) when it is done.
    """
    _check_scheme(bits, None, dtype_bytes, device)
    if process_overhead is not None and (not isinstance(process_overhead, int)
                                         or process_overhead < 0):
        raise ValueError(f"process_overhead must be a non-negative integer of bytes, "
                         f"got {process_overhead!r}")
    if device == "cpu":
        base = CPU_PROCESS_OVERHEAD if process_overhead is None else process_overhead
        return base
    base = DEFAULT_CUDA_PROCESS_OVERHEAD if process_overhead is None else process_overhead
    if bits == 16:
        return base
    projections = quantized_projections(config).values()
    largest = max(rows * cols for rows, cols in projections)
    cached = max(cuda_extract_bytes(rows, cols, bits) for rows, cols in projections)
    return base + max(largest * dtype_bytes, cached)


# -- CUDA graphs in the continuous batcher ----------------------------------------------------------
def cuda_graph_bytes(config: ChatGLM2Config, bits: int, step: int, request_tokens: int,
                     pool_tokens: int, *, dtype_bytes: int = 2, async_batching: bool = True) -> int:
    """What capturing the batcher's steps in CUDA graphs (``builder.serving.batcher``) adds on a
    GPU, beside the KV pool and the batcher's own buffers:

    - the graphs' private memory pool: warm-up captures the largest step first, ``step`` query
      tokens against one request of ``request_tokens`` already cached, and every later graph
      (the padded buckets: more rows or keys than a step has, never more than this largest one)
      is captured into the same pool. It holds that step's temporaries for the life of the
      process, apart from the caching allocator's cache, which still serves the eager work: a
      prefill chunk's activations (:func:`activation_bytes`, logits of the last position only)
      plus K and V read back from the cache and expanded from the groups to every head
      (``2 × request_tokens × hidden``), as paged SDPA with a mask does;
    - with async batching, the second set of the step's inputs: the ``[step, pool + step]``
      attention mask (counted in float32, as ``builder.plan.placement.batcher_buffer_bytes`` counts the
      first) and the per-token index tensors (int32 inputs, int64 read/write indices).

    Per-graph driver memory (the instantiated graphs themselves) is not counted: unmeasured.

    >>> from builder import CHATGLM2_6B
    >>> cuda_graph_bytes(CHATGLM2_6B, 4, 512, 2048, 4096, async_batching=False) < GIB
    True
    """
    _check_scheme(bits, None, dtype_bytes, "cuda")
    for name, value in (("step", step), ("request_tokens", request_tokens),
                        ("pool_tokens", pool_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer of tokens, got {value!r}")
    pool = (activation_bytes(config, bits, step, "encode", dtype_bytes=dtype_bytes,
                             all_logits=False)
            + 2 * request_tokens * config.hidden_size * dtype_bytes)
    second_inputs = 0
    if async_batching:
        second_inputs = (step * (pool_tokens + step) * 4  # attention mask
                         + step * 8 * 4  # input ids, positions, ... and output ids (int32)
                         + (pool_tokens + 2 * step) * 8)  # read and write indices (int64)
    return pool + second_inputs


# -- the estimate ------------------------------------------------------------------------------
def estimate_breakdown(config: ChatGLM2Config, bits: int, tokens: int, phase: str, *,
                       group_size: int | None = None, dtype_bytes: int = 2, device: str = "cuda",
                       process_overhead: int | None = None, sdpa: bool = True,
                       all_logits: bool = True, concurrency: int = 1) -> MemoryEstimate:
    """Every term of :func:`estimate_memory`, for reports.

    ``bits``: 16 (not quantized), 8 or 4 (ChatGLM's weight-only scheme, ``group_size`` for a
    group-wise int4). ``phase``: ``"encode"`` (one prefill of ``tokens``) or ``"generate"``
    (decoding until ``tokens`` in total; a long prompt's prefill is an ``encode`` of the prompt,
    so a request needs the larger of the two). ``dtype_bytes``: the unquantized weights',
    activations' and KV cache's element size (2: fp16/bf16; 4: fp32 on a CPU). ``device``:
    ``"cuda"`` or ``"cpu"``. ``process_overhead``: a GPU profile's per-process figure.
    ``sdpa=False``: torch < 2's naive attention with the full score matrix. Tokens past
    ``config.seq_length`` are estimated all the same; capping them is the caller's business.
    ``concurrency``: that many requests of ``tokens`` in one running batch (continuous
    batching): each holds its KV cache; a decode step works on one row per request (its
    temporaries grow with them, a dequantized weight does not), while prefills run one at a time.

    >>> from builder import CHATGLM2_6B
    >>> e = estimate_breakdown(CHATGLM2_6B, 8, 2048, "encode")
    >>> e.weights < e.total
    True
    """
    _check_phase(tokens, phase)
    _check_scheme(bits, group_size, dtype_bytes, device)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    activations = activation_bytes(config, bits, tokens, phase, dtype_bytes=dtype_bytes,
                                   device=device, sdpa=sdpa, all_logits=all_logits,
                                   batch=concurrency)  # decode rows (encode: one prefill)
    return MemoryEstimate(
        weights=weight_bytes(config, bits, group_size=group_size, dtype_bytes=dtype_bytes,
                             device=device),
        kv_cache=concurrency * kv_cache_bytes(config, tokens, dtype_bytes=dtype_bytes),
        activations=activations,
        overhead=overhead_bytes(config, bits, dtype_bytes=dtype_bytes, device=device,
                                process_overhead=process_overhead),
    )


def estimate_memory(config: ChatGLM2Config, bits: int, tokens: int, phase: str, *,
                    group_size: int | None = None, dtype_bytes: int = 2, device: str = "cuda",
                    process_overhead: int | None = None, sdpa: bool = True,
                    all_logits: bool = True, concurrency: int = 1) -> int:
    """Bytes one process needs to serve ``config`` at ``bits`` for ``tokens`` in ``phase``
    (``concurrency`` such requests at once).

    The sum of :func:`estimate_breakdown`'s terms; same arguments.

    >>> from builder import CHATGLM2_6B
    >>> round(estimate_memory(CHATGLM2_6B, 4, 8192, "generate") / GIB, 2)
    5.17
    """
    return estimate_breakdown(config, bits, tokens, phase, group_size=group_size,
                              dtype_bytes=dtype_bytes, device=device,
                              process_overhead=process_overhead, sdpa=sdpa,
                              all_logits=all_logits, concurrency=concurrency).total


# -- argument checks ---------------------------------------------------------------------------
def _check_phase(tokens: int, phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")


def _check_scheme(bits: int, group_size: int | None, dtype_bytes: int, device: str) -> None:
    if bits not in (16, 8, 4) or isinstance(bits, bool):
        raise ValueError(f"bits must be 16 (not quantized), 8 or 4, got {bits!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if dtype_bytes not in (2, 4) or isinstance(dtype_bytes, bool):
        raise ValueError(f"dtype_bytes must be 2 (fp16/bf16) or 4 (fp32), got {dtype_bytes!r}")
    if group_size is not None:
        if bits != 4:
            raise ValueError(f"group_size is for group-wise int4 only, got group_size="
                             f"{group_size!r} with bits={bits}")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
