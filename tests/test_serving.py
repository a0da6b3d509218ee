"""The generated repository in a live Triton: variants, routers, streaming, errors, glm-chat,
LangChain.

One server for the module: the tiny repository built with the `cpu` profile and routing limits low
enough that each variant gets picked, started with `glm-serve`'s library on free loopback ports.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import threading
import time
import urllib.request

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from builder.client.chat import ChatError, ChatGLMClient
from builder.client.cli import main as glm_chat_main

from conftest import LIVE_LIMITS, serve_tiny_repository

pytestmark = pytest.mark.server

LIMITS = LIVE_LIMITS  # tokens: prompt + max_token
QUESTION = "3只鸡和2只兔子一共有几条腿？"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = serve_tiny_repository(tmp_path_factory.mktemp("serving") / "repo")
    yield server
    server.stop()


@pytest.fixture
def client(server):
    c = ChatGLMClient(server.urls["grpc"], temperature=0, max_token=64, timeout_s=60)
    yield c
    c.close()


def raw_infer(server, model="chatglm2-6b", **values):
    """Send the given inputs as raw BYTES tensors (values: name -> list of bytes)."""
    with grpcclient.InferenceServerClient(server.urls["grpc"]) as c:
        inputs = []
        for name, items in values.items():
            tensor = grpcclient.InferInput(name, [len(items)], "BYTES")
            tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(len(items)))
            inputs.append(tensor)
        return c.infer(model, inputs, client_timeout=60)


def good(**overrides):
    values = {"prompt": [QUESTION.encode()], "history": [], "temperature": [b"0"],
              "max_token": [b"64"], "history_len": [b"0"]}
    return values | overrides


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_each_variant_answers_directly(client, precision):
    result = client.chat(QUESTION, model=f"chatglm2-6b-{precision}")
    assert result.variant == precision
    assert result.response.startswith("3只鸡有")
    assert result.history == [(QUESTION, result.response)]


def test_router_keeps_the_history_contract(client):
    past = [("你好", "你好！"), ("1加1等于多少？", "1加1等于2。")]
    result = client.chat("2加2等于多少？", past)
    assert result.history[:-1] == past and result.history[-1][0] == "2加2等于多少？"
    assert result.variant == "fp16"


def test_http_round_trip(server):
    http = ChatGLMClient(server.urls["http"], protocol="http", temperature=0, max_token=64)
    assert http.chat(QUESTION).variant == "fp16"


@pytest.mark.parametrize("max_token,variant", [(64, "fp16"), (300, "int8"), (1200, "int4")])
def test_routing_by_request_length(server, max_token, variant):
    result = raw_infer(server, **good(max_token=[str(max_token).encode()]))
    assert result.as_numpy("variant")[0].decode() == variant


@pytest.mark.parametrize("max_token", [2049, 40000])
def test_max_token_above_seq_length_is_clamped_then_refused(server, max_token):
    """Clamped to seq_length (2048), still above int4's 1500; 40000 is what older clients send."""
    with pytest.raises(InferenceServerException, match="needs 2048 tokens.*longest is 1500"):
        raw_infer(server, **good(max_token=[str(max_token).encode()]))


# -- routing by the prompt and the history it keeps (LIMITS: fp16 100, int8 400, int4 1500) --------

PAIRS = [(f"{a}加{a}等于多少？", f"{a}加{a}等于{2 * a}。") for a in range(1, 21)]  # 26 tokens each
LONG_PROMPT = "1加1等于多少？" * 12  # 75 tokens as a chat input, 101 after one pair


def flat(pairs) -> list[bytes]:
    return [text.encode() for pair in pairs for text in pair]


def history_of(result) -> list[tuple[str, str]]:
    return [(q.decode(), a.decode()) for q, a in result.as_numpy("history").reshape(-1, 2)]


def variant_of(result) -> str:
    return result.as_numpy("variant")[0].decode()


def test_routing_by_prompt_length(server):
    """Same history, same max_token (90): 20 + 26 tokens stay on fp16, 75 + 26 need int8."""
    values = dict(history=flat(PAIRS[:1]), history_len=[b"1"], max_token=[b"90"])
    assert variant_of(raw_infer(server, **good(**values))) == "fp16"
    result = raw_infer(server, **good(prompt=[LONG_PROMPT.encode()], **values))
    assert variant_of(result) == "int8"
    response = result.as_numpy("response")[0].decode()
    assert history_of(result) == PAIRS[:1] + [(LONG_PROMPT, response)]


