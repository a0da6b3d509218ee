"""ChatGLM3 and GLM-4 built in all three precisions and served through their routers (live).

Small random-weight checkpoints in each family's real layout and tokenizer kind (the builders of
tests/test_family.py); each is built for the `cpu` profile with routing limits that send short,
medium and long requests to fp16, int8 and int4, served by a real tritonserver, and asked through
its router by the real gRPC client. The repository is named after the family.
"""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from builder.build.pipeline import BuildOptions, build
from builder.client.chat import ChatGLMClient
from builder.serving.server import ServerOptions

from conftest import serving, thudm_state
from test_family import (CHATGLM3_TOKENIZER_CONFIG, CHATGLM_SMALL, GLM4_SMALL, thudm_checkpoint,
                         train_bpe, write_tiktoken_file, CORPUS)

pytestmark = pytest.mark.server

LIMITS = {"fp16": 200, "int8": 600, "int4": 1500}


def glm4_checkpoint(root):
    ranks, _ = train_bpe(CORPUS, 100)
    tokenizer = write_tiktoken_file(root / "glm4-tokenizer.model", ranks)
    config = dataclasses.replace(GLM4_SMALL, seq_length=2048)
    return thudm_checkpoint(root / "glm-4 small", config, thudm_state(config, seed=7),
                            tokenizer=tokenizer, extra={"eos_token_id": [370, 377, 379],
                                                        "pad_token_id": 370})


def chatglm3_checkpoint(root):
    config = dataclasses.replace(CHATGLM_SMALL, rope_ratio=50.0)  # ChatGLM3-6B-32k's scheme
    path = thudm_checkpoint(root / "chatglm3 small", config, thudm_state(config, seed=8))
    (path / "tokenizer_config.json").write_text(json.dumps(CHATGLM3_TOKENIZER_CONFIG))
    return path


@pytest.mark.parametrize("family, make", [("glm-4-9b-chat", glm4_checkpoint),
                                          ("chatglm3-6b-32k", chatglm3_checkpoint)])
def test_a_family_builds_in_three_precisions_and_answers_through_its_router(tmp_path, family, make):
    checkpoint = make(tmp_path)
    result = build(BuildOptions(quant=("fp16", "int8", "int4"), gpu="cpu", model=str(checkpoint),
                                out=tmp_path / "repo", limits=LIMITS), progress=False)
    names = {f"{family}{suffix}" for suffix in ("", "-stream", "-fp16", "-int8", "-int4")}
    assert {p.name for p in (tmp_path / "repo").iterdir() if p.is_dir()} == names
    assert json.loads((tmp_path / "repo" / "build.json").read_text())["plan"]["model_name"] == family
    assert result.plan.model_name == family
    options = ServerOptions.on_loopback(tmp_path / "repo", log_file=tmp_path / "server.log", restart_stubs=False)
    with serving(options) as server:
        client = ChatGLMClient(server.urls["grpc"], temperature=0, max_token=40, model=family)
        try:
            served = {}
            for max_token in (40, 400, 1200):  # fp16, int8, int4 by length
                client.max_token = max_token
                answer = client.chat("你好", [("北京天气怎么样？", "今天北京晴。")])
                assert answer.history[:-1] == [("北京天气怎么样？", "今天北京晴。")]
                assert answer.history[-1] == ("你好", answer.response)
                served[max_token] = answer.variant
            assert served == {40: "fp16", 400: "int8", 1200: "int4"}
            client.max_token = 40
            pieces = list(client.stream("你好", model=f"{family}-stream"))
            assert pieces and pieces[-1].variant == "fp16"
        finally:
            client.close()
    log = (tmp_path / "server.log").read_text()
    assert re.search(rf"successfully loaded '{re.escape(family)}-int4'", log)
