"""A real tritonserver on loopback, with tiny Python-backend models written into a temporary repo.

The server tests share one server (module fixture); two tests start their own small one, to watch
it stop or fail.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from builder.serving import cli, install as install_module
from builder.serving.server import (
    STUB_NAME,
    ServerInstall,
    ServerNotFoundError,
    ServerOptions,
    ServerStartError,
    TritonServer,
    find_tritonserver,
    prepare_server_tree,
    server_command,
    server_environment,
)

# --- the tiny models ------------------------------------------------------------------------------

STRING_IO = """
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
DECOUPLED = "model_transaction_policy { decoupled: true }\n"

# Echoes TEXT; "bad" gets a per-request TritonError, "raise" makes execute() raise.
ECHO = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            if b"raise" in text.tolist():
                raise ValueError("asked to raise")
            if b"bad" in text.tolist():
                error = pb_utils.TritonError("bad input: 'bad'", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", text)]))
        return responses
"""

# Decoupled: one response per word of TEXT[0], then a final flag without a response.
WORDS = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()[0]
            for word in text.split():
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", np.array([word], dtype=object))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""

# BLS: asks "echo" and upper-cases its answer.
SHOUT = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT")
            echoed = pb_utils.InferenceRequest(
                model_name="echo", requested_output_names=["TEXT"], inputs=[text]
            ).exec()
            if echoed.has_error():
                raise pb_utils.TritonModelException(echoed.error().message())
            words = pb_utils.get_output_tensor_by_name(echoed, "TEXT").as_numpy()
            upper = np.array([word.upper() for word in words.tolist()], dtype=object)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", upper)]))
        return responses
"""

# Decoupled BLS on a decoupled model: streams "words"' responses on, upper-cased.
RELAY = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "TEXT")
            stream = pb_utils.InferenceRequest(
                model_name="words", requested_output_names=["TEXT"], inputs=[text]
            ).exec(decoupled=True)
            for response in stream:
                word = pb_utils.get_output_tensor_by_name(response, "TEXT")
                if word is None:  # the final, empty response
                    continue
                upper = np.array([w.upper() for w in word.as_numpy().tolist()], dtype=object)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", upper)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""

MODELS = {"echo": (ECHO, ""), "words": (WORDS, DECOUPLED), "shout": (SHOUT, ""), "relay": (RELAY, DECOUPLED)}


def write_model(repo: Path, name: str, code: str, extra_config: str = "") -> None:
    """``repo/name/config.pbtxt`` and ``repo/name/1/model.py`` for a string-in, string-out model."""
    (repo / name / "1").mkdir(parents=True)
    config = f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n{STRING_IO}{extra_config}'
    (repo / name / "config.pbtxt").write_text(config)
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(code))


def group_processes(group: int) -> list[psutil.Process]:
    """Live tritonserver / stub processes in process group ``group``."""
    found = []
    for process in psutil.process_iter(["name", "status"]):
        if process.info["name"] not in ("tritonserver", STUB_NAME):
            continue
        try:
            if os.getpgid(process.pid) == group and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
        except ProcessLookupError:
            pass
    return found


def text_input(client_module, words: list[str], name: str = "TEXT"):
    tensor = client_module.InferInput(name, [len(words)], "BYTES")
    tensor.set_data_from_numpy(np.array([w.encode() for w in words], dtype=object))
    return tensor


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for name, (code, extra_config) in MODELS.items():
        write_model(repo, name, code, extra_config)
    options = ServerOptions.on_loopback(repo, log_file=tmp_path_factory.mktemp("log") / "tritonserver.log")
    with TritonServer(options, ready_timeout=60) as running:
        yield running


@pytest.fixture(scope="module")
def grpc_client(server):
    return grpcclient.InferenceServerClient(server.urls["grpc"])


# --- against the shared server --------------------------------------------------------------------


@pytest.mark.server
def test_round_trip_over_grpc(grpc_client):
    result = grpc_client.infer("echo", [text_input(grpcclient, ["你好", "hello"])])
    assert [t.decode() for t in result.as_numpy("TEXT")] == ["你好", "hello"]


@pytest.mark.server
def test_round_trip_over_http(server):
    client = httpclient.InferenceServerClient(server.urls["http"])
    try:
        assert client.is_model_ready("echo")
        result = client.infer("echo", [text_input(httpclient, ["three legs"])])
        assert result.as_numpy("TEXT").tolist() == [b"three legs"]
    finally:
        client.close()


