"""Shared fixtures: small random checkpoints in THUDM's layout, written without the loader's code."""
from __future__ import annotations

import contextlib
import json
import shutil
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch

from builder import TINY_CHECKPOINT
from builder.model.config import ChatGLM2Config

# Small, but every architectural feature of ChatGLM2: 2 layers, 4 heads over 2 K/V groups, QKV bias.
SMALL = ChatGLM2Config(num_layers=2, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
                       num_attention_heads=4, multi_query_group_num=2, padded_vocab_size=832,
                       seq_length=2048)


def thudm_state(config: ChatGLM2Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors under THUDM's names and shapes (written out by hand here)."""
    g = torch.Generator().manual_seed(seed)
    H, F, V = config.hidden_size, config.ffn_hidden_size, config.padded_vocab_size
    qkv = config.num_attention_heads * config.kv_channels + 2 * config.multi_query_group_num * config.kv_channels

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    state = {"transformer.embedding.word_embeddings.weight": rand(V, H, scale=1.0),
             "transformer.encoder.final_layernorm.weight": 1 + rand(H),
             "transformer.output_layer.weight": rand(V, H),
             "transformer.rotary_pos_emb.inv_freq": torch.rand(config.kv_channels // 4)}
    for i in range(config.num_layers):
        p = f"transformer.encoder.layers.{i}."
        state |= {p + "input_layernorm.weight": 1 + rand(H),
                  p + "self_attention.query_key_value.weight": rand(qkv, H),
                  p + "self_attention.query_key_value.bias": rand(qkv),
                  p + "self_attention.dense.weight": rand(H, H),
                  p + "post_attention_layernorm.weight": 1 + rand(H),
                  p + "mlp.dense_h_to_4h.weight": rand(2 * F, H),
                  p + "mlp.dense_4h_to_h.weight": rand(H, F)}
    return state


def write_checkpoint(path: Path, config: ChatGLM2Config, state: dict[str, torch.Tensor], *,
                     fmt: str = "safetensors", shards: int = 1, index: bool = True) -> Path:
    """Write ``state`` as a THUDM-layout checkpoint in ``shards`` files (with or without index)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    shutil.copy(TINY_CHECKPOINT / "tokenizer.model", path / "tokenizer.model")
    names = sorted(state)
    weight_map = {}
    for s in range(shards):
        part = {n: state[n].contiguous() for n in names[s::shards]}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(path / file))
        else:
            file = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, path / file)
        weight_map |= {n: file for n in part}
    if index:
        index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        (path / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("small-chatglm2")
    state = thudm_state(SMALL)
    return write_checkpoint(path, SMALL, state), state


@pytest.fixture(scope="session")
def tiny():
    """The embedded tiny model, loaded once (float32 on CPU)."""
    from builder import load_chatglm2

    return load_chatglm2(TINY_CHECKPOINT)


_FINISHING: list[tuple[str, threading.Thread, list[BaseException]]] = []


def finish_later(what: str, stop: Callable[[], object]) -> None:
    """Run ``stop`` (a module's server shutdown and its checks) on a thread while the next tests
    run; the session waits for it at its end and fails if it raised.

    Stopping a repository takes about 10 s of waiting, little of it work: Triton's Python backend
    sleeps 1 s per model instance before it unloads it (``StubLauncher::UpdateHealth``), one
    instance after another, and the one-response router has 8.
    """
    errors: list[BaseException] = []

    def run():
        try:
            stop()
        except BaseException as err:  # reported by finished_stops below
            errors.append(err)

    thread = threading.Thread(target=run, name=f"stop {what}")
    thread.start()
    _FINISHING.append((what, thread, errors))


@contextlib.contextmanager
def serving(options, ready_timeout: float = 240):
    """A started ``TritonServer`` for ``options`` (ready, or stopped and raised); on leaving the
    block its stop goes to :func:`finish_later`."""
    from builder.serving.server import TritonServer

    server = TritonServer(options, ready_timeout=ready_timeout).__enter__()  # stops itself if not ready
    try:
        yield server
    finally:
        finish_later(f"tritonserver for {options.model_repository}", server.stop)


@pytest.fixture(scope="session", autouse=True)
def finished_stops():
    """Every :func:`finish_later` stop has ended, without an error, before the session does."""
    yield
    failures = []
    for what, thread, errors in _FINISHING:
        thread.join(120)
        if thread.is_alive():
            failures.append(f"{what}: still stopping after 120 s")
        failures += [f"{what}: {type(err).__name__}: {err}" for err in errors]
    assert not failures, failures


LIVE_LIMITS = {"fp16": 100, "int8": 400, "int4": 1500}  # tokens: low enough that each variant gets picked


def serve_tiny_repository(out: Path, **build_options):
    """Build the tiny repository (fp16/int8/int4, `cpu` profile, :data:`LIVE_LIMITS`) into ``out``
    and start a real tritonserver on free loopback ports; the caller stops it. ``server.repo`` is
    ``out``."""
    from builder.build.pipeline import BuildOptions, build
    from builder.serving.server import ServerOptions, TritonServer

    build(BuildOptions(quant=("fp16", "int8", "int4"), gpu="cpu", out=out, limits=LIVE_LIMITS,
                       **build_options), progress=False)
    options = ServerOptions.on_loopback(out, log_file=out.parent / "server.log")
    server = TritonServer(options, ready_timeout=240)
    server.start().wait_ready()
    server.repo = out
    return server


def glm_samples(server) -> list[tuple[str, dict, float]]:
    """The server's ``glm_*`` metric samples: ``(name, labels, value)``, from its metrics port."""
    import re
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://{server.urls['metrics']}/metrics", timeout=10).read().decode()
    samples = []
    for line in text.splitlines():
        match = re.match(r'^(glm_\w+)\{(.*)\} (\S+)$', line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples
