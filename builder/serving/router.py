"""The router models ``chatglm2-6b`` (one response) and ``chatglm2-6b-stream`` (decoupled).

Each counts the request's tokens with the tokenizer (the prompt plus the history it keeps), picks
the highest-precision variant whose planned limit covers the request, and forwards it with a BLS
call. The generated ``model.py`` only imports :class:`TritonPythonModel`; whether it streams comes
from the model's ``model_transaction_policy``. Nothing here imports torch.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Python-backend stub

from ..routing import RoutingTable
from ..tokenizer import ChatGLM2Tokenizer
from .params import RouterParameters
from .request import OUTPUTS, RequestError, parse_request
from .variant import FINAL, error_response, request_inputs

log = logging.getLogger("glm-build.router")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        params = RouterParameters.from_model_config(config)
        self.table = RoutingTable.from_json(params.routing)
        self.seq_length = params.seq_length
        self.tokenizer = ChatGLM2Tokenizer(params.tokenizer)

    def route(self, request) -> tuple[str, list]:
        """The variant for this request, and the inputs to forward to it."""
        inputs = request_inputs(request)
        req = parse_request(inputs)
        prompt_tokens = len(self.tokenizer.build_chat_input(req.prompt, req.history))
        needed = max(prompt_tokens + 1, min(req.max_token, self.seq_length))
        route = self.table.choose(needed)
        if route is None:
            raise RequestError(f"{self.table.refusal(needed)} (prompt with its kept history: "
                               f"{prompt_tokens} tokens; input 'max_token' = {req.max_token})")
        stream = np.array([b"1" if self.decoupled else b"0"], dtype=object)
        forwarded = [pb_utils.Tensor(name, array) for name, array in inputs.items()
                     if array is not None and name != "stream"]
        return route.name, forwarded + [pb_utils.Tensor("stream", stream)]

    def forward(self, variant: str, inputs: list):
        """Yield the variant's responses (one, or a stream) as responses of this model."""
        call = pb_utils.InferenceRequest(model_name=variant, inputs=inputs,
                                         requested_output_names=list(OUTPUTS))
        for answer in call.exec(decoupled=True):
            if answer.has_error():
                raise RuntimeError(f"variant {variant} failed: {answer.error().message()}")
            tensors = [pb_utils.get_output_tensor_by_name(answer, name) for name in OUTPUTS]
            if all(t is not None for t in tensors):  # the empty final flag carries no outputs
                yield pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests):
        responses = []
        for request in requests:
            sender = request.get_response_sender() if self.decoupled else None
            try:
                variant, inputs = self.route(request)
                last = None
                for last in self.forward(variant, inputs):
                    if sender:
                        sender.send(last)
                if last is None:
                    raise RuntimeError(f"variant {variant} sent no answer")
                if sender:
                    sender.send(flags=FINAL)
                else:
                    responses.append(last)
            except Exception as err:  # bad input or a failed variant: this request only
                if not isinstance(err, RequestError):
                    log.error("%s: %s", self.name, err)
                if sender:
                    sender.send(error_response(str(err)), flags=FINAL)
                else:
                    responses.append(error_response(str(err)))
        return None if self.decoupled else responses
