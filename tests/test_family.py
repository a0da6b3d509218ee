"""The GLM family (issue 29): each family's small random checkpoint in its real layout, with a small
tokenizer of its real kind; logits against THUDM's forward, chat prompts token for token, tool calls."""
from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from builder import TINY_CHECKPOINT, load_chatglm2
from builder.model.checkpoint import check_checkpoint
from builder.model.config import ChatGLM2Config
from builder.model.family import FAMILIES, SPECS, FamilyError, detect_family, explain_family
from builder.model.tokenizers import ChatGLM3Tokenizer, GLM4Tokenizer
from builder.model.tools import (chatglm3_system_message, from_openai_messages, parse_tool_calls,
                                 tool_call_message)

from conftest import thudm_state, write_checkpoint
from reference import forward

IDS = [5, 17, 300, 2, 99, 311, 7, 64, 128, 200, 3, 42, 250, 9, 77, 31]
SMALL_BLOCK = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
                   num_attention_heads=4, multi_query_group_num=2)
CHATGLM_SMALL = ChatGLM2Config(**SMALL_BLOCK, padded_vocab_size=832, seq_length=2048)  # 823 sp + 9
GLM4_SMALL = ChatGLM2Config(**SMALL_BLOCK, padded_vocab_size=384, seq_length=4096,
                            layernorm_epsilon=1.5625e-07, rope_ratio=500.0)

# What THUDM's tokenization_chatglm.py for glm-4-9b-chat sets, written out here by hand.
GLM4_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
            r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                 "<|user|>", "<|assistant|>", "<|observation|>", "<|begin_of_image|>",
                 "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"]
