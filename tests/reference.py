"""ChatGLM2's forward pass written straight from the architecture, on THUDM-named tensors.

Independent of the loader's name mapping: RMSNorm, rotary on the first half of each head with
interleaved pairs (base 10000), multi-query attention with grouped K/V, SwiGLU, QKV bias.

``rope_ratio`` as THUDM's two RotaryEmbedding versions apply it: ``rope="base"`` (ChatGLM3, GLM-4:
``base = 10000 * rope_ratio``) or ``rope="positions"`` (ChatGLM2-6B-32k: ``seq_idx / rope_ratio``).
"""
from __future__ import annotations

import math

import torch

from builder.model.config import ChatGLM2Config


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary(x, positions, rot_dim, base=10000.0, position_divisor=1.0):
    """x [seq, heads, head_dim]; rotate pairs (x[2i], x[2i+1]) of the first rot_dim dims."""
    theta = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))  # [rot/2]
    angle = (positions[:, None].double() / position_divisor) * theta[None, :]  # [seq, rot/2]
    cos, sin = angle.cos()[:, None, :].to(x.dtype), angle.sin()[:, None, :].to(x.dtype)
    pairs = x[..., :rot_dim].reshape(*x.shape[:-1], rot_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., rot_dim:]], dim=-1)


def forward(state: dict[str, torch.Tensor], config: ChatGLM2Config, ids: list[int], *,
            rope_ratio: float = 1.0, rope: str = "base") -> torch.Tensor:
    """Logits [seq, vocab] for one sequence."""
    assert rope in ("base", "positions")
    base = 10000.0 * rope_ratio if rope == "base" else 10000.0
    divisor = rope_ratio if rope == "positions" else 1.0
    s = len(ids)
    nh, g, d = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
    eps = config.layernorm_epsilon
    h = state["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]  # [seq, hidden]
    positions = torch.arange(s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(config.num_layers):
        p = f"transformer.encoder.layers.{i}."
        x = rms_norm(h, state[p + "input_layernorm.weight"], eps)
        qkv = x @ state[p + "self_attention.query_key_value.weight"].T + state[p + "self_attention.query_key_value.bias"]
        q = qkv[:, :nh * d].view(s, nh, d)
        k = qkv[:, nh * d:nh * d + g * d].view(s, g, d)
        v = qkv[:, nh * d + g * d:].view(s, g, d)
        q, k = (rotary(t, positions, d // 2, base, divisor) for t in (q, k))
        group_of_head = torch.arange(nh) // (nh // g)
        k, v = k[:, group_of_head], v[:, group_of_head]  # [seq, heads, head_dim]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", scores, v).reshape(s, nh * d)
        h = h + attn @ state[p + "self_attention.dense.weight"].T
        x = rms_norm(h, state[p + "post_attention_layernorm.weight"], eps)
        a, b = (x @ state[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (torch.nn.functional.silu(a) * b) @ state[p + "mlp.dense_4h_to_h.weight"].T
    h = rms_norm(h, state["transformer.encoder.final_layernorm.weight"], eps)
    return h @ state["transformer.output_layer.weight"].T
