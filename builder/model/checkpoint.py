"""Load a ChatGLM2 checkpoint in THUDM's layout onto transformers' ``GlmForCausalLM``.

THUDM names are mapped onto GLM's as each shard is read, so peak host memory is about the model
plus one shard. Nothing here runs ``trust_remote_code``.

>>> from builder import load_chatglm2, TINY_CHECKPOINT
>>> model, tokenizer = load_chatglm2(TINY_CHECKPOINT)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import ChatGLM2Config

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")

# THUDM name (after `transformer.`) -> GLM name; `{i}` is the layer number.
_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "encoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.gate_up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}
_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
# Buffers THUDM saves that GLM recomputes.
_IGNORED = re.compile(r"(rotary_pos_emb\.inv_freq|\.rotary_emb\.inv_freq)$")


class CheckpointError(FileNotFoundError):
    """A checkpoint directory lacks a file it needs, or holds a tensor we cannot place."""


def map_thudm_tensor(name: str, tensor: torch.Tensor, config: ChatGLM2Config
                     ) -> list[tuple[str, torch.Tensor]]:
    """One THUDM tensor as the GLM tensors it becomes (the fused QKV splits in three).

    Works for a quantized checkpoint too: its ``weight`` / ``weight_scale`` rows split the same way.
    """
    if _IGNORED.search(name):
        return []
    if name.startswith(("model.", "lm_head.")):  # already GLM's names (glm-4-9b-chat-hf layout)
        return [(name, tensor)]
    short = name.removeprefix("transformer.")
    if short in _RENAMES:
        return [(_RENAMES[short], tensor)]
    match = _LAYER.match(name)
    if not match:
        raise CheckpointError(f"unexpected tensor {name!r} in checkpoint (not a ChatGLM2 weight)")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest.startswith("self_attention.query_key_value."):
        suffix = rest.removeprefix("self_attention.query_key_value.")
        # rows: [q: heads × kv_channels | k: groups × kv_channels | v: groups × kv_channels]
        q, k, v = tensor.split([config.q_size, config.kv_size, config.kv_size], dim=0)
        return [(f"{prefix}self_attn.{p}_proj.{suffix}", t.contiguous())
                for p, t in (("q", q), ("k", k), ("v", v))]
    for old, new in _LAYER_RENAMES.items():
        if rest == old or rest.startswith(old + "."):
            return [(prefix + new + rest[len(old):], tensor)]
    raise CheckpointError(f"unexpected tensor {name!r} in checkpoint (not a ChatGLM2 weight)")


def glm_to_thudm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GLM names back to THUDM's, fusing q/k/v again (used to write checkpoints)."""
    renames = {v: k for k, v in _RENAMES.items()}
    layer_renames = {v: k for k, v in _LAYER_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        if _IGNORED.search(name):
            continue
        if name in renames:
            out["transformer." + renames[name]] = tensor
            continue
        match = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
        if not match:
            raise ValueError(f"unexpected GLM tensor {name!r}")
        layer, rest = match.groups()
        prefix = f"transformer.encoder.layers.{layer}."
        qkv = re.match(r"^self_attn\.([qkv])_proj\.(.+)$", rest)
        if qkv:
            which, suffix = qkv.groups()
            pending_qkv.setdefault(f"{prefix}self_attention.query_key_value.{suffix}", {})[which] = tensor
            continue
        for new, old in layer_renames.items():
            if rest == new or rest.startswith(new + "."):
                out[prefix + old + rest[len(new):]] = tensor
                break
        else:
            raise ValueError(f"unexpected GLM tensor {name!r}")
    for name, parts in pending_qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight shards, from the index file when there is one."""
    for index_name in _INDEX_FILES:
        index = path / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are not in {path}: {missing}")
            return [path / n for n in names]
    for pattern in _WEIGHT_GLOBS:
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise CheckpointError(
        f"no weights in {path}: expected *.safetensors or pytorch_model*.bin shards "
        f"(optionally with {' or '.join(_INDEX_FILES)})")


def check_checkpoint(path: str | Path, family: str | None = None) -> ChatGLM2Config:
    """Check that ``path`` is a loadable GLM-family checkpoint and return its config, reading no
    weights. ``family``: a ``--family`` name instead of detecting it (builder.model.family)."""
    from .family import detect_family

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"checkpoint {path} is missing {[CONFIG_FILE]}; a ChatGLM2 checkpoint needs "
            f"{[CONFIG_FILE, TOKENIZER_FILE]} and weight shards (*.safetensors or pytorch_model*.bin)")
    found = detect_family(path, family)
    tokenizers = [found.tokenizer_file] + (["tokenizer.model", "tokenizer.json"] if found.kind == "glm4" else [])
    if not any((path / n).is_file() for n in tokenizers):
        raise CheckpointError(
            f"checkpoint {path} is missing {[found.tokenizer_file]}; a {found.name} checkpoint "
            f"needs {[CONFIG_FILE, found.tokenizer_file]} and weight shards (*.safetensors or "
            f"pytorch_model*.bin)")
    config = found.read_config(path)
    weight_files(path)
    return config


def iter_checkpoint_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(THUDM name, tensor) for every tensor, one shard in memory at a time."""
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as shard:
                for name in shard.keys():
                    yield name, shard.get_tensor(name)
        else:
            shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for name in list(shard):
                yield name, shard.pop(name)
            del shard


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU, float16 on CUDA (never bfloat16 by default: the P40 has none)."""
    return torch.float16 if device.type == "cuda" else torch.float32


BF16_COMPUTE_CAPABILITY = (8, 0)
"""bfloat16 arithmetic on NVIDIA GPUs starts with Ampere. ``torch.cuda.is_bf16_supported()`` says
True below it too (it counts emulation) and asks about the current device, not the target."""


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Fail before loading when ``device`` cannot compute in ``dtype``.

    >>> check_dtype(torch.bfloat16, torch.device("cuda:1"))  # on a P40 (6.1): ValueError
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if dtype == torch.bfloat16 and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < BF16_COMPUTE_CAPABILITY:
            raise ValueError(
                f"dtype bfloat16: {torch.cuda.get_device_name(device)} ({device}, compute "
                f"capability {capability[0]}.{capability[1]}) has no bfloat16 arithmetic (it needs "
                f"{BF16_COMPUTE_CAPABILITY[0]}.{BF16_COMPUTE_CAPABILITY[1]}); use float16")


# A hook that may replace a GLM tensor as it is loaded (the quantizer uses it). It gets the GLM name
# and the tensor and returns True when it has placed the tensor itself.
TensorHook = Callable[[str, torch.Tensor], bool]


def count_tensors(path: Path) -> int | None:
    """How many tensors the checkpoint holds, when that is cheap to know (index or safetensors)."""
    for index_name in _INDEX_FILES:
        if (path / index_name).is_file():
            return len(json.loads((path / index_name).read_text())["weight_map"])
    files = weight_files(path)
    if all(f.suffix == ".safetensors" for f in files):
        from safetensors import safe_open

        total = 0
        for file in files:
            with safe_open(str(file), framework="pt") as shard:
                total += len(shard.keys())
        return total
    return None


def load_weights(model: torch.nn.Module, path: Path, config: ChatGLM2Config, *,
                 device: torch.device, dtype: torch.dtype, hook: TensorHook | None = None,
                 progress=None) -> None:
    """Stream the checkpoint's tensors into ``model`` (built on the meta device).

    ``progress``: a tqdm-like bar; its total is set to the tensor count and it advances per tensor.
    """
    expected = {n for n, p in model.named_parameters()}
    loaded: set[str] = set()
    if progress is not None:
        progress.total = count_tensors(path)
        progress.refresh()
    for thudm_name, tensor in iter_checkpoint_tensors(path):
        if progress is not None:
            progress.update(1)
        for name, value in map_thudm_tensor(thudm_name, tensor, config):
            if hook is not None and hook(name, value):
                loaded.add(name)
                continue
            if name not in expected:
                raise CheckpointError(f"tensor {thudm_name!r} maps to {name!r}, which the model lacks")
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            old = getattr(module, attr)
            if tuple(old.shape) != tuple(value.shape):
                raise CheckpointError(
                    f"tensor {thudm_name!r} has shape {tuple(tensor.shape)}, but config.json implies "
                    f"{tuple(old.shape)} for {name}")
            cast = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
            setattr(module, attr, torch.nn.Parameter(cast, requires_grad=False))
            loaded.add(name)
    if hook is not None and hasattr(hook, "check_complete"):
        hook.check_complete()
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:5]}")


def build_empty_model(config: ChatGLM2Config, dtype: torch.dtype):
    """A ``GlmForCausalLM`` of this shape with no storage (meta tensors), ready to be filled."""
    from transformers import GlmForCausalLM

    glm_config = config.to_glm_config(dtype)
    with torch.device("meta"):
        model = GlmForCausalLM(glm_config)
    return model


def finish_model(model, device: torch.device, dtype: torch.dtype):
    """Recompute the rotary buffers lost on the meta device and put the model in eval mode."""
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    model.model.rotary_emb = GlmRotaryEmbedding(config=model.config).to(device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"model tensors were never loaded: {leftover[:5]}")
    model.config.dtype = dtype
    if device.type == "cpu":
        from .cpu_linear import use_row_inputs
        from .cpu_runtime import prepare_attention

        use_row_inputs(model)
        prepare_attention(dtype)
    return model.eval()


def load_chatglm2(path: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, bits: int = 16, group_size: int | None = None,
                  output_bits: int = 16, progress=None, family: str | None = None):
    """Load a ChatGLM2 checkpoint (THUDM layout) as ``(GlmForCausalLM, ChatGLM2Tokenizer)``.

    With ``bits`` 8 or 4 each projection is quantized as its shard is read, so peak host memory
    is about the quantized model plus one shard. A pre-quantized checkpoint (THUDM's int4/int8
    format, ``quantization_bit`` in config.json) loads as it is.

    >>> model, tokenizer = load_chatglm2("THUDM-chatglm2-6b/", device="cuda")  # float16
    >>> model, tokenizer = load_chatglm2("THUDM-chatglm2-6b/", bits=4)  # int4 on the CPU

    ``output_bits`` 8 also quantizes the output layer (``lm_head``, 65024 rows on the 6B) to int8 per
    row: half its bytes, which are most of a shallow decode step's fixed cost on the CPU. Opt-in:
    ChatGLM2's own int4/int8 keep it in float; ``docs/benchmarks.md`` has what it costs in fidelity.

    ChatGLM3 and GLM-4 checkpoints (and glm-4-9b-chat-hf in transformers' layout) load the same
    way, with their family's tokenizer; ``family`` names it instead of detecting it.
    """
    from .family import detect_family
    from .quantization import check_bits, make_load_hook, make_prequantized_hook

    path = Path(path)
    config = check_checkpoint(path, family)
    if bits != 16:
        check_bits(bits, group_size)
    if output_bits not in (16, 8):
        raise ValueError(f"output_bits must be 16 (float output layer) or 8, got {output_bits!r}")
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    check_dtype(dtype, device)
    tokenizer = detect_family(path, family).load_tokenizer(path)
    model = build_empty_model(config, dtype)
    hook = None
    if config.quantization_bit:
        if bits not in (16, config.quantization_bit):
            raise ValueError(f"bits={bits}: {path} holds weights quantized to "
                             f"{config.quantization_bit} bits (config.json quantization_bit); "
                             f"load it with bits={config.quantization_bit}")
        # A file in the dtype the model computes in is used whole from its memory map (the CPU
        # variants' --quantize-at build repositories): its codes need no copy either.
        mapped = device.type == "cpu" and config.torch_dtype == str(dtype).removeprefix("torch.")
        hook = make_prequantized_hook(model, config.quantization_bit, device=device, dtype=dtype,
                                      mapped=mapped)
    elif bits != 16:
        hook = make_load_hook(model, bits, group_size, device=device, dtype=dtype)
    load_weights(model, path, config, device=device, dtype=dtype, hook=hook, progress=progress)
    model = finish_model(model, device, dtype)
    if output_bits == 8:
        from .quantization import quantize_output_layer

        quantize_output_layer(model)
    release_free_memory(device)
    return model, tokenizer


def release_free_memory(device: torch.device) -> None:
    """Give back what loading freed but the allocators keep: glibc's free heap pages
    (``malloc_trim``), and on CUDA the caching allocator's unused blocks.

    Without it a process that quantized at load keeps tens to hundreds of MB of freed temporaries
    resident, a figure that depends on the host and the shard layout rather than the model.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): nothing to trim this way
    if device.type == "cuda":
        torch.cuda.empty_cache()


# safetensors' dtypes in the order its writer sorts them (its Dtype enum): the file holds the
# tensors by dtype, last first, then by name. Only what the header's length is predicted from.
_SAFETENSORS_DTYPES = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3",
                       "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_TORCH_TO_SAFETENSORS = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                         torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
                         torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
FILE_ALIGNMENT = 64
"""Where :func:`save_aligned` starts a file's tensor data: the CPU kernels' alignment
(:data:`~builder.model.quantization.KERNEL_ALIGNMENT`), so a code tensor read from the memory map is
used as it is (safetensors itself starts the data on an 8-byte boundary)."""


def _data_start(file: Path) -> int:
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _header_length(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """The length safetensors' writer gives the header of ``state`` (compact JSON, the tensors in
    its order, padded with spaces to 8 bytes): a prediction, checked by :func:`save_aligned`."""
    order = sorted(state, key=lambda name: (-_SAFETENSORS_DTYPES.index(_TORCH_TO_SAFETENSORS[state[name].dtype]),
                                            name))
    header, offset = {"__metadata__": metadata}, 0
    for name in order:
        tensor = state[name]
        end = offset + tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _TORCH_TO_SAFETENSORS[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, end]}
        offset = end
    length = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return -(-length // 8) * 8


def save_aligned(state: dict[str, torch.Tensor], file: Path) -> None:
    """``safetensors.torch.save_file(state, file)`` with the tensor data starting :data:`FILE_ALIGNMENT`
    bytes into the file, a ``padding`` metadata entry of spaces making up the difference. Tensors
    whose sizes are multiples of it (every projection of the GLM models) then start aligned too.
    The file stays a plain safetensors file; where the predicted header length is wrong (another
    safetensors), it is written once more with the measured one."""
    from safetensors.torch import save_file

    try:
        start = 8 + _header_length(state, {"format": "pt", "padding": ""})
    except (KeyError, ValueError):  # a dtype not in the tables: measured below instead
        start = 8
    padding = " " * ((-start) % FILE_ALIGNMENT)
    save_file(state, str(file), metadata={"format": "pt", "padding": padding})
    start = _data_start(file)
    if start % FILE_ALIGNMENT:
        padding += " " * ((-start) % FILE_ALIGNMENT)
        save_file(state, str(file), metadata={"format": "pt", "padding": padding})


def save_quantized(src: str | Path, dst: str | Path, bits: int, *, group_size: int | None = None,
                   progress=None, dtype: torch.dtype = torch.float16) -> Path:
    """Quantize checkpoint ``src`` once, offline, into ``dst`` in THUDM's int8/int4 format.

    ``dst`` gets ``config.json`` (with ``quantization_bit``), ``tokenizer.model`` and one
    safetensors file whose names and layout are THUDM's, so ``load_chatglm2(dst)`` and THUDM's own
    code both read it. Written to a temporary folder beside ``dst`` and moved into place at the end.

    ``dtype``: the unquantized tensors' (embedding, output layer, norms, biases; scales stay float16).
    float16 is THUDM's; ``torch.bfloat16`` for a repository served by the CPU variants, which compute
    in bfloat16: they then use the embedding and output layer (1 GB of the 6B) straight from the
    file's memory map instead of converting them at every start.

    >>> save_quantized("chatglm2-6b/", "chatglm2-6b-int4/", 4)
    >>> save_quantized("chatglm2-6b/", "chatglm2-6b-int4-cpu/", 4, dtype=torch.bfloat16)
    """
    import dataclasses
    import shutil
    import tempfile

    src, dst = Path(src), Path(dst)
    if group_size is not None:
        raise ValueError(f"group_size={group_size}: THUDM's format stores one scale per row; "
                         "save group-wise weights is not supported (quantize at initialize instead)")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    model, _ = load_chatglm2(src, bits=bits, dtype=dtype, progress=progress)
    config = dataclasses.replace(check_checkpoint(src), quantization_bit=bits,
                                 torch_dtype=str(dtype).removeprefix("torch."))
    state = glm_to_thudm({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}-"))
    try:
        save_aligned(state, staging / "model.safetensors")
        shutil.copy(src / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst
