"""Tool calls through the OpenAI endpoint (issue 29): request checks, the conversation in each
family's messages, the ``messages`` input of the serving contract, when a streamed reply is known
to be a call, and the OpenAI shapes of the answer (checked against the ``openai`` SDK's own types).

Pure parts run without a server; the answer is driven by the pieces Triton would stream.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import openai.types.chat as oai
import pytest
from pydantic import ValidationError

from builder import TINY_CHECKPOINT
from builder.model.family import get_family
from builder.model.tokenizers import ChatGLM3Tokenizer, GLM4Tokenizer
from builder.model.tools import parse_tool_calls, tool_call_message
from builder.serving.openai.app import Answer, validation_error
from builder.serving.openai.conversation import ConversationError, map_chat
from builder.serving.openai.protocol import ChatCompletionRequest
from builder.serving.openai.tool_calls import call_state
from builder.serving.openai.triton import Piece, ServedModel, find_router
from builder.serving.request import (MESSAGES_INPUT, RequestError, messages_input, messages_length,
                                     parse_messages, parse_request)
from builder.model.tokenizer import ChatGLM2Tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
# a user question, the assistant's call, the tool's result: the model answers the result
TOOL_ROUND = [{"role": "system", "content": "你是助手。"},
              {"role": "user", "content": "北京天气怎么样？"},
              {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 25}'}]


def request(**extra) -> dict:
    return {"model": "glm-4-9b-chat", "messages": [{"role": "user", "content": "北京天气？"}]} | extra


def refused(body: dict):
    """The APIError the gateway answers for ``body``, from pydantic's validation."""
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    return validation_error(caught.value)


@pytest.fixture(scope="module")
def glm4(tmp_path_factory) -> GLM4Tokenizer:
    """A byte-level GLM-4 tokenizer (tiktoken, 256 ranks and GLM-4's 14 specials after them)."""
    import base64

    path = tmp_path_factory.mktemp("g4") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return GLM4Tokenizer(path)


@pytest.fixture(scope="module")
def chatglm3() -> ChatGLM3Tokenizer:
    return ChatGLM3Tokenizer(TINY_CHECKPOINT / "tokenizer.model")


# -- the request ------------------------------------------------------------------------------------
def test_tools_and_a_tool_round_are_accepted():
    chat = ChatCompletionRequest.model_validate(request(messages=TOOL_ROUND, tools=[WEATHER, TIME],
                                                        tool_choice="auto"))
    assert chat.prompt_tools == [WEATHER, TIME]
    assert chat.messages[2].content is None and chat.messages[2].tool_calls[0].function.name == "get_weather"
    strict = WEATHER | {"function": WEATHER["function"] | {"strict": True}}
    assert ChatCompletionRequest.model_validate(request(tools=[strict])).prompt_tools == [WEATHER]
    # 'none': the model is not shown the tools
    assert ChatCompletionRequest.model_validate(request(tools=[WEATHER], tool_choice="none")).prompt_tools is None


