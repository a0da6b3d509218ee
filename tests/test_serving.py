"""The generated repository in a live Triton: variants, routers, streaming, errors, LangChain.

One server for the module: the tiny repository built with the `cpu` profile and routing limits low
enough that each variant gets picked, started with `glm-serve`'s library on free loopback ports.
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import time

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from builder.build import BuildOptions, build
from builder.client import ChatError, ChatGLMClient
from builder.serving.server import ServerOptions, TritonServer, free_port

pytestmark = pytest.mark.server

LIMITS = {"fp16": 100, "int8": 400, "int4": 1500}  # tokens: prompt + max_token
QUESTION = "3只鸡和2只兔子一共有几条腿？"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("serving") / "repo"
    build(BuildOptions(quant=("fp16", "int8", "int4"), gpu="cpu", out=out, limits=LIMITS),
          progress=False)
    options = ServerOptions(out, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), address="127.0.0.1",
                            log_file=out.parent / "server.log")
    server = TritonServer(options, ready_timeout=240)
    server.start().wait_ready()
    server.repo = out
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


@pytest.mark.parametrize("max_token,variant", [(64, "fp16"), (300, "int8"), (1200, "int4"),
                                               (40000, "int4")])
def test_routing_by_request_length(server, max_token, variant):
    """max_token above seq_length (2048) is clamped; 40000 is what older clients send."""
    if max_token > 1500:  # clamped to 2048, still above int4's 1500: refused instead
        with pytest.raises(InferenceServerException, match="needs 2048 tokens.*longest is 1500"):
            raw_infer(server, **good(max_token=[str(max_token).encode()]))
        return
    result = raw_infer(server, **good(max_token=[str(max_token).encode()]))
    assert result.as_numpy("variant")[0].decode() == variant


def test_streaming_through_the_stream_router(client):
    parts = list(client.stream("What is 2 plus 3?"))
    assert len(parts) >= 2
    texts = [p.response for p in parts]
    assert all(b.startswith(a.rstrip()) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == client.chat("What is 2 plus 3?").response
    assert parts[-1].variant == "fp16"


def test_eight_concurrent_clients_lose_no_request(server):
    questions = [f"{a}加{a + 1}等于多少？" for a in range(8)]

    def ask(question):
        c = ChatGLMClient(server.urls["grpc"], temperature=0, max_token=64, timeout_s=120)
        try:
            return question, c.chat(question)
        finally:
            c.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, questions))
    assert [q for q, _ in results] == questions
    for question, result in results:
        assert result.history[-1] == (question, result.response) and result.response


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

    from builder.langchain import ChatGLMTriton

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

    from builder.langchain import ChatGLM

    llm = ChatGLM(url=server.urls["grpc"], temperature=0, max_token=64)
    response, history = llm.chat(QUESTION, [])
    assert history == [[QUESTION, response]]
    chain = PromptTemplate.from_template("{q}") | llm | StrOutputParser()
    assert chain.invoke({"q": QUESTION}) == response


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


def test_a_killed_variant_fails_fast_and_comes_back(server):
    victim = stub_of(server, "chatglm2-6b-int8")
    victim.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE:  # Triton reaps it
        assert time.monotonic() < deadline
        time.sleep(0.1)
    int8 = good(max_token=[b"300"])
    start = time.monotonic()
    with pytest.raises(InferenceServerException, match="chatglm2-6b-int8"):
        raw_infer(server, **int8)
    assert time.monotonic() - start < 30  # fails fast, never hangs
    assert raw_infer(server, **good()).as_numpy("variant")[0] == b"fp16"
    assert raw_infer(server, **good(max_token=[b"1200"])).as_numpy("variant")[0] == b"int4"
    deadline = time.monotonic() + 120
    while True:  # Triton does not restart a dead stub: glm-serve's watchdog reloads the model
        try:
            assert raw_infer(server, **int8).as_numpy("variant")[0] == b"int8"
            break
        except InferenceServerException:
            assert time.monotonic() < deadline, "the int8 variant never came back"
            time.sleep(2)
    # ...through the repository API, which it may call only because it holds the admin key
    assert server.watchdog.reloads["chatglm2-6b-int8"] >= 1


def test_zz_shutdown_leaves_no_server_or_stub(server):
    group = os.getpgid(server.pid)
    members = [p for p in psutil.process_iter() if _pgid(p) == group]
    assert len(members) >= 1 + 3 + 4  # server, three variants, two routers × 2 instances
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
