"""The OpenAI-compatible endpoint against a live Triton, with the official ``openai`` SDK as the
client (and raw HTTP for the error cases).

One server for the module: the tiny repository (as in test_serving.py) served by ``glm-serve``
itself, on free loopback ports, with the OpenAI endpoint beside Triton and an API key from the
environment; SIGTERM at the end must stop both, every stub included.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import httpx
import openai
import pytest

from builder.client.chat import ChatGLMClient
from builder.serving.openai import API_KEY_ENV, GatewayOptions, OpenAIGateway
from builder.serving.server import free_port
from builder.model.tokenizer import ChatGLM2Tokenizer

from conftest import LIVE_LIMITS, finish_later
from test_cancellation import metrics, total
from test_server import group_processes

pytestmark = pytest.mark.server

QUESTION = "3只鸡和2只兔子一共有几条腿？"
KEY = "sk-test-0123456789"
VARIANTS = ["chatglm2-6b-fp16", "chatglm2-6b-int8", "chatglm2-6b-int4"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from builder.build.pipeline import BuildOptions, build

    base = tmp_path_factory.mktemp("openai")
    repo = build(BuildOptions(quant=("fp16", "int8", "int4"), gpu="cpu", out=base / "repo",
                              limits=LIVE_LIMITS), progress=False).out
    ports = {name: free_port() for name in ("http", "grpc", "metrics", "openai")}
    command = [sys.executable, "-m", "builder.serving.cli", str(repo), "--address", "127.0.0.1",
               "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
               "--metrics-port", str(ports["metrics"]), "--openai-port", str(ports["openai"]),
               "--log-file", str(base / "server.log"), "--start-timeout", "240"]
    stderr = open(base / "stderr.txt", "w+")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                               env=os.environ | {API_KEY_ENV: KEY})
    watchdog = threading.Timer(300, process.kill)  # a hung start never hangs the run
    watchdog.start()

    def end(group=None):
        try:
            if group is not None:
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=60) == 0  # glm-serve stops the endpoint and Triton
                assert group_processes(group) == []
        finally:
            watchdog.cancel()
            process.kill()
            process.wait()
            stderr.close()

    try:
        triton_line = process.stdout.readline()
        openai_line = process.stdout.readline()
        watchdog.cancel()
        assert openai_line.startswith("OpenAI endpoint ready"), (triton_line, openai_line,
                                                                  stderr.seek(0) or stderr.read())
        assert "API key required" in openai_line
        group = int(triton_line.split("pid ")[1].split(")")[0])
    except BaseException:
        end()
        raise
    yield types.SimpleNamespace(repo=repo, url=f"http://127.0.0.1:{ports['openai']}/v1",
                                urls={name: f"127.0.0.1:{port}" for name, port in ports.items()})
    finish_later("glm-serve with its OpenAI endpoint", lambda: end(group))


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120, trust_env=False) as c:
        yield c


def ask(question=QUESTION, **extra):
    return {"model": "chatglm2-6b", "messages": [{"role": "user", "content": question}]} | extra


def tokenizer(server) -> ChatGLM2Tokenizer:
    return ChatGLM2Tokenizer(server.repo / "chatglm2-6b-stream" / "1" / "tokenizer.model")


# -- answers ---------------------------------------------------------------------------------------

def test_models_are_listed(client):
    models = {m.id: m for m in client.models.list()}
    assert list(models) == ["chatglm2-6b", *VARIANTS]
    assert all(m.owned_by == "THUDM" and m.object == "model" for m in models.values())
    assert [models[v].model_extra["precision"] for v in VARIANTS] == ["fp16", "int8", "int4"]
    assert client.models.retrieve("chatglm2-6b-int8").model_extra["precision"] == "int8"


def test_chat_answers_the_same_streamed_or_not(server, client):
    raw = client.chat.completions.with_raw_response.create(
        model="chatglm2-6b", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=64)
    whole = raw.parse()
    assert raw.headers["x-glm-variant"] == "fp16"  # 20 + 64 tokens: within fp16's 100
    answer = whole.choices[0]
    assert answer.message.role == "assistant" and answer.message.content.startswith("3只鸡有")
    assert answer.finish_reason == "stop" and whole.object == "chat.completion"
    assert whole.id.startswith("chatcmpl-") and whole.model == "chatglm2-6b"
    assert whole.system_fingerprint == "glm-fp16"
    count = len(tokenizer(server).encode(answer.message.content))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        20, count, 20 + count)

    chunks = list(client.chat.completions.create(
        model="chatglm2-6b", messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        temperature=0, max_tokens=64, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_history_and_a_system_message(server, client):
    system = "你是一个数学老师。"
    past = [("你好", "你好！有什么可以帮你？")]
    messages = [{"role": "system", "content": system}]
    for q, a in past:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": QUESTION})
    reply = client.chat.completions.create(model="chatglm2-6b", messages=messages, temperature=0,
                                           max_tokens=40)
    # THUDM's mapping: the system message goes in front of this turn's question
    assert reply.usage.prompt_tokens == len(tokenizer(server).build_chat_input(system + QUESTION, past))
    direct = ChatGLMClient(server.urls["grpc"], temperature=0, max_token=reply.usage.prompt_tokens + 40)
    try:
        expected = direct.chat(system + QUESTION, past).response
    finally:
        direct.close()
    assert reply.choices[0].message.content == expected


def test_max_tokens_ends_with_length(client):
    reply = client.chat.completions.create(**ask(temperature=0, max_tokens=5))
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    assert reply.choices[0].message.content == "3只鸡有6条腿，"
    streamed = list(client.chat.completions.create(**ask(temperature=0, max_tokens=5, stream=True)))
    assert streamed[-1].choices[0].finish_reason == "length"


def test_a_stop_sequence_cuts_the_answer(client):
    reply = client.chat.completions.create(**ask(temperature=0, max_tokens=64, stop=["条腿"]))
    assert reply.choices[0].message.content == "3只鸡有6"
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**ask(temperature=0, max_tokens=64, stop="条腿", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "3只鸡有6"


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_variant_named_directly(client, precision):
    raw = client.chat.completions.with_raw_response.create(**ask(
        temperature=0, max_tokens=64, model=f"chatglm2-6b-{precision}"))
    reply = raw.parse()
    assert raw.headers["x-glm-variant"] == precision and reply.system_fingerprint == f"glm-{precision}"
    assert reply.model == f"chatglm2-6b-{precision}"
    assert reply.choices[0].message.content.startswith("3只鸡有")


def test_eight_streams_at_once(client):
    def stream(_):
        parts = client.chat.completions.create(**ask(temperature=0, max_tokens=64, stream=True))
        return "".join(c.choices[0].delta.content or "" for c in parts)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(stream, range(8)))
    assert len(set(answers)) == 1 and answers[0].startswith("3只鸡有")


def test_a_dropped_stream_frees_its_request(server, http):
    """A client that closes its stream mid-answer: the router cancels the request at its variant."""
    before = metrics(server)
    # The tiny model answers this prompt with dots until max_length (hundreds of tokens)
    long = ask("鸡 " * 100, temperature=0, max_tokens=1000, stream=True)
    with http.stream("POST", "/chat/completions", json=long) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        seen = []
        for line in r.iter_lines():  # up to the first piece of the answer, then hang up
            seen.append(line)
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        else:
            pytest.fail(f"the answer ended before it could be dropped: {seen}")
    deadline = time.monotonic() + 10
    while True:
        found = metrics(server)
        cancelled = (total(found, "glm_router_cancelled_requests_total", "chatglm2-6b-stream/")
                     - total(before, "glm_router_cancelled_requests_total", "chatglm2-6b-stream/"))
        idle = all(found[f"{name}[{v}]"] == 0 for v in VARIANTS
                   for name in ("glm_batch_running_requests", "glm_kv_blocks_used"))
        if cancelled == 1 and idle:
            break
        assert time.monotonic() < deadline, f"cancelled {cancelled}, idle {idle}"
        time.sleep(0.1)


# -- errors ----------------------------------------------------------------------------------------

def error(response, status: int, param=..., code=None) -> dict:
    """OpenAI's error body, checked: the status, the four fields, ``param`` and ``code`` when given."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert param is ... or body["param"] == param, body
    assert code is None or body["code"] == code, body
    return body


