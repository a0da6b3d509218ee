"""The synthetic real-shape checkpoint, written with a small config so the test stays fast."""
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from builder.model.checkpoint import load_chatglm2
from builder.model.config import ChatGLM2Config
from builder.model.synthetic import INDEX_FILE, write_synthetic_checkpoint

from conftest import SMALL, thudm_state


def test_synthetic_checkpoint_is_indexed_and_loads(tmp_path):
    path = write_synthetic_checkpoint(tmp_path / "synthetic", num_layers=1, config=SMALL, seed=3)
    index = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    one_layer = dataclasses.replace(SMALL, num_layers=1)
    expected = {n for n in thudm_state(one_layer) if not n.endswith("inv_freq")}
    assert set(index) == expected
    in_shards, total = {}, 0
    for file in set(index.values()):
        with safe_open(str(path / file), framework="pt") as shard:
            for name in shard.keys():
                tensor = shard.get_tensor(name)
                in_shards[name] = file
                total += tensor.numel() * tensor.element_size()
                assert tensor.dtype == torch.float16
    assert in_shards == index
    assert len(set(index.values())) == 3  # embedding, one layer, norm + output layer
    assert ChatGLM2Config.from_json(path / "config.json") == dataclasses.replace(one_layer, torch_dtype="float16")

    model, _ = load_chatglm2(path)
    assert model.config.num_hidden_layers == 1
    qkv = model.model.layers[0].self_attn.q_proj.weight
    assert 0.01 < qkv.std().item() < 0.03  # the realistic scale, N(0, 0.02²)
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, SMALL.padded_vocab_size) and torch.isfinite(logits).all()
    quantized, _ = load_chatglm2(path, bits=8, dtype=torch.bfloat16)
    assert torch.isfinite(quantized(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_layouts_hold_the_same_tensors(tmp_path):
    from builder.model.checkpoint import iter_checkpoint_tensors, weight_files

    per_layer = write_synthetic_checkpoint(tmp_path / "per-layer", num_layers=2, config=SMALL, seed=5)
    expected = {n: t for n, t in iter_checkpoint_tensors(per_layer)}
    single = write_synthetic_checkpoint(tmp_path / "single", num_layers=2, config=SMALL, seed=5, layout="single")
    assert [f.name for f in weight_files(single)] == ["model.safetensors"]
    bin_ = write_synthetic_checkpoint(tmp_path / "bin", num_layers=2, config=SMALL, seed=5, layout="bin")
    assert [f.name for f in weight_files(bin_)] == [f"pytorch_model-0000{i}-of-00004.bin" for i in range(1, 5)]
    assert (bin_ / "pytorch_model.bin.index.json").is_file()
    for path in (single, bin_):
        got = dict(iter_checkpoint_tensors(path))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[n], expected[n]) for n in expected)
    with pytest.raises(ValueError, match="layout must be one of per-layer, single, bin, got 'zip'"):
        write_synthetic_checkpoint(tmp_path / "zip", config=SMALL, layout="zip")
