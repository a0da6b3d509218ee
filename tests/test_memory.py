"""The memory estimator: the published table, the terms, and hand counts on a tiny config."""
import pytest

from builder import CHATGLM2_6B, ChatGLM2Config
from builder.plan import memory
from builder.plan.memory import (GIB, PRECISION_BITS, PUBLISHED_TABLE, TABLE_UNIT_BYTES,
                            estimate_breakdown, estimate_memory, kv_cache_bytes, weight_bytes)

CELLS = [(precision, phase) for precision in PUBLISHED_TABLE for phase in ("encode", "generate")]

# 2 layers, hidden 64 = 4 heads × 16, 2 K/V groups, FFN 96, vocab 128.
TINY = ChatGLM2Config(num_layers=2, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
                      num_attention_heads=4, multi_query_group_num=2, padded_vocab_size=128,
                      seq_length=256)


@pytest.mark.parametrize("precision,phase", CELLS)
def test_published_table_within_four_percent(precision, phase):
    """What the README promises for every cell of THUDM's table."""
    tokens, published = PUBLISHED_TABLE[precision][phase]
    estimate = estimate_memory(CHATGLM2_6B, PRECISION_BITS[precision], tokens, phase)
    assert abs(estimate - published) / published <= 0.04, (
        f"{precision} {phase} {tokens}: estimated {estimate / GIB:.2f} GiB, "
        f"published {published / GIB:.1f}")


def test_published_table_values_and_unit():
    assert TABLE_UNIT_BYTES == 2**30
    assert PUBLISHED_TABLE["fp16"]["encode"] == (2048, round(13.1 * 2**30))
    assert PUBLISHED_TABLE["int4"]["generate"] == (8192, round(5.1 * 2**30))
    assert set(PUBLISHED_TABLE) == set(PRECISION_BITS)


@pytest.mark.parametrize("precision,phase", CELLS)
def test_terms_positive_and_sum_to_total(precision, phase):
    tokens, _ = PUBLISHED_TABLE[precision][phase]
    e = estimate_breakdown(CHATGLM2_6B, PRECISION_BITS[precision], tokens, phase)
    assert min(e.weights, e.kv_cache, e.activations, e.overhead) > 0
    assert e.total == e.weights + e.kv_cache + e.activations + e.overhead
    assert e.as_dict()["total"] == e.total
    assert estimate_memory(CHATGLM2_6B, PRECISION_BITS[precision], tokens, phase) == e.total


def test_generate_below_encode_like_the_table():
    for bits in (16, 8, 4):
        assert (estimate_memory(CHATGLM2_6B, bits, 8192, "generate")
                < estimate_memory(CHATGLM2_6B, bits, 2048, "encode"))


