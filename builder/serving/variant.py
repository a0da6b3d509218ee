"""The variant model: one precision of ChatGLM2 in a Triton Python-backend instance.

The generated ``chatglm2-6b-<precision>/1/model.py`` only imports :class:`TritonPythonModel`.
The model is decoupled so the streaming router can relay partial answers; a request with
``stream`` = "1" gets them, any other gets one response.
"""
from __future__ import annotations

import json
import logging
import time

import triton_python_backend_utils as pb_utils  # provided by the Python-backend stub

from .params import VariantParameters
from .request import RequestError, output_arrays, parse_request, REQUIRED_INPUTS, OPTIONAL_INPUTS

log = logging.getLogger("glm-build.variant")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


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


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from ..checkpoint import load_chatglm2

        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.params = VariantParameters.from_model_config(config)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        start = time.perf_counter()
        self.model, self.tokenizer = load_chatglm2(
            self.params.checkpoint, device=device, dtype=getattr(torch, self.params.dtype),
            bits=self.params.bits, group_size=self.params.group_size or None)
        log.warning("%s: loaded %s (%d-bit, %s) on %s in %.1f s", self.name, self.params.checkpoint,
                    self.params.bits, self.params.dtype, device, time.perf_counter() - start)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.serve(request, sender)
            except RequestError as err:
                sender.send(error_response(str(err)), flags=FINAL)
            except Exception as err:  # a bug or an OOM must fail this request, not the model
                log.exception("%s: request failed", self.name)
                sender.send(error_response(f"{self.name}: {type(err).__name__}: {err}"), flags=FINAL)
        return None

    def serve(self, request, sender) -> None:
        from ..generation import PromptTooLongError, stream_chat

        req = parse_request(request_inputs(request))
        max_length = req.max_token
        if max_length > self.params.seq_length:
            log.warning("%s: max_token %d is above seq_length %d; clamped", self.name, max_length,
                        self.params.seq_length)
            max_length = self.params.seq_length
        try:
            answers = stream_chat(self.model, self.tokenizer, req.prompt, req.history,
                                  max_length=max_length, temperature=req.temperature)
            response, history = "", list(req.history) + [(req.prompt, "")]
            for response, history in answers:
                if req.stream:
                    sender.send(to_response(response, history, self.params.precision))
        except PromptTooLongError as err:
            raise RequestError(f"input 'max_token' = {req.max_token}: {err}") from None
        sender.send(to_response(response, history, self.params.precision), flags=FINAL)

    def finalize(self):
        self.model = None
