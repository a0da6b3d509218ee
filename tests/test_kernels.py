"""torch's packed CPU kernels on the tensors a checkpoint hands them, and THUDM's quantized format
built by hand (not by ``save_quantized``) in both file formats.

These run again under every CPU capability the host has (tests/test_isa.py): a weight that one ISA's
kernel reads fine can fault another's.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from builder import TINY_CHECKPOINT, load_chatglm2
from builder.model.checkpoint import iter_checkpoint_tensors
from builder.model.config import ChatGLM2Config
from builder.model.quantization import QuantizedLinear, owned_aligned

from conftest import write_checkpoint

PROJECTION_SUFFIXES = ("self_attention.query_key_value.weight", "self_attention.dense.weight",
                       "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")
IDS = [[819, 821, 723, 263, 705, 12, 40, 7, 301, 9, 77, 5]]


# -- THUDM's scheme, written out here by hand --------------------------------------------------------
def thudm_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale = max|w| / (2^(bits-1) - 1) per row; q = round(w / scale); int4 packs element 2j
    in the high nibble. Returns (weight int8 [out, in] or [out, in/2], weight_scale fp16 [out])."""
    limit = 2 ** (bits - 1) - 1
    scale = (weight.float().abs().amax(dim=1) / limit).half()
    q = torch.round(weight.float() / scale.float()[:, None]).clamp(-limit, limit).to(torch.int8)
    if bits == 4:
        nibbles = q.to(torch.int16) & 0xF
        q = ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).to(torch.uint8).view(torch.int8)
    return q, scale


def thudm_dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        byte = weight.view(torch.uint8).to(torch.int16)
        high, low = byte >> 4, byte & 0xF
        codes = torch.stack([high, low], dim=-1).flatten(1)
        weight = torch.where(codes > 7, codes - 16, codes)
    return weight.float() * scale.float()[:, None]