@pytest.mark.parametrize("extra, param, code", [
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "unsupported_parameter"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     "tool_choice", "unsupported_parameter"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "invalid_value"),
    ({"tool_choice": "auto"}, "tool_choice", "invalid_value"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name",
     "invalid_value"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type", "invalid_value"),
    ({"functions": [WEATHER["function"]]}, "functions", "unsupported_parameter"),
    ({"messages": [{"role": "tool", "content": "25"}]}, "messages.0", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, "messages.0", "invalid_value"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages.0", "invalid_value"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        CALL | {"function": {"name": "get_weather", "arguments": "{not json"}}]}]},
     "messages.0.tool_calls.0.function.arguments", "invalid_value"),
])
def test_bad_tool_fields_are_named(extra, param, code):
    err = refused(request(**extra))
    assert err.status == 400
    assert (err.body.error.param, err.body.error.code) == (param, code), err.body


# -- the conversation per family --------------------------------------------------------------------
def test_chatglm2_refuses_tools_naming_them():
    chat = ChatCompletionRequest.model_validate(request(tools=[WEATHER]))
    with pytest.raises(ConversationError) as caught:
        map_chat(chat, get_family("chatglm2-6b"))
    assert (caught.value.param, caught.value.code) == ("tools", "unsupported_parameter")
    assert "chatglm2-6b has no tool calling" in str(caught.value)
    # a tool round without tools is refused too, at the message that holds it
    with pytest.raises(ConversationError) as caught:
        map_chat(ChatCompletionRequest.model_validate(request(messages=TOOL_ROUND)), get_family("chatglm2-6b"))
    assert caught.value.param == "messages[2]"
    # and a plain chat keeps THUDM's ChatGLM2 mapping
    plain = map_chat(ChatCompletionRequest.model_validate(request(messages=[
        {"role": "system", "content": "简短。"}, {"role": "user", "content": "你好"}])), get_family("chatglm2-6b"))
    assert (plain.prompt, plain.history, plain.messages) == ("简短。你好", (), None)


def test_glm4_gets_its_own_messages_and_tools(glm4):
    chat = ChatCompletionRequest.model_validate(request(messages=TOOL_ROUND, tools=[WEATHER]))
    conversation = map_chat(chat, get_family("glm-4-9b-chat"))
    family_messages = [{"role": "system", "content": "你是助手。"},
                       {"role": "user", "content": "北京天气怎么样？"},
                       tool_call_message("glm4", "get_weather", {"city": "北京"}),
                       {"role": "observation", "content": '{"temperature": 25}'}]
    assert list(conversation.messages) == family_messages and conversation.tools == (WEATHER,)
    ids = conversation.prompt_ids(glm4)
    # the tools' system block, then each message under its role, then the assistant's turn
    assert ids == glm4.build_chat_input('{"temperature": 25}', family_messages[1:3], system="你是助手。",
                                        tools=[WEATHER], role="observation")
    text = glm4.render_chat(family_messages, [WEATHER])
    assert "## get_weather" in text and text.endswith('<|observation|>\n{"temperature": 25}<|assistant|>')
    # tool_choice 'none': the same conversation without the tools block
    none = map_chat(ChatCompletionRequest.model_validate(request(messages=TOOL_ROUND, tools=[WEATHER],
                                                                 tool_choice="none")),
                    get_family("glm-4-9b-chat"))
    assert none.tools is None and "## get_weather" not in glm4.decode(none.prompt_ids(glm4))


def test_chatglm3_puts_the_tools_in_its_system_message(chatglm3):
    chat = ChatCompletionRequest.model_validate(request(messages=TOOL_ROUND, tools=[WEATHER]))
    conversation = map_chat(chat, get_family("chatglm3-6b"))
    assert conversation.messages[2]["content"] == "```python\ntool_call(city='北京')\n```"
    expected = chatglm3.build_chat_input('{"temperature": 25}', list(conversation.messages[1:3]),
                                         system="你是助手。", tools=[WEATHER], role="observation")
    assert conversation.prompt_ids(chatglm3) == expected
    assert ("你是助手。\n" + json.dumps([WEATHER["function"]], indent=4, ensure_ascii=False)
            in chatglm3.decode(expected))


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "messages[1]"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c", "content": "1"}], "messages[1]"),
])
def test_a_conversation_the_model_cannot_answer_is_refused(messages, param):
    chat = ChatCompletionRequest.model_validate(request(messages=messages, tools=[WEATHER]))
    with pytest.raises(ConversationError) as caught:
        map_chat(chat, get_family("glm-4-9b-chat"))
    assert caught.value.param == param


# -- the contract's `messages` input ----------------------------------------------------------------
def contract_inputs(messages: str, max_token: int = 1000) -> dict:
    def strings(items):
        return np.array([s.encode() for s in items], dtype=object)

    return {"prompt": strings([""]), "history": strings([]), "temperature": strings(["0"]),
            "max_token": strings([str(max_token)]), "history_len": strings(["0"]),
            MESSAGES_INPUT: strings([messages])}


