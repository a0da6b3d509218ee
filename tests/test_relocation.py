"""A repository that moves: no build-machine path in any generated file, weights inside it (linked,
copied or quantized at build) or named by a path the deployment mounts, and a moved, renamed
repository served by a real Triton."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from builder import TINY_CHECKPOINT
from builder.build.pipeline import BuildError, BuildOptions, build
from builder.cli import build_parser, options_from_args
from builder.client.chat import ChatGLMClient
from builder.serving.server import ServerOptions

from conftest import serving
from test_render import fake_checkpoint, params, parse

QUESTION = "3只鸡和2只兔子一共有几条腿？"
LIMITS = {"fp16": 100, "int4": 1500}  # short requests to fp16, long ones to int4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """fp16 from the checkpoint (hard-linked in), int4 quantized at build, from a checkpoint that
    lives only on the "build machine"."""
    machine = tmp_path_factory.mktemp("build-machine")
    checkpoint = machine / "checkpoints" / "tiny-chatglm2"
    shutil.copytree(TINY_CHECKPOINT, checkpoint)
    out = machine / "work" / "generated_repo"
    build(BuildOptions(quant=("fp16", "int4"), gpu="cpu", model=str(checkpoint), out=out,
                       quantize_at="build", limits=LIMITS), progress=False)
    return machine, checkpoint, out


def generated_files(folder: Path):
    return [p for p in sorted(folder.rglob("*")) if p.is_file()]


def test_no_build_machine_path_in_any_generated_file(built):
    machine, checkpoint, out = built
    forbidden = {str(machine), str(machine.resolve()), str(checkpoint), str(out.resolve()),
                 str(Path(TINY_CHECKPOINT).resolve()), os.getcwd(), str(Path(__file__).parents[1])}
    files = generated_files(out)
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        for text in forbidden:
            assert text.encode() not in data, f"{path.relative_to(out)} names {text}"
    record = json.loads((out / "build.json").read_text())
    assert record["inputs"]["model"]["checkpoint"] == "tiny-chatglm2"  # the name, not the place
    assert record["inputs"]["options"]["out"] == "generated_repo"


def test_each_model_folder_holds_what_it_loads(built):
    _, checkpoint, out = built
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "chatglm2-6b", "chatglm2-6b-fp16", "chatglm2-6b-int4", "chatglm2-6b-stream"]
    fp16 = out / "chatglm2-6b-fp16" / "1" / "weights"
    assert sorted(p.name for p in fp16.iterdir()) == ["config.json", "model.safetensors",
                                                      "tokenizer.model"]
    assert (fp16 / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    assert json.loads((out / "chatglm2-6b-int4" / "1" / "weights" / "config.json").read_text())[
        "quantization_bit"] == 4
    weights = json.loads((out / "build.json").read_text())["weights"]
    assert weights["mode"] == "link" and weights["variants"]["chatglm2-6b-int4"]["quantized_at_build"]


def test_variants_that_load_one_checkpoint_share_its_files(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "ckpt")
    out = build(BuildOptions(quant=("fp16", "int8", "int4"), gpu="cpu", model=str(checkpoint),
                             out=tmp_path / "repo", weights="copy"), progress=False).out
    inodes = {(out / f"chatglm2-6b-{p}" / "1" / "weights" / "model.safetensors").stat().st_ino
              for p in ("fp16", "int8", "int4")}
    assert len(inodes) == 1  # one copy, hard-linked between the variants
    assert inodes != {(checkpoint / "model.safetensors").stat().st_ino}  # copied, not linked
    files = json.loads((out / "build.json").read_text())["weights"]["files"]
    assert files == {"linked": 0, "copied": 3, "shared": 6}


def test_weights_uri_leaves_the_checkpoint_out(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "ckpt")
    out = build(BuildOptions(quant=("fp16", "int4"), gpu="cpu", model=str(checkpoint),
                             out=tmp_path / "repo", weights_uri="file:///mnt/weights/chatglm2-6b/"),
                progress=False).out
    for precision in ("fp16", "int4"):
        p = params(parse(out / f"chatglm2-6b-{precision}" / "config.pbtxt"))
        assert p["checkpoint"] == "/mnt/weights/chatglm2-6b"
        assert not (out / f"chatglm2-6b-{precision}" / "1" / "weights").exists()
    assert (out / "chatglm2-6b" / "1" / "tokenizer.model").is_file()  # the routers need no mount
    assert json.loads((out / "build.json").read_text())["weights"]["uri"] == "/mnt/weights/chatglm2-6b"
    with pytest.raises(BuildError, match="mount it"):
        BuildOptions(quant="int4", gpu="cpu", weights_uri="s3://bucket/chatglm2-6b")


def test_weights_flags_reach_the_build_options():
    args = build_parser().parse_args(["--quant", "int4", "--gpu", "p40", "--weights", "copy"])
    assert options_from_args(args).weights == "copy"
    args = build_parser().parse_args(["--quant", "int4", "--gpu", "p40", "--weights-uri", "/mnt/w"])
    assert options_from_args(args).weights_uri == "/mnt/w"
    assert build_parser().parse_args(["--quant", "int4", "--gpu", "p40"]).weights == "link"
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(["--quant", "int4", "--gpu", "p40", "--weights", "copy",
                                   "--weights-uri", "/mnt/w"])


@pytest.mark.server
def test_a_moved_and_renamed_repository_serves(built, tmp_path_factory):
    machine, checkpoint, out = built
    elsewhere = tmp_path_factory.mktemp("another-machine") / "models" / "chatglm2-renamed"
    elsewhere.parent.mkdir(parents=True)
    shutil.move(str(out), str(elsewhere))
    shutil.rmtree(checkpoint)  # what the repository was built from is gone
    options = ServerOptions.on_loopback(elsewhere, log_file=elsewhere.parent / "server.log")
    with serving(options) as server:
        client = ChatGLMClient(server.urls["grpc"], temperature=0, max_token=64, timeout_s=60)
        try:
            short = client.chat(QUESTION)
            assert short.variant == "fp16" and short.response.startswith("3只鸡有")
            client.max_token = 1200  # past fp16's limit: int4, from its weights quantized at build
            long = client.chat(QUESTION)
            assert long.variant == "int4" and long.response.startswith("3只鸡有")
            parts = list(client.stream(QUESTION))  # the streaming router, same tokenizer copy
            assert parts[-1].response == long.response and parts[-1].variant == "int4"
        finally:
            client.close()