@pytest.mark.server
def test_a_bad_request_leaves_the_model_serving(grpc_client):
    with pytest.raises(InferenceServerException, match="bad input"):
        grpc_client.infer("echo", [text_input(grpcclient, ["bad"])])
    with pytest.raises(InferenceServerException, match="asked to raise"):
        grpc_client.infer("echo", [text_input(grpcclient, ["raise"])])
    result = grpc_client.infer("echo", [text_input(grpcclient, ["still here"])])
    assert result.as_numpy("TEXT").tolist() == [b"still here"]


@pytest.mark.server
def test_bls_call_between_python_models(grpc_client):
    result = grpc_client.infer("shout", [text_input(grpcclient, ["quiet", "words"])])
    assert result.as_numpy("TEXT").tolist() == [b"QUIET", b"WORDS"]


def stream(server, model: str, text: str) -> tuple[list[bytes], bool]:
    """Send one streaming request; the words received and whether an empty final response closed it."""
    client = grpcclient.InferenceServerClient(server.urls["grpc"])
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, [text_input(grpcclient, [text])], enable_empty_final_response=True)
        words = []
        while True:
            result, error = responses.get(timeout=20)
            assert error is None, error
            final = result.get_response().parameters["triton_final_response"].bool_param
            output = result.as_numpy("TEXT")
            if final:
                return words, output is None
            words += output.tolist()
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.server
def test_decoupled_model_streams_over_grpc(server):
    words, empty_final = stream(server, "words", "three hens two rabbits")
    assert words == [b"three", b"hens", b"two", b"rabbits"]
    assert empty_final


@pytest.mark.server
def test_decoupled_bls_relays_a_stream(server):
    words, empty_final = stream(server, "relay", "ten legs")
    assert words == [b"TEN", b"LEGS"]
    assert empty_final


# --- servers of their own -------------------------------------------------------------------------


@pytest.mark.server
def test_stop_ends_the_server_and_every_stub(tmp_path):
    write_model(tmp_path / "repo", "echo", ECHO)
    write_model(tmp_path / "repo", "words", WORDS, DECOUPLED)
    with TritonServer(ServerOptions.on_loopback(tmp_path / "repo", log_file=tmp_path / "log.txt"), ready_timeout=60) as running:
        group = running.pid
        stubs = [p for p in group_processes(group) if p.info["name"] == STUB_NAME]
        assert len(stubs) == 2  # one per model instance, in the server's process group
        assert running.stop() is not None
    assert not running.running
    assert group_processes(group) == []


@pytest.mark.server
def test_a_broken_model_fails_fast_with_the_log(tmp_path):
    write_model(tmp_path / "repo", "broken", "this is not python\n")
    started = time.monotonic()
    with pytest.raises(ServerStartError, match="exited with code") as error:
        with TritonServer(ServerOptions.on_loopback(tmp_path / "repo", log_file=tmp_path / "log.txt"), ready_timeout=60):
            pass
    assert "broken" in str(error.value)  # the log tail names the model that failed
    assert time.monotonic() - started < 30


@pytest.mark.server
def test_glm_serve_stops_on_sigterm(tmp_path):
    write_model(tmp_path / "repo", "echo", ECHO)
    options = ServerOptions.on_loopback(tmp_path / "repo", log_file=tmp_path / "log.txt")
    command = [sys.executable, "-m", "builder.serving.cli", str(options.model_repository),
               "--http-port", str(options.http_port), "--grpc-port", str(options.grpc_port),
               "--metrics-port", str(options.metrics_port), "--log-file", str(options.log_file),
               "--openai-port", "0"]  # no router here to put the OpenAI endpoint in front of
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, process.kill)  # never let a hung glm-serve hang the test run
    watchdog.start()
    try:
        ready_line = process.stdout.readline()  # blocks until the server is ready (or glm-serve exits)
        assert f"gRPC 127.0.0.1:{options.grpc_port}" in ready_line, process.stderr.read()
        group = int(ready_line.split("pid ")[1].split(")")[0])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        watchdog.cancel()
        process.kill()
    assert group_processes(group) == []


# --- without a server -----------------------------------------------------------------------------


def test_cli_parses_every_flag(tmp_path):
    args = cli.build_parser().parse_args(
        [str(tmp_path), "--http-port", "9000", "--grpc-port", "9001", "--metrics-port", "9002",
         "--model-config-name", "h100", "--log-verbose", "1", "--log-file", "server.log"]
    )
    assert cli.options_from_args(args) == ServerOptions(
        tmp_path, http_port=9000, grpc_port=9001, metrics_port=9002,
        model_config_name="h100", log_verbose=1, log_file=Path("server.log"),
    )


