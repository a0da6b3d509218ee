"""ChatGLM2's weight-only INT8/INT4 quantization: the math on hand-made tensors, the layer against
the formula (written out again here), the model swap, memory, THUDM's format, and the load hooks."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from builder.model.config import ChatGLM2Config
from builder.model.quantization import (QuantizedLinear, dequantize, make_load_hook, make_prequantized_hook,
                              pack_int4, quantize, quantize_rows, row_scales, unpack_int4)

from conftest import SMALL, thudm_state
from reference import forward

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = ChatGLM2Config(num_layers=2, hidden_size=128, ffn_hidden_size=344, kv_channels=32,
                      num_attention_heads=4, multi_query_group_num=2, padded_vocab_size=512,
                      seq_length=2048)
PROJECTIONS = {f"model.layers.{i}.{p}" for i in range(2)
               for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_up_proj", "mlp.down_proj")}
IDS = [5, 17, 300, 2, 99, 411, 7, 64, 128, 500, 3, 42]


# -- the formula, written out independently of builder.quantize ---------------------------------------
def formula(weight: torch.Tensor, bits: int, group_size: int | None = None):
    """THUDM's scheme: fp16 scale = max|w| / (2^(bits-1) - 1) per row (or per row per group),
    q = round(w / scale). Returns (q [out, in], scale per weight [out, in])."""
    out_features, in_features = weight.shape
    group = group_size or in_features
    w = weight.float().reshape(out_features, in_features // group, group)
    scale = (w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)).half().float()
    q = torch.round(w / scale.clamp(min=torch.finfo(torch.float32).tiny))
    q = q.clamp(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    return q.reshape(out_features, in_features), scale.expand_as(w).reshape(out_features, in_features)


def formula_weight(weight, bits, group_size=None):
    q, scale = formula(weight, bits, group_size)
    return q * scale


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.buffers()) + list(module.parameters()))


# -- pure functions on hand-made tensors -----------------------------------------------------------
def test_row_scales():
    w = torch.tensor([[1.0, -2.54, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.7, 0.0, -0.07, 0.35]])
    assert torch.allclose(row_scales(w, 8), torch.tensor([2.54 / 127, 0.0, 0.7 / 127]))
    assert torch.allclose(row_scales(w, 4), torch.tensor([2.54 / 7, 0.0, 0.7 / 7]))
    grouped = row_scales(w, 4, group_size=2)  # [rows, groups]
    assert torch.allclose(grouped, torch.tensor([[2.54, 0.5], [0.0, 0.0], [0.7, 0.35]]) / 7)


def test_quantize_rows_rounds_clamps_and_handles_zero_rows():
    w = torch.tensor([[1.0, -2.54, 0.51, 3.0], [0.0, 0.0, 0.0, 0.0]])
    q = quantize_rows(w, torch.tensor([0.02, 0.0]), 8)
    assert q.dtype == torch.int8
    assert q.tolist() == [[50, -127, 26, 127], [0, 0, 0, 0]]  # 3.0 / 0.02 = 150 clamps to 127
    assert quantize_rows(torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([0.1]), 4).tolist() == [[5, -7, 7]]
    grouped = quantize_rows(torch.tensor([[1.0, 2.0, 1.0, 2.0]]), torch.tensor([[1.0, 0.5]]), 4)
    assert grouped.tolist() == [[1, 2, 2, 4]]


def test_pack_int4_puts_element_0_in_the_high_nibble():
    q = torch.tensor([[1, -2, 7, -8, -1, 0]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (1, 3)
    # 0x1E, 0x78, 0xF0 (as int8: -16)
    assert packed.tolist() == [[0x1E, 0x78, -16]]
    assert unpack_int4(packed).tolist() == q.tolist()


def test_pack_unpack_round_trip_over_every_pair_and_byte():
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(values, values).reshape(1, -1)  # [1, 512]: all 256 pairs
    assert torch.equal(unpack_int4(pack_int4(pairs)), pairs)
    every_byte = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).reshape(2, 128)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def test_dequantize():
    q = torch.tensor([[2, -3], [4, 1]], dtype=torch.int8)
    assert dequantize(q, torch.tensor([0.5, 2.0])).tolist() == [[1.0, -1.5], [8.0, 2.0]]
    assert dequantize(q[:, :2], torch.tensor([[0.5, 1.0], [1.0, 0.25]])).tolist() == [[1.0, -3.0], [4.0, 0.25]]


# -- one layer against the formula -----------------------------------------------------------------
# (out, in, bits, group_size, kernel): the CPU kernels where the shape allows, else dequantize-matmul
LAYERS = [(96, 256, 8, None, "cpu_int8"), (96, 256, 4, None, "cpu_int4"),
          (688, 128, 4, 32, "cpu_int4"), (64, 13696, 4, None, "cpu_int4"),
          (128, 344, 8, None, "dequantize"), (128, 344, 4, None, "dequantize"),
          (40, 96, 4, None, "dequantize")]


@pytest.mark.parametrize("out_features,in_features,bits,group_size,kernel", LAYERS)
def test_quantized_linear_matches_formula(out_features, in_features, bits, group_size, kernel):
    g = torch.Generator().manual_seed(out_features + in_features + bits)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    bias = torch.randn(out_features, generator=g)
    x = torch.randn(2, 3, in_features, generator=g)
    layer = QuantizedLinear.from_float(weight, bias, bits, group_size)
    assert layer.kernel == kernel
    expected = x @ formula_weight(weight, bits, group_size).T + bias
    y = layer(x)
    assert y.shape == (2, 3, out_features) and y.dtype == torch.float32
    # the CPU kernels take bfloat16 activations; the fallback is float32 throughout
    assert relative_error(y, expected) < (1e-2 if kernel.startswith("cpu") else 1e-5)
    q, scale = formula(weight, bits, group_size)
    if in_features < 10000:  # THUDM's tensors, recovered from the kernel's layout
        state = layer.thudm_state()
        want_q = q.to(torch.int8)
        if bits == 4:  # element 2j in the high nibble, two's complement
            nib = want_q.to(torch.int16) & 0xF
            want_q = ((nib[:, 0::2] << 4) | nib[:, 1::2]).to(torch.uint8).view(torch.int8)
        assert state["weight"].dtype == torch.int8 and torch.equal(state["weight"], want_q)
        assert state["weight_scale"].dtype == torch.float16
        columns = scale[:, ::group_size] if group_size else scale[:, 0]
        assert torch.equal(state["weight_scale"].float(), columns)
        assert torch.equal(state["bias"], bias)


@pytest.mark.parametrize("bits,group_size,out_features,in_features",
                         [(8, None, 96, 256), (4, None, 96, 256), (4, 64, 96, 256), (4, None, 128, 344),
                          (8, None, 128, 344)])
def test_thudm_state_round_trip(bits, group_size, out_features, in_features):
    g = torch.Generator().manual_seed(1)
    layer = QuantizedLinear.from_float(torch.randn(out_features, in_features, generator=g), None, bits, group_size)
    x = torch.randn(5, in_features, generator=g)
    again = QuantizedLinear.from_thudm(**layer.thudm_state(), bias=None, bits=bits)
    assert torch.equal(again(x), layer(x))
    assert set(layer.state_dict()) == {"weight", "weight_scale"}
    assert torch.equal(layer.state_dict()["weight"], layer.thudm_state()["weight"])


def test_dtype_casts_keep_codes_and_scales():
    g = torch.Generator().manual_seed(2)
    layer = QuantizedLinear.from_float(torch.randn(64, 128, generator=g), torch.randn(64, generator=g), 4)
    before = layer.thudm_state()
    layer.to(torch.bfloat16)
    after = layer.thudm_state()
    assert after["weight_scale"].dtype == torch.float16 and torch.equal(after["weight"], before["weight"])
    assert torch.equal(after["weight_scale"], before["weight_scale"]) and after["bias"].dtype == torch.bfloat16
    assert layer(torch.randn(1, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16


# -- the model swap ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    from transformers import GlmForCausalLM

    torch.manual_seed(0)
    return GlmForCausalLM(TINY.to_glm_config(torch.float32)).eval()


def formula_model(model, bits, group_size=None):
    """A float copy whose projection weights are replaced by the formula's dequantized weights."""
    ref = copy.deepcopy(model)
    for name, module in ref.named_modules():
        if name in PROJECTIONS:
            module.weight.data = formula_weight(module.weight.data, bits, group_size)
    return ref