def test_a_prompt_longer_than_max_token_is_refused_by_the_router(server):
    with pytest.raises(InferenceServerException) as info:
        raw_infer(server, **good(prompt=[LONG_PROMPT.encode()]))  # max_token 64
    message = str(info.value)
    assert "input 'max_token' = 64: the query alone is 75 tokens" in message
    assert "variant" not in message  # the router's own refusal: no variant was asked


@pytest.mark.parametrize("pairs,history_len,variant", [
    (10, 10, "int8"),  # 292 prompt tokens
    (20, 20, "int4"),  # 612
    (20, 1, "fp16"),  # 46: the rest is dropped, and not counted
    (20, 0, "fp16"),  # 20
])
def test_routing_by_kept_history_length(server, pairs, history_len, variant):
    result = raw_infer(server, **good(history=flat(PAIRS[:pairs]),
                                      history_len=[str(history_len).encode()]))
    assert variant_of(result) == variant
    kept = PAIRS[:pairs][len(PAIRS[:pairs]) - history_len:] if history_len else []
    assert history_of(result)[:-1] == kept


@pytest.mark.parametrize("history_len", [0, 1, 2, 3, 10])
def test_history_len_keeps_the_last_pairs(server, history_len):
    """Three pairs sent; the history output holds the ones kept, then the new pair."""
    result = raw_infer(server, **good(history=flat(PAIRS[:3]), history_len=[str(history_len).encode()],
                                      max_token=[b"128"]))
    response = result.as_numpy("response")[0].decode()
    kept = PAIRS[3 - min(history_len, 3):3]
    assert history_of(result) == kept + [(QUESTION, response)]


def test_streaming_through_the_stream_router(client):
    parts = list(client.stream("What is 2 plus 3?"))
    assert len(parts) >= 2
    texts = [p.response for p in parts]
    assert all(b.startswith(a.rstrip()) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == client.chat("What is 2 plus 3?").response
    assert parts[-1].variant == "fp16"


def test_eight_concurrent_clients_each_get_their_own_answer(server):
    """Eight different questions at once, through the router to all three variants: greedy, each
    answer is the one its question gets alone."""
    jobs = [(f"{a}加{a + 1}等于多少？", (64, 300, 1200)[a % 3]) for a in range(8)]
    start = threading.Barrier(len(jobs), timeout=60)

    def ask(job, together=False):
        question, max_token = job
        c = ChatGLMClient(server.urls["grpc"], temperature=0, max_token=max_token, timeout_s=120)
        try:
            if together:
                start.wait()
            return c.chat(question)
        finally:
            c.close()

    alone = [ask(job) for job in jobs]
    assert len({r.response for r in alone}) == len(jobs)  # so a mix-up cannot go unseen
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(job, together=True), jobs))
    for (question, _), one, many in zip(jobs, alone, together):
        assert (many.response, many.variant) == (one.response, one.variant), question
        assert many.history == [(question, one.response)]
    assert [r.variant for r in together] == ["fp16", "int8", "int4"] * 2 + ["fp16", "int8"]


# -- bad requests: a per-request error naming the field, and the model keeps serving ---------------

