"""scripts/bench_peer.py without timing anything: ``--family`` picks the shapes, names and depth it
extrapolates to, and (where chatglm.cpp is installed) a tiny GLM-4 checkpoint converts with
chatglm.cpp's own ``ChatGLM4Converter`` and runs in its engine."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_peer  # noqa: E402


def test_default_family_is_chatglm2_at_28_layers():
    args = bench_peer.parse_args([])
    assert (args.family, args.full_layers, args.model_name) == ("chatglm2-6b", 28, "ChatGLM2-6B")
    assert args.layer_counts == [2, 4]


def test_glm4_family_extrapolates_to_40_layers():
    args = bench_peer.parse_args(["--family", "glm-4-9b-chat", "--precisions", "int4,int8,fp16"])
    assert (args.full_layers, args.model_name) == (40, "GLM-4-9B-Chat")
    assert args.precision_list == ["int4", "int8", "fp16"]
    assert bench_peer.extrapolate(0.1, 0.3, 2, 4, args.full_layers) == pytest.approx((0.1, -0.1, 3.9))


def test_transformers_layout_is_refused():
    """chatglm.cpp converts THUDM's layout only."""
    with pytest.raises(SystemExit):
        bench_peer.parse_args(["--family", "glm-4-9b-chat-hf"])


def test_worker_command_carries_the_family(monkeypatch, tmp_path):
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        return type("Done", (), {"returncode": 0, "stderr": "", "stdout": 'RESULT {"decode_s": 1}'})()

    monkeypatch.setattr(bench_peer.subprocess, "run", fake_run)
    args = bench_peer.parse_args(["--family", "glm-4-9b-chat"])
    assert bench_peer.run_worker("ours", tmp_path, "int4", args, None) == {"decode_s": 1}
    command = seen["command"]
    assert command[command.index("--family") + 1] == "glm-4-9b-chat"
    assert bench_peer.parse_args(command[2:]).family == "glm-4-9b-chat"  # the worker parses it back


def tiny_glm4(tmp_path: Path) -> Path:
    """One layer of GLM-4-9B-chat's config with toy widths, its tiktoken tokenizer file, named as
    ``checkpoint()`` names it so ``ggml_file`` finds it."""
    from builder.model.family import get_family
    from builder.model.synthetic import write_synthetic_checkpoint

    spec = dataclasses.replace(get_family("glm-4-9b-chat").spec, hidden_size=256, ffn_hidden_size=512,
                               kv_channels=64, num_attention_heads=4, padded_vocab_size=1024)
    return write_synthetic_checkpoint(tmp_path / "glm-4-9b-chat-1l", num_layers=1, config=spec,
                                      family="glm-4-9b-chat")


def test_glm4_converts_with_chatglm_cpp_and_runs(tmp_path):
    chatglm_cpp = pytest.importorskip("chatglm_cpp")
    ckpt = tiny_glm4(tmp_path)
    ggml = bench_peer.ggml_file(ckpt, "f16", "glm-4-9b-chat")
    assert ggml.read_bytes()[:8] == b"ggml\x04\x00\x00\x00"  # magic, ModelType.CHATGLM4
    pipeline = chatglm_cpp.Pipeline(str(ggml), max_length=64)
    config = chatglm_cpp._C.GenerationConfig(max_length=64, do_sample=False)
    ids = bench_peer.prompt_ids(8)
    assert 0 <= pipeline.model.generate_next_token(ids, None, config, 0, len(ids)) < 1024