def test_cli_defaults_are_tritons_ports(tmp_path):
    options = cli.options_from_args(cli.build_parser().parse_args([str(tmp_path)]))
    assert (options.http_port, options.grpc_port, options.metrics_port) == (8000, 8001, 8002)
    assert options.model_config_name is None


def test_cli_calls_serve_with_the_options(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "serve", lambda options, ready_timeout, **openai: calls.append(
        (options, ready_timeout, openai)) or 7)
    assert cli.main([str(tmp_path), "--grpc-port", "9101"]) == 7
    assert calls == [(ServerOptions(tmp_path, grpc_port=9101), 300.0,
                      {"openai_port": 9000, "openai_api_key": None})]


def test_cli_missing_repo_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"model_repository='{tmp_path / 'nowhere'}': no such folder" in err


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"http_port": 0}, "http_port=0"),
        ({"grpc_port": 70000}, "grpc_port=70000"),
        ({"metrics_port": 8000}, "ports must differ"),
        ({"model_config_name": "h 100"}, "model_config_name='h 100'"),
        ({"log_verbose": -1}, "log_verbose=-1"),
        ({"metrics_address": "localhost:1"}, "metrics_address='localhost:1'"),
    ],
)
def test_server_options_name_the_bad_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ServerOptions(tmp_path, **overrides)


def test_server_command_passes_the_options(tmp_path):
    install = ServerInstall(binary=Path("/opt/tritonserver/bin/tritonserver"), source="path")
    command = server_command(
        ServerOptions(tmp_path, http_port=1, grpc_port=2, metrics_port=3, model_config_name="h100",
                      extra_args=("--exit-timeout-secs", "5")),
        install,
        shm_prefix="glm1_",
        admin_key="k3y",
    )
    assert command[0] == "/opt/tritonserver/bin/tritonserver"
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags["--model-repository"] == str(tmp_path)
    assert (flags["--http-port"], flags["--grpc-port"], flags["--metrics-port"]) == ("1", "2", "3")
    assert flags["--model-config-name"] == "h100"
    assert flags["--exit-timeout-secs"] == "5"
    assert "--backend-directory" not in flags  # a PATH install keeps its own default
    rule = "model-repository,shared-memory,trace,logging:glm-admin-key=k3y"
    assert f"--http-restricted-api={rule}" in command and f"--grpc-restricted-protocol={rule}" in command


@pytest.mark.parametrize("flag", ["--grpc-restricted-protocol=inference:a=b", "--model-control-mode=poll",
                                  "--http-restricted-api=logging:a=b", "--load-model=evil"])
def test_flags_that_would_undo_the_restrictions_are_refused(tmp_path, flag):
    with pytest.raises(ValueError, match="extra_args.*set by glm-serve itself"):
        ServerOptions(tmp_path, extra_args=(flag,))


def test_cli_passes_triton_flags_after_the_double_dash(tmp_path):
    args = cli.parse_args(
        [str(tmp_path), "--metrics-address", "127.0.0.1", "--", "--grpc-use-ssl=true",
         "--grpc-server-cert", "cert.pem"])
    options = cli.options_from_args(args)
    assert options.extra_args == ("--grpc-use-ssl=true", "--grpc-server-cert", "cert.pem")
    assert options.metrics_address == "127.0.0.1"


def test_wheel_tree_is_prepared_once_with_the_stub_and_its_environment(tmp_path):
    install = find_tritonserver()
    if install.source != "wheel":
        pytest.skip("tritonserver comes from PATH here: nothing to prepare")
    prepared = prepare_server_tree(install, tmp_path)
    stub = prepared.backend_dir / "python" / STUB_NAME
    assert os.access(stub, os.X_OK) and os.access(prepared.binary, os.X_OK)
    assert prepare_server_tree(install, tmp_path) == prepared
    assert prepare_server_tree(prepared) is prepared  # already runnable
    assert len(list(tmp_path.iterdir())) == 1  # reused, no staging folder left behind

    env = server_environment(prepared, base={"PATH": "/usr/bin"})
    assert env["PATH"] == f"{os.path.dirname(sys.executable)}:/usr/bin"
    library_path = env["LD_LIBRARY_PATH"].split(":")
    assert sysconfig.get_config_var("LIBDIR") in library_path
    assert any(d.endswith("nvidia_pytriton.libs") for d in library_path)


def test_no_tritonserver_anywhere_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(install_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(install_module, "_wheel_install", lambda: None)
    with pytest.raises(ServerNotFoundError, match="pip install nvidia-pytriton"):
        find_tritonserver()
