"""CUDA graphs in the decode paths (issue 22): what the batcher asks transformers for per device
kind, what our own loop decides, what the plan counts. The choices are pure functions, tested on
a CPU; the captures themselves run only where a GPU is (``-m gpu``)."""
from __future__ import annotations

import logging

import pytest
import torch
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from builder import TINY_CHECKPOINT, chat, load_chatglm2
from builder.model.cuda_quant import FUSED_MAX_TOKENS
from builder.serving import batcher as batcher_module
from builder.model.generation import (GRAPHS_ENV, StaticDecoder, decode_step_kind, generate_ids,
                                sample_next, static_cache_tokens)
from builder.serving.batcher import (KV_BUCKETS, Q_PADDING_TOKENS, Batcher, BatcherConfig,
                                     continuous_batching_config, cuda_graphs_decision,
                                     kv_padding_tokens)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIG = BatcherConfig(num_blocks=64, block_size=16, max_batch_tokens=256, seed=3)
# What the batcher asked for before graphs (and still asks for on a CPU), key for key.
BEFORE = dict(num_blocks=64, page_size=16, max_batch_tokens=256,
              allow_block_sharing=True, seed=3)
GRAPH_KEYS = {"use_cuda_graph", "use_async_batching", "q_padding_interval_size",
              "kv_padding_interval_size"}


def graph_part(kwargs: dict) -> dict:
    """The graph arguments of ``kwargs``, after checking the rest still asks for the same pool."""
    assert kwargs.items() >= BEFORE.items()
    return {k: v for k, v in kwargs.items() if k in GRAPH_KEYS}


# -- the batcher's ContinuousBatchingConfig, per device kind ---------------------------------------
@pytest.mark.parametrize("env", [None, "1", "0"])
def test_on_a_cpu_nothing_changes_whatever_the_switch(monkeypatch, env):
    if env is None:
        monkeypatch.delenv(GRAPHS_ENV, raising=False)
    else:
        monkeypatch.setenv(GRAPHS_ENV, env)
    for config in (CONFIG, BatcherConfig(**{**CONFIG.__dict__, "cuda_graphs": True})):
        assert graph_part(continuous_batching_config(config, "cpu")) == {}
        on, why = cuda_graphs_decision(config, torch.device("cpu"))
        assert not on and "cpu" in why


def test_on_cuda_graphs_padding_and_async_batching_are_asked_for(monkeypatch):
    monkeypatch.delenv(GRAPHS_ENV, raising=False)
    kwargs = continuous_batching_config(CONFIG, "cuda:0")
    assert graph_part(kwargs) == {"use_cuda_graph": True, "use_async_batching": True,
                                  "q_padding_interval_size": Q_PADDING_TOKENS,
                                  "kv_padding_interval_size": kv_padding_tokens(64, 16)}
    # a decode step of up to 8 requests stays on the fused int8/int4 kernel when padded
    assert Q_PADDING_TOKENS == FUSED_MAX_TOKENS == 8
    resolved = ContinuousBatchingConfig(**kwargs)
    assert resolved.cuda_graph_booleans == (True, True)  # varlen (paged SDPA) and decode paths
    no_async = continuous_batching_config(BatcherConfig(num_blocks=64, async_batching=False), "cuda")
    assert no_async["use_cuda_graph"] is True and no_async["use_async_batching"] is False


@pytest.mark.parametrize("env", ["0", "off", "False", " no "])
def test_the_switch_turns_graphs_off_on_cuda(monkeypatch, env):
    monkeypatch.setenv(GRAPHS_ENV, env)
    kwargs = continuous_batching_config(CONFIG, torch.device("cuda", 1))
    assert graph_part(kwargs) == {"use_cuda_graph": False, "use_async_batching": False}
    assert ContinuousBatchingConfig(**kwargs).cuda_graph_booleans == (False, False)
    on, why = cuda_graphs_decision(CONFIG, "cuda")
    assert not on and GRAPHS_ENV in why