BAD = [
    ({"temperature": [b"warm"]}, "'temperature' must be a number, got 'warm'"),
    ({"temperature": [b"-0.5"]}, "'temperature' must not be negative, got -0.5"),
    ({"max_token": [b"0"]}, "'max_token' must be a positive integer, got 0"),
    ({"max_token": [b"1.5"]}, "'max_token' must be an integer, got '1.5'"),
    ({"history_len": [b"-1"]}, "'history_len' must not be negative, got -1"),
    ({"history_len": [b"two"]}, "'history_len' must be an integer, got 'two'"),
    ({"history": [b"only a question"]}, "odd number"),
    ({"prompt": [b"\xff\xfe broken"]}, "'prompt' is not valid UTF-8"),
    ({"max_token": [b"1800"]}, "needs 1800 tokens"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_request_names_the_field_and_the_next_one_is_served(server, change, message):
    with pytest.raises(InferenceServerException) as info:
        raw_infer(server, **good(**change))
    assert message in str(info.value)
    ok = raw_infer(server, **good())
    assert ok.as_numpy("response")[0].decode().startswith("3只鸡有")


def test_missing_input_is_named(server):
    values = good()
    del values["temperature"]
    with pytest.raises(InferenceServerException, match="temperature"):
        raw_infer(server, **values)
    assert raw_infer(server, **good()).as_numpy("variant")[0] == b"fp16"


def test_bad_request_to_a_variant_directly(client):
    client.temperature = -1
    with pytest.raises(ChatError, match="'temperature' must not be negative"):
        client.chat(QUESTION, model="chatglm2-6b-int4")
    client.temperature = 0
    assert client.chat(QUESTION, model="chatglm2-6b-int4").variant == "int4"


# -- LangChain ------------------------------------------------------------------------------------

def test_langchain_chain_with_the_chat_model(server):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    from builder.client.langchain import ChatGLMTriton

    prompt = ChatPromptTemplate.from_messages([("human", "{a}加{b}等于多少？")])
    model = ChatGLMTriton(url=server.urls["grpc"], temperature=0, max_token=64)
    chain = prompt | model | StrOutputParser()
    answer = chain.invoke({"a": 2, "b": 3})
    assert answer.startswith("2加")
    streamed = "".join(chain.stream({"a": 2, "b": 3}))
    assert streamed == answer


def test_langchain_seed_style_llm(server):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import PromptTemplate

    from builder.client.langchain import ChatGLM

    llm = ChatGLM(url=server.urls["grpc"], temperature=0, max_token=64)
    response, history = llm.chat(QUESTION, [])
    assert history == [[QUESTION, response]]
    chain = PromptTemplate.from_template("{q}") | llm | StrOutputParser()
    assert chain.invoke({"q": QUESTION}) == response


# -- glm-chat: the user's command -----------------------------------------------------------------

def glm_chat(server, capsys, protocol, *argv):
    """Run ``glm-chat`` against the server: (exit status, stdout, stderr)."""
    host, port = server.urls[protocol].rsplit(":", 1)
    capsys.readouterr()
    status = glm_chat_main(["-ip", host, "-p", port, "--protocol", protocol, "-t", "0",
                            "-m", "64", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def answer(client):
    """The greedy answer to QUESTION through the router."""
    return client.chat(QUESTION).response


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_glm_chat_answers_one_question(server, capsys, answer, protocol):
    status, out, err = glm_chat(server, capsys, protocol, QUESTION)
    assert status == 0 and out == answer + "\n"
    assert re.fullmatch(r"\[0\] variant fp16, \d+ ms\n", err), err


def test_glm_chat_streams_the_answer(server, capsys, answer, monkeypatch):
    parts = []
    stream = ChatGLMClient.stream

    def spy(self, *args, **kwargs):
        for part in stream(self, *args, **kwargs):
            parts.append(part.response)
            yield part

    monkeypatch.setattr(ChatGLMClient, "stream", spy)
    status, out, err = glm_chat(server, capsys, "grpc", "--stream", QUESTION)
    assert status == 0 and out == answer + "\n"
    assert len(parts) >= 2 and parts[-1] == answer  # printed piece by piece
    assert re.fullmatch(r"\[0\] variant fp16, \d+ ms\n", err), err


def test_glm_chat_stream_over_http_is_a_usage_error(server, capsys):
    with pytest.raises(SystemExit) as info:
        glm_chat(server, capsys, "http", "--stream", QUESTION)
    assert info.value.code == 2
    assert "--stream needs --protocol grpc" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_glm_chat_count_prints_the_latency_summary(server, capsys, answer, protocol):
    status, out, err = glm_chat(server, capsys, protocol, "-c", "3", QUESTION)
    assert status == 0 and out == (answer + "\n") * 3
    lines = err.splitlines()
    each = [int(re.fullmatch(rf"\[{i}\] variant fp16, (\d+) ms", line).group(1))
            for i, line in enumerate(lines[:3])]
    summary = re.fullmatch(r"cnt=3 min=(\d+)ms avg=(\d+)ms max=(\d+)ms", lines[3])
    assert summary and len(lines) == 4, err
    low, mean, high = map(int, summary.groups())
    assert (low, high) == (min(each), max(each)) and low <= mean <= high


def test_glm_chat_reports_a_refused_request(server, capsys):
    status, out, err = glm_chat(server, capsys, "grpc", "-m", "40000", QUESTION)
    assert status == 1 and out == ""
    assert err.startswith("glm-chat: error: ") and "needs 2048 tokens" in err


@pytest.mark.parametrize("protocol,flags", [("grpc", []), ("http", []), ("grpc", ["--stream"])])
def test_glm_chat_interactive_keeps_the_history(server, capsys, monkeypatch, protocol, flags):
    sent = []  # (prompt, history, final answer) of each request
    method = "stream" if flags else "chat"
    original = getattr(ChatGLMClient, method)

    def chat(self, prompt, history=(), **kwargs):
        result = original(self, prompt, history, **kwargs)
        sent.append((prompt, list(history), result.response))
        return result

    def stream(self, prompt, history=(), **kwargs):
        for result in original(self, prompt, history, **kwargs):
            yield result
        sent.append((prompt, list(history), result.response))

    monkeypatch.setattr(ChatGLMClient, method, stream if flags else chat)
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n1加1等于多少？\nclear\n2加2等于多少？\nexit\n"))
    status, out, _ = glm_chat(server, capsys, protocol, *flags)
    assert status == 0
    assert [(prompt, history) for prompt, history, _ in sent] == [
        ("你好", []), ("1加1等于多少？", [("你好", sent[0][2])]),  # the history kept...
        ("2加2等于多少？", [])]  # ...until 'clear'
    replies = [reply for _, _, reply in sent]
    assert out == "问: 答: {}\n问: 答: {}\n问: 问: 答: {}\n问: ".format(*replies)


# -- failures -------------------------------------------------------------------------------------

# -- security: model control belongs to glm-serve alone ---------------------------------------------

def _evil_model(marker):
    """A Python-backend model whose initialize() writes ``marker``: code a stranger would upload."""
    code = (f"class TritonPythonModel:\n    def initialize(self, args):\n"
            f"        open({str(marker)!r}, 'w').write('ran')\n"
            f"    def execute(self, requests):\n        return []\n")
    config = {"name": "evil", "backend": "python", "max_batch_size": 0,
              "input": [{"name": "X", "data_type": "TYPE_STRING", "dims": [1]}],
              "output": [{"name": "Y", "data_type": "TYPE_STRING", "dims": [1]}],
              "instance_group": [{"kind": "KIND_CPU", "count": 1}]}
    return json.dumps(config), {"file:1/model.py": code.encode()}


def _refused(call):
    with pytest.raises(InferenceServerException) as error:
        call()
    assert "is restricted, expecting header" in str(error.value), str(error.value)


def test_model_control_and_settings_are_refused_without_the_admin_key(server, tmp_path):
    marker = tmp_path / "evil-ran"
    config, files = _evil_model(marker)
    for client in (httpclient.InferenceServerClient(server.urls["http"]),
                   grpcclient.InferenceServerClient(server.urls["grpc"])):
        _refused(lambda: client.load_model("evil", config=config, files=files))
        _refused(lambda: client.unload_model("chatglm2-6b-int4"))
        _refused(lambda: client.get_model_repository_index())
        _refused(lambda: client.register_system_shared_memory("glm", "/glm-evil", 64))
        _refused(lambda: client.update_trace_settings(settings={"trace_file": str(tmp_path / "t.json")}))
        _refused(lambda: client.update_log_settings(settings={"log_file": str(tmp_path / "log.txt")}))
        _refused(lambda: client.load_model("evil", config=config, files=files,
                                           headers={"glm-admin-key": "guess"}))
        assert client.is_model_ready("chatglm2-6b-int4")  # inference & metadata stay open
        assert client.get_model_config("chatglm2-6b")  # read-only config stays open
        client.close()
    time.sleep(1)
    assert not marker.exists()
    assert not (server.repo / "evil").exists() and not list(tmp_path.glob("*.txt"))
    assert raw_infer(server, **good()).as_numpy("variant")[0] == b"fp16"  # the router still answers
    # glm-serve's own key opens the same API (read-only use here), on both protocols
    index = httpclient.InferenceServerClient(server.urls["http"]).get_model_repository_index(
        headers=server.admin_headers)
    assert {m["name"] for m in index} >= {"chatglm2-6b", "chatglm2-6b-int4"}
    assert "evil" not in {m["name"] for m in index}
    with grpcclient.InferenceServerClient(server.urls["grpc"]) as grpc:
        index = grpc.get_model_repository_index(headers=server.admin_grpc_headers, as_json=True)
    assert "chatglm2-6b-int4" in {m["name"] for m in index["models"]}


def test_a_raw_upload_over_http_is_refused(server, tmp_path):
    """What a 20-line attacker sends: POST /v2/repository/models/evil/load with a file override."""
    import urllib.error
    import urllib.request

    marker = tmp_path / "evil-ran"
    config, files = _evil_model(marker)
    body = {"parameters": {"config": config, "file:1/model.py": base64.b64encode(files["file:1/model.py"]).decode()}}
    request = urllib.request.Request(f"http://{server.urls['http']}/v2/repository/models/evil/load",
                                     data=json.dumps(body).encode(), method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as error:
        opener.open(request, timeout=30)
    assert error.value.code in (401, 403)
    time.sleep(1)
    assert not marker.exists() and not (server.repo / "evil").exists()


def stub_of(server, model: str) -> psutil.Process:
    marker = os.path.join(str(server.repo), model, "1", "model.py")
    group = os.getpgid(server.pid)
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(marker in part for part in cmdline) and os.getpgid(proc.pid) == group:
            return proc
    raise AssertionError(f"no stub process for {model}")


def test_a_killed_variant_falls_back_to_int4_and_comes_back(server):
    """--fallback lower (the default): while int8's stub is dead, or being reloaded, its requests
    are answered by int4, which covers them; tests/test_batching.py has --fallback none."""
    victim = stub_of(server, "chatglm2-6b-int8")
    victim.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE:  # Triton reaps it
        assert time.monotonic() < deadline
        time.sleep(0.1)
    int8 = good(max_token=[b"300"])
    start = time.monotonic()
    assert raw_infer(server, **int8).as_numpy("variant")[0] == b"int4"  # not an error: int4 served it
    assert time.monotonic() - start < 30  # fast, never hangs
    assert raw_infer(server, **good()).as_numpy("variant")[0] == b"fp16"
    assert raw_infer(server, **good(max_token=[b"1200"])).as_numpy("variant")[0] == b"int4"
    deadline = time.monotonic() + 120
    while True:  # Triton does not restart a dead stub: glm-serve's watchdog reloads the model
        served = raw_infer(server, **int8).as_numpy("variant")[0]  # never an error meanwhile
        if served == b"int8":
            break
        assert served == b"int4"
        assert time.monotonic() < deadline, "the int8 variant never came back"
        time.sleep(1)
    # ...through the repository API, which it may call only because it holds the admin key
    assert server.watchdog.reloads["chatglm2-6b-int8"] >= 1
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://{server.urls['metrics']}/metrics", timeout=10).read().decode()
    assert re.search(r'glm_router_fallbacks_total\{[^}]*preferred="chatglm2-6b-int8"[^}]*'
                     r'served="chatglm2-6b-int4"[^}]*\} [1-9]', text), \
        [line for line in text.splitlines() if "fallback" in line]


def test_zz_shutdown_leaves_no_server_or_stub(server):
    group = os.getpgid(server.pid)
    members = [p for p in psutil.process_iter() if _pgid(p) == group]
    assert len(members) >= 1 + 3 + 8 + 2  # server, three variants, the routers' 8 + 2 instances
    server.stop()
    time.sleep(0.5)
    assert [p for p in psutil.process_iter() if _pgid(p) == group] == []


def _pgid(proc):
    """The process group of a live process; None for one gone or a zombie (it runs nothing:
    the stub killed above stays one when nothing on this machine reaps orphans)."""
    try:
        return None if proc.status() == psutil.STATUS_ZOMBIE else os.getpgid(proc.pid)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return None
