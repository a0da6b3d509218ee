"""A random-weight checkpoint in THUDM's layout with ChatGLM2-6B's real layer shapes, for benchmarks.

No checkpoint of the real model can be downloaded here, so speed and peak-memory measurements run
on this: every tensor has the 6B's shape (hidden 4096, FFN 13696, 32 heads × 128, 2 K/V groups,
vocab 65024), only ``num_layers`` is smaller. It is written one shard at a time (embedding, one
shard per ``shard_layers`` decoder layers, then the final norm and output layer) so writing it never
holds more than one shard, like the real checkpoint's ``pytorch_model-0000N-of-00007`` files.
``layout`` picks how it is cut: ``per-layer`` (safetensors, one shard per ``shard_layers`` layers),
``single`` (one ``model.safetensors``: a real 6B shard is 1.8–2 GB, a 2-layer checkpoint is one
1.9 GB file) or ``bin`` (the per-layer cut as ``pytorch_model-0000N-of-0000M.bin`` with THUDM's
``pytorch_model.bin.index.json``).

>>> path = write_synthetic_checkpoint("/tmp/glm-2l", num_layers=2)   # ~1.9 GB of fp16
>>> model, _ = load_chatglm2(path, bits=4, dtype=torch.bfloat16)
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from .config import CHATGLM2_6B, ChatGLM2Config

INDEX_FILE = "model.safetensors.index.json"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
LAYOUTS = ("per-layer", "single", "bin")


def layer_tensors(config: ChatGLM2Config, layer: int, g: torch.Generator,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors under THUDM's names: projections ~ N(0, 0.02²), norms ~ 1."""
    H, F = config.hidden_size, config.ffn_hidden_size
    p = f"transformer.encoder.layers.{layer}."
    shapes = {"self_attention.query_key_value.weight": (config.qkv_size, H),
              "self_attention.dense.weight": (H, H),
              "mlp.dense_h_to_4h.weight": (2 * F, H),  # [gate; up]
              "mlp.dense_4h_to_h.weight": (H, F)}
    out = {p + name: _normal(shape, 0.02, g, dtype) for name, shape in shapes.items()}
    if config.add_qkv_bias:
        out[p + "self_attention.query_key_value.bias"] = _normal((config.qkv_size,), 0.02, g, dtype)
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        out[p + norm] = 1 + _normal((H,), 0.05, g, dtype)
    return out


def _output_layer(vocab: int, hidden: int, g: torch.Generator, dtype: torch.dtype,
                  tokenizer) -> torch.Tensor:
    """N(0, 0.02²) rows for the ids ``tokenizer`` has text for, zero rows past them and for the
    stop ids: greedy decoding then picks ids it can decode, so answers (noise) stream as text, as a
    real model's would, and never stop before ``max_length`` (a fixed amount of work), while every
    matmul keeps the real model's shape."""
    weight = _normal((vocab, hidden), 0.02, g, dtype)
    weight[getattr(tokenizer, "n_sp", None) or tokenizer.n_ranks:] = 0
    weight[[i for i in tokenizer.stop_ids if i < vocab]] = 0
    return weight


def write_tokenizer(path: Path, family: str) -> None:
    """A small tokenizer of ``family``'s kind into ``path``: the embedded tiny model's
    sentencepiece ``tokenizer.model`` (with ChatGLM3's ``tokenizer_config.json``), or for GLM-4 a
    byte-level tiktoken ``tokenizer.model`` (256 ranks: every text encodes, one id per byte)."""
    import base64

    from .. import TINY_CHECKPOINT
    from .family import TOKENIZER_CONFIG_FILE, get_family

    kind = get_family(family).kind
    if kind == "glm4":
        (path / "tokenizer.model").write_text(
            "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
        return
    shutil.copy(TINY_CHECKPOINT / "tokenizer.model", path / "tokenizer.model")
    if kind == "chatglm3":
        (path / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"name_or_path": f"THUDM/{family}"}))


def _normal(shape: tuple[int, ...], std: float, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * std).to(dtype)


def write_synthetic_checkpoint(path: str | Path, *, num_layers: int = 2,
                               config: ChatGLM2Config = CHATGLM2_6B, seed: int = 0,
                               dtype: torch.dtype = torch.float16, shard_layers: int = 1,
                               layout: str = "per-layer", family: str = "chatglm2-6b") -> Path:
    """Write a random checkpoint of ``family`` (THUDM's layout) with ``config``'s shapes and
    ``num_layers`` layers.

    ``path`` gets ``config.json``, a small tokenizer of the family's kind (:func:`write_tokenizer`:
    its vocabulary is far smaller than the model's, so feed token ids directly), safetensors shards
    and ``model.safetensors.index.json``. Deterministic for a given ``seed``.

    >>> write_synthetic_checkpoint("/tmp/glm-4l", num_layers=4)
    """
    from safetensors.torch import save_file

    from .family import get_family

    if num_layers < 1 or shard_layers < 1:
        raise ValueError(f"num_layers and shard_layers must be ≥ 1, got {num_layers} and {shard_layers}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    config = dataclasses.replace(config, num_layers=num_layers, quantization_bit=0,
                                 torch_dtype=str(dtype).removeprefix("torch."))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path, family)
    tokenizer = get_family(family).load_tokenizer(path)
    g = torch.Generator().manual_seed(seed)
    H, V = config.hidden_size, config.padded_vocab_size
    layer_groups = [range(i, min(i + shard_layers, num_layers)) for i in range(0, num_layers, shard_layers)]
    count = len(layer_groups) + 2
    weight_map: dict[str, str] = {}
    total_size = 0

    single: dict[str, torch.Tensor] = {}

    def write(number: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total_size
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        if layout == "single":
            single.update(tensors)
            return
        if layout == "bin":
            file = f"pytorch_model-{number:05d}-of-{count:05d}.bin"
            torch.save(tensors, path / file)
        else:
            file = f"model-{number:05d}-of-{count:05d}.safetensors"
            save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))

    write(1, {"transformer.embedding.word_embeddings.weight": _normal((V, H), 0.02, g, dtype)})
    for number, layers in enumerate(layer_groups, start=2):
        shard: dict[str, torch.Tensor] = {}
        for layer in layers:
            shard |= layer_tensors(config, layer, g, dtype)
        write(number, shard)
        del shard
    write(count, {"transformer.encoder.final_layernorm.weight": 1 + _normal((H,), 0.05, g, dtype),
                  "transformer.output_layer.weight": _output_layer(V, H, g, dtype, tokenizer)})
    if layout == "single":
        save_file(single, str(path / "model.safetensors"), metadata={"format": "pt"})
        del single
    else:
        (path / (BIN_INDEX_FILE if layout == "bin" else INDEX_FILE)).write_text(json.dumps(
            {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2))
    raw = {k: v for k, v in config.to_dict().items() if k != "rope_scheme"}  # not a THUDM field
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return path