def test_the_config_field_wins_over_the_switch(monkeypatch):
    monkeypatch.setenv(GRAPHS_ENV, "0")
    forced = BatcherConfig(num_blocks=64, cuda_graphs=True)
    assert continuous_batching_config(forced, "cuda")["use_cuda_graph"] is True
    monkeypatch.setenv(GRAPHS_ENV, "1")
    off = BatcherConfig(num_blocks=64, cuda_graphs=False)
    assert continuous_batching_config(off, "cuda")["use_cuda_graph"] is False
    with pytest.raises(ValueError, match=r"BatcherConfig\.cuda_graphs .*got 'yes'"):
        BatcherConfig(num_blocks=64, cuda_graphs="yes")


def test_key_padding_splits_the_pool_into_whole_block_buckets():
    assert kv_padding_tokens(256, 256) == 8192  # 65536 tokens in 8 buckets
    assert kv_padding_tokens(9, 64) == 2 * 64  # rounded up to whole blocks: 9 blocks, 8 buckets
    assert kv_padding_tokens(1, 16) == 16  # never below one block
    for blocks, size in ((64, 16), (100, 256), (7, 64)):
        padding = kv_padding_tokens(blocks, size)
        assert padding % size == 0 and -(-blocks * size // padding) <= KV_BUCKETS


def test_a_cpu_batcher_resolves_graphs_off_and_says_why_once(tiny, monkeypatch, caplog):
    monkeypatch.setattr(batcher_module, "_graphs_said", set())
    model, tok = tiny
    with caplog.at_level(logging.WARNING, logger="glm-build.batcher"):
        first, second = Batcher(model, tok, CONFIG), Batcher(model, tok, CONFIG)
    for b in (first, second):
        resolved = b._manager.continuous_batching_config
        assert resolved.cuda_graph_booleans == (False, False) and not resolved.use_async_batching
        assert b._manager.batch_processor is None  # no warm-up on a CPU: nothing to capture
    said = [r.getMessage() for r in caplog.records if "CUDA graphs" in r.getMessage()]
    assert said == ["CUDA graphs off for the batch steps: the model is on cpu, not CUDA: "
                    "CUDA graphs do not apply"]


# -- our own loop (chat(), glm-build profile, the GPU bench) ------------------------------------------
def test_our_loop_decodes_eagerly_on_a_cpu_and_through_a_graph_on_cuda(monkeypatch):
    monkeypatch.delenv(GRAPHS_ENV, raising=False)
    assert decode_step_kind("cpu")[0] == "eager"
    assert decode_step_kind(torch.device("cuda", 0))[0] == "graph"
    monkeypatch.setenv(GRAPHS_ENV, "0")
    kind, why = decode_step_kind("cuda")
    assert kind == "eager" and why == f"{GRAPHS_ENV}=0"
    assert decode_step_kind("cpu")[0] == "eager"


def test_static_cache_length_rounds_up_and_stays_within_the_model():
    assert static_cache_tokens(300, 32768) == 512
    assert static_cache_tokens(512, 32768) == 512
    assert static_cache_tokens(3900, 4000) == 4000  # never past seq_length ...
    assert static_cache_tokens(5000, 4096) == 5000  # ... unless the request itself asks for more


def _greedy_static(model, ids, steps, *, capture=False) -> list[int]:
    with torch.inference_mode():
        decoder = StaticDecoder(model, static_cache_tokens(len(ids) + steps, 32768), capture=capture)
        out, logits = [], decoder.prefill(ids)
        for _ in range(steps):
            out.append(sample_next(logits, 0, 1))
            logits = decoder.step(out[-1])
    return out


@pytest.mark.parametrize("bits, attention", [(16, "sdpa"), (4, "sdpa"), (16, "eager")])
def test_the_static_decoder_gives_the_dynamic_loops_greedy_ids(bits, attention):
    model, tok = load_chatglm2(TINY_CHECKPOINT, bits=bits,
                               dtype=torch.float32 if bits == 16 else torch.bfloat16)
    model.set_attn_implementation(attention)  # eager adds the mask: it must be additive
    ids = tok.build_chat_input("3只鸡和2只兔子一共有几条腿？", [])
    dynamic = list(generate_ids(model, ids, max_length=len(ids) + 32, temperature=0, top_p=1,
                                stop_ids=()))
    assert len(dynamic) == 32
    assert _greedy_static(model, ids, 32) == dynamic
    assert not hasattr(model, "_glm_static_decoder")  # the CPU path made no static cache


def test_a_static_decoder_refuses_what_does_not_fit(tiny):
    model, _ = tiny
    decoder = StaticDecoder(model, 8, capture=False)
    with pytest.raises(ValueError, match="does not fit a static cache of 8"):
        decoder.prefill(list(range(3, 11)))
    with torch.inference_mode():
        decoder.prefill([3, 4, 5, 6, 7, 8, 9])
        decoder.step(10)
        with pytest.raises(ValueError, match="full"):
            decoder.step(11)


# -- on a GPU: captured at warm-up, the same greedy answers with graphs on and off -----------------
def _answers(batcher: Batcher, questions) -> list[str]:
    handles = [batcher.submit(q, [], max_length=96, temperature=0, on_update=lambda *a: None)
               for q in questions]
    assert all(h.wait(120) for h in handles)
    assert all(h.error is None for h in handles), [h.error for h in handles]
    return [h.response for h in handles]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_graphs_on_and_off_give_the_same_greedy_answers_on_cuda(bits):
    model, tok = load_chatglm2(TINY_CHECKPOINT, device="cuda", dtype=torch.float16,
                               bits=bits)
    questions = ["你好", "3只鸡和2只兔子一共有几条腿？", "What is 2 plus 3?"]
    out = {}
    for graphs in (False, True):
        config = BatcherConfig(num_blocks=64, block_size=16, max_batch_tokens=128,
                               cuda_graphs=graphs)
        with Batcher(model, tok, config) as batcher:
            resolved = batcher._manager.continuous_batching_config
            assert any(resolved.cuda_graph_booleans) is graphs
            if graphs:  # captured at warm-up, before the first request
                processor = batcher._manager.batch_processor
                io = processor.inputs_and_outputs
                pairs = getattr(io, "io_pairs", None)
                stores = [p.device_io.graphs for p in pairs] if pairs else [io.graphs]
                assert any(store._storage for store in stores)
            out[graphs] = _answers(batcher, questions)
    assert out[True] == out[False]
    expected = [chat(model, tok, q, temperature=0, max_length=96)[0] for q in questions]
    assert out[False] == expected


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_our_loop_replays_one_graph_with_the_eager_loops_answers_on_cuda(bits, monkeypatch):
    model, tok = load_chatglm2(TINY_CHECKPOINT, device="cuda", dtype=torch.float16, bits=bits)
    ids = tok.build_chat_input("3只鸡和2只兔子一共有几条腿？", [])
    monkeypatch.setenv(GRAPHS_ENV, "0")
    eager = list(generate_ids(model, ids, max_length=len(ids) + 48, temperature=0, top_p=1,
                              stop_ids=()))
    monkeypatch.delenv(GRAPHS_ENV)
    graphed = list(generate_ids(model, ids, max_length=len(ids) + 48, temperature=0, top_p=1,
                                stop_ids=()))
    assert model._glm_static_decoder.graph is not None  # captured, not fallen back
    assert graphed == eager
    again = list(generate_ids(model, ids, max_length=len(ids) + 48, temperature=0, top_p=1,
                              stop_ids=()))
    assert again == eager  # the cache reset and the graph replayed for a second request


# -- int8/int4 projections inside a capture ---------------------------------------------------------
def test_a_capture_that_meets_the_unloaded_kernel_extracts_and_says_so_once(monkeypatch, caplog):
    from builder.model import cuda_quant
    from builder.model.quantization import QuantizedLinear

    layer = QuantizedLinear.from_float(torch.randn(64, 128), None, 8)
    x = torch.randn(2, 128, dtype=torch.float16)
    launched = []
    monkeypatch.setattr(cuda_quant, "fused_applies", lambda *a: True)
    monkeypatch.setattr(cuda_quant, "fused_linear", lambda *a: launched.append(1) or "fused")
    monkeypatch.setattr(cuda_quant, "_fused_loaded", set())
    monkeypatch.setattr(cuda_quant, "_said", set())
    monkeypatch.setattr(cuda_quant, "capturing", lambda x: True)
    with caplog.at_level(logging.WARNING, logger="glm-build.cuda_quant"):
        first = cuda_quant.linear(x, layer.weight, layer.weight_scale, 8, None)
        cuda_quant.linear(x, layer.weight, layer.weight_scale, 8, None)
    assert launched == [] and first.shape == (2, 64)  # extraction ran, not the kernel
    expected = x.float() @ (layer.weight.float() * layer.weight_scale.float()[:, None]).t()
    assert torch.allclose(first.float(), expected, rtol=1e-2, atol=1e-2)
    assert len([r for r in caplog.records if "not loaded before a CUDA graph" in r.getMessage()]) == 1
    # once it has run eagerly on the device (the warm-up step), a capture takes the kernel
    monkeypatch.setattr(cuda_quant, "capturing", lambda x: False)
    assert cuda_quant.linear(x, layer.weight, layer.weight_scale, 8, None) == "fused"
    monkeypatch.setattr(cuda_quant, "capturing", lambda x: True)
    assert cuda_quant.linear(x, layer.weight, layer.weight_scale, 8, None) == "fused"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits, tokens", [(8, 1), (4, 1), (4, 8), (8, 16)])
def test_a_quantized_projection_replays_from_a_graph_as_it_ran_eagerly(bits, tokens):
    from builder.model.quantization import QuantizedLinear

    layer = QuantizedLinear.from_float(torch.randn(4608, 4096), torch.randn(4608), bits,
                                       device="cuda")
    x = torch.randn(tokens, 4096, dtype=torch.float16, device="cuda")
    eager = layer(x)  # loads the fused kernel (tokens <= 8) before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, layer(x))  # the replay read the new input through the kept pointers
    assert not torch.equal(out, eager)


# -- the plan counts what graphs cost ----------------------------------------------------------------
def test_the_graph_term_counts_the_largest_step_and_the_second_inputs():
    from builder import CHATGLM2_6B
    from builder.plan.memory import activation_bytes, cuda_graph_bytes

    sync = cuda_graph_bytes(CHATGLM2_6B, 4, 512, 2048, 65536, async_batching=False)
    assert sync == (activation_bytes(CHATGLM2_6B, 4, 512, "encode", all_logits=False)
                    + 2 * 2048 * 4096 * 2)  # K and V of one 2048-token request, all heads
    with_async = cuda_graph_bytes(CHATGLM2_6B, 4, 512, 2048, 65536)
    assert with_async - sync == 512 * (65536 + 512) * 4 + 512 * 32 + (65536 + 1024) * 8
    assert cuda_graph_bytes(CHATGLM2_6B, 4, 512, 8192, 65536) > with_async  # a longer request
    with pytest.raises(ValueError, match="pool_tokens must be a positive integer"):
        cuda_graph_bytes(CHATGLM2_6B, 4, 512, 2048, 0)


@pytest.mark.parametrize("profile, precisions", [("h200-141gb", "fp16,int8,int4"),
                                                  ("p40x2", "fp16,int8,int4"), ("cpu", "int4")])
def test_gpu_pools_make_room_for_the_graphs_and_cpu_pools_do_not_change(profile, precisions,
                                                                        monkeypatch):
    from builder import CHATGLM2_6B, load_profile
    from builder.plan import placement as plan_module

    gpu = load_profile(profile)
    counted = plan_module.make_plan(CHATGLM2_6B, precisions, gpu)
    monkeypatch.setattr(plan_module, "cuda_graph_bytes", lambda *a, **k: 0)
    uncounted = plan_module.make_plan(CHATGLM2_6B, precisions, gpu)
    pairs = list(zip(counted.placements, uncounted.placements))
    if gpu.kind == "cpu":
        assert all(a.kv_blocks == b.kv_blocks for a, b in pairs)
    else:
        assert all(a.kv_blocks <= b.kv_blocks for a, b in pairs)
        assert any(a.kv_blocks < b.kv_blocks for a, b in pairs)  # the term is not free
        assert all(a.concurrency(a.max_tokens) >= 1 for a, _ in pairs)
