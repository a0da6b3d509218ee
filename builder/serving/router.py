"""The router models ``chatglm2-6b`` (one response) and ``chatglm2-6b-stream`` (decoupled).

Each counts the request's tokens with the tokenizer (the prompt plus the history it keeps), picks
the highest-precision variant whose planned limit covers the request, and forwards it with a BLS
call. When that variant cannot take it now (its batch is full, its stub is down or being
reloaded) and nothing has been sent yet, the request goes to the next variant the ``fallback``
policy allows (``builder.plan.routing.RoutingTable.candidates``), and the ``variant`` output says which
one served. The generated ``model.py`` only imports :class:`TritonPythonModel`; whether it
streams comes from the model's ``model_transaction_policy``. Nothing here imports torch.

The streaming router answers from a thread per request (a decoupled model may respond after
``execute()`` returns), so two instances carry any number of streams; the one-response router
must answer from ``execute()`` and has one instance per request in flight (see
``builder.build.templates.ROUTER_INSTANCES``).
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Python-backend stub

from ..plan.routing import RoutingTable, check_fallback
from ..model.family import get_family
from .cancel import CANCEL_PREFIX, CANCELLED, ROUTE_PREFIX, CancelWatch, Ticket
from .metrics import COUNTER, Family
from .params import RouterParameters, resolve_path
from .request import (OUTPUTS, RequestError, messages_length, parse_messages, parse_request,
                      request_length)
from .variant import BUSY, FINAL, error_response, request_inputs

log = logging.getLogger("glm-build.router")

# What a variant that cannot take a request now answers (its own refusal, or Triton's for a dead
# stub or a model being reloaded): the request may go elsewhere.
_UNAVAILABLE = (BUSY, "is not healthy", "unknown model", "is not found", "not ready", "unavailable",
                "stub process")


class ClientGone(RuntimeError):
    """The router's client cancelled (or its stream closed): the request ends without an answer."""


class VariantUnavailable(RuntimeError):
    """The variant refused the request before answering anything: another may take it."""


