"""A client that goes away frees its place in the batch, through both routers (live).

One server for the module: a small random-weight checkpoint whose output layer never picks a stop
token, so every answer runs to its ``max_token`` unless it is cancelled, built in all three
precisions with routing limits that spread requests over the variants. The limits are long
(1,300 to 4,096 tokens, 2-3x what a stream decodes before it is dropped here) so that no answer can end before its client drops it, even on a loaded
host. The int4 variant's running
batch is capped at 4 requests (its ``max_running`` parameter, added to its config.pbtxt), so
that a fifth has to wait in the queue.
"""
from __future__ import annotations

import dataclasses
import queue
import time

import pytest
import tritonclient.grpc as grpcclient

from builder import TINY_CHECKPOINT
from builder.build.pipeline import BuildOptions, build
from builder.client.chat import contract_inputs
from builder.serving.server import ServerOptions, TritonServer
from builder.model.tokenizer import ChatGLM2Tokenizer

from conftest import SMALL, finish_later, glm_samples, thudm_state, write_checkpoint

pytestmark = pytest.mark.server

LIMITS = {"fp16": 1300, "int8": 2600, "int4": 4096}  # tokens, prompt included
LONG = dataclasses.replace(SMALL, seq_length=4096)  # not 8192: that is ChatGLM3-6B's
INT4_LONG = 4000  # a max_token only int4 takes
VARIANTS = [f"chatglm2-6b-{p}" for p in LIMITS]
INT4_RUNNING = 4  # requests in int4's running batch at once
FREED_WITHIN_S = 5.0
PROMPT = "1加1等于多少？"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("cancellation")
    tokenizer = ChatGLM2Tokenizer(TINY_CHECKPOINT / "tokenizer.model")
    state = thudm_state(LONG, seed=1)
    state["transformer.output_layer.weight"][list(tokenizer.stop_ids)] = 0  # never the best logit
    checkpoint = write_checkpoint(base / "never-stops", LONG, state)
    repo = base / "repo"
    config = repo / "chatglm2-6b-int4" / "config.pbtxt"
    build(BuildOptions(quant=tuple(LIMITS), gpu="cpu", out=repo, limits=LIMITS,
                       model=str(checkpoint)), progress=False)
    config.write_text(config.read_text() + 'parameters {\n  key: "max_running"\n  value: '
                      f'{{ string_value: "{INT4_RUNNING}" }}\n}}\n')
    server = TritonServer(ServerOptions.on_loopback(repo, log_file=base / "server.log"), ready_timeout=240)
    server.start().wait_ready()
    server.tokenizer = tokenizer
    yield server
    finish_later("the cancellation server", server.stop)


def metrics(server) -> dict[str, float]:
    """``glm_*`` samples by ``name[model]`` (variants) or ``name[router/variant]`` (routers)."""
    def key(labels: dict) -> str:
        return labels.get("model") or f"{labels.get('router')}/{labels.get('variant')}"

    return {f"{name}[{key(labels)}]": value for name, labels, value in glm_samples(server)}


def total(found: dict, name: str, prefix: str = "") -> float:
    return sum(v for k, v in found.items() if k.startswith(f"{name}[{prefix}"))


def inputs(prompt: str, max_token: int, stream: bool = False) -> list:
    # a variant streams its partial answers only when asked (a router always does)
    return contract_inputs(prompt, temperature=0, max_token=max_token, history_len=0,
                           stream=True if stream else None)


