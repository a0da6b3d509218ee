"""``glm-build``: parsing and wiring (with the work monkeypatched), then the real thing end to end."""
import argparse
import json
from pathlib import Path

import pytest

import builder.cli
from builder import CHATGLM2_6B, TINY_CHECKPOINT
from builder.build.pipeline import BuildError, BuildOptions, build, resolve_model
from builder.cli import build_parser, main, options_from_args

from conftest import SMALL
from test_render import fake_checkpoint, snapshot

needs_tiny = pytest.mark.skipif(not (TINY_CHECKPOINT / "config.json").is_file(),
                                reason="the embedded tiny checkpoint is not there yet")


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# -- parsing, separately from the work -----------------------------------------------------------
@pytest.fixture
def captured(monkeypatch):
    """Replace the build with a recorder: these tests check parsing and wiring only."""
    calls = []

    class Result:
        def summary(self):
            return "summary"

    def fake_build(options):
        calls.append(options)
        return Result()

    monkeypatch.setattr(builder.cli, "build", fake_build)
    return calls


def test_arguments_become_build_options(captured, capsys):
    status, out, _ = run(capsys, "--quant", "int4,fp16", "--gpu", "p40x2", "--model", "/ckpt",
                         "--out", "repo", "--max-tokens", "8192", "--min-tokens", "1024",
                         "--limits", "int4=8192,fp16=1024", "--quantize-at", "build", "--force")
    assert status == 0 and out.strip() == "summary"
    (options,) = captured
    assert options == BuildOptions(quant=("int4", "fp16"), gpu="p40x2", model="/ckpt",
                                   out=Path("repo"), max_tokens=8192, min_tokens=1024,
                                   limits={"int4": 8192, "fp16": 1024}, quantize_at="build",
                                   force=True)


def test_defaults(captured, capsys):
    assert run(capsys, "--quant", "int4", "--gpu", "cpu")[0] == 0
    (options,) = captured
    assert options.model is None and options.spec is None and options.out == Path("generated_repo")
    assert options.quantize_at == "initialize" and not options.dry_run and not options.force
    assert options.limits == {} and options.max_tokens is None and options.min_tokens == 2048


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest


@pytest.mark.parametrize("argv,message", [
    (["--quant", "int3", "--gpu", "p40"], "quant: unknown precision int3; known: fp16, int8"),
    (["--quant", "int4,int4", "--gpu", "p40"], "names a precision twice"),
    (["--quant", "int4", "--gpu", "p40", "--spec", "chatglm2-6b"], "only with --dry-run"),
])
def test_bad_options_exit_2_naming_the_field(captured, capsys, argv, message):
    status, _, err = run(capsys, *argv)
    assert status == 2 and err.startswith("glm-build: error: ") and message.split(";")[0] in err
    assert captured == []


@pytest.mark.parametrize("argv", [
    ["--quant", "int4"],  # --gpu missing
    ["--quant", "int4", "--gpu", "p40", "--model", "x", "--spec", "chatglm2-6b", "--dry-run"],
    ["--quant", "int4", "--gpu", "p40", "--max-tokens", "0"],
    ["--quant", "int4", "--gpu", "p40", "--limits", "int4:8192"],
    ["--quant", "int4", "--gpu", "p40", "--quantize-at", "never"],
])
def test_argparse_errors_exit_2(captured, capsys, argv):
    status, _, err = run(capsys, *argv)
    assert status == 2 and "glm-build: error:" in err and captured == []


