"""Loading THUDM-layout checkpoints onto GlmForCausalLM: numerics against a reference, and errors."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from builder import CHATGLM2_6B, load_chatglm2
from builder.model.checkpoint import CheckpointError, glm_to_thudm
from builder.model.config import ChatGLM2Config, UnsupportedCheckpointError

from conftest import SMALL, thudm_state, write_checkpoint
from reference import forward

IDS = [5, 17, 300, 2, 99, 411, 7, 64, 128, 800, 3, 42]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_logits_match_reference_forward(small_checkpoint):
    path, state = small_checkpoint
    model, _ = load_chatglm2(path)
    assert type(model).__name__ == "GlmForCausalLM"
    assert not model.training and model.dtype == torch.float32
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS])).logits[0]
    assert relative_error(logits, forward(state, SMALL, IDS)) < 1e-4


def test_incremental_decoding_matches_full_forward(small_checkpoint):
    """The KV-cache path (used by chat) gives the same last-token logits as a full pass."""
    from transformers import DynamicCache

    path, state = small_checkpoint
    model, _ = load_chatglm2(path)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([IDS[:-1]]), cache=cache, use_cache=True)
        last = model(input_ids=torch.tensor([IDS[-1:]]), cache=cache, use_cache=True).logits[0, -1]
    assert relative_error(last, forward(state, SMALL, IDS)[-1]) < 1e-4


@pytest.mark.parametrize("fmt,shards,index", [("safetensors", 3, False), ("bin", 2, True), ("bin", 1, False)])
def test_shard_formats_load_the_same(tmp_path, fmt, shards, index):
    state = thudm_state(SMALL, seed=1)
    path = write_checkpoint(tmp_path / "ckpt", SMALL, state, fmt=fmt, shards=shards, index=index)
    model, _ = load_chatglm2(path)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS])).logits[0]
    assert relative_error(logits, forward(state, SMALL, IDS)) < 1e-4


def test_default_dtype_and_explicit_dtype(small_checkpoint):
    path, _ = small_checkpoint
    model, _ = load_chatglm2(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_roundtrip_of_the_name_mapping(small_checkpoint):
    path, state = small_checkpoint
    model, _ = load_chatglm2(path)
    back = glm_to_thudm(model.state_dict())
    expected = {k: v for k, v in state.items() if "inv_freq" not in k}
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(back[name], tensor)


def test_real_6b_config():
    assert CHATGLM2_6B.qkv_size == 4096 + 2 * 2 * 128
    glm = CHATGLM2_6B.to_glm_config()
    assert (glm.num_key_value_heads, glm.head_dim, glm.intermediate_size) == (2, 128, 13696)
    assert glm.rope_parameters["partial_rotary_factor"] == 0.5


# -- errors ---------------------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_chatglm2(tmp_path / "nope")


def test_missing_files_are_listed(small_checkpoint, tmp_path):
    path, _ = small_checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    (copy / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"missing \['tokenizer.model'\]"):
        load_chatglm2(copy)


def test_no_weights(small_checkpoint, tmp_path):
    path, _ = small_checkpoint
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(path / name, copy / name)
    with pytest.raises(CheckpointError, match=r"\*\.safetensors or pytorch_model\*\.bin"):
        load_chatglm2(copy)


@pytest.mark.parametrize("field,value", [("rmsnorm", False), ("multi_query_attention", False),
                                         ("post_layer_norm", False), ("original_rope", False),
                                         ("add_bias_linear", True)])
def test_unsupported_architecture_flags(small_checkpoint, tmp_path, field, value):
    path, _ = small_checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    raw = json.loads((copy / "config.json").read_text()) | {field: value}
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedCheckpointError, match=f"{field}.*{value}"):
        load_chatglm2(copy)


def test_kv_channels_times_heads_must_be_hidden():
    with pytest.raises(UnsupportedCheckpointError, match=r"kv_channels × num_attention_heads = 16 × 4 = 64.*100"):
        dataclasses.replace(SMALL, hidden_size=100)


def test_shape_mismatch_names_the_tensor(tmp_path):
    state = thudm_state(SMALL)
    wrong = dataclasses.replace(SMALL, ffn_hidden_size=128)
    path = write_checkpoint(tmp_path / "ckpt", wrong, state)
    with pytest.raises(CheckpointError, match=r"mlp\.dense_(h_to_4h|4h_to_h)\.weight. has shape"):
        load_chatglm2(path)


def test_missing_tensor_is_reported(tmp_path):
    state = thudm_state(SMALL)
    del state["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    path = write_checkpoint(tmp_path / "ckpt", SMALL, state)
    with pytest.raises(CheckpointError, match="lacks 1 tensors.*layers.1.mlp.down_proj"):
        load_chatglm2(path)


def test_unknown_tensor_is_reported(tmp_path):
    state = thudm_state(SMALL) | {"transformer.prefix_encoder.embedding.weight": torch.zeros(2, 2)}
    path = write_checkpoint(tmp_path / "ckpt", SMALL, state)
    with pytest.raises(CheckpointError, match="prefix_encoder"):
        load_chatglm2(path)


def test_config_reads_thudm_fields_and_ignores_the_rest():
    raw = json.loads(json.dumps(CHATGLM2_6B.to_dict())) | {"hidden_dropout": 0.0, "quantization_bit": None}
    assert ChatGLM2Config.from_dict(raw) == CHATGLM2_6B