# -- misaligned and borrowed weights reach the kernels safely ---------------------------------------
def _misaligned(tensor: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``tensor`` that starts ``offset`` bytes past a 64-byte boundary, inside a bigger
    buffer: what a safetensors shard (8-byte alignment) or a q/k/v slice hands the loader."""
    flat = tensor.contiguous().view(torch.int8).flatten()
    buffer = torch.zeros(flat.numel() + 128, dtype=torch.int8)
    start = (-buffer.data_ptr()) % 64 + offset
    view = buffer[start:start + flat.numel()]
    view.copy_(flat)
    return view.view(tensor.dtype).view(tensor.shape)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("offset", [1, 8, 16, 40])
@pytest.mark.parametrize("rows", [1, 8, 33])
def test_kernels_take_weights_at_any_offset(bits, offset, rows):
    g = torch.Generator().manual_seed(bits * 100 + offset)
    weight = torch.randn(64, 256, generator=g) * 0.05
    q, scale = thudm_quantize(weight, bits)
    layer = QuantizedLinear.from_thudm(_misaligned(q, offset), _misaligned(scale, offset & ~1), None, bits)
    assert layer.kernel == ("cpu_int8" if bits == 8 else "cpu_int4")
    x = torch.randn(rows, 256, generator=g)
    expected = x @ thudm_dequantize(q, scale, bits).T
    y = layer(x)
    assert float((y - expected).norm() / expected.norm()) < 1e-2
    for tensor in layer.buffers():
        assert tensor.data_ptr() % 64 == 0  # what the kernels read is aligned and its own


def test_owned_aligned_copies_only_what_it_must():
    whole = torch.zeros(64, 32, dtype=torch.int8)
    assert owned_aligned(whole) is whole
    part = whole[16:32]  # aligned, but a slice that would keep the whole tensor alive
    assert owned_aligned(part) is not part and owned_aligned(part).untyped_storage().nbytes() == 512
    odd = _misaligned(whole, 8)
    copy = owned_aligned(odd)
    assert copy.data_ptr() % 64 == 0 and torch.equal(copy, odd)


# -- a THUDM-format quantized checkpoint, made by hand ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_float_state():
    return {name: tensor.float() for name, tensor in iter_checkpoint_tensors(TINY_CHECKPOINT)}


@pytest.fixture(scope="module")
def tiny_config():
    return ChatGLM2Config.from_json(TINY_CHECKPOINT / "config.json")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("bits", [8, 4])
def test_hand_made_thudm_checkpoint_matches_a_dequantized_reference(tmp_path, tiny_float_state,
                                                                    tiny_config, bits, fmt):
    quantized, dequantized = {}, {}
    for name, tensor in tiny_float_state.items():
        if name.endswith(PROJECTION_SUFFIXES):
            q, scale = thudm_quantize(tensor, bits)
            quantized[name], quantized[name + "_scale"] = q, scale
            dequantized[name] = thudm_dequantize(q, scale, bits)
        else:
            quantized[name] = tensor.half()
            dequantized[name] = tensor
    config = dataclasses.replace(tiny_config, quantization_bit=bits)
    # .bin named like THUDM's shards (pytorch_model-00001-of-00002.bin + index); safetensors in one file
    path = write_checkpoint(tmp_path / f"int{bits}-{fmt}", config, quantized, fmt=fmt,
                            shards=2 if fmt == "bin" else 1, index=fmt == "bin")
    assert json.loads((path / "config.json").read_text())["quantization_bit"] == bits
    reference_path = write_checkpoint(tmp_path / "dequantized", tiny_config, dequantized)

    model, _ = load_chatglm2(path, dtype=torch.bfloat16)
    reference, _ = load_chatglm2(reference_path, dtype=torch.float32)
    kernels = {m.kernel for m in model.modules() if isinstance(m, QuantizedLinear)}
    assert f"cpu_int{bits}" in kernels
    ids = torch.tensor(IDS)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        expected = reference(input_ids=ids).logits
    assert float((logits - expected).norm() / expected.norm()) < 2e-2  # bfloat16 activations
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


# -- the CPU runtime's workarounds (builder.model.cpu_linear, cpu_runtime) -----------------------------------
def _peak_growth_mib(call) -> float:
    """How far the resident high-water mark rises during ``call`` (Linux), in MiB."""
    def read(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = read("VmRSS")
    call()
    return read("VmHWM") - before


def test_the_last_position_logits_do_not_copy_the_output_layer():
    """lm_head on hidden[:, -1:, :] (a view with the prompt as its batch stride): torch's bf16
    matmul copied the whole weight for it (+508 MB on the 6B) unless it gets plain rows."""
    from builder.model.cpu_linear import RowsLinear, use_row_inputs

    head = use_row_inputs(torch.nn.Sequential(torch.nn.Linear(4096, 32768, bias=False))).to(torch.bfloat16)[0]
    assert isinstance(head, RowsLinear)
    hidden = torch.randn(1, 512, 4096, dtype=torch.bfloat16)
    last = hidden[:, -1:, :]
    with torch.inference_mode():
        expected = head(last.reshape(1, 4096).clone())  # the same row, plain
        head(last)  # warm
        growth = _peak_growth_mib(lambda: head(last))
        assert torch.equal(head(last).view(1, -1), expected)
    assert growth < 64, f"the matmul grew the resident set by {growth:.0f} MiB (weight: 256 MiB)"


def test_bfloat16_attention_at_the_6b_head_size(tmp_path):
    """Heads of 128 and 80 tokens take torch's packed flash-attention path, which fails under a
    capability forced below the CPU's own unless the loader works around it."""
    from conftest import thudm_state

    config = ChatGLM2Config(num_layers=1, hidden_size=256, ffn_hidden_size=128, kv_channels=128,
                            num_attention_heads=2, multi_query_group_num=1, padded_vocab_size=832,
                            seq_length=2048)
    path = write_checkpoint(tmp_path / "heads128", config, thudm_state(config))
    model, _ = load_chatglm2(path, bits=8, dtype=torch.bfloat16)
    with torch.inference_mode():
        logits = model(input_ids=torch.arange(80)[None] % 800 + 1).logits
    assert logits.shape == (1, 80, 832) and torch.isfinite(logits).all()


# -- quantizing by row blocks gives what one whole-layer pass gives ----------------------------------
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 64)])
def test_row_blocks_change_nothing(monkeypatch, bits, group_size):
    import builder.model.quantization as quantization

    g = torch.Generator().manual_seed(11)
    weight = torch.randn(64 * 5 + 16, 256, generator=g) * 0.05  # 5 whole 64-row groups and a tail
    whole = QuantizedLinear.from_float(weight, None, bits, group_size)
    monkeypatch.setattr(quantization, "QUANTIZE_BLOCK_BYTES", 64 * 256 * 4)  # 64 float32 rows
    assert len(list(quantization.row_blocks(weight.shape[0], 256 * 4))) == 6
    blocked = QuantizedLinear.from_float(weight, None, bits, group_size)
    for name, tensor in whole.named_buffers():
        assert torch.equal(tensor, dict(blocked.named_buffers())[name]), name
    state, expected = blocked.thudm_state(), thudm_quantize(weight, bits) if group_size is None else None
    if expected is not None:
        assert torch.equal(state["weight"], expected[0]) and torch.equal(state["weight_scale"], expected[1])


