"""An OpenAI-compatible endpoint (``/v1``) in front of Triton: a protocol layer that forwards each
chat to the router (or a named variant) over gRPC. See ``app`` (routes), ``protocol`` (shapes),
``conversation`` (messages to ChatGLM2's prompt + history), ``triton`` (the gRPC side) and
``gateway`` (uvicorn beside glm-serve's Triton)."""
from .gateway import API_KEY_ENV, DEFAULT_PORT, GatewayOptions, OpenAIGateway  # noqa: F401
