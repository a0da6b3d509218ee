"""Fit, placement, routing limits, and the router's rule."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from builder import CHATGLM2_6B
from builder.plan.memory import GIB
from builder.plan.placement import (PRECISIONS, PlacementError, Variant, largest_fit, make_plan, need_bytes,
                          pack_decreasing, place, variants_of)
from builder.plan.profiles import load_profile
from builder.plan.routing import Route, RoutingTable, choose_variant

from conftest import SMALL

P40 = load_profile("p40")
ALL3 = ["fp16", "int8", "int4"]


def assert_within_budget(plan):
    for device in plan.devices:
        assert device.used_bytes <= device.budget_bytes, device
        assert device.headroom_bytes >= 0


# -- variants ----------------------------------------------------------------------------------
def test_variant_fields_and_names():
    assert (Variant("fp16").bits, Variant("int8").bits, Variant("int4").bits) == (16, 8, 4)
    assert Variant("int4").group_size is None and Variant("int4-g128").group_size == 128
    assert Variant("int8").name == "chatglm2-6b-int8"
    with pytest.raises(ValueError, match="unknown precision 'int3'.*fp16, int8"):
        Variant("int3")


def test_variants_ordered_highest_precision_first():
    assert [v.precision for v in variants_of("int4, fp16,int8")] == ALL3
    assert list(PRECISIONS)[0] == "fp16" and list(PRECISIONS)[-1] == "int4"
    with pytest.raises(ValueError, match="int4 asked more than once"):
        variants_of(["int4", "int4"])


def test_dtype_per_device_kind():
    cpu = load_profile("cpu")
    assert Variant("fp16").dtype(cpu) == "bfloat16" and Variant("fp16").dtype(P40) == "float16"
    assert Variant("int4").dtype(cpu) == "bfloat16" and Variant("int4").dtype(P40) == "float16"
    assert Variant("fp16").dtype(cpu, "float16") == "float16"  # glm-build --cpu-dtype float16
    assert Variant("int8").dtype(cpu, "float16") == "bfloat16"  # the int kernels need bfloat16
    assert Variant("fp16").dtype(P40, "bfloat16") == "float16"  # a GPU is not a CPU
    with pytest.raises(ValueError, match="cpu_dtype must be one of bfloat16, float16, got 'fp32'"):
        Variant("fp16").dtype(cpu, "fp32")
    plan = make_plan(CHATGLM2_6B, "fp16,int4", cpu, cpu_dtype="float16")
    assert [p.dtype for p in plan.placements] == ["float16", "bfloat16"]


# -- fit and placement ----------------------------------------------------------------------------
def test_6b_all_three_on_one_p40_is_refused_with_what_fits():
    with pytest.raises(PlacementError) as info:
        make_plan(CHATGLM2_6B, ALL3, P40)
    message = str(info.value)
    assert "fp16+int8+int4 of ChatGLM2-6B on p40" in message
    assert "GiB" in message and "GB)" in message  # both units
    assert "int8+int4" in message and "fp16+int4" in message
    assert "--gpu p40x2" in message
    assert ("int8", "int4") in info.value.fitting and ("fp16", "int4") in info.value.fitting
    assert info.value.suggested_gpu == "p40x2"
    # every suggestion really fits
    for subset in info.value.fitting:
        make_plan(CHATGLM2_6B, subset, P40)
    make_plan(CHATGLM2_6B, ALL3, load_profile(info.value.suggested_gpu))


def test_6b_int4_fits_a_p40_with_room_to_spare():
    plan = make_plan(CHATGLM2_6B, ["int4"], P40)
    (placement,) = plan.placements
    assert placement.device == 0 and placement.max_tokens == CHATGLM2_6B.seq_length
    assert plan.devices[0].headroom_bytes > 10 * GIB
    assert plan.limits() == {"chatglm2-6b-int4": 32768}
    assert_within_budget(plan)


def test_p40x2_places_the_three_variants_on_two_gpus():
    plan = make_plan(CHATGLM2_6B, ALL3, load_profile("p40x2"))
    assert {p.device for p in plan.placements} == {0, 1}
    assert [d.index for d in plan.devices] == [0, 1]
    assert_within_budget(plan)
    assert sum(len(d.variants) for d in plan.devices) == 3


def test_a_variant_larger_than_any_one_gpu_gets_no_count_suggestion():
    small_gpu = dataclasses.replace(load_profile("t4"), memory_bytes=8 * GIB)
    with pytest.raises(PlacementError) as info:
        make_plan(CHATGLM2_6B, ["fp16", "int4"], small_gpu)
    assert "alone is larger than one device" in str(info.value)
    assert info.value.suggested_gpu is None and info.value.fitting == [("int4",)]


def test_cpu_profile_places_on_the_host():
    plan = make_plan(SMALL, ALL3, load_profile("cpu"))
    assert [p.device for p in plan.placements] == [None, None, None]
    assert [d.label for d in plan.devices] == ["CPU"]
    assert [p.dtype for p in plan.placements] == ["bfloat16", "bfloat16", "bfloat16"]


def test_packing_spreads_then_falls_back_to_first_fit():
    needs = {Variant("fp16"): 6, Variant("int8"): 4, Variant("int4"): 3}
    spread = pack_decreasing(needs, 10, 2)
    first = pack_decreasing(needs, 10, 2, spread=False)
    assert spread[Variant("fp16")] != spread[Variant("int8")]
    assert first[Variant("fp16")] == first[Variant("int8")] == 0
    assert place(needs, 10, 2) == spread
    assert place(needs, 5, 2) is None


# -- routing limits -------------------------------------------------------------------------------
def test_tight_budget_gives_long_requests_to_int4():
    plan = make_plan(CHATGLM2_6B, ["fp16", "int4"], P40)
    limits = plan.limits()
    assert limits["chatglm2-6b-int4"] > limits["chatglm2-6b-fp16"] >= 2048
    assert_within_budget(plan)
    # fp16 got the largest limit that still fits beside int4
    budget = P40.memory_bytes
    int4 = plan.placements[1]
    fp16_limit = limits["chatglm2-6b-fp16"]
    assert need_bytes(CHATGLM2_6B, Variant("fp16"), fp16_limit + 1, P40) + int4.need_bytes > budget


def test_largest_fit_is_the_boundary():
    v = Variant("int8")
    available = need_bytes(CHATGLM2_6B, v, 5000, P40)
    assert largest_fit(CHATGLM2_6B, v, available, P40, 32768) == 5000
    assert largest_fit(CHATGLM2_6B, v, 1000, P40, 32768) == 0


def test_max_and_min_tokens():
    plan = make_plan(CHATGLM2_6B, ALL3, load_profile("a100-80gb"), max_tokens=4096)
    assert set(plan.limits().values()) == {4096}
    assert make_plan(SMALL, ["int4"], P40, min_tokens=4096).min_tokens == SMALL.seq_length
    with pytest.raises(ValueError, match="max_tokens 40000 exceeds the model's seq_length 32768"):
        make_plan(CHATGLM2_6B, ["int4"], P40, max_tokens=40000)
    with pytest.raises(ValueError, match="min_tokens must be a positive integer"):
        make_plan(CHATGLM2_6B, ["int4"], P40, min_tokens=0)


def test_limits_override():
    plan = make_plan(CHATGLM2_6B, ["fp16", "int4"], P40, limits_override={"int4": 8192})
    default = make_plan(CHATGLM2_6B, ["fp16", "int4"], P40)
    assert plan.limits()["chatglm2-6b-int4"] == 8192
    # the memory int4 gave back goes to fp16
    assert plan.limits()["chatglm2-6b-fp16"] > default.limits()["chatglm2-6b-fp16"]
    assert_within_budget(plan)
    named = make_plan(CHATGLM2_6B, ["fp16", "int4"], P40,
                      limits_override={"chatglm2-6b-fp16": 2048})
    assert named.limits()["chatglm2-6b-fp16"] == 2048


@pytest.mark.parametrize("override,match", [
    ({"fp16": 32768}, r"--limits fp16=32768: chatglm2-6b-fp16 would need .* the most it can take"),
    ({"int4": 2048}, r"--limits names 'int4', which is not among the asked variants"),
    ({"int8": 40000}, r"--limits int8=40000: above max_tokens 32768"),
    ({"int8": 0}, r"positive integer"),
])
def test_limits_override_errors_name_the_variant_and_value(override, match):
    # fp16 at 32768 tokens (17.1 GiB) beside int8 at 2048 (7.7 GiB) exceeds a P40's 24 GiB
    with pytest.raises(ValueError, match=match):
        make_plan(CHATGLM2_6B, ["fp16", "int8"], P40, limits_override=override)


def test_plan_as_dict_and_routing_table():
    plan = make_plan(CHATGLM2_6B, ALL3, load_profile("p40x2"))
    record = plan.as_dict()
    assert [p["name"] for p in record["placements"]] == [v.name for v in variants_of(ALL3)]
    assert {d["index"] for d in record["devices"]} == {0, 1}
    table = plan.routing_table()
    assert [r.precision for r in table.routes] == ALL3
    assert RoutingTable.from_json(table.to_json()) == table


# -- the router's rule ------------------------------------------------------------------------------
def test_choose_variant_takes_the_highest_precision_that_covers():
    limits = [("fp16", 2048), ("int8", 6000), ("int4", 32768)]
    assert choose_variant(limits, 1) == "fp16"
    assert choose_variant(limits, 2048) == "fp16"
    assert choose_variant(limits, 2049) == "int8"
    assert choose_variant(limits, 32768) == "int4"
    assert choose_variant(limits, 32769) is None
    assert choose_variant({"fp16": 8192, "int4": 4096}, 5000) == "fp16"
    with pytest.raises(ValueError, match="tokens must be a positive integer"):
        choose_variant(limits, 0)


def test_routing_table_json_and_refusal():
    table = RoutingTable((Route("chatglm2-6b-fp16", "fp16", 16, 2048),
                          Route("chatglm2-6b-int4", "int4", 4, 16384)))
    assert table.choose(3000).name == "chatglm2-6b-int4"
    assert table.choose(20000) is None
    assert "20000 tokens" in table.refusal(20000) and "16384 (chatglm2-6b-int4)" in \
        table.refusal(20000)
    assert RoutingTable.from_json(table.to_json()) == table
    with pytest.raises(ValueError, match="routing parameter is not valid JSON"):
        RoutingTable.from_json("[")
    with pytest.raises(ValueError, match="keys"):
        RoutingTable.from_json('[{"name": "x"}]')
    with pytest.raises(ValueError, match="unique"):
        RoutingTable((table.routes[0], table.routes[0]))


def test_routing_module_imports_no_torch():
    path = Path(__file__).resolve().parents[1] / "builder" / "plan" / "routing.py"
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('routing', {str(path)!r})\n"
            "module = sys.modules['routing'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "assert module.choose_variant([('a', 10)], 5) == 'a'\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the batchers' KV pools -------------------------------------------------------------------------
def test_kv_pools_come_from_the_headroom_and_fit_with_a_full_batch():
    from builder.plan.memory import estimate_memory
    from builder.plan.placement import KV_PAGE_SIZE, MAX_RUNNING  # a GPU plan's pages

    for profile_name, precisions in (("p40", "int4"), ("p40", "int8,int4"), ("p40x2", "fp16,int8,int4")):
        profile = load_profile(profile_name)
        plan = make_plan(CHATGLM2_6B, precisions, profile)
        for d in plan.devices:
            on_device = [p for p in plan.placements if p.device == d.index]
            total = 0
            for p in on_device:
                per_request = -(-p.max_tokens // KV_PAGE_SIZE)
                assert per_request <= p.kv_blocks <= MAX_RUNNING * per_request
                assert p.concurrency(p.max_tokens) >= 1 and p.concurrency(512) >= p.concurrency(2048)
                # a full batch of 2048-token requests, with its decode rows, still fits the device
                n = max(p.concurrency(2048), 1)
                total += estimate_memory(CHATGLM2_6B, p.variant.bits, 2048, "generate",
                                         process_overhead=profile.process_overhead_bytes,
                                         concurrency=n, all_logits=False)
            assert total <= d.budget_bytes, (profile_name, d.label, total / GIB)


@pytest.mark.parametrize("precisions", ["int8", "int4", "fp16", "int8,int4"])
def test_a_cpu_pool_is_sized_for_a_cpu_s_batch_not_for_the_whole_host(precisions):
    """A CPU profile's budget is the whole host. Sized for 32 requests at the 32768-token limit, a
    single int8 variant's pool held 327,664 tokens and its full batch 1.77x its need at the limit,
    more than transformers takes at load; now 32 requests of 2048 tokens, and one at the limit."""
    from builder.plan.placement import MAX_RUNNING, batch_bytes, pool_lengths

    profile = load_profile("cpu")
    plan = make_plan(CHATGLM2_6B, precisions, profile)
    for p in plan.placements:
        assert p.kv_page_size == 16
        assert p.concurrency(p.max_tokens) >= 1 and p.concurrency(2048) <= MAX_RUNNING
        full = max(batch_bytes(CHATGLM2_6B, p.variant, profile, tokens, p.kv_blocks, p.max_batch_tokens)
                   for tokens in pool_lengths(p.max_tokens))
        assert full <= 1.15 * p.need_bytes, (p.variant.name, full / GIB, p.need_bytes / GIB)


def test_concurrency_grows_the_estimate_by_kv_and_decode_rows():
    from builder.plan.memory import estimate_breakdown, kv_cache_bytes

    one = estimate_breakdown(CHATGLM2_6B, 4, 512, "generate")
    eight = estimate_breakdown(CHATGLM2_6B, 4, 512, "generate", concurrency=8)
    assert eight.weights == one.weights and eight.overhead == one.overhead
    assert eight.kv_cache == 8 * kv_cache_bytes(CHATGLM2_6B, 512)
    assert one.activations < eight.activations < 8 * one.activations  # the dequantized weight is shared
    with pytest.raises(ValueError, match="concurrency must be a positive integer, got 0"):
        estimate_breakdown(CHATGLM2_6B, 4, 512, "generate", concurrency=0)


@pytest.mark.parametrize("fallback,tokens,expected", [
    ("none", 300, ["int8"]), ("lower", 300, ["int8", "int4"]), ("any", 300, ["int8", "int4"]),
    ("lower", 50, ["fp16", "int8", "int4"]), ("any", 1000, ["int4"]), ("lower", 5000, []),
])
def test_fallback_candidates(fallback, tokens, expected):
    table = RoutingTable((Route("chatglm2-6b-fp16", "fp16", 16, 100), Route("chatglm2-6b-int8", "int8", 8, 400),
                          Route("chatglm2-6b-int4", "int4", 4, 1500)))
    assert [r.precision for r in table.candidates(tokens, fallback)] == expected


def test_fallback_any_tries_higher_precisions_after_lower_ones():
    table = RoutingTable((Route("a-int8", "int8", 8, 400), Route("a-fp16", "fp16", 16, 4000),
                          Route("a-int4", "int4", 4, 4000)))  # a hand-edited order
    assert [r.precision for r in table.candidates(300, "any")] == ["int8", "int4", "fp16"]
    assert [r.precision for r in table.candidates(300, "lower")] == ["int8", "int4"]
    with pytest.raises(ValueError, match="fallback must be one of none, lower, any, got 'up'"):
        table.candidates(300, "up")