CORPUS = ("你好，我是人工智能助手。北京天气怎么样？今天北京晴，气温25度。 The weather in Beijing is "
          "sunny today. get_weather city temperature {\"city\": \"北京\"} hello world hello there "
          "1加1等于2。 Hello, world!\n\nline two\n") * 3
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# -- small tokenizers of each real kind -------------------------------------------------------------
def train_bpe(corpus: str, merges: int) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    """Byte-level BPE on ``corpus`` pre-split by GLM-4's regex: (ranks, merges in order)."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(tuple(bytes([b]) for b in piece.encode()) for piece in regex.findall(GLM4_PAT, corpus))
    order: list[tuple[bytes, bytes]] = []
    for _ in range(merges):
        pairs: Counter = Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        ranks[a + b] = len(ranks)
        order.append((a, b))
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return ranks, order


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, 100)


def write_tiktoken_file(path: Path, ranks: dict[bytes, int]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def write_tokenizer_json(path: Path, ranks: dict[bytes, int], merges) -> Path:
    """glm-4-9b-chat-hf's kind: byte-level BPE split by GLM-4's regex, specials after the ranks."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_unicode = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    tokenizer = Tokenizer(models.BPE({text(t): r for t, r in ranks.items()},
                                     [(text(a), text(b)) for a, b in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(GLM4_SPECIALS)
    tokenizer.save(str(path))
    return path


def tiktoken_encoding(ranks):
    """An encoding built here, independently of GLM4Tokenizer, to state what the prompt must be."""
    import tiktoken

    specials = {t: len(ranks) + i for i, t in enumerate(GLM4_SPECIALS)}
    return tiktoken.Encoding("test-glm4", pat_str=GLM4_PAT, mergeable_ranks=ranks, special_tokens=specials)


# -- small checkpoints of each real layout ----------------------------------------------------------
def thudm_checkpoint(path: Path, config: ChatGLM2Config, state, *, extra=None, tokenizer=None) -> Path:
    write_checkpoint(path, config, state)
    raw = {k: v for k, v in config.to_dict().items() if k != "rope_scheme"}  # not a THUDM field
    (path / "config.json").write_text(json.dumps(raw | (extra or {})))
    if tokenizer is not None:
        shutil.copy(tokenizer, path / "tokenizer.model")
    return path


def hf_checkpoint(path: Path, config: ChatGLM2Config, state, tokenizer_json: Path) -> Path:
    """transformers' own GlmForCausalLM names and config.json (glm-4-9b-chat-hf)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    nh, g, d = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
    out = {"model.embed_tokens.weight": state["transformer.embedding.word_embeddings.weight"],
           "model.norm.weight": state["transformer.encoder.final_layernorm.weight"],
           "lm_head.weight": state["transformer.output_layer.weight"]}
    for i in range(config.num_layers):
        t, m = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[t + f"self_attention.query_key_value.{kind}"].split([nh * d, g * d, g * d])
            out |= {m + f"self_attn.q_proj.{kind}": q, m + f"self_attn.k_proj.{kind}": k,
                    m + f"self_attn.v_proj.{kind}": v}
        out |= {m + "self_attn.o_proj.weight": state[t + "self_attention.dense.weight"],
                m + "mlp.gate_up_proj.weight": state[t + "mlp.dense_h_to_4h.weight"],
                m + "mlp.down_proj.weight": state[t + "mlp.dense_4h_to_h.weight"],
                m + "input_layernorm.weight": state[t + "input_layernorm.weight"],
                m + "post_attention_layernorm.weight": state[t + "post_attention_layernorm.weight"]}
    save_file({k: v.contiguous() for k, v in out.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": config.padded_vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": nh, "num_key_value_heads": g,
        "head_dim": d, "max_position_embeddings": config.seq_length, "rms_norm_eps": 1.5625e-07,
        "rope_theta": 10000.0 * config.rope_ratio, "partial_rotary_factor": 0.5, "attention_bias": True,
        "hidden_act": "silu", "pad_token_id": 370, "eos_token_id": [370, 377, 379],
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    shutil.copy(tokenizer_json, path / "tokenizer.json")
    return path


CHATGLM3_TOKENIZER_CONFIG = {"name_or_path": "THUDM/chatglm3-6b", "tokenizer_class": "ChatGLMTokenizer",
                             "added_tokens_decoder": {"64795": {"content": "<|user|>", "special": True}}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, bpe):
    """name -> (folder, THUDM-named state, rope_ratio, rope scheme) for each family."""
    root = tmp_path_factory.mktemp("families")
    ranks, merges = bpe
    tiktoken_file = write_tiktoken_file(root / "glm4-tokenizer.model", ranks)
    chatglm2_32k = dataclasses.replace(CHATGLM_SMALL, rope_ratio=16.0)
    chatglm3_32k = dataclasses.replace(CHATGLM_SMALL, rope_ratio=50.0)
    out = {}
    state = thudm_state(chatglm2_32k, seed=2)
    out["chatglm2-6b-32k"] = (thudm_checkpoint(root / "c2", chatglm2_32k, state,
                                               extra={"_name_or_path": "THUDM/chatglm2-6b-32k"}),
                              state, 16.0, "positions")
    state = thudm_state(chatglm3_32k, seed=3)
    path = thudm_checkpoint(root / "c3", chatglm3_32k, state)
    (path / "tokenizer_config.json").write_text(json.dumps(CHATGLM3_TOKENIZER_CONFIG))
    out["chatglm3-6b-32k"] = (path, state, 50.0, "base")
    state = thudm_state(GLM4_SMALL, seed=4)
    out["glm-4-9b-chat"] = (thudm_checkpoint(root / "g4", GLM4_SMALL, state, tokenizer=tiktoken_file,
                                             extra={"eos_token_id": [370, 377, 379], "pad_token_id": 370}),
                            state, 500.0, "base")
    state = thudm_state(GLM4_SMALL, seed=5)
    tokenizer_json = write_tokenizer_json(root / "tokenizer.json", ranks, merges)
    out["glm-4-9b-chat-hf"] = (hf_checkpoint(root / "g4hf", GLM4_SMALL, state, tokenizer_json),
                               state, 500.0, "base")
    return out


# -- families: detection, names, specs ------------------------------------------------------------
@pytest.mark.parametrize("name", ["chatglm2-6b-32k", "chatglm3-6b-32k", "glm-4-9b-chat", "glm-4-9b-chat-hf"])
def test_each_layout_is_detected(checkpoints, name):
    family, why = explain_family(checkpoints[name][0])
    assert family.name == name and why
    assert family.variant_name("int4") == f"{name}-int4"
    assert (family.router_name, family.stream_router_name) == (name, f"{name}-stream")


def test_the_embedded_tiny_model_is_chatglm2():
    assert detect_family(TINY_CHECKPOINT).name == "chatglm2-6b"


def _sentencepiece_folder(tmp_path, **config) -> Path:
    tmp_path.mkdir(exist_ok=True)
    shutil.copy(TINY_CHECKPOINT / "tokenizer.model", tmp_path / "tokenizer.model")
    raw = {k: v for k, v in CHATGLM_SMALL.to_dict().items() if k != "rope_scheme"} | config
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize("files,config,expected", [
    ({"tokenizer_config.json": json.dumps(CHATGLM3_TOKENIZER_CONFIG)}, {}, "chatglm3-6b"),
    ({"tokenization_chatglm.py": 'special = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]'},
     {}, "chatglm3-6b"),
    ({}, {"_name_or_path": "THUDM/chatglm3-6b"}, "chatglm3-6b"),
    ({}, {"seq_length": 8192}, "chatglm3-6b"),
    ({}, {"seq_length": 131072, "rope_ratio": 500, "_name_or_path": "THUDM/chatglm3-6b-128k"}, "chatglm3-6b-128k"),
    ({}, {"rope_ratio": 16, "_name_or_path": "THUDM/chatglm2-6b-32k"}, "chatglm2-6b-32k"),
    ({"tokenization_chatglm.py": "SPECIAL = ['[MASK]', '[gMASK]', '[sMASK]', 'sop', 'eop']"}, {}, "chatglm2-6b"),
])
def test_each_signal_decides(tmp_path, files, config, expected):
    folder = _sentencepiece_folder(tmp_path / "ckpt", **config)
    for name, text in files.items():
        (folder / name).write_text(text)
    assert detect_family(folder).name == expected


def test_rope_ratio_without_a_generation_sign_is_refused(tmp_path):
    folder = _sentencepiece_folder(tmp_path / "ckpt", rope_ratio=50)
    with pytest.raises(FamilyError, match="--family chatglm2-6b-32k or --family chatglm3-6b-32k"):
        detect_family(folder)
    assert detect_family(folder, "chatglm3-6b-32k").name == "chatglm3-6b-32k"


def test_unknown_layouts_name_what_is_missing(tmp_path):
    with pytest.raises(FamilyError, match="no config.json"):
        detect_family(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(FamilyError, match="model_type 'llama'.*give --family"):
        detect_family(tmp_path)
    with pytest.raises(FamilyError, match="--family 'glm-5' is unknown; known: chatglm2-6b"):
        detect_family(tmp_path, "glm-5")


def test_override_must_match_the_layout(checkpoints):
    with pytest.raises(FamilyError, match="transformers layout"):
        detect_family(checkpoints["glm-4-9b-chat"][0], "glm-4-9b-chat-hf")


def test_specs_are_the_published_configs():
    glm4 = SPECS["glm-4-9b-chat"]
    assert (glm4.num_layers, glm4.padded_vocab_size, glm4.seq_length, glm4.rope_ratio,
            glm4.layernorm_epsilon) == (40, 151552, 131072, 500.0, 1.5625e-07)
    assert SPECS["chatglm3-6b"].seq_length == 8192 and SPECS["chatglm3-6b"].num_layers == 28
    assert SPECS["chatglm2-6b-32k"].rope_scheme == "positions"
    # ~9.4e9 parameters for GLM-4-9B: its fp16 weights are ~17.5 GiB, as the issue says
    params = (glm4.padded_vocab_size * glm4.hidden_size * 2 + glm4.num_layers * (
        glm4.hidden_size * glm4.qkv_size + glm4.qkv_size + glm4.hidden_size ** 2
        + 3 * glm4.hidden_size * glm4.ffn_hidden_size + 2 * glm4.hidden_size))
    assert 17.0 < params * 2 / 2**30 < 18.0
    rows = FAMILIES["glm-4-9b-chat"].published
    assert [(r.precision, r.input_tokens, r.value) for r in rows][:2] == [("fp16", 1000, 19047), ("fp16", 8000, 20629)]
    assert rows[-1].memory_bytes == 16065 * 2**20
    assert FAMILIES["chatglm2-6b"].published_ref == "builder.plan.memory.PUBLISHED_TABLE"


# -- logits against THUDM's forward --------------------------------------------------------------
@pytest.mark.parametrize("name", ["chatglm2-6b-32k", "chatglm3-6b-32k", "glm-4-9b-chat", "glm-4-9b-chat-hf"])
def test_logits_match_thudm_forward(checkpoints, name):
    path, state, rope_ratio, rope = checkpoints[name]
    model, tokenizer = load_chatglm2(path)
    config = check_checkpoint(path)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS])).logits[0]
    expected = forward(state, config, IDS, rope_ratio=rope_ratio, rope=rope)
    assert float((logits - expected).norm() / expected.norm()) < 1e-4
    # the other rotary scheme is measurably different, so the check above can tell them apart
    other = forward(state, config, IDS, rope_ratio=rope_ratio, rope="base" if rope == "positions" else "positions")
    assert float((logits - other).norm() / expected.norm()) > 1e-3
    assert type(tokenizer).__name__ == {"chatglm2-6b-32k": "ChatGLM2Tokenizer",
                                        "chatglm3-6b-32k": "ChatGLM3Tokenizer"}.get(name, "GLM4Tokenizer")


def test_glm4_epsilon_reaches_the_model(checkpoints):
    model, _ = load_chatglm2(checkpoints["glm-4-9b-chat"][0])
    assert model.config.rms_norm_eps == 1.5625e-07
    assert model.config.rope_parameters["rope_theta"] == 5_000_000.0


# -- tokenizers and chat prompts, token for token ---------------------------------------------------
@pytest.fixture(scope="module")
def chatglm3():
    return ChatGLM3Tokenizer(TINY_CHECKPOINT / "tokenizer.model")


def test_chatglm3_role_tokens_follow_the_sentencepiece_vocabulary(chatglm3):
    n = chatglm3.sp.vocab_size()
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert [chatglm3.special_ids[t] for t in names] == list(range(n, n + 9))
    assert chatglm3.stop_ids == (2, n + 6, n + 8)
    assert chatglm3.vocab_size == n + 9


def test_chatglm3_prompt_with_system_tools_call_and_observation(chatglm3):
    sp, n = chatglm3.sp, chatglm3.sp.vocab_size()
    gmask, sop, system, user, assistant, observation = n + 1, n + 3, n + 5, n + 6, n + 7, n + 8
    function = WEATHER["function"]
    history = [{"role": "user", "content": "北京天气怎么样？"},
               tool_call_message("chatglm3", "get_weather", {"city": "北京"}),
               ]
    ids = chatglm3.build_chat_input('{"temperature": 25}', history, system="你是助手。", tools=[WEATHER],
                                    role="observation")
    expected = ([gmask, sop, system] + sp.encode("\n")
                + sp.encode("你是助手。\n" + json.dumps([function], indent=4, ensure_ascii=False))
                + [user] + sp.encode("\n") + sp.encode("北京天气怎么样？")
                + [assistant] + sp.encode("get_weather\n") + sp.encode("```python\ntool_call(city='北京')\n```")
                + [observation] + sp.encode("\n") + sp.encode('{"temperature": 25}') + [assistant])
    assert ids == expected


def test_chatglm3_plain_chat(chatglm3):
    sp, n = chatglm3.sp, chatglm3.sp.vocab_size()
    ids = chatglm3.build_chat_input("再见", [("你好", "你好！")])
    assert ids == ([n + 1, n + 3, n + 6] + sp.encode("\n") + sp.encode("你好") + [n + 7] + sp.encode("\n")
                   + sp.encode("你好！") + [n + 6] + sp.encode("\n") + sp.encode("再见") + [n + 7])
    assert chatglm3.decode(ids) == "\n你好\n你好！\n再见"


@pytest.fixture(scope="module")
def glm4(tmp_path_factory, bpe):
    return GLM4Tokenizer(write_tiktoken_file(tmp_path_factory.mktemp("g4tok") / "tokenizer.model", bpe[0]))


def test_glm4_special_tokens_numbered_from_the_ranks(glm4, bpe):
    n = len(bpe[0])
    assert [glm4.special_ids[t] for t in GLM4_SPECIALS] == list(range(n, n + 14))
    assert glm4.stop_ids == (n, n + 7, n + 9)  # <|endoftext|>, <|user|>, <|observation|>
    assert glm4.vocab_size == n + 14 and glm4.pad_id == glm4.eos_id == n


@pytest.mark.parametrize("text", ["", "你好", "Hello, world!", "北京 天气\n\n  x", "emoji 😀 mixed 中文",
                                  "<|user|> typed by a user", "1234567 numbers"])
def test_glm4_round_trip_and_pretokenization(glm4, bpe, text):
    ids = glm4.encode(text)
    assert glm4.decode(ids) == text
    assert ids == tiktoken_encoding(bpe[0]).encode_ordinary(text)


def test_glm4_prompt_with_system_tools_call_and_observation(glm4, bpe):
    history = [{"role": "user", "content": "北京天气怎么样？"},
               tool_call_message("glm4", "get_weather", {"city": "北京"})]
    ids = glm4.build_chat_input('{"temperature": 25}', history, system="你是助手。", tools=[WEATHER],
                                role="observation")
    rendered = ("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 "
                "模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
                "\n\n## get_weather\n\n" + json.dumps(WEATHER["function"], indent=4, ensure_ascii=False)
                + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
                "<|system|>\n你是助手。<|user|>\n北京天气怎么样？<|assistant|>get_weather\n"
                '{"city": "北京"}<|observation|>\n{"temperature": 25}<|assistant|>')
    messages = [{"role": "system", "content": "你是助手。"}, *history,
                {"role": "observation", "content": '{"temperature": 25}'}]
    assert glm4.render_chat(messages, tools=[WEATHER]) == rendered
    assert ids == tiktoken_encoding(bpe[0]).encode(rendered, allowed_special="all")
    n = len(bpe[0])
    assert ids[:3] == [n + 2, n + 4, n + 6] and ids[-1] == n + 8


def test_glm4_prompt_keeps_typed_special_tokens_as_text(glm4):
    ids = glm4.build_chat_input("say <|user|> please")
    assert ids.count(glm4.special_ids["<|user|>"]) == 1  # only the role marker


def test_glm4_tokenizer_json_matches_tiktoken(checkpoints, glm4):
    hf = GLM4Tokenizer(checkpoints["glm-4-9b-chat-hf"][0] / "tokenizer.json")
    assert hf.special_ids == glm4.special_ids
    for text in ["你好，我是人工智能助手。", "The weather in Beijing is sunny", "  x\n\ny 12345"]:
        assert hf.encode(text) == glm4.encode(text)
        assert hf.decode(hf.encode(text)) == text
    assert hf.build_chat_input("你好", [("hi", "hello")], system="s") == glm4.build_chat_input(
        "你好", [("hi", "hello")], system="s")


@pytest.mark.parametrize("answer", ["<|endoftext|>", "<|user|>", "<|observation|>", "<eop>"])
def test_glm4_chat_stops_at_its_end_tokens(checkpoints, answer):
    """The model's answer is made one fixed token (an output layer whose bias picks it): chat()
    stops at once at GLM-4's three end tokens, and runs to max_length on any other."""
    from builder.model.generation import chat

    model, tok = load_chatglm2(checkpoints["glm-4-9b-chat"][0])
    prompt = tok.build_chat_input("你好")
    assert prompt[:2] == tok.prefix_ids and prompt[-1] == tok.special_ids["<|assistant|>"]
    head = torch.nn.Linear(GLM4_SMALL.hidden_size, GLM4_SMALL.padded_vocab_size)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.special_ids[answer]] = 1.0
    model.lm_head = head
    steps = []
    model.register_forward_hook(lambda *_: steps.append(1))
    response, history = chat(model, tok, "你好", temperature=0, max_length=len(prompt) + 5)
    assert response == ""  # special tokens decode to nothing
    assert len(steps) == (1 if answer != "<eop>" else 5)