def test_the_messages_input_round_trips_and_counts_like_the_gateway(chatglm3):
    chat = ChatCompletionRequest.model_validate(request(messages=TOOL_ROUND, tools=[WEATHER]))
    conversation = map_chat(chat, get_family("chatglm3-6b"))
    inputs = contract_inputs(messages_input(conversation.messages, conversation.tools))
    parsed = parse_messages(inputs)
    assert list(parsed.messages) == list(conversation.messages) and parsed.tools == (WEATHER,)
    prompt = len(conversation.prompt_ids(chatglm3))  # what the gateway reports as prompt_tokens
    assert messages_length(parse_request(inputs), parsed, chatglm3, seq_length=8192) == (1000, prompt)
    assert parse_messages({k: v for k, v in inputs.items() if k != MESSAGES_INPUT}) is None
    with pytest.raises(RequestError, match="leaves no room to answer"):  # the gateway's context marker
        messages_length(parse_request(contract_inputs(inputs[MESSAGES_INPUT][0].decode(), prompt)),
                        parsed, chatglm3, seq_length=8192)
    with pytest.raises(RequestError, match="has no roles"):
        parsed.prompt_ids(ChatGLM2Tokenizer(TINY_CHECKPOINT / "tokenizer.model"))


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('[{"role": "user", "content": "hi"}]', "must be a JSON object"),
    ('{"messages": [{"role": "tool", "content": "1"}]}', r"messages\[0\] must be an object with a role"),
    ('{"messages": [{"role": "user", "content": "hi", "name": "x"}]}', "unknown keys"),
    ('{"messages": [{"role": "user", "content": 5}]}', r"messages\[0\].content must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
     "the last message must be"),
    ('{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', r"tools\[0\]"),
])
def test_a_bad_messages_input_is_named(text, match):
    with pytest.raises(RequestError, match=match):
        parse_messages(contract_inputs(text))


def test_the_gateway_finds_the_router_named_after_the_model(tmp_path):
    assert find_router(tmp_path) == "chatglm2-6b"  # nothing there yet: the seed's name
    for name, text in [("glm-4-9b-chat", 'key: "routing"'), ("glm-4-9b-chat-stream", 'key: "routing"'),
                       ("glm-4-9b-chat-fp16", 'key: "checkpoint"'), ("other-stream", 'key: "bits"')]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(f"parameters {{\n  {text}\n}}\n")
    assert find_router(tmp_path) == "glm-4-9b-chat"


# -- when a streamed reply is a call ----------------------------------------------------------------
NAMES = {"get_weather", "get_time"}
REPLIES = {
    "glm4": ['get_weather\n{"city": "北京"}', '\nget_weather\n  {"city": "北京", "days": 2}',
             "\n北京今天晴。", "get_weather is a tool", "get_weather\nnot json", 'get_time\n\n{"a": 1}',
             "get\n{}", 'get_weather\n{"city": '],
    "chatglm3": ["get_weather\n```python\ntool_call(city='北京')\n```", "\n北京今天晴。",
                 "get weather\ntool_call(city='x')", "get_time\ntool_call()", "get_weather 晴",
                 "get_weather\n```python\nos.system('x')\n```"],
}


@pytest.mark.parametrize("fmt, text, state", [
    ("glm4", "", "undecided"), ("glm4", "\n  get_wea", "undecided"), ("glm4", "get_weather\n", "undecided"),
    ("glm4", 'get_weather\n{"ci', "call"), ("glm4", "\n北京", "plain"), ("glm4", "get_weather\nok", "plain"),
    ("glm4", "other\n{", "plain"), ("glm4", "get_weather\n\n", "plain"),
    ("chatglm3", "get_wea", "undecided"), ("chatglm3", "get_weather\n", "call"), ("chatglm3", "\n", "plain"),
    ("chatglm3", "get weather", "plain"), ("chatglm3", "北京", "plain"),
])
def test_call_state(fmt, text, state):
    assert call_state(fmt, text, NAMES) == state


@pytest.mark.parametrize("fmt", ["glm4", "chatglm3"])
def test_plain_is_never_said_of_a_reply_that_parses_as_a_call(fmt):
    """Every prefix of every reply: a call is never 'plain' on the way (once 'plain', the text is
    sent as it comes), and a reply that is plain from its first line is let through early."""
    tools = [WEATHER, TIME]
    for reply in REPLIES[fmt]:
        is_call = parse_tool_calls(fmt, reply, tools) is not None
        states = [call_state(fmt, reply[:n], NAMES) for n in range(len(reply) + 1)]
        assert not (is_call and "plain" in states), (reply, states)
        if not is_call and reply.strip().split("\n")[0].strip() not in NAMES:
            assert states[-1] == "plain", (reply, states)
    assert sum(parse_tool_calls(fmt, r, tools) is not None for r in REPLIES[fmt]) >= 2


