"""glm-build: ChatGLM2 on NVIDIA Triton Inference Server, several precisions side by side.

The public names are imported lazily, so ``builder.serving`` (the router, ``glm-serve``) and the
tokenizer work without importing torch.

>>> from builder import load_chatglm2, chat, TINY_CHECKPOINT
>>> model, tokenizer = load_chatglm2(TINY_CHECKPOINT)
>>> chat(model, tokenizer, "3只鸡和2只兔子一共有几条腿？", temperature=0)
"""
from importlib import import_module
from pathlib import Path

# The embedded tiny ChatGLM2 checkpoint (THUDM layout); `make tiny-model` re-creates it.
TINY_CHECKPOINT = Path(__file__).parent / "assets" / "tiny-chatglm2"

_LAZY = {
    "chat": "model.generation", "stream_chat": "model.generation",
    "load_chatglm2": "model.checkpoint",
    "CHATGLM2_6B": "model.config", "ChatGLM2Config": "model.config",
    "estimate_memory": "plan.memory",
    "load_profile": "plan.profiles",
    "quantize": "model.quantization",
}

__all__ = ["TINY_CHECKPOINT", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'builder' has no attribute {name!r}")
