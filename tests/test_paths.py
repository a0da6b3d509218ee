"""Any folder serves (issue 28): a repository, checkpoint or mount whose path holds a space, a quote,
a backslash or Chinese characters builds, loads and answers, because nothing the Python-backend stub
is given or opens holds such a character (``builder.serving.stub_paths``); a model that does not
load is named with its cause (``builder.serving.load_causes``).

What Triton 2.51 does with each character when given the path as it is (seen with this wheel):
a space: the stub dies with ``std::invalid_argument: stol`` and Triton waits for it forever; a
quote: ``bash: unexpected EOF while looking for matching quote``, same wait; a backslash: bash eats
it, ``Python model file not found``; Chinese characters: ``UnicodeEncodeError: 'ascii' codec``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from builder import TINY_CHECKPOINT
from builder.build.pipeline import BuildOptions, build
from builder.model.checkpoint import check_checkpoint
from builder.serving import cli
from builder.serving.load_causes import LoadCauses
from builder.serving.params import resolve_path
from builder.serving.server import ServerOptions, TritonServer
from builder.serving.params import ALIASES_ENV
from builder.serving.stub_paths import StubPaths, model_paths, stub_safe

from conftest import LIVE_LIMITS
from test_server import group_processes, write_model

ODD = "my \"odd\" 'path' \\ 模型 dir"  # every character the stub launcher cannot take, at once
CHARACTERS = [" ", "'", '"', "\\", "模型"]
QUESTION = "3只鸡和2只兔子一共有几条腿？"
ANSWER = "3只鸡有6条腿，2只兔子有8条腿，一共有14条腿。"

# Reports what the stub was given, and opens it (which the ASCII-only stub cannot for 模型).
PROBE = '''
import os
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        print("PROBE " + args["model_repository"], flush=True)
        os.listdir(args["model_repository"])

    def execute(self, requests):
        return [pb_utils.InferenceResponse([]) for _ in requests]
'''


def odd_checkpoint(root: Path) -> Path:
    """The tiny checkpoint copied into a folder named :data:`ODD` under ``root``."""
    return Path(shutil.copytree(TINY_CHECKPOINT, root / ODD / "tiny 检查点"))


def stub_view(paths: StubPaths, model: str, written: Path) -> Path:
    """What ``resolve_path`` computes inside the stub, with glm-serve's environment."""
    aliases = json.loads(paths.environment().get(ALIASES_ENV, "{}"))
    model_dir = paths.repository / model  # args["model_repository"]
    seen = written if written.is_absolute() else model_dir / written
    return Path(aliases.get(str(seen), seen))


# -- what the stub is given, one character at a time ------------------------------------------------
@pytest.mark.parametrize("character", CHARACTERS)
def test_each_character_alone_reaches_the_stub_as_plain_ascii(tmp_path, character):
    checkpoint = Path(shutil.copytree(TINY_CHECKPOINT, tmp_path / f"in{character}put" / "ckpt"))
    out = tmp_path / f"re{character}po"
    build(BuildOptions(quant="fp16", gpu="cpu", model=str(checkpoint), out=out), progress=False)
    paths = StubPaths.open(out, base=tmp_path)
    try:
        assert not stub_safe(out.absolute()) and stub_safe(paths.repository)
        assert (paths.repository / "chatglm2-6b-fp16" / "config.pbtxt").is_file()
        for model, written in model_paths(out):
            seen = stub_view(paths, model, written)
            assert stub_safe(seen) and seen.exists(), (model, seen)
        alias = paths.repository
    finally:
        paths.close()
    assert not alias.is_symlink() and not any(tmp_path.glob("glm-serve-*"))


@pytest.mark.server
@pytest.mark.parametrize("character", CHARACTERS)
def test_triton_loads_a_model_from_a_folder_with_each_character(tmp_path, character):
    repo = tmp_path / f"a{character}b" / "repo"
    write_model(repo, "probe", PROBE)
    runtime = tmp_path / "run"
    runtime.mkdir()
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    try:
        with TritonServer(ServerOptions.on_loopback(repo, log_file=tmp_path / "log.txt"), ready_timeout=60) as server:
            alias = server.stub_paths.repository
            assert alias.parent.parent == runtime and alias.resolve() == repo.resolve()
    finally:
        del os.environ["XDG_RUNTIME_DIR"]
    log = (tmp_path / "log.txt").read_text(encoding="utf-8")
    assert f"PROBE {alias}/probe\n" in log  # the stub was given the alias
    assert log.count(f"glm-serve: serving {repo.absolute()} as {alias}") == 1  # said once
    assert list(runtime.iterdir()) == []  # the alias went with the server


def test_a_safe_repository_is_served_as_it_is(tmp_path):
    write_model(tmp_path / "repo", "probe", PROBE)
    paths = StubPaths.open(tmp_path / "repo", base=tmp_path / "nowhere")
    assert paths.repository == (tmp_path / "repo").absolute() and not paths.aliased
    assert paths.environment() == {}