@pytest.mark.parametrize("phase", ["encode", "generate"])
def test_grows_with_tokens(phase):
    sizes = [estimate_memory(CHATGLM2_6B, 16, t, phase) for t in (1, 128, 1024, 2048, 8192)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


@pytest.mark.parametrize("phase,tokens", [("encode", 2048), ("generate", 8192)])
def test_fewer_bits_need_less(phase, tokens):
    fp16, int8, int4 = (estimate_memory(CHATGLM2_6B, b, tokens, phase) for b in (16, 8, 4))
    assert int4 < int8 < fp16


def test_weights_of_the_6b():
    assert weight_bytes(CHATGLM2_6B, 16) == 6_243_584_000 * 2  # 6.24 B parameters in fp16
    projections = 5_710_544_896  # quantized weights of the 28 layers
    rows = 28 * (4608 + 4096 + 27392 + 4096)
    plain = 533_039_104 * 2
    assert weight_bytes(CHATGLM2_6B, 8) == projections + rows * 2 + plain
    assert weight_bytes(CHATGLM2_6B, 4) == projections // 2 + rows * 2 + plain


def test_weights_hand_count_tiny():
    h, ffn, vocab, layers = 64, 96, 128, 2
    qkv_rows = 4 * 16 + 2 * 2 * 16  # 128
    projection_weights = qkv_rows * h + h * h + 2 * ffn * h + ffn * h  # 8192+4096+12288+6144
    assert projection_weights == 30720
    rows = qkv_rows + h + 2 * ffn + h  # 448
    plain = 2 * vocab * h + layers * (2 * h + qkv_rows) + h  # embedding, output, norms, bias
    assert plain == 16384 + 512 + 64
    assert weight_bytes(TINY, 16) == (layers * projection_weights + plain) * 2
    assert weight_bytes(TINY, 8) == layers * (projection_weights + rows * 2) + plain * 2
    assert weight_bytes(TINY, 4) == layers * (projection_weights // 2 + rows * 2) + plain * 2
    # group-wise int4 on CUDA: one fp16 scale per 32 inputs of a row
    groups = qkv_rows * 2 + h * 2 + 2 * ffn * 2 + h * 3  # cols 64 → 2 groups, cols 96 → 3
    assert (weight_bytes(TINY, 4, group_size=32)
            == layers * (projection_weights // 2 + groups * 2) + plain * 2)


def test_kv_cache_hand_count():
    assert kv_cache_bytes(TINY, 10) == 2 * 2 * (2 * 16) * 10 * 2
    assert kv_cache_bytes(CHATGLM2_6B, 8192) == 28 * 2 * 2 * 128 * 8192 * 2  # ≈ 235 MB


def test_naive_attention_costs_the_score_matrix():
    naive = estimate_breakdown(CHATGLM2_6B, 16, 2048, "encode", sdpa=False)
    attention = memory.activation_steps(CHATGLM2_6B, 16, 2048, "encode")["attention"]
    assert attention < 32 * 2048 * 2048 * 2  # SDPA never holds a [heads, q, k] matrix
    assert naive.activations > 32 * 2048 * 2048 * (2 + 4 + 4)  # fp16 scores, fp32, softmax


def test_last_logit_only_shrinks_encode():
    full = estimate_breakdown(CHATGLM2_6B, 16, 2048, "encode")
    last = estimate_breakdown(CHATGLM2_6B, 16, 2048, "encode", all_logits=False)
    assert last.activations < full.activations


def test_quantized_cuda_carries_the_dequantized_weight():
    steps = memory.activation_steps(CHATGLM2_6B, 8, 8192, "generate")
    assert max(steps, key=steps.get) == "dense_h_to_4h"
    assert steps["dense_h_to_4h"] >= 27392 * 4096 * 2


def test_cpu_mode():
    fp16_gpu = estimate_breakdown(CHATGLM2_6B, 16, 512, "generate")
    fp32_cpu = estimate_breakdown(CHATGLM2_6B, 16, 512, "generate", device="cpu", dtype_bytes=4)
    assert fp32_cpu.weights == 2 * fp16_gpu.weights
    assert fp32_cpu.kv_cache == 2 * fp16_gpu.kv_cache
    assert fp32_cpu.overhead == memory.CPU_PROCESS_OVERHEAD  # no CUDA context
    # no dequantized transient: torch's CPU kernels are fused
    int8_cpu = memory.activation_steps(CHATGLM2_6B, 8, 512, "generate", device="cpu")
    assert int8_cpu["dense_h_to_4h"] < 27392 * 4096
    # int4 on CPU: THUDM's layout (glm-build's kernel), 0.25× the fp16 bytes plus an fp16 scale per row
    rows_cols = memory.quantized_projections(TINY).values()
    packed = sum(r * c // 2 + r * 2 for r, c in rows_cols)
    plain = memory.plain_parameters(TINY) * 2
    assert weight_bytes(TINY, 4, device="cpu") == 2 * packed + plain


def test_process_overhead_from_a_profile():
    base = estimate_breakdown(CHATGLM2_6B, 4, 2048, "encode")
    p40 = estimate_breakdown(CHATGLM2_6B, 4, 2048, "encode", process_overhead=736 * 2**20)
    assert base.overhead - p40.overhead == memory.DEFAULT_CUDA_PROCESS_OVERHEAD - 736 * 2**20


@pytest.mark.parametrize("kwargs,field", [
    ({"bits": 3}, "bits"),
    ({"phase": "decode"}, "phase"),
    ({"tokens": 0}, "tokens"),
    ({"device": "mps"}, "device"),
    ({"dtype_bytes": 3}, "dtype_bytes"),
    ({"bits": 8, "group_size": 64}, "group_size"),
    ({"process_overhead": -1}, "process_overhead"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    args = {"bits": 4, "tokens": 16, "phase": "encode", **kwargs}
    with pytest.raises(ValueError, match=field):
        estimate_memory(TINY, args.pop("bits"), args.pop("tokens"), args.pop("phase"), **args)
