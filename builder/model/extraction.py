"""How this package's CUDA path dequantizes an int8/int4 projection: by row blocks of a fixed size.

The kernel (:mod:`.cuda_quant`) and the memory estimate (:mod:`builder.plan.memory`) both read
these figures, so the plan counts exactly the blocks the kernel allocates. Nothing here imports
torch.
"""
from __future__ import annotations

MIB = 2**20

CUDA_EXTRACT_BLOCK_BYTES = 64 * MIB
"""fp16 bytes of one projection's weight that this package's CUDA path dequantizes at once
(:mod:`builder.model.cuda_quant`): the 6B's ``dense_h_to_4h`` (224 MB in fp16) in four blocks, its
``dense_4h_to_h`` in two, the rest in one. THUDM's ``cpm_kernels`` extract the whole weight."""


def cuda_extract_rows(rows: int, cols: int) -> int:
    """Rows of a [rows, cols] projection that this package's CUDA path dequantizes at once: as
    many as fit :data:`CUDA_EXTRACT_BLOCK_BYTES` in fp16, at least one.

    >>> cuda_extract_rows(27392, 4096), cuda_extract_rows(4608, 4096)
    (8192, 4608)
    """
    return min(rows, max(1, CUDA_EXTRACT_BLOCK_BYTES // (cols * 2)))


def cuda_extract_bytes(rows: int, cols: int, bits: int, tokens: int = 0) -> int:
    """Temporaries of one int8/int4 projection's forward on this package's CUDA path
    (:mod:`builder.model.cuda_quant`), beyond its input and output: one fp16 block of
    :func:`cuda_extract_rows` rows (codes times scales written straight into it), for int4 one
    ``[block, cols/2]`` int8 nibble plane beside it, and, when the weight takes more than one
    block, the block's ``[tokens, block]`` fp16 output before it is copied into place.

    With ``tokens=0`` it is what the caching allocator keeps cached between forwards (the
    blocks are the same size every time, so they are reused, and :func:`overhead_bytes` counts
    them as reserved). The fused kernel (CuPy, decode steps) needs none of it; prefills still do.

    >>> cuda_extract_bytes(27392, 4096, 8) == 8192 * 4096 * 2
    True
    """
    block = cuda_extract_rows(rows, cols)
    nibbles = block * cols // 2 if bits == 4 else 0
    output = tokens * block * 2 if block < rows else 0
    return block * cols * 2 + nibbles + output
