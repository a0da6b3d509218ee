"""The variant model: one precision of ChatGLM2 in a Triton Python-backend instance, serving many
requests at once.

The generated ``chatglm2-6b-<precision>/1/model.py`` only imports :class:`TritonPythonModel`. The
model is decoupled: ``execute()`` parses each request and hands it to the continuous batcher
(:mod:`.batcher`, over the KV pool the memory plan sized), then returns; the batcher's delivery
thread answers each request through its own response sender (every partial answer when the
request asked to ``stream``, the final one always). A request whose client went away leaves the
batch and frees its KV blocks, running or still queued; so does one a router forwarded when the
router says its client went away (a cancel message, :mod:`.cancel`). One that fails fails alone.

A full batcher refuses a request with an error that starts with :data:`BUSY`, so that the router
can hand it to another variant.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import triton_python_backend_utils as pb_utils  # provided by the Python-backend stub

from .cancel import CANCELLED, POLL_INTERVAL_S, CancelRegistry, client_gone, routed_id
from .metrics import COUNTER, GAUGE, Family
from .params import VariantParameters, resolve_path
from .request import (OPTIONAL_INPUTS, REQUIRED_INPUTS, RequestError, messages_length, output_arrays,
                      parse_messages, parse_request)

log = logging.getLogger("glm-build.variant")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
BUSY = "busy:"  # the start of a full variant's refusal (the router falls back on it)
METRICS_INTERVAL_S = 1.0


def request_inputs(request) -> dict:
    """The request's inputs as numpy arrays (None where absent)."""
    out = {}
    for name in REQUIRED_INPUTS + OPTIONAL_INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        out[name] = None if tensor is None else tensor.as_numpy()
    return out


def to_response(response: str, history, variant: str):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor(name, array) for name, array in output_arrays(response, history, variant).items()])