def unavailable(message: str) -> bool:
    """Whether a variant's error says it could not take the request now (vs. a failed request).

    >>> unavailable("busy: chatglm2-6b-int8 is full: 64 requests already wait")
    True
    """
    text = message.lower()
    return any(marker in text for marker in _UNAVAILABLE)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        params = RouterParameters.from_model_config(config)
        check_fallback(params.fallback)
        self.fallback = params.fallback
        self.table = RoutingTable.from_json(params.routing)
        self.seq_length = params.seq_length
        tokenizer = resolve_path(params.tokenizer, Path(args["model_repository"]))  # <folder>/<file>
        self.tokenizer = get_family(params.family).load_tokenizer(tokenizer.parent)
        self.fallbacks = Family("glm_router_fallbacks_total", COUNTER,
                                "Requests sent to another variant than the one routing picked",
                                router=self.name)
        self.cancels = Family("glm_router_cancelled_requests_total", COUNTER,
                              "Requests whose client went away before the answer ended (each "
                              "cancelled at its variant)", router=self.name)
        self.watch = CancelWatch(send_cancel, self._count_cancel)

    def route(self, request) -> tuple[list[str], list]:
        """The variants to try for this request, in order, and the inputs to forward."""
        inputs = request_inputs(request)
        req = parse_request(inputs)
        chat = parse_messages(inputs)  # a conversation in the family's roles (tools), if sent
        needed, prompt_tokens = (messages_length(req, chat, self.tokenizer, self.seq_length) if chat
                                 else request_length(req, self.tokenizer, self.seq_length))
        routes = self.table.candidates(needed, self.fallback)
        if not routes:
            raise RequestError(f"{self.table.refusal(needed)} (prompt with its kept history: "
                               f"{prompt_tokens} tokens; input 'max_token' = {req.max_token})")
        stream = np.array([b"1" if self.decoupled else b"0"], dtype=object)
        forwarded = [pb_utils.Tensor(name, array) for name, array in inputs.items()
                     if array is not None and name != "stream"]
        return [r.name for r in routes], forwarded + [pb_utils.Tensor("stream", stream)]

    def forward(self, variant: str, inputs: list, ticket: Ticket):
        """Yield the variant's responses (one, or a stream) as responses of this model; raises
        :class:`VariantUnavailable` when it refused before answering anything, and
        :class:`ClientGone` once the client went away (the variant then drops the request)."""
        call = pb_utils.InferenceRequest(model_name=variant, inputs=inputs,
                                         requested_output_names=list(OUTPUTS),
                                         request_id=ROUTE_PREFIX + ticket.route_id)
        ticket.variant = variant
        answered = False
        ended = False  # the variant's stream ended (its last response, or an error, came)
        try:
            ticket.responses = call.exec(decoupled=True)
            for answer in ticket.responses:
                if self.watch.check(ticket):
                    raise ClientGone(CANCELLED)
                if answer.has_error():  # a variant's error is its final response
                    ended = True
                    message = answer.error().message()
                    if not answered and unavailable(message):
                        raise VariantUnavailable(f"variant {variant}: {message}")
                    raise RuntimeError(f"variant {variant} failed: {message}")
                tensors = [pb_utils.get_output_tensor_by_name(answer, name) for name in OUTPUTS]
                if all(t is not None for t in tensors):  # the empty final flag carries no outputs
                    answered = True
                    yield pb_utils.InferenceResponse(output_tensors=tensors)
            ended = True
        except pb_utils.TritonModelException as err:  # the BLS call itself failed (model gone)
            ended = True
            if answered or not unavailable(str(err)):
                raise
            raise VariantUnavailable(f"variant {variant}: {err}") from None
        finally:
            if not ended and ticket.responses is not None:
                # Never leave a BLS stream half read: stop the variant's request if the
                # client's cancel did not already, then read the stream to its end, so the
                # variant's request is over when this request is.
                try:
                    if not ticket.cancelled:
                        send_cancel(variant, ticket.route_id)
                    for _ in ticket.responses:
                        pass
                except Exception as err:  # the variant is gone: nothing left to read
                    log.warning("%s: reading %s's stream to its end: %s", self.name, variant, err)

    def serve(self, request, send, sender=None):
        """Route ``request``, falling back as the policy allows; ``send(response)`` each answer.
        Returns the last response, or None once the client went away; raises for a request no
        variant served.

        While the request is in flight, :class:`~.cancel.CancelWatch` polls its client (through
        ``sender`` where the model is decoupled): a client that went away has its request
        cancelled at the variant (its place in the batch and its KV blocks freed, queued or
        running), and is never retried on another variant.
        """
        ticket = self.watch.track(request, sender)
        try:
            return self._serve(request, send, ticket)
        except ClientGone:
            return None
        except Exception:
            if self.watch.check(ticket):  # the variant's "cancelled" error, or the client left meanwhile
                return None
            raise
        finally:
            self.watch.untrack(ticket)

    def _serve(self, request, send, ticket: Ticket):
        variants, inputs = self.route(request)
        errors = []
        for variant in variants:
            if self.watch.check(ticket):  # never start (or retry) a request nobody waits for
                raise ClientGone(CANCELLED)
            try:
                last = None
                for last in self.forward(variant, inputs, ticket):
                    send(last)
                if last is None:
                    raise RuntimeError(f"variant {variant} sent no answer")
                if variant != variants[0]:
                    self._count_fallback(variants[0], variant)
                return last
            except VariantUnavailable as err:
                errors.append(str(err))
                log.warning("%s: %s%s", self.name, err,
                            "; trying the next variant" if variant != variants[-1] else "")
        raise RuntimeError("no variant could take the request now (fallback "
                           f"{self.fallback!r}): " + "; ".join(errors))

    def _count_cancel(self, ticket: Ticket) -> None:
        self.cancels.increment(1, variant=ticket.variant or "none")

    def _count_fallback(self, preferred: str, served: str) -> None:
        self.fallbacks.increment(1, preferred=preferred, served=served)

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                threading.Thread(target=self._stream, args=(request,), daemon=True,
                                 name="glm-route").start()
            return None
        responses = []
        for request in requests:
            try:  # one response: only the last is returned, nothing is sent on the way
                responses.append(self.serve(request, lambda response: None)
                                 or error_response(f"{self.name}: {CANCELLED}"))
            except Exception as err:  # bad input or no variant: this request only
                if not isinstance(err, RequestError):
                    log.error("%s: %s", self.name, err)
                responses.append(error_response(str(err)))
        return responses

    def finalize(self):
        self.watch.close()

    def _stream(self, request) -> None:
        sender = request.get_response_sender()
        try:
            if self.serve(request, sender.send, sender) is None:
                sender.send(error_response(f"{self.name}: {CANCELLED}"), flags=FINAL)
            else:
                sender.send(flags=FINAL)
        except Exception as err:  # bad input, a failed or unavailable variant: this request only
            if not isinstance(err, RequestError):
                log.error("%s: %s", self.name, err)
            try:
                sender.send(error_response(str(err)), flags=FINAL)
            except Exception:  # the client went away meanwhile
                log.warning("%s: could not deliver the error: %s", self.name, err)


def cancel_inputs() -> list:
    """The inputs of a cancel message: the contract's required inputs, empty (the variant reads
    only the request id, :data:`~.cancel.CANCEL_PREFIX` and the id to drop)."""
    empty = {"prompt": [b""], "history": [], "temperature": [b"0"], "max_token": [b"1"],
             "history_len": [b"0"]}
    return [pb_utils.Tensor(name, np.array(values, dtype=object).reshape(len(values)))
            for name, values in empty.items()]


def send_cancel(variant: str, route_id: str) -> None:
    """Tell ``variant`` to drop the request this router forwarded as ``route_id``."""
    call = pb_utils.InferenceRequest(model_name=variant, inputs=cancel_inputs(),
                                     requested_output_names=list(OUTPUTS),
                                     request_id=CANCEL_PREFIX + route_id)
    for answer in call.exec(decoupled=True):
        if answer.has_error():
            raise RuntimeError(answer.error().message())