# -- the answer's shapes ----------------------------------------------------------------------------
def pieces(texts, log=None):
    """What the Triton stream yields: the answer so far, the variant, whether it is the last."""
    async def stream():
        for i, text in enumerate(texts):
            if log is not None:
                log.append(f"piece {i}")
            yield Piece(text, "int4", i == len(texts) - 1)
    return stream()


def answer(texts, tokenizer, tools=(WEATHER,), log=None, **extra) -> Answer:
    chat = ChatCompletionRequest.model_validate(request(tools=list(tools) or None, **extra))
    model = ServedModel("glm-4-9b-chat", "glm-4-9b-chat-stream", "router", 4096, direct=False)
    return Answer(chat, model, tokenizer, 30, 30 + 64, pieces(texts, log),
                  tool_format="glm4", tools=chat.prompt_tools)


def completion(a: Answer) -> dict:
    async def run():
        return (await a.whole(await a.first())).model_dump()
    return asyncio.run(run())


def events(a: Answer, log=None) -> list:
    async def run():
        out = []
        async for event in a.events(await a.first()):
            if log is not None:
                log.append("event")
            out.append(event)
        return out
    found = asyncio.run(run())
    assert found[-1] == "data: [DONE]\n\n" and all(e.startswith("data: ") and e.endswith("\n\n") for e in found)
    return [json.loads(e[6:]) for e in found[:-1]]


CALL_TEXTS = ["get_", "get_weather", "get_weather\n{", 'get_weather\n{"city": "北京"}']


def test_a_call_comes_back_as_tool_calls(glm4):
    body = completion(answer(CALL_TEXTS, glm4))
    parsed = oai.ChatCompletion.model_validate(body)  # the SDK's own type
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "北京"}
    assert parsed.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert body["usage"]["completion_tokens"] == len(glm4.encode(CALL_TEXTS[-1]))  # what the model wrote
    # a plain answer keeps OpenAI's plain shape: no tool_calls key at all
    plain = completion(answer(["\n北京", "\n北京今天晴。"], glm4))["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "\n北京今天晴。", "refusal": None}
    assert plain["finish_reason"] == "stop"


def test_a_call_streams_as_openai_does(glm4):
    chunks = events(answer(CALL_TEXTS, glm4, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        oai.ChatCompletionChunk.model_validate(chunk)
    first, arguments, end, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": first["choices"][0]["delta"]["tool_calls"][0]["id"], "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]}
    assert arguments["choices"][0]["delta"] == {"role": None, "content": None, "tool_calls": [
        {"index": 0, "function": {"arguments": '{"city": "北京"}'}}]}
    assert end["choices"][0]["finish_reason"] == "tool_calls" and end["choices"][0]["delta"] == {
        "role": None, "content": None}
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 30


def test_a_plain_reply_streams_once_it_cannot_be_a_call(glm4):
    log = []
    texts = ["\n北", "\n北京", "\n北京今天", "\n北京今天晴。"]
    chunks = events(answer(texts, glm4, log=log, stream=True), log)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d["content"] or "" for d in deltas) == "\n北京今天晴。"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # the text was let through at the first piece that ruled a call out, not at the end
    assert log.index("event") < log.index("piece 2")
    # a reply held back as a possible call that turns out plain is sent whole at the end
    held = events(answer(["get_weather", "get_weather\n{", "get_weather\n{oops"], glm4, stream=True))
    assert [c["choices"][0]["delta"]["content"] for c in held[:-1]] == ["", "get_weather\n{oops"]
    assert held[-1]["choices"][0]["finish_reason"] == "stop"


def test_without_tools_nothing_is_held_back(glm4):
    log = []
    chunks = events(answer(["get_", "get_weather", 'get_weather\n{"city": "北京"}'], glm4, tools=(),
                           log=log, stream=True), log)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert log.index("event") < log.index("piece 1")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in json.dumps(chunks)