def error_response(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


class VariantMetrics:
    """This variant's batch on Triton's metrics port, beside Triton's own (``glm_*`` families)."""

    def __init__(self, model: str):
        def family(name, kind, description):
            created = Family(name, kind, description, model=model)
            created.declare()  # at 0 from the start
            return created

        self.running = family("glm_batch_running_requests", GAUGE, "Requests in the running batch")
        self.queued = family("glm_batch_queued_requests", GAUGE, "Requests waiting to join the batch")
        self.kv_used = family("glm_kv_blocks_used", GAUGE, "KV-cache blocks held by requests")
        self.kv_free = family("glm_kv_blocks_free", GAUGE, "KV-cache blocks free")
        self.tokens = family("glm_generated_tokens_total", COUNTER, "Answer tokens generated")
        self.prompt = family("glm_prompt_tokens_total", COUNTER, "Prompt tokens of the requests submitted")
        self.reused = family("glm_prompt_tokens_reused_total", COUNTER,
                             "Prompt tokens found in the KV pool instead of prefilled (prefix sharing)")
        self.cancelled = family("glm_cancelled_requests_total", COUNTER,
                                "Requests that left the batch because their client went away")
        self.ttft_sum = family("glm_time_to_first_token_seconds_sum", COUNTER,
                               "Sum of the times to first token, seconds")
        self.ttft_count = family("glm_time_to_first_token_seconds_count", COUNTER,
                                 "Requests that got a first token")
        self._published: dict[str, float] = {}  # each counter's total so far, by name

    def publish(self, stats) -> None:
        self.running.set(stats.running_requests)
        self.queued.set(stats.queued_requests)
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_free.set(stats.kv_blocks_free)
        for counter, total in ((self.tokens, stats.generated_tokens), (self.cancelled, stats.cancelled_requests),
                               (self.prompt, stats.prompt_tokens), (self.reused, stats.reused_prompt_tokens)):
            counter.increment(total - self._published.get(counter.name, 0))  # the batcher keeps totals
            self._published[counter.name] = total

    def first_token(self, seconds: float) -> None:
        try:
            self.ttft_sum.increment(seconds)
            self.ttft_count.increment(1)
        except Exception:  # metrics must never fail a request
            log.exception("publishing the time to first token failed")


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from ..model.checkpoint import load_chatglm2
        from .batcher import Batcher, BatcherConfig

        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.params = VariantParameters.from_model_config(config)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        start = time.perf_counter()
        # relative to this model's folder, wherever the repository was moved
        self.checkpoint = resolve_path(self.params.checkpoint, Path(args["model_repository"]))
        self.model, self.tokenizer = load_chatglm2(
            self.checkpoint, device=device, dtype=getattr(torch, self.params.dtype),
            bits=self.params.bits, group_size=self.params.group_size or None,
            family=self.params.family)
        # A repository built before the plan sized pools: one request at seq_length.
        blocks = self.params.kv_blocks or -(-self.params.seq_length // self.params.kv_page_size)
        self.batcher = Batcher(self.model, self.tokenizer, BatcherConfig(
            num_blocks=blocks, block_size=self.params.kv_page_size,
            max_batch_tokens=self.params.max_batch_tokens or 512,
            max_running=self.params.max_running or None))
        self.batcher.start()
        self.metrics = VariantMetrics(self.name)
        self.routed = CancelRegistry()  # the routers' requests, by the id each router gave
        self._waiting: dict[object, tuple] = {}  # handle -> (request, sender), until its first token
        self._waiting_lock = threading.Lock()
        self._closing = threading.Event()
        threading.Thread(target=self._publish_metrics, name="glm-metrics", daemon=True).start()
        threading.Thread(target=self._watch_waiting, name="glm-watch", daemon=True).start()
        log.warning("%s: loaded %s (%d-bit, %s) on %s in %.1f s; KV pool %d × %d tokens",
                    self.name, self.checkpoint, self.params.bits, self.params.dtype, device,
                    time.perf_counter() - start, blocks, self.params.kv_page_size)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            kind, route_id = routed_id(request)
            if kind == "cancel":  # a router's client went away: drop what it forwarded
                self.routed.cancel(route_id)
                sender.send(flags=FINAL)
                continue
            try:
                self.submit(request, sender, route_id)
            except Exception as err:  # a bad or refused request fails alone, at once
                if not isinstance(err, RequestError):
                    log.warning("%s: request refused: %s", self.name, err)
                sender.send(error_response(str(err)), flags=FINAL)
        return None

    def submit(self, request, sender, route_id: str = "") -> None:
        """Queue one chat in the batch; ``route_id`` is the id a router forwarded it under."""
        from ..model.generation import PromptTooLongError
        from .batcher import BatcherFullError

        inputs = request_inputs(request)
        req, chat = parse_request(inputs), parse_messages(inputs)
        max_length = min(req.max_token, self.params.seq_length)  # as documented: clamped
        state = {"handle": None, "first": True}
        started = time.perf_counter()

        def on_update(text, history, finished, error):
            if state["first"] and (text or finished):
                with self._waiting_lock:  # before anything is sent: see _watch_waiting
                    state["first"] = False
                    self._waiting.pop(state["handle"], None)
                self.metrics.first_token(time.perf_counter() - started)
            if finished and route_id:
                self.routed.discard(route_id)
            # A direct client that went away frees its place in the batch. A router's request is
            # cancelled by its router's message instead (.cancel): Triton 2.51 never marks a BLS
            # request cancelled, and not asking about it spares a server round trip per token.
            if not route_id and client_gone(request, sender):
                self._drop(state["handle"], sender)
                return
            if error is not None:
                sender.send(error_response(f"{self.name}: {type(error).__name__}: {error}"), flags=FINAL)
            elif finished:
                sender.send(to_response(text, history, self.params.precision), flags=FINAL)
            elif req.stream:
                sender.send(to_response(text, history, self.params.precision))

        try:
            if chat is None:
                handle = self.batcher.submit(req.prompt, req.history, max_length=max_length,
                                             temperature=req.temperature, on_update=on_update)
            else:  # the family's roles, tools included: nothing is dropped from it
                messages_length(req, chat, self.tokenizer, self.params.seq_length)
                handle = self.batcher.submit_prompt_ids(
                    chat.prompt_ids(self.tokenizer), req.prompt, req.history,
                    max_length=max_length, temperature=req.temperature, on_update=on_update)
            state["handle"] = handle
        except PromptTooLongError as err:
            raise RequestError(f"input 'max_token' = {req.max_token}: {err}") from None
        except BatcherFullError as err:
            raise RuntimeError(f"{BUSY} {self.name} is full: {err}") from None
        except ValueError as err:
            raise RequestError(f"{self.name}: {err}") from None
        if not route_id:  # a direct client: watched here until its first token
            with self._waiting_lock:
                if state["first"]:
                    self._waiting[handle] = (request, sender)
        elif not self.routed.add(route_id, lambda: self._drop(handle, sender)):  # its cancel came first
            self._drop(handle, sender)

    def _drop(self, handle, sender) -> bool:
        """Cancel ``handle`` (its place in the batch and its KV blocks are freed) and end its
        response stream; False when it had ended already."""
        if handle is None or not handle.cancel():
            return False
        try:
            sender.send(error_response(f"{self.name}: {CANCELLED}"), flags=FINAL)
        except Exception:  # nobody is listening any more
            pass
        return True

    def _watch_waiting(self) -> None:
        """A direct client's request still waiting for its first token gets no update to notice a
        cancelled client by: ask for it here, so a request dropped in the queue never starts
        decoding. (A router's requests are cancelled by their router: :mod:`.cancel`.) The server
        is asked under the lock ``on_update`` takes before it sends anything: asking Triton 2.51
        about a request whose last response has gone crashes it."""
        while not self._closing.wait(POLL_INTERVAL_S):
            gone = []
            with self._waiting_lock:
                for handle in [h for h in self._waiting if h.done or h.first_token_at is not None]:
                    del self._waiting[handle]
                for handle, (request, sender) in list(self._waiting.items()):
                    if client_gone(request, sender):
                        del self._waiting[handle]
                        gone.append((handle, sender))
            for handle, sender in gone:
                self._drop(handle, sender)

    def _publish_metrics(self) -> None:
        while not self._closing.wait(METRICS_INTERVAL_S):
            try:
                self.metrics.publish(self.batcher.stats())
            except Exception:  # metrics must never take the model down
                log.exception("%s: publishing metrics failed", self.name)

    def finalize(self):
        self._closing.set()
        self.batcher.stop()
        self.model = None