def test_help_exits_0(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0 and "--quantize-at" in out


def test_options_validate_in_post_init():
    with pytest.raises(BuildError, match="model and spec are exclusive"):
        BuildOptions(quant="int4", gpu="p40", model="x", spec="chatglm2-6b", dry_run=True)
    with pytest.raises(BuildError, match="spec: unknown 'glm3'"):
        BuildOptions(quant="int4", gpu="p40", spec="glm3", dry_run=True)
    with pytest.raises(BuildError, match="max_tokens: must be a positive integer"):
        BuildOptions(quant="int4", gpu="p40", max_tokens=-1)
    assert BuildOptions(quant="int4", gpu="p40", limits="int4=100").limits == {"int4": 100}
    with pytest.raises(BuildError, match="cpu_dtype: must be one of bfloat16, float16, got 'float32'"):
        BuildOptions(quant="fp16", gpu="cpu", cpu_dtype="float32")
    args = build_parser().parse_args(["--quant", "fp16", "--gpu", "cpu", "--dry-run"])
    assert options_from_args(args).dry_run is True and options_from_args(args).cpu_dtype == "bfloat16"
    args = build_parser().parse_args(["--quant", "fp16", "--gpu", "cpu", "--cpu-dtype", "float16"])
    assert options_from_args(args).cpu_dtype == "float16"


def test_cpu_dtype_float16_keeps_the_fp16_variant_exact_and_says_so(capsys):
    status, out, _ = run(capsys, "--quant", "fp16,int4", "--gpu", "cpu", "--spec", "chatglm2-6b",
                         "--dry-run", "--cpu-dtype", "float16")
    assert status == 0
    dtype = {line.split()[0]: line.split()[2] for line in out.splitlines()
             if line.startswith("chatglm2-6b-")}  # the plan's table: variant, device, dtype, ...
    assert dtype == {"chatglm2-6b-fp16": "float16", "chatglm2-6b-int4": "bfloat16"}


# -- the real thing ----------------------------------------------------------------------------
def test_6b_int4_on_a_p40_fits_and_says_by_how_much(capsys):
    status, out, _ = run(capsys, "--quant", "int4", "--gpu", "p40", "--spec", "chatglm2-6b",
                         "--dry-run")
    assert status == 0
    assert "GPU 0 (24.00 GiB): fits chatglm2-6b-int4 with" in out and "to spare" in out
    assert "32768" in out and "5.5 / 5.1 GB" in out and "Dry run: nothing written." in out


def test_6b_three_variants_on_one_p40_exit_2(capsys):
    status, out, err = run(capsys, "--quant", "fp16,int8,int4", "--gpu", "p40", "--spec",
                           "chatglm2-6b", "--dry-run")
    assert status == 2 and out == ""
    assert err.startswith("glm-build: error: cannot place fp16+int8+int4 of ChatGLM2-6B on p40")
    assert "--gpu p40x2" in err and "int8+int4" in err


def test_refused_build_writes_nothing(tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path / "chatglm2-6b", CHATGLM2_6B)
    out = tmp_path / "repo"
    status, _, err = run(capsys, "--quant", "fp16,int8,int4", "--gpu", "p40", "--model",
                         str(checkpoint), "--out", str(out))
    assert status == 2 and "p40x2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chatglm2-6b"]
    # and a refused build leaves an old output untouched
    fake_checkpoint(tmp_path / "small", SMALL)
    assert run(capsys, "--quant", "int4", "--gpu", "cpu", "--model", str(tmp_path / "small"),
               "--out", str(out))[0] == 0
    before = snapshot(out)
    status, _, _ = run(capsys, "--quant", "fp16,int8,int4", "--gpu", "p40", "--model",
                       str(checkpoint), "--out", str(out), "--force")
    assert status == 2 and snapshot(out) == before


def test_6b_on_p40x2_uses_both_gpus(capsys):
    status, out, _ = run(capsys, "--quant", "fp16,int8,int4", "--gpu", "p40x2", "--spec",
                         "chatglm2-6b", "--dry-run")
    assert status == 0 and "GPU 0 (24.00 GiB): fits" in out and "GPU 1 (24.00 GiB): fits" in out


def test_existing_output_needs_force(tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path / "small", SMALL)
    out = tmp_path / "repo"
    argv = ["--quant", "fp16,int4", "--gpu", "cpu", "--model", str(checkpoint), "--out", str(out)]
    status, stdout, _ = run(capsys, *argv)
    assert status == 0 and f"Wrote {out}/" in stdout and "NOT ChatGLM2-6B" not in stdout
    before = snapshot(out)
    status, _, err = run(capsys, *argv)
    assert status == 2 and "--force" in err and snapshot(out) == before
    assert run(capsys, *argv, "--force")[0] == 0


@needs_tiny
def test_default_model_is_the_embedded_demo_and_says_so(tmp_path, capsys):
    out = tmp_path / "generated_repo"
    status, stdout, _ = run(capsys, "--quant", "fp16,int8,int4", "--gpu", "cpu", "--out", str(out))
    assert status == 0
    assert "embedded demo model" in stdout and "NOT ChatGLM2-6B" in stdout
    assert "ChatGLM2-6B fp16+int8+int4 on cpu" in stdout  # the 6B comparison, always
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "chatglm2-6b", "chatglm2-6b-fp16", "chatglm2-6b-int4", "chatglm2-6b-int8",
        "chatglm2-6b-stream"]
    record = json.loads((out / "build.json").read_text())
    assert record["inputs"]["model"]["is_demo"] is True
    assert "NOT ChatGLM2-6B" in (out / "report.md").read_text()