# -- live: a GLM-4 random-weight repository behind the gateway ---------------------------------------
GLM4_LIMIT = 1000  # tokens the fp16 variant serves: a request past it gets the router's count back


@pytest.fixture(scope="module")
def glm4_server(tmp_path_factory):
    """A small GLM-4 checkpoint in THUDM's layout with a tiktoken tokenizer of its kind (as
    test_family makes it), built (fp16), served by tritonserver with the gateway beside it."""
    import httpx

    from builder.build.pipeline import BuildOptions, build
    from builder.serving.openai import GatewayOptions, OpenAIGateway
    from builder.serving.server import ServerOptions, free_port
    from conftest import serving, thudm_state
    from test_family import CORPUS, GLM4_SMALL, thudm_checkpoint, train_bpe, write_tiktoken_file

    base = tmp_path_factory.mktemp("glm4-openai")
    tokenizer = write_tiktoken_file(base / "tokenizer.model", train_bpe(CORPUS, 100)[0])
    checkpoint = thudm_checkpoint(base / "glm-4-small", GLM4_SMALL, thudm_state(GLM4_SMALL, seed=4),
                                  tokenizer=tokenizer,
                                  extra={"eos_token_id": [370, 377, 379], "pad_token_id": 370})
    repo = build(BuildOptions(model=str(checkpoint), quant=("fp16",), gpu="cpu", out=base / "repo",
                              limits={"fp16": GLM4_LIMIT}), progress=False).out
    options = ServerOptions.on_loopback(repo, log_file=base / "server.log")
    with serving(options) as server, OpenAIGateway(GatewayOptions(
            repo, server.urls["grpc"], port=free_port(), address="127.0.0.1")) as gateway:
        gateway.wait_ready(120)
        with httpx.Client(base_url=gateway.url, timeout=120, trust_env=False) as http:
            yield http, GLM4Tokenizer(repo / "glm-4-9b-chat-stream" / "1" / "tokenizer.model")


GLM4_MESSAGES = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "北京天气怎么样？"},
                 tool_call_message("glm4", "get_weather", {"city": "北京"}),
                 {"role": "observation", "content": '{"temperature": 25}'}]


@pytest.mark.server
def test_a_request_with_tools_reaches_glm4_with_its_prompt(glm4_server):
    http, tokenizer = glm4_server
    assert [m["id"] for m in http.get("/models").json()["data"]] == ["glm-4-9b-chat", "glm-4-9b-chat-fp16"]
    body = request(messages=TOOL_ROUND, tools=[WEATHER], temperature=0, max_tokens=8)
    reply = http.post("/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    found = oai.ChatCompletion.model_validate(reply.json())
    # the gateway counted the prompt GLM-4's template makes: tools block, roles, the observation
    assert found.usage.prompt_tokens == len(tokenizer.encode_messages(GLM4_MESSAGES, [WEATHER]))
    assert found.choices[0].finish_reason in ("stop", "length", "tool_calls")
    streamed = http.post("/chat/completions", json=body | {"stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    # ChatGLM2-only refusals do not apply; a forced call still does
    forced = http.post("/chat/completions", json=body | {"tool_choice": "required"})
    assert forced.status_code == 400 and forced.json()["error"]["param"] == "tool_choice"


@pytest.mark.server
def test_the_router_counts_the_same_prompt(glm4_server):
    """The router's own count, in its refusal of a request longer than any variant serves, is the
    gateway's: it built the prompt from the ``messages`` input with the same template."""
    from builder.serving import request as contract

    if MESSAGES_INPUT not in contract.OPTIONAL_INPUTS:
        pytest.skip("the router does not read the 'messages' input yet (request.OPTIONAL_INPUTS)")
    http, tokenizer = glm4_server
    refused = http.post("/chat/completions", json=request(messages=TOOL_ROUND, tools=[WEATHER],
                                                          max_tokens=GLM4_LIMIT * 2))
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    expected = len(tokenizer.encode_messages(GLM4_MESSAGES, [WEATHER]))
    assert f"prompt with its kept history: {expected} tokens" in refused.json()["error"]["message"]