# -- the checkpoint: linked, copied, or named by --weights-uri, from such a folder -----------------
@pytest.mark.parametrize("weights", ["link", "copy", "uri"])
def test_weights_from_an_odd_folder_reach_the_stub_as_plain_ascii(tmp_path, weights):
    checkpoint = odd_checkpoint(tmp_path)
    out = tmp_path / ODD / "out 仓库"
    options = dict(weights_uri=str(checkpoint)) if weights == "uri" else dict(weights=weights)
    build(BuildOptions(quant="fp16,int4", gpu="cpu", model=str(checkpoint), out=out, **options),
          progress=False)
    record = json.loads((out / "build.json").read_text(encoding="utf-8"))
    assert record["weights"]["mode"] == weights
    paths = StubPaths.open(out, base=tmp_path)
    try:
        seen = {}
        for model, written in model_paths(out):
            path = stub_view(paths, model, written)
            assert stub_safe(path) and path.exists(), (model, written, path)
            seen[model, written.name] = path
        for variant in ("chatglm2-6b-fp16", "chatglm2-6b-int4"):
            path = seen[variant, checkpoint.name if weights == "uri" else "weights"]
            assert check_checkpoint(path).num_layers == check_checkpoint(checkpoint).num_layers
        assert (seen["chatglm2-6b", "tokenizer.model"]).is_file()
        # the stub's own resolve_path, with the environment glm-serve gives it
        os.environ.update(paths.environment())
        try:
            written = next(w for m, w in model_paths(out) if m == "chatglm2-6b-fp16")  # checkpoint
            got = resolve_path(written, paths.repository / "chatglm2-6b-fp16")
            assert got == seen["chatglm2-6b-fp16", written.name] and got.is_dir()
        finally:
            os.environ.pop(ALIASES_ENV, None)
    finally:
        paths.close()
    assert not any(tmp_path.glob("glm-serve-*"))


# -- why a model did not load ----------------------------------------------------------------------
# Lines Triton 2.51 and its stubs logged here, for models served from unsafe paths without an alias.
SEEN = {
    "space": ["I1205 17:19:52.992651 12211 model_lifecycle.cc:472] \"loading: probe:1\"",
              "terminate called after throwing an instance of 'std::invalid_argument'",
              "  what():  stol"],
    "quote": ["I1205 17:17:35.659710 9400 model_lifecycle.cc:472] \"loading: probe:1\"",
              "bash: -c: line 1: unexpected EOF while looking for matching `''"],
    "backslash": ["I1205 17:18:55.865431 11231 model_lifecycle.cc:472] \"loading: probe:1\"",
                  "I1205 17:18:55.873143 11240 pb_stub.cc:2105]  Failed to preinitialize Python stub: "
                  "Python model file not found in '/tmp/p28/ab/repo/probe/1/model.py'"],
    "chinese": ["I1205 17:19:36.001 11544 model_lifecycle.cc:472] \"loading: probe:1\"",
                "E1205 17:19:36.002633 11544 model_lifecycle.cc:642] \"failed to load 'probe' version 1: "
                "Internal: UnicodeEncodeError: 'ascii' codec can't encode characters in position 9-10: "
                "ordinal not in range(128)\\n\\nAt:\\n  <frozen importlib._bootstrap_external>(147)\""],
}


@pytest.mark.parametrize("case, cause", [
    ("space", "still loading after 60 s: its stub never started; logged meanwhile: terminate called "
              "after throwing an instance of 'std::invalid_argument' (what():  stol)"),
    ("quote", "still loading after 60 s: its stub never started; logged meanwhile: bash: -c: line 1: "
              "unexpected EOF while looking for matching `''"),
    ("backslash", "still loading after 60 s: Failed to preinitialize Python stub: Python model file "
                  "not found in '/tmp/p28/ab/repo/probe/1/model.py'"),
    ("chinese", "failed: Internal: UnicodeEncodeError: 'ascii' codec can't encode characters in "
                "position 9-10: ordinal not in range(128)"),
])
def test_load_causes_name_each_model_with_the_first_line_logged(case, cause):
    causes = LoadCauses()
    for line in SEEN[case] + ["I1205 17:21:34 17849 model_lifecycle.cc:472] \"loading: okay:1\"",
                              "I1205 17:21:34 17849 model_lifecycle.cc:839] \"successfully loaded 'okay'\""]:
        causes.feed(line + "\n")
    report = causes.report(waited_s=60)
    assert report == ["probe: " + cause]