@pytest.mark.parametrize("body, param", [
    (ask(n=2), "n"),
    (ask(top_p=0.5), "top_p"),
    (ask(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (ask(logprobs=True), "logprobs"),
    (ask(frobnicate=1), "frobnicate"),
    (ask(temperature=3), "temperature"),
    (ask(max_tokens=0), "max_tokens"),
    ({"model": "chatglm2-6b"}, "messages"),
    ({"model": "chatglm2-6b", "messages": [{"role": "assistant", "content": "hi"}]}, "messages[0]"),
    ({"model": "chatglm2-6b", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "messages[1]"),
    ({"model": "chatglm2-6b", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
])
def test_a_bad_field_is_named(http, body, param):
    found = error(http.post("/chat/completions", json=body), 400)
    assert found["param"].startswith(param) and found["type"] == "invalid_request_error", found


def test_malformed_json_and_oversized_bodies(http):
    error(http.post("/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}),
          400, code="invalid_json")
    error(http.post("/chat/completions", content=b"x" * (5 * 2**20)), 413)


def test_an_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**ask(model="gpt-4"))
    assert caught.value.code == "model_not_found" and caught.value.param == "model"


def test_a_request_no_variant_can_serve_gets_the_routers_reason(client, http):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**ask(max_tokens=5000))
    assert caught.value.code == "context_length_exceeded"
    assert "more than any variant serves: the longest is 1500" in caught.value.message
    found = error(http.post("/chat/completions", json=ask(question="腿" * 3000)), 400, "messages")
    assert "1500" in found["message"]
    assert client.chat.completions.create(**ask(temperature=0, max_tokens=8)).choices  # still serving


def test_a_wrong_or_missing_key(server):
    with openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(**ask())
    with httpx.Client(trust_env=False) as bare:
        error(bare.post(server.url + "/chat/completions", json=ask()), 401, code="invalid_api_key")


def test_not_ready_is_503(server, tmp_path):
    """A gateway whose Triton is not there (yet): 503 with OpenAI's body, and not ready."""
    gateway = OpenAIGateway(GatewayOptions(server.repo, f"127.0.0.1:{free_port()}", port=free_port(),
                                           address="127.0.0.1"))
    with gateway:
        assert not gateway.ready()
        with httpx.Client(trust_env=False, timeout=30) as bare:
            error(bare.post(gateway.url + "/chat/completions", json=ask()), 503, code="service_unavailable")
            error(bare.get(gateway.url + "/models"), 503)


def test_the_port_cannot_change_the_server(http):
    for method, path in [("POST", "/../v2/repository/models/chatglm2-6b/unload"),
                         ("POST", "/repository/index"), ("DELETE", "/models/chatglm2-6b")]:
        assert http.request(method, path).status_code in (404, 405)


def test_a_network_address_without_a_key_is_warned_about(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert "anyone" in GatewayOptions(tmp_path, "127.0.0.1:8001", address="0.0.0.0").warning()
    assert GatewayOptions(tmp_path, "127.0.0.1:8001", address="127.0.0.1").warning() is None
    assert GatewayOptions(tmp_path, "127.0.0.1:8001", address="0.0.0.0", api_key="k").warning() is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert GatewayOptions(tmp_path, "127.0.0.1:8001", address="0.0.0.0").api_key == "from-env"
