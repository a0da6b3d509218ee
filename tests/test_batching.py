"""Many requests at once, live: the variants' continuous batchers behind the routers.

One server for the module: the tiny repository built with the `cpu` profile, routing limits low
enough that each variant gets picked, and ``--fallback none`` (tests/test_serving.py's server has
the default, ``lower``, and checks that a killed variant's requests get answers from int4).
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import time

import psutil
import pytest
import torch
import tritonclient.grpc as grpcclient

from builder import TINY_CHECKPOINT, chat, load_chatglm2
from builder.client.chat import ChatGLMClient

from conftest import finish_later, glm_samples, serve_tiny_repository

pytestmark = pytest.mark.server

QUESTIONS = ["3只鸡和2只兔子一共有几条腿？", "5只鸡有几条腿？", "How many legs do 4 rabbits have?",
             "2只兔子有几条腿？", "How many legs do 7 chickens have?", "6只鸡和1只兔子一共有几条腿？",
             "How many legs do 3 chickens and 3 rabbits have?", "9只兔子有几条腿？"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = serve_tiny_repository(tmp_path_factory.mktemp("batching") / "repo", fallback="none")
    yield server
    finish_later("the batching server", server.stop)


def ask(server, question, max_token=64, model=None):
    client = ChatGLMClient(server.urls["grpc"], temperature=0, max_token=max_token, timeout_s=120)
    try:
        return client.chat(question, model=model)
    finally:
        client.close()


def served_dtype(server, model: str) -> str:
    """What ``model`` computes in, from the config the server loaded."""
    with grpcclient.InferenceServerClient(server.urls["grpc"]) as client:
        config = client.get_model_config(model, as_json=True)["config"]
    return config["parameters"]["dtype"]["string_value"]


def metrics(server) -> dict[str, float]:
    """``glm_*`` samples by ``name[model]`` (variants) or ``name[served]`` (router fallbacks)."""
    return {f"{name}[{labels.get('model', labels.get('served', ''))}]": value
            for name, labels, value in glm_samples(server)}


def test_eight_concurrent_requests_get_the_answers_chat_gives_each_alone(server):
    dtype = served_dtype(server, "chatglm2-6b-fp16")  # bfloat16 on the `cpu` profile, by default
    model, tokenizer = load_chatglm2(TINY_CHECKPOINT, dtype=getattr(torch, dtype))
    expected = [chat(model, tokenizer, q, max_length=64, temperature=0)[0] for q in QUESTIONS]
    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda q: ask(server, q), QUESTIONS))
    assert [a.variant for a in answers] == ["fp16"] * len(QUESTIONS)
    assert [a.response for a in answers] == expected


def test_the_batch_metrics_are_on_the_metrics_port(server):
    ask(server, QUESTIONS[0])
    time.sleep(1.5)  # the variants publish every second
    found = metrics(server)
    for name in ("glm_batch_running_requests", "glm_batch_queued_requests", "glm_kv_blocks_used",
                 "glm_kv_blocks_free", "glm_generated_tokens_total", "glm_prompt_tokens_total",
                 "glm_prompt_tokens_reused_total",
                 "glm_time_to_first_token_seconds_count"):
        assert f"{name}[chatglm2-6b-fp16]" in found, name
    assert found["glm_generated_tokens_total[chatglm2-6b-fp16]"] > 0
    assert found["glm_time_to_first_token_seconds_count[chatglm2-6b-fp16]"] >= 1
    assert found["glm_kv_blocks_used[chatglm2-6b-fp16]"] == 0  # nothing running now


def test_a_chats_next_turn_finds_its_history_in_the_kv_pool(server):
    """The `cpu` plan's 16-token blocks: the second turn of a chat, sent with its history through
    the router, is counted on the metrics port as prompt tokens found in the pool."""
    client = ChatGLMClient(server.urls["grpc"], temperature=0, max_token=160, timeout_s=120)
    try:
        first = client.chat("A cage holds chickens and rabbits: 21 heads and 60 feet. How many of each?",
                            model="chatglm2-6b-fp16")
        time.sleep(1.5)  # the variants publish every second
        before = metrics(server)
        second = client.chat("And with 30 heads?", first.history, model="chatglm2-6b-fp16")
    finally:
        client.close()
    time.sleep(1.5)
    after = metrics(server)
    assert second.variant == "fp16" and len(second.history) == 2
    name = "glm_prompt_tokens_reused_total[chatglm2-6b-fp16]"
    assert after[name] - before[name] >= 16  # at least the first turn's whole blocks
    prompt = "glm_prompt_tokens_total[chatglm2-6b-fp16]"
    assert after[prompt] - before[prompt] > after[name] - before[name]


def test_a_bad_request_among_good_ones_fails_alone(server):
    def one(i):
        if i == 3:  # the prompt alone is longer than max_token: the variant refuses it
            return ask(server, QUESTIONS[0] * 6, max_token=20, model="chatglm2-6b-int4")
        return ask(server, QUESTIONS[i], model="chatglm2-6b-int4")

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
    for i, future in enumerate(futures):
        if i == 3:
            with pytest.raises(Exception, match="max_token"):
                future.result()
        else:
            assert future.result().response


def test_without_fallback_a_killed_variant_fails_its_requests(server):
    marker = os.path.join(str(server.repo), "chatglm2-6b-int8", "1", "model.py")
    group = os.getpgid(server.pid)
    victims = [p for p in psutil.process_iter(["cmdline"])
               if any(marker in part for part in p.info["cmdline"] or []) and os.getpgid(p.pid) == group]
    assert victims
    server.watchdog.stop()  # keep it dead for this test
    victims[0].send_signal(signal.SIGKILL)
    time.sleep(1)
    with pytest.raises(Exception, match="chatglm2-6b-int8"):
        ask(server, QUESTIONS[0], max_token=300)  # routed to int8; --fallback none
    assert ask(server, QUESTIONS[0], max_token=1200).variant == "int4"


def test_glm_chat_concurrency_reports_ttft_and_tokens_per_second(server, capsys):
    from builder.client.cli import main as glm_chat_main

    from builder.model.tokenizer import ChatGLM2Tokenizer

    answer = ask(server, QUESTIONS[0]).response  # greedy: each of the 6 answers is this one
    tokens = 6 * len(ChatGLM2Tokenizer(TINY_CHECKPOINT / "tokenizer.model").encode(answer))
    port = server.urls["grpc"].rsplit(":", 1)[1]
    started = time.perf_counter()
    status = glm_chat_main([QUESTIONS[0], "-p", port, "-c", "6", "-j", "3", "-t", "0", "-m", "64",
                            "--tokenizer", str(TINY_CHECKPOINT / "tokenizer.model")])
    outer_s = time.perf_counter() - started
    err = capsys.readouterr().err
    assert status == 0, err
    match = re.search(r"concurrency 3: 6 answers, 0 lost, ([\d.]+) tokens/s; TTFT p50 (\d+) ms "
                      r"p95 (\d+) ms; per output token p50 (\d+) ms p95 (\d+) ms", err)
    assert match, err
    per_s, ttft_p50, ttft_p95, tpot_p50, tpot_p95 = float(match.group(1)), *map(int, match.groups()[1:])
    # tokens/s counts these answers' tokens over the run's time, which is within the call's
    assert tokens / outer_s <= per_s * 1.01
    # and the run lasted at least one request: its first token, then the rest one at a time
    assert per_s <= tokens / ((ttft_p50 + tpot_p50 * (tokens / 6 - 1)) / 1000) * 1.5
    assert 0 < ttft_p50 <= ttft_p95 and 0 < tpot_p50 <= tpot_p95


def test_glm_chat_concurrency_needs_grpc_and_a_prompt(capsys):
    from builder.client.cli import main as glm_chat_main

    with pytest.raises(SystemExit) as exit_info:
        glm_chat_main(["hi", "--protocol", "http", "-j", "2"])
    assert exit_info.value.code == 2
    assert "--concurrency needs --protocol grpc and a prompt" in capsys.readouterr().err


def test_run_load_ramp_staggers_the_clients_starts(server):
    from builder.client.loadtest import run_load

    # Three clients, one request each, spread over 1.5 s: they start 0.5 s apart; every request
    # is still answered.
    result = run_load(server.urls["grpc"], [QUESTIONS[0]], concurrency=3, requests=3, max_token=64,
                      ramp_s=1.5)
    assert result.lost == 0 and len(result.timings) == 3
    starts = sorted(t.started_s for t in result.timings)
    assert starts[0] < 0.25 and [round(b - a, 1) for a, b in zip(starts, starts[1:])] == [0.5, 0.5], starts
    with pytest.raises(ValueError, match="ramp_s must be >= 0, got -1"):
        run_load(server.urls["grpc"], [QUESTIONS[0]], concurrency=1, requests=1, ramp_s=-1)