@pytest.mark.parametrize("bits,limit", [(8, 0.55), (4, 0.30)])
def test_quantize_tiny_model(tiny_model, bits, limit):
    model = copy.deepcopy(tiny_model)
    fp16_bytes = sum(2 * (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0))
                     for n, m in model.named_modules() if n in PROJECTIONS)
    assert quantize(model, bits) is model
    replaced = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert replaced == PROJECTIONS
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    assert torch.equal(model.lm_head.weight, tiny_model.lm_head.weight)
    # resident bytes: every tensor the quantized modules hold, against their fp16 weights + biases
    resident = sum(tensor_bytes(m) for n, m in model.named_modules() if n in PROJECTIONS)
    assert resident <= limit * fp16_bytes, resident / fp16_bytes

    ids = torch.tensor([IDS])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        expected = formula_model(tiny_model, bits)(input_ids=ids).logits
        plain = tiny_model(input_ids=ids).logits
    assert relative_error(logits, expected) < 2e-2
    assert relative_error(logits, expected) < relative_error(logits, plain)


def test_quantize_group_wise_and_custom_filter(tiny_model):
    model = quantize(copy.deepcopy(tiny_model), 4, group_size=32,
                     filter_fn=lambda module, name: name.endswith(("q_proj", "k_proj", "v_proj")))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear) and layer.group_size == 32 and layer.kernel == "cpu_int4"
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    expected = tiny_model.model.layers[0].self_attn.q_proj.bias + \
        torch.ones(1, 128) @ formula_weight(tiny_model.model.layers[0].self_attn.q_proj.weight, 4, 32).T
    assert relative_error(layer(torch.ones(1, 128)), expected) < 1e-2
    with pytest.raises(ValueError, match="down_proj.*group_size=128 does not divide in_features=344"):
        quantize(copy.deepcopy(tiny_model), 4, group_size=128)


