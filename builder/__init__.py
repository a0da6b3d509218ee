"""glm-build: ChatGLM2 on NVIDIA Triton Inference Server, several precisions side by side."""
from pathlib import Path

from .chat import chat, stream_chat
from .checkpoint import load_chatglm2
from .config import CHATGLM2_6B, ChatGLM2Config

# The embedded tiny ChatGLM2 checkpoint (THUDM layout); `make tiny-model` re-creates it.
TINY_CHECKPOINT = Path(__file__).parent / "assets" / "tiny-chatglm2"

__all__ = ["CHATGLM2_6B", "ChatGLM2Config", "TINY_CHECKPOINT", "chat", "load_chatglm2", "stream_chat"]