class Stream:
    """One client with its own gRPC stream to ``model``."""

    def __init__(self, server, model: str, prompt: str, max_token: int, stream: bool = False):
        self.results: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(server.urls["grpc"])
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))
        self.client.async_stream_infer(model, inputs(prompt, max_token, stream))

    def first_piece(self, timeout: float = 120):
        result, error = self.results.get(timeout=timeout)
        assert error is None, error
        return result.as_numpy("response")[0].decode()

    def drop(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def wait_until_free(server, before: dict, dropped: int, router: str, deadline_s: float,
                    forwarded: int | None = None) -> float:
    """Seconds until every variant has no running or queued request and no KV block in use,
    ``router``'s cancelled counter grew by ``dropped`` and the variants' by ``forwarded`` (the
    dropped requests the router had sent on; default: all); fails past the deadline."""
    forwarded = dropped if forwarded is None else forwarded
    start = time.monotonic()
    while True:
        found = metrics(server)
        idle = all(found[f"{name}[{v}]"] == 0 for v in VARIANTS for name in (
            "glm_batch_running_requests", "glm_batch_queued_requests", "glm_kv_blocks_used"))
        variant_cancels = (total(found, "glm_cancelled_requests_total")
                           - total(before, "glm_cancelled_requests_total"))
        router_cancels = (total(found, "glm_router_cancelled_requests_total", router + "/")
                          - total(before, "glm_router_cancelled_requests_total", router + "/"))
        if idle and variant_cancels == forwarded and router_cancels == dropped:
            return time.monotonic() - start
        assert time.monotonic() - start < deadline_s, (
            f"{dropped} dropped, after {deadline_s} s: variants cancelled {variant_cancels}, "
            f"router {router_cancels}; " + ", ".join(f"{k} = {v:g}" for k, v in sorted(found.items())
                                                     if "batch" in k or "kv_blocks_used" in k))
        time.sleep(0.1)


def answered(server, model="chatglm2-6b", max_token=40) -> str:
    with grpcclient.InferenceServerClient(server.urls["grpc"]) as client:
        result = client.infer(model, inputs(PROMPT, max_token), client_timeout=60)
    return result.as_numpy("response")[0].decode()


def test_dropped_streams_through_the_stream_router_free_every_variant(server):
    # 48 streams: 22 routed to fp16, 22 to int8, 4 to int4 (its batch is capped at 4)
    lengths = [1290] * 22 + [2590] * 22 + [INT4_LONG] * 4
    before = metrics(server)
    streams = [Stream(server, "chatglm2-6b-stream", PROMPT, n) for n in lengths]
    assert all(stream.first_piece() for stream in streams)
    for stream in streams:
        stream.drop()
    freed_s = wait_until_free(server, before, len(streams), "chatglm2-6b-stream",
                              FREED_WITHIN_S + 1.0)  # + the variants' metrics period (1 s)
    print(f"48 dropped streams freed in {freed_s:.1f} s")
    found = metrics(server)
    for v in VARIANTS:  # each variant had some of them
        assert found[f"glm_cancelled_requests_total[{v}]"] > before[f"glm_cancelled_requests_total[{v}]"], v
    started = time.monotonic()
    assert answered(server)
    assert time.monotonic() - started < 10  # nothing left in the way


def test_one_response_requests_whose_clients_leave_are_cancelled(server):
    """32 one-response requests through ``chatglm2-6b``, cancelled by their gRPC clients while the
    router's 8 instances forward 8 of them (long answers, all to int4: 4 decode, 4 wait in its
    batcher) and the rest wait in Triton's queue."""
    before = metrics(server)
    client = grpcclient.InferenceServerClient(server.urls["grpc"])
    done: queue.Queue = queue.Queue()
    calls = [client.async_infer("chatglm2-6b", inputs(PROMPT, INT4_LONG),
                                callback=lambda result, error: done.put(error))
             for _ in range(32)]
    deadline = time.monotonic() + 60
    while True:  # the forwarded ones are in int4's batcher: none can finish before the cancel
        found = metrics(server)
        if (found["glm_batch_running_requests[chatglm2-6b-int4]"] == INT4_RUNNING
                and found["glm_batch_queued_requests[chatglm2-6b-int4]"] == 8 - INT4_RUNNING):
            break
        assert time.monotonic() < deadline, f"the forwarded requests never reached int4: {found}"
        time.sleep(0.2)
    for call in calls:
        call.cancel()
    errors = [done.get(timeout=30) for _ in calls]
    assert all(error is not None and "cancel" in str(error).lower() for error in errors), errors
    client.close()
    # The 24 that waited in Triton's queue reach the router cancelled and are never forwarded
    # (counted under variant="none"); the variants cancel the 8 they had.
    wait_until_free(server, before, 32, "chatglm2-6b", FREED_WITHIN_S + 1.0, forwarded=8)
    found = metrics(server)
    assert (total(found, "glm_router_cancelled_requests_total", "chatglm2-6b/none")
            - total(before, "glm_router_cancelled_requests_total", "chatglm2-6b/none")) == 24
    assert answered(server)


def test_a_request_dropped_in_the_queue_never_starts_decoding(server):
    """int4's running batch is full (4 long answers): the next request routed there waits, is
    dropped there, and never gets a token, while the others go on decoding."""
    before = metrics(server)
    holders = [Stream(server, "chatglm2-6b-stream", PROMPT, INT4_LONG) for _ in range(INT4_RUNNING)]
    assert all(holder.first_piece() for holder in holders)
    waiting = Stream(server, "chatglm2-6b-stream", PROMPT, INT4_LONG)  # int4 too: no place left
    deadline = time.monotonic() + 10
    while metrics(server)["glm_batch_queued_requests[chatglm2-6b-int4]"] < 1:
        assert time.monotonic() < deadline, "the fifth request never queued"
        time.sleep(0.2)
    waiting.drop()
    deadline = time.monotonic() + FREED_WITHIN_S + 1.0
    while True:
        found = metrics(server)
        if (found["glm_batch_queued_requests[chatglm2-6b-int4]"] == 0
                and found["glm_cancelled_requests_total[chatglm2-6b-int4]"]
                == before["glm_cancelled_requests_total[chatglm2-6b-int4]"] + 1):
            break
        assert time.monotonic() < deadline, f"the queued request was not cancelled: {found}"
        time.sleep(0.1)
    received = [waiting.results.get() for _ in range(waiting.results.qsize())]
    assert all(error is not None for _, error in received), received  # not one piece of an answer
    # only the holders ever got a first token; they are still decoding
    assert (found["glm_time_to_first_token_seconds_count[chatglm2-6b-int4]"]
            == before["glm_time_to_first_token_seconds_count[chatglm2-6b-int4]"] + INT4_RUNNING)
    assert found["glm_batch_running_requests[chatglm2-6b-int4]"] == INT4_RUNNING
    before = metrics(server)
    for holder in holders:
        holder.drop()
    wait_until_free(server, before, INT4_RUNNING, "chatglm2-6b-stream", FREED_WITHIN_S + 1.0)


def test_a_one_response_request_past_its_grpc_deadline_is_cancelled(server):
    before = metrics(server)
    with grpcclient.InferenceServerClient(server.urls["grpc"]) as client:
        with pytest.raises(Exception, match="(?i)deadline"):
            client.infer("chatglm2-6b", inputs(PROMPT, INT4_LONG), client_timeout=1.0)  # int4, long
    wait_until_free(server, before, 1, "chatglm2-6b", FREED_WITHIN_S + 1.0)


def test_a_stream_straight_to_a_variant_leaves_the_batch_when_dropped(server):
    """No router in between: the variant itself sees its client go (``is_cancelled``)."""
    before = metrics(server)
    stream = Stream(server, "chatglm2-6b-int4", PROMPT, INT4_LONG, stream=True)
    assert stream.first_piece()  # the request is in the batch
    stream.drop()
    wait_until_free(server, before, 0, "chatglm2-6b-stream", FREED_WITHIN_S + 1.0, forwarded=1)
    assert answered(server)
