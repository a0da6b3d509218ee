"""ChatGLM2's configuration, with THUDM's field names, and its mapping onto transformers' GLM.

A ChatGLM2 checkpoint's ``config.json`` is read into :class:`ChatGLM2Config`; the architecture
assumptions this package relies on are checked in ``__post_init__`` so an unsupported checkpoint
fails at once, naming the field and its value.

>>> from builder import CHATGLM2_6B
>>> CHATGLM2_6B.num_layers, CHATGLM2_6B.kv_channels
(28, 128)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UnsupportedCheckpointError(ValueError):
    """The checkpoint's config describes something this package cannot load."""


# Fields whose value must be exactly this for the GLM mapping to be right.
_REQUIRED_FLAGS = {
    "multi_query_attention": True,  # grouped K/V heads (MQA with `multi_query_group_num` groups)
    "rmsnorm": True,  # RMSNorm, not LayerNorm
    "post_layer_norm": True,  # a final norm before the output layer
    "original_rope": True,  # rotary on the first half of each head, interleaved pairs
    "add_bias_linear": False,  # no bias on dense / MLP projections
    "apply_residual_connection_post_layernorm": False,  # pre-norm residuals
}


@dataclass(frozen=True)
class ChatGLM2Config:
    """The fields of THUDM's ChatGLM2 ``config.json`` that define the network."""

    num_layers: int = 28
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128  # head_dim
    num_attention_heads: int = 32
    multi_query_group_num: int = 2  # K/V heads
    padded_vocab_size: int = 65024
    seq_length: int = 32768
    layernorm_epsilon: float = 1e-5
    add_qkv_bias: bool = True
    multi_query_attention: bool = True
    rmsnorm: bool = True
    post_layer_norm: bool = True
    original_rope: bool = True
    add_bias_linear: bool = False
    apply_residual_connection_post_layernorm: bool = False
    rope_ratio: float = 1.0  # ChatGLM2 itself has none; ChatGLM3-32k scales the rotary base
    # How rope_ratio applies (not a THUDM field: the family decides, builder.model.family):
    # "base" multiplies the base (10000 × rope_ratio: ChatGLM3, GLM-4); "positions" divides
    # positions by it (ChatGLM2-6B-32k).
    rope_scheme: str = "base"
    quantization_bit: int = 0  # 0: plain weights; 4 or 8: THUDM's pre-quantized format
    torch_dtype: str = "float16"
    pad_token_id: int = 0
    eos_token_id: int = 2

    def __post_init__(self):
        for field, wanted in _REQUIRED_FLAGS.items():
            if getattr(self, field) != wanted:
                raise UnsupportedCheckpointError(
                    f"unimplemented: config.json field {field!r} is {getattr(self, field)!r}; "
                    f"glm-build supports only {field}={wanted} (the ChatGLM2 architecture)")
        for field in ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels",
                      "num_attention_heads", "multi_query_group_num", "padded_vocab_size",
                      "seq_length"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UnsupportedCheckpointError(
                    f"config.json field {field!r} must be a positive integer, got {value!r}")
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise UnsupportedCheckpointError(
                f"unimplemented: kv_channels × num_attention_heads = {self.kv_channels} × "
                f"{self.num_attention_heads} = {self.kv_channels * self.num_attention_heads}, "
                f"but hidden_size is {self.hidden_size}")
        if self.num_attention_heads % self.multi_query_group_num:
            raise UnsupportedCheckpointError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"multi_query_group_num ({self.multi_query_group_num})")
        if self.kv_channels % 4:
            raise UnsupportedCheckpointError(
                f"kv_channels must be a multiple of 4 for half-head rotary, got {self.kv_channels}")
        if self.rope_scheme not in ("base", "positions"):
            raise UnsupportedCheckpointError(
                f"rope_scheme must be 'base' or 'positions', got {self.rope_scheme!r}")
        if self.quantization_bit not in (0, 4, 8):
            raise UnsupportedCheckpointError(
                f"config.json field 'quantization_bit' must be 0, 4 or 8, got {self.quantization_bit!r}")

    # -- derived sizes --------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        """Rows of K (and of V) in the fused QKV projection."""
        return self.multi_query_group_num * self.kv_channels

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    def rope_parameters(self) -> dict[str, Any]:
        """transformers' ``rope_parameters`` for this checkpoint's rotary scheme.

        >>> ChatGLM2Config(rope_ratio=16, rope_scheme="positions").rope_parameters()["rope_type"]
        'linear'
        """
        if self.rope_scheme == "positions":  # angle = (position / rope_ratio) × 10000^(-2i/d)
            return {"rope_type": "linear", "factor": float(self.rope_ratio), "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.5}
        return {"rope_type": "default", "rope_theta": 10000.0 * self.rope_ratio,
                "partial_rotary_factor": 0.5}

    # -- I/O ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ChatGLM2Config":
        """Keep the known fields; THUDM's config has many more (dropouts, fusion flags)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        if "quantization_bit" in values and values["quantization_bit"] is None:
            values["quantization_bit"] = 0
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "ChatGLM2Config":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UnsupportedCheckpointError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """THUDM's config.json, with the fields their remote code expects."""
        return {
            "model_type": "chatglm",
            "architectures": ["ChatGLMModel"],
            **dataclasses.asdict(self),
            "tie_word_embeddings": False,
        }

    def to_glm_config(self, dtype=None):
        """The equivalent ``transformers.GlmConfig``."""
        from transformers import GlmConfig

        return GlmConfig(
            vocab_size=self.padded_vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.multi_query_group_num,
            head_dim=self.kv_channels,
            max_position_embeddings=self.seq_length,
            rms_norm_eps=self.layernorm_epsilon,
            # rotary on half of each head (64 of 128 dims for the 6B), base 10000, interleaved pairs
            rope_parameters=self.rope_parameters(),
            attention_bias=self.add_qkv_bias,
            hidden_act="silu",
            tie_word_embeddings=False,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            bos_token_id=1,
            dtype=dtype,
        )


# THUDM/chatglm2-6b's config.json (the fields that define the network).
CHATGLM2_6B = ChatGLM2Config()