@pytest.mark.server
def test_glm_serve_prints_the_cause_of_a_stub_that_cannot_start(tmp_path):
    write_model(tmp_path / "repo", "okay", PROBE)
    write_model(tmp_path / "repo", "nostub", "import os, sys\nprint('no GPU driver here', file=sys.stderr, "
                "flush=True)\nos._exit(3)\n")
    write_model(tmp_path / "repo", "broken", "raise RuntimeError('checkpoint missing: /nowhere')\n")
    options = ServerOptions.on_loopback(tmp_path / "repo", log_file=tmp_path / "log.txt")
    command = [sys.executable, "-m", "builder.serving.cli", str(options.model_repository),
               "--address", "127.0.0.1", "--http-port", str(options.http_port),
               "--grpc-port", str(options.grpc_port), "--metrics-port", str(options.metrics_port),
               "--log-file", str(options.log_file), "--start-timeout", "20",
               "--openai-port", "0"]  # no gateway here: tests/test_openai.py has its own
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 1
    assert "nostub: still loading after 20 s: its stub never started; logged meanwhile: no GPU driver here" \
        in result.stderr, result.stderr
    assert "broken: failed: " in result.stderr and "checkpoint missing: /nowhere" in result.stderr
    assert "okay:" not in result.stderr.split("last log lines")[0]


# -- the whole way: build from and into such a folder, serve, ask, stop ----------------------------
@pytest.mark.server
def test_a_repository_in_an_odd_folder_builds_loads_and_answers(tmp_path):
    import tritonclient.grpc  # noqa: F401  (the real client, under ChatGLMClient)

    from builder.client.chat import ChatGLMClient

    checkpoint = odd_checkpoint(tmp_path)
    out = tmp_path / ODD / "生成的 repo"
    build(BuildOptions(quant=("fp16", "int8", "int4"), gpu="cpu", model=str(checkpoint), out=out,
                       limits=LIVE_LIMITS), progress=False)
    runtime = tmp_path / "run"
    runtime.mkdir()
    options = ServerOptions.on_loopback(out, log_file=tmp_path / ODD / "server log.txt")
    command = [sys.executable, "-m", "builder.serving.cli", str(out), "--address", "127.0.0.1",
               "--http-port", str(options.http_port), "--grpc-port", str(options.grpc_port),
               "--metrics-port", str(options.metrics_port), "--log-file", str(options.log_file),
               "--start-timeout", "280", "--openai-port", "0"]  # no gateway: test_openai.py
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)))
    killer = threading.Timer(400, process.kill)  # never let a hung glm-serve hang the test run
    killer.start()
    try:
        ready = process.stdout.readline()
        assert "Triton ready" in ready, process.stderr.read()
        group = int(ready.split("pid ")[1].split(")")[0])
        (folder,) = runtime.iterdir()
        assert (folder / "repo").resolve() == out.resolve()
        client = ChatGLMClient(f"127.0.0.1:{options.grpc_port}", temperature=0, max_token=64,
                               timeout_s=120)
        try:
            result = client.chat(QUESTION)
        finally:
            client.close()
        assert result.response == ANSWER and result.variant == "fp16"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        killer.cancel()
        process.kill()
        process.wait()
    assert list(runtime.iterdir()) == []  # no alias left behind
    assert group_processes(group) == []
    log = options.log_file.read_text(encoding="utf-8")
    assert log.count("glm-serve: serving ") == 1 and "UnicodeEncodeError" not in log


def test_cli_takes_a_start_timeout(tmp_path):
    args = cli.build_parser().parse_args([str(tmp_path), "--start-timeout", "12.5"])
    assert args.start_timeout == 12.5
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([str(tmp_path), "--start-timeout", "0"])


# -- every path a user passes ------------------------------------------------------------------
def test_every_command_takes_paths_from_an_odd_folder(tmp_path, monkeypatch):
    import ast

    from builder.cli import main

    checkpoint = odd_checkpoint(tmp_path)
    odd = tmp_path / ODD
    monkeypatch.chdir(tmp_path)  # --model and --out relative, the others absolute
    assert main(["--quant", "fp16,int4", "--gpu", "cpu", "--model", f"{ODD}/{checkpoint.name}",
                 "--out", f"{ODD}/out 仓库"]) == 0
    assert main(["profile", "--model", str(checkpoint), "--quant", "int4", "--device", "cpu",
                 "--workloads", "encode:16", "--out", str(odd / "profile 文件")]) == 0
    assert (odd / "profile 文件" / "profile.md").is_file()
    assert main(["deploy", "--repo", str(odd / "out 仓库"), "--out", str(odd / "部署 deploy")]) == 0
    assert (odd / "部署 deploy" / "kubernetes" / "deployment.yaml").is_file()
    curves = Path(shutil.copy(Path(__file__).parents[1] / "docs" / "service-curves" / "tiny-cpu.json",
                              odd / "curve 曲线.json"))
    assert main(["capacity", "--rate", "4/s", "--prompt-tokens", "20", "--output-tokens", "15",
                 "--ttft-p95", "1.5s", "--curves", str(curves), "--requests", "300"]) == 0
    # the generated model.py files stay valid Python, naming the folder as it is
    source = (odd / "out 仓库" / "chatglm2-6b" / "1" / "model.py").read_text(encoding="utf-8")
    compile(source, "model.py", "exec")
    assert f"checkpoint {ODD}/tiny 检查点." in ast.get_docstring(ast.parse(source))