@needs_tiny
def test_quantize_at_build_saves_weights_that_give_the_load_time_logits(tmp_path, capsys):
    """Each int variant loads its saved weights as the variant does (the parameters of its
    config.pbtxt) and gets the logits of quantizing the source checkpoint at load."""
    import torch

    from builder import load_chatglm2
    from builder.model.quantization import QuantizedLinear
    from builder.model.tokenizer import ChatGLM2Tokenizer
    from test_render import params, parse

    out = tmp_path / "repo"
    status, _, _ = run(capsys, "--quant", "fp16,int8,int4", "--gpu", "cpu", "--quantize-at",
                       "build", "--out", str(out))
    assert status == 0
    assert params(parse(out / "chatglm2-6b-fp16" / "config.pbtxt"))["checkpoint"] == "1/weights"
    tokenizer = ChatGLM2Tokenizer(TINY_CHECKPOINT / "tokenizer.model")
    ids = torch.tensor([tokenizer.build_chat_input("3只鸡和2只兔子一共有几条腿？")])  # [1, seq]
    for precision, bits in (("int8", 8), ("int4", 4)):
        p = params(parse(out / f"chatglm2-6b-{precision}" / "config.pbtxt"))
        assert p["quantize_at"] == "build" and int(p["bits"]) == bits
        assert p["checkpoint"] == "1/weights"  # relative to the model's folder
        dtype = getattr(torch, p["dtype"])
        saved, _ = load_chatglm2(out / f"chatglm2-6b-{precision}" / p["checkpoint"], bits=bits, dtype=dtype,
                                 group_size=int(p["group_size"]) or None)
        assert isinstance(saved.model.layers[0].mlp.down_proj, QuantizedLinear)
        at_load, _ = load_chatglm2(TINY_CHECKPOINT, bits=bits, dtype=dtype)
        with torch.no_grad():
            a = at_load(input_ids=ids).logits.float()  # [1, seq, vocab]
            b = saved(input_ids=ids).logits.float()
        # the same codes and scales (scales stored in fp16, as THUDM does): the same logits
        assert float((a - b).norm() / a.norm()) < 1e-3, precision


# -- hub ids -----------------------------------------------------------------------------------
def hub_cache(root: Path, repo_id: str, config) -> Path:
    """A Hugging Face cache laid out by hand: refs/main → snapshots/<hash>/ files."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo_id.replace('/', '--')}"
    fake_checkpoint(folder / "snapshots" / revision, config)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return folder / "snapshots" / revision


def test_hub_id_resolves_from_the_local_cache(tmp_path, monkeypatch, capsys):
    snapshot_dir = hub_cache(tmp_path / "hub", "THUDM/chatglm2-6b", CHATGLM2_6B)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model(BuildOptions(quant="int4", gpu="p40", model="THUDM/chatglm2-6b"))
    assert source.checkpoint == snapshot_dir and source.label == "ChatGLM2-6B"
    assert source.config == CHATGLM2_6B and not source.is_demo
    status, out, _ = run(capsys, "--quant", "int4", "--gpu", "p40", "--model",
                         "THUDM/chatglm2-6b", "--dry-run")
    assert status == 0 and "glm-build plan: ChatGLM2-6B on p40" in out


def test_hub_id_not_in_the_cache_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(BuildError, match="'THUDM/chatglm2-6b' is not a folder and not in"):
        build(BuildOptions(quant="int4", gpu="p40", model="THUDM/chatglm2-6b", dry_run=True))
    status, _, err = run(capsys, "--quant", "int4", "--gpu", "p40", "--model", "THUDM/nope",
                         "--dry-run")
    assert status == 2 and "never downloads" in err


def test_missing_folder_is_not_taken_for_a_hub_id(tmp_path, capsys):
    status, _, err = run(capsys, "--quant", "int4", "--gpu", "p40", "--model",
                         str(tmp_path / "nowhere"), "--dry-run")
    assert status == 2 and "is not a checkpoint folder" in err
