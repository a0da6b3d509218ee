"""Quantizing while loading, and THUDM-format pre-quantized checkpoints (save, then load as is)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from builder import TINY_CHECKPOINT, load_chatglm2
from builder.model.checkpoint import save_quantized
from builder.model.quantization import QuantizedLinear

IDS = [[819, 821, 723, 263, 705, 12, 40, 7]]


@pytest.mark.parametrize("bits", [8, 4])
def test_load_time_quantization_replaces_every_projection(bits):
    model, _ = load_chatglm2(TINY_CHECKPOINT, bits=bits, dtype=torch.bfloat16)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 6 * model.config.num_hidden_layers
    assert not isinstance(model.lm_head, QuantizedLinear)


@pytest.mark.parametrize("bits", [8, 4])
def test_saved_checkpoint_is_thudm_format_and_loads_to_the_same_logits(tmp_path, bits):
    dst = save_quantized(TINY_CHECKPOINT, tmp_path / f"int{bits}", bits)
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_bit"] == bits
    from safetensors import safe_open

    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        qkv = f.get_tensor("transformer.encoder.layers.0.self_attention.query_key_value.weight")
        scale = f.get_tensor("transformer.encoder.layers.0.self_attention.query_key_value.weight_scale")
    hidden = config["hidden_size"]
    assert qkv.dtype == torch.int8 and qkv.shape[1] == (hidden if bits == 8 else hidden // 2)
    assert scale.dtype == torch.float16 and scale.shape == (qkv.shape[0],)

    direct, _ = load_chatglm2(TINY_CHECKPOINT, bits=bits, dtype=torch.bfloat16)
    loaded, _ = load_chatglm2(dst, dtype=torch.bfloat16)
    with torch.no_grad():
        a = direct(input_ids=torch.tensor(IDS)).logits.float()
        b = loaded(input_ids=torch.tensor(IDS)).logits.float()
    # Scales are stored in fp16 as THUDM does: at most a rounding step apart.
    assert float((a - b).norm() / a.norm()) < 1e-2


def test_prequantized_checkpoint_refuses_other_bits(tmp_path):
    dst = save_quantized(TINY_CHECKPOINT, tmp_path / "int4", 4)
    with pytest.raises(ValueError, match="bits=8.*quantization_bit"):
        load_chatglm2(dst, bits=8)


def test_bad_bits_name_the_value():
    with pytest.raises(ValueError, match="bits=3"):
        load_chatglm2(TINY_CHECKPOINT, bits=3)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_bfloat16_repository_loads_its_float_tensors_as_they_are(tmp_path, bits):
    """save_quantized(dtype=bfloat16), for the CPU variants: the embedding and output layer are
    used from the file without a conversion, and the logits are the float16 repository's."""
    from safetensors import safe_open

    half = save_quantized(TINY_CHECKPOINT, tmp_path / "half", bits)
    brain = save_quantized(TINY_CHECKPOINT, tmp_path / "brain", bits, dtype=torch.bfloat16)
    assert json.loads((brain / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(brain / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("transformer.output_layer.weight").dtype == torch.bfloat16
        assert f.get_tensor("transformer.encoder.layers.0.self_attention.query_key_value.weight_scale"
                            ).dtype == torch.float16  # THUDM's scales whatever the float dtype
    a, _ = load_chatglm2(half, dtype=torch.bfloat16)
    b, _ = load_chatglm2(brain, dtype=torch.bfloat16)
    with torch.no_grad():
        la = a(input_ids=torch.tensor(IDS)).logits.float()
        lb = b(input_ids=torch.tensor(IDS)).logits.float()
    assert float((la - lb).norm() / la.norm()) < 1e-2
    assert torch.equal(la.argmax(-1), lb.argmax(-1))
    with pytest.raises(ValueError, match="dtype"):
        save_quantized(TINY_CHECKPOINT, tmp_path / "f32", bits, dtype=torch.float32)


def file_mapped_at(address: int) -> str | None:
    """The file whose memory map holds ``address`` in this process (None: anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return rest[4] if len(rest) > 4 and rest[4].startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
@pytest.mark.parametrize("bits", [8, 4])
def test_the_codes_of_a_repository_in_the_model_dtype_are_read_from_its_file(tmp_path, bits):
    """A repository saved in the dtype the model computes in keeps its codes, scales and biases in
    the file's memory map (aligned for the kernels: the data starts on 64 bytes), not in a second,
    copied set; one in another float dtype is converted, and its codes are copies, so no map of
    it stays open."""
    brain = save_quantized(TINY_CHECKPOINT, tmp_path / "brain", bits, dtype=torch.bfloat16)
    half = save_quantized(TINY_CHECKPOINT, tmp_path / "half", bits)
    for saved in (brain, half):
        with open(saved / "model.safetensors", "rb") as f:
            assert (8 + int.from_bytes(f.read(8), "little")) % 64 == 0
    mapped, _ = load_chatglm2(brain, dtype=torch.bfloat16)
    converted, _ = load_chatglm2(half, dtype=torch.bfloat16)
    layers = [m for m in mapped.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) >= 4 * mapped.config.num_hidden_layers  # q, k, v split from one tensor
    for layer in layers:
        # torch's int4 kernel (GLM_CPU_KERNELS=0) reads a repacked copy: only the bias is the file's
        kept = (layer.bias,) if layer.int4_layout == "torch" else (layer.weight, layer.weight_scale, layer.bias)
        for tensor in kept:
            if tensor is not None:
                assert file_mapped_at(tensor.data_ptr()) == str(brain / "model.safetensors")
    assert all(file_mapped_at(t.data_ptr()) is None
               for m in converted.modules() if isinstance(m, QuantizedLinear)
               for t in (m._buffers.get("weight"), m.weight_scale) if t is not None)
    with torch.no_grad():
        assert torch.equal(mapped(input_ids=torch.tensor(IDS)).logits,
                           converted(input_ids=torch.tensor(IDS)).logits)