# -- tool calls -----------------------------------------------------------------------------------
def test_glm4_tool_call_parses_to_openai_shape():
    calls = parse_tool_calls("glm4", 'get_weather\n{"city": "北京", "days": 2}', [WEATHER])
    assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京", "days": 2}
    again = parse_tool_calls("glm4", 'get_weather\n{"city": "北京"}', [WEATHER])
    assert again[0]["id"] != calls[0]["id"]


@pytest.mark.parametrize("reply", ["北京今天晴。", "get_weather\nnot json", 'other_tool\n{"a": 1}',
                                   'get_weather\n{"city": ', "get_weather\n[1, 2]"])
def test_glm4_plain_answers_are_not_calls(reply):
    assert parse_tool_calls("glm4", reply, [WEATHER]) is None


def test_chatglm3_tool_call_parses_to_openai_shape():
    reply = "get_weather\n```python\ntool_call(city='北京', days=2, detail={'wind': True})\n```"
    calls = parse_tool_calls("chatglm3", reply, [WEATHER])
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京", "days": 2, "detail": {"wind": True}}
    # what we write into the history parses back to the same call
    message = tool_call_message("chatglm3", "get_weather", {"city": "北京"})
    back = parse_tool_calls("chatglm3", message["metadata"] + "\n" + message["content"], [WEATHER])
    assert json.loads(back[0]["function"]["arguments"]) == {"city": "北京"}