# -- many rows take the dense path (builder.model.cpu_quant), and it computes what the kernels compute -----
@pytest.fixture
def dense_from(monkeypatch):
    """Set the row count from which quantized projections take the dense path (0: never)."""
    from builder.model import cpu_quant

    def set_rows(rows: int) -> None:
        table = {capability: {8: rows, 4: rows} for capability in cpu_quant.DENSE_ROWS}
        monkeypatch.setattr(cpu_quant, "DENSE_ROWS", table)
        cpu_quant.dense_rows.cache_clear()
    yield set_rows
    cpu_quant.dense_rows.cache_clear()


def test_int4_layout_is_read_for_this_capability():
    """AVX-512 and AVX2 pack k-major blocks the dense path reads; the DEFAULT capability packs row
    pairs, which it does not read: int4 then stays on the kernel at every row count."""
    from builder.model import cpu_quant

    expected = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability())
    assert cpu_quant.int4pack_layout() == expected
    if expected is None:
        cpu_quant.dense_rows.cache_clear()
        assert cpu_quant.dense_rows(4) == 0


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 32), (4, 128)])
@pytest.mark.parametrize("out_features,in_features", [(64 * 9 + 16, 256), (96, 512), (48, 13696)])
@pytest.mark.parametrize("rows", [1, 12, 33])
def test_dense_path_matches_the_weight_only_kernel(dense_from, bits, group_size, out_features,
                                                   in_features, rows):
    """Short last blocks (16, 48 rows), several dequantized blocks, group-wise scales: the dense
    path gives the kernel's result to bfloat16 rounding, and the formula's."""
    from builder.model import cpu_quant

    g = torch.Generator().manual_seed(out_features + rows + bits)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    layer = QuantizedLinear.from_float(weight, None, bits, group_size)
    if layer.int4_layout == "torch" and cpu_quant.int4pack_layout() is None:
        pytest.skip("this capability's int4 packing is not read by the dense path (kernels only)")
    assert layer.kernel == f"cpu_int{bits}"
    x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
    dense_from(0)
    assert layer.cpu_path(rows) in ("glm_kernel", "torch_kernel")
    kernel = layer(x).float()
    dense_from(1)
    assert layer.cpu_path(rows) == "dense"
    dense = layer(x).float()
    q = layer.codes().float()
    scale = layer.weight_scale.float()
    scale = scale[:, None] if scale.dim() == 1 else scale.repeat_interleave(in_features // scale.shape[1], 1)
    exact = x.float() @ (q * scale).t()
    bf16_step = exact.abs().amax() * 2 ** -7  # one bfloat16 rounding step at the largest output
    assert float((dense - kernel).abs().max()) <= 2 * bf16_step
    assert float((dense - exact).norm() / exact.norm()) < 4e-3
    assert float((kernel - exact).norm() / exact.norm()) < 4e-3
    with monkeypatch_blocks(cpu_quant, 64 * in_features):  # many blocks: the same sums
        assert torch.allclose(layer(x).float(), dense, rtol=0, atol=float(bf16_step))


class monkeypatch_blocks:
    """Dequantize ``elements`` weights at a time inside the ``with``."""

    def __init__(self, module, elements):
        self.module, self.elements = module, elements

    def __enter__(self):
        self.saved, self.module.DENSE_BLOCK_ELEMENTS = self.module.DENSE_BLOCK_ELEMENTS, self.elements

    def __exit__(self, *exc):
        self.module.DENSE_BLOCK_ELEMENTS = self.saved


def _count_paths(monkeypatch) -> dict:
    """Count the calls of every CPU path of a quantized projection (the real functions still run)."""
    from builder.model import cpu_kernels, cpu_quant

    calls = {"dense": 0, "weight_only": 0}
    targets = [(cpu_quant, name, "dense") for name in ("int8_rows", "int4_rows")]
    targets += [(cpu_kernels, "dense_mm", "dense")]
    targets += [(cpu_kernels, name, "weight_only") for name in ("int8_mm", "int4_mm")]
    targets += [(torch.ops.aten, name, "weight_only")
                for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu")]
    for owner, name, path in targets:
        real = getattr(owner, name)

        def counted(*args, _real=real, _path=path):
            calls[_path] += 1
            return _real(*args)
        monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("bits", [8, 4])
def test_a_prefill_takes_the_dense_path_and_a_decode_step_the_kernel(monkeypatch, bits):
    """Would fail if a quantized prefill went through the weight-only kernels again."""
    from builder.model import cpu_quant

    cpu_quant.dense_rows.cache_clear()
    monkeypatch.setenv("GLM_CPU_DECODE", "kernel")  # decode steps: no probe (tested below)
    model, _ = load_chatglm2(TINY_CHECKPOINT, bits=bits, dtype=torch.bfloat16)
    layouts = {m.int4_layout for m in model.modules() if isinstance(m, QuantizedLinear) and bits == 4}
    if layouts == {"torch"} and cpu_quant.int4pack_layout() is None:
        pytest.skip("this capability's int4 packing is not read by the dense path (kernels only)")
    calls = _count_paths(monkeypatch)
    prompt = torch.tensor([IDS[0] * 3])  # 36 tokens, above every threshold
    layout = layouts.pop() if layouts else "torch"  # int4: where its codes are
    assert prompt.shape[1] >= cpu_quant.dense_rows(bits, layout) > 1
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=prompt, cache=cache, use_cache=True)
        assert calls["dense"] > 0 and calls["weight_only"] == 0
        calls.update(dense=0, weight_only=0)
        model(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
        assert calls["weight_only"] > 0 and calls["dense"] == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_path_is_probed_once_per_shape(monkeypatch, bits):
    """A one-row call times every candidate on the layer's own weight, once per shape; the answer is
    the same whichever path won."""
    from builder.model import cpu_quant

    monkeypatch.setattr(cpu_quant, "_decode_paths", {})
    monkeypatch.delenv("GLM_CPU_DECODE", raising=False)
    cpu_quant.dense_rows.cache_clear()
    layer = QuantizedLinear.from_float(torch.randn(128, 512) * 0.05, None, bits)
    if layer.int4_layout == "torch" and cpu_quant.int4pack_layout() is None:
        pytest.skip("this capability's int4 packing is not read by the dense path (kernels only)")
    x = torch.randn(1, 512).to(torch.bfloat16)
    candidates = layer._cpu_paths()
    expected = candidates["dense"](x)
    y = layer(x)
    [(key, path)] = cpu_quant._decode_paths.items()
    assert key == (bits, 128, 512, None, tuple(candidates), 1)
    assert path in candidates and layer.cpu_path(1) == path
    assert cpu_quant.decode_paths() == {f"int{bits} 128x512": path}
    assert torch.allclose(y.float(), expected.float(), rtol=0, atol=float(expected.abs().max()) * 2 ** -7)
    layer(torch.randn(6, 512).to(torch.bfloat16))  # a batch of 6 sequences: probed apart
    assert len(cpu_quant._decode_paths) == 2 and f"int{bits} 128x512 5-8 rows" in cpu_quant.decode_paths()
    monkeypatch.setattr(cpu_quant, "_decode_paths", {})
    monkeypatch.setenv("GLM_CPU_DECODE", "dense")
    calls = _count_paths(monkeypatch)
    layer(x)
    assert calls["dense"] == 1 and calls["weight_only"] == 0 and not cpu_quant._decode_paths  # forced
    assert layer.cpu_path(1) == "dense"
    monkeypatch.setenv("GLM_CPU_DECODE", "fastest")
    with pytest.raises(ValueError, match="GLM_CPU_DECODE"):
        layer(x)


QUESTIONS = ["你好", "3 只鸡和 2 只兔共有几条腿？", "1 加 2 等于几？", "4 只兔有几条腿？"]


def _greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens after each row of ``ids`` [batch, prompt], decoded together."""
    from transformers import DynamicCache

    new, cache = [], DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=ids, cache=cache, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)  # [batch, 1]
            new.append(token)
            out = model(input_ids=token, cache=cache, use_cache=True)
    return torch.cat(new, dim=1)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_greedy_answers_unchanged_by_the_dense_path_and_by_batching(dense_from, bits):
    """The tiny model's greedy answers: weight-only kernels everywhere (as before the dense path)
    == the dense path for every prefill == prompts decoded as one batch (each step then has 4 rows
    and takes the dense path from 4)."""
    from builder.model.generation import chat

    model, tokenizer = load_chatglm2(TINY_CHECKPOINT, bits=bits, dtype=torch.bfloat16)
    answers = {}
    for rows in (0, 2):
        dense_from(rows)
        answers[rows] = [chat(model, tokenizer, q, max_length=96, temperature=0)[0] for q in QUESTIONS]
    assert answers[0] == answers[2]
    assert any(answers[0])

    prompts = [tokenizer.build_chat_input(q) for q in QUESTIONS]
    length = min(len(p) for p in prompts)  # one length, so no padding: the chat prefix, then the tail
    ids = torch.tensor([p[:2] + p[len(p) - length + 2:] for p in prompts])
    dense_from(4)
    batched = _greedy(model, ids, 12)
    for row in range(len(prompts)):
        dense_from(0)
        alone = _greedy(model, ids[row:row + 1], 12)
        assert torch.equal(batched[row:row + 1], alone), QUESTIONS[row]