def test_bits_16_is_a_no_op_and_bad_bits_name_the_value(tiny_model):
    model = copy.deepcopy(tiny_model)
    assert quantize(model, 16) is model
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    for bad in (3, 2, "8", 32):
        with pytest.raises(ValueError, match=f"bits={bad!r}"):
            quantize(model, bad)
    with pytest.raises(ValueError, match="bits=5"):
        QuantizedLinear.from_float(torch.ones(16, 32), None, 5)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize(model, 4, group_size=48)
    with pytest.raises(ValueError, match="int4 only"):
        quantize(model, 8, group_size=128)
    with pytest.raises(ValueError, match="bits=3"):
        make_load_hook(model, 3)


# -- quantizing while a checkpoint streams in ---------------------------------------------------------
def dequantized_state(state, config, bits):
    """THUDM-named state with every projection weight replaced by the formula's (fused QKV is
    quantized row by row, so splitting it first changes nothing)."""
    out = dict(state)
    for name, tensor in state.items():
        if name.endswith(("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight",
                          "dense_4h_to_h.weight")):
            out[name] = formula_weight(tensor, bits)
    return out


def write_weights(path, config, state):
    """config.json and one safetensors shard: all that load_weights reads (no tokenizer needed)."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    save_file({n: t.contiguous() for n, t in state.items()}, str(path / "model.safetensors"))
    return path


def load_with_hook(path, config, make_hook=None):
    from builder.model.checkpoint import build_empty_model, finish_model, load_weights

    model = build_empty_model(config, torch.float32)
    hook = make_hook(model) if make_hook else None
    load_weights(model, path, config, device=torch.device("cpu"), dtype=torch.float32, hook=hook)
    if hook is not None:
        hook.check_complete()
    return finish_model(model, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    state = thudm_state(SMALL)
    return write_weights(tmp_path_factory.mktemp("small-weights"), SMALL, state), state


@pytest.mark.parametrize("bits", [8, 4])
def test_load_hook_quantizes_while_streaming(small_weights, bits):
    path, state = small_weights
    model = load_with_hook(path, SMALL, lambda m: make_load_hook(m, bits))
    assert {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)} == PROJECTIONS
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS])).logits[0]
    assert relative_error(logits, forward(dequantized_state(state, SMALL, bits), SMALL, IDS)) < 2e-2


def test_load_hook_pairs_weight_and_bias_in_either_order(tiny_model):
    from builder.model.checkpoint import build_empty_model

    model = build_empty_model(TINY, torch.float32)
    hook = make_load_hook(model, 8)
    source = tiny_model.model.layers[1].self_attn
    assert hook("model.layers.1.self_attn.k_proj.bias", source.k_proj.bias.detach())
    assert isinstance(model.model.layers[1].self_attn.k_proj, torch.nn.Linear)  # waits for its weight
    with pytest.raises(ValueError, match="k_proj has only \\['bias'\\]"):
        hook.check_complete()
    assert hook("model.layers.1.self_attn.k_proj.weight", source.k_proj.weight.detach())
    assert hook("model.layers.1.self_attn.o_proj.weight", source.o_proj.weight.detach())  # no bias
    assert isinstance(model.model.layers[1].self_attn.k_proj, QuantizedLinear)
    assert isinstance(model.model.layers[1].self_attn.o_proj, QuantizedLinear)
    assert not hook("model.embed_tokens.weight", tiny_model.model.embed_tokens.weight)
    assert not hook("model.layers.1.input_layernorm.weight", torch.ones(128))
    assert not hook("lm_head.weight", tiny_model.lm_head.weight)
    hook.check_complete()


def test_prequantized_checkpoint_loads_as_it_is(small_weights, tmp_path):
    """A quantized model's state_dict, written in THUDM's layout (fused QKV, int4 packed), loads back
    through the pre-quantized hook and gives the same logits."""
    from builder.model.checkpoint import glm_to_thudm

    path, _ = small_weights
    model = quantize(load_with_hook(path, SMALL), 4)
    thudm = glm_to_thudm(model.state_dict())
    qkv = thudm["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    assert qkv.dtype == torch.int8 and qkv.shape == (SMALL.qkv_size, SMALL.hidden_size // 2)
    assert thudm["transformer.encoder.layers.0.self_attention.query_key_value.weight_scale"].dtype == torch.float16
    config = dataclasses.replace(SMALL, quantization_bit=4)
    saved = write_weights(tmp_path / "int4", config, thudm)
    loaded = load_with_hook(saved, config, lambda m: make_prequantized_hook(m, 4))
    ids = torch.tensor([IDS])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# -- CUDA: THUDM's extract-then-fp16-matmul ----------------------------------------------------------
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_layer_matches_formula(bits):
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(256, 512, generator=g) * 0.05, torch.randn(256, generator=g)
    x = torch.randn(4, 512, generator=g)
    layer = QuantizedLinear.from_float(weight.cuda(), bias.cuda().half(), bits)
    assert layer.kernel == "cuda_extract"
    expected = x @ formula_weight(weight, bits).T + bias.half().float()
    assert relative_error(layer(x.cuda().half()).cpu(), expected) < 2e-3
    moved = QuantizedLinear.from_float(weight, bias, bits).to("cuda")  # re-laid out for CUDA
    assert moved.kernel == "cuda_extract"
    assert relative_error(moved(x.cuda()).cpu(), expected) < 2e-3


# -- the opt-in int8 output layer -----------------------------------------------------------------------
def test_output_layer_int8_is_opt_in_and_close_to_float():
    """``output_bits=8`` swaps only ``lm_head`` for per-row int8 (the formula), and the logits stay
    close: every next-token choice over a prompt agrees with the float output layer's."""
    from builder import TINY_CHECKPOINT
    from builder.model.checkpoint import load_chatglm2

    base, tokenizer = load_chatglm2(TINY_CHECKPOINT, bits=8)
    quant, _ = load_chatglm2(TINY_CHECKPOINT, bits=8, output_bits=8)
    assert not isinstance(base.lm_head, QuantizedLinear)
    assert isinstance(quant.lm_head, QuantizedLinear) and quant.lm_head.bits == 8
    q, scale = formula(base.lm_head.weight.detach(), 8)
    assert torch.equal(quant.lm_head.codes().float(), q)
    assert torch.equal(quant.lm_head.weight_scale.float(), scale[:, 0])
    assert type(quant.model.embed_tokens) is torch.nn.Embedding  # the input embedding stays float
    ids = torch.tensor([tokenizer.build_chat_input("3只鸡和2只兔子一共有几条腿？")])
    with torch.inference_mode():
        a, b = base(input_ids=ids).logits, quant(input_ids=ids).logits
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_output_bits_other_than_8_or_16_name_the_value():
    from builder import TINY_CHECKPOINT
    from builder.model.checkpoint import load_chatglm2

    with pytest.raises(ValueError, match="output_bits must be 16 .* got 4"):
        load_chatglm2(TINY_CHECKPOINT, output_bits=4)