@pytest.mark.parametrize("reply", ["\n北京今天晴。", "北京今天晴。", "get_weather\n```python\nos.system('x')\n```",
                                   "get_weather\n```python\ntool_call(city=open('x'))\n```",
                                   "unknown\n```python\ntool_call(a=1)\n```"])
def test_chatglm3_plain_answers_and_unsafe_code_are_not_calls(reply):
    assert parse_tool_calls("chatglm3", reply, [WEATHER]) is None


def test_chatglm2_has_no_tool_format():
    assert FAMILIES["chatglm2-6b"].tool_format is None
    assert parse_tool_calls(None, 'get_weather\n{"city": "北京"}', [WEATHER]) is None


def test_openai_messages_become_family_messages():
    openai = [{"role": "system", "content": "s"}, {"role": "user", "content": "北京天气？"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 25}'}]
    assert from_openai_messages("glm4", openai) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
        {"role": "observation", "content": '{"temperature": 25}'}]
    assert from_openai_messages("chatglm3", openai)[2]["content"] == "```python\ntool_call(city='北京')\n```"
    assert chatglm3_system_message([WEATHER])["tools"] == [WEATHER["function"]]


def test_quantize_at_build_is_refused_for_the_transformers_layout(checkpoints, tmp_path):
    from builder.build.pipeline import BuildError, BuildOptions, build

    folder = checkpoints["glm-4-9b-chat-hf"][0]
    with pytest.raises(BuildError, match="transformers' layout .*--quantize-at initialize"):
        build(BuildOptions(quant=("int4",), gpu="cpu", model=str(folder), out=tmp_path / "repo",
                           quantize_at="build"), progress=False)
    assert not (tmp_path / "repo").exists()
