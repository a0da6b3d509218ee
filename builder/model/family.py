"""The GLM families glm-build serves, and which one a checkpoint folder holds.

A :class:`Family` is everything that differs between ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat
once the network is loaded (they are all the same block on ``GlmForCausalLM``): the name the
repository is built under, the tokenizer and its file, the chat and tool formats, the end tokens,
how ``rope_ratio`` applies, the published config (``--spec NAME``) and the published memory figures.

>>> family = detect_family("THUDM-glm-4-9b-chat/")
>>> family.name, family.variant_name("int4"), family.stream_router_name
('glm-4-9b-chat', 'glm-4-9b-chat-int4', 'glm-4-9b-chat-stream')

Which signals decide (:func:`explain_family` returns them as sentences):

1. ``config.json``'s layout: ``model_type`` ``"glm"`` or ``architectures`` ``["GlmForCausalLM"]`` is
   transformers' own layout (glm-4-9b-chat-hf); ``"chatglm"`` / ``ChatGLMModel`` is THUDM's.
2. The tokenizer file's format: ``tokenizer.model`` as tiktoken text (``base64-token rank`` lines)
   is GLM-4; a sentencepiece binary is ChatGLM2 or ChatGLM3. Without one, ``padded_vocab_size``
   151,552 is GLM-4 and anything else ChatGLM2/3 (whose check then names the missing file).
3. ChatGLM3 against ChatGLM2 (the same sentencepiece model): a role token (``<|user|>``) in
   ``tokenizer_config.json`` (its chat template or added tokens) or in the shipped
   ``tokenization_chatglm.py`` (read as text, never run); else ``chatglm3`` / ``chatglm2`` in the
   ``_name_or_path`` of either JSON; else ``seq_length`` 8192 (ChatGLM3-6B's).
4. The member (-32k, -128k, -1m) from ``seq_length`` and ``rope_ratio``.

``--family NAME`` (``override``) skips all of it.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from builder.model.config import CHATGLM2_6B, ChatGLM2Config, UnsupportedCheckpointError

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_CODE_FILE = "tokenization_chatglm.py"

KINDS = ("chatglm2", "chatglm3", "glm4")
LAYOUTS = ("thudm", "transformers")
TOKENIZERS = {"sentencepiece": "tokenizer.model", "tiktoken": "tokenizer.model",
              "tokenizers": "tokenizer.json"}  # kind -> the file it reads
CHAT_FORMATS = ("rounds", "roles", "glm4-template")
TOOL_FORMATS = (None, "chatglm3", "glm4")
ROPE_SCHEMES = ("base", "positions")
MIB = 2**20


class FamilyError(ValueError):
    """A checkpoint whose family cannot be told, or an unknown ``--family``."""


@dataclass(frozen=True)
class PublishedRow:
    """One published memory figure, in its table's own conditions."""

    precision: str  # the variant it compares with: "fp16" (the 16-bit variant, BF16 in GLM-4's table), "int8", "int4"
    input_tokens: Optional[int]  # prompt length of the measurement; None: the source gives none
    value: float  # as printed
    unit: str  # "MiB" or "GB" (the ChatGLM READMEs' GB is read as GiB, like builder.plan.memory)
    conditions: str  # GPU, runtime and what was measured
    source: str  # where it is published
    # the table's runtime, for an estimate in its conditions (builder.plan.memory.estimate_memory):
    phase: str = "encode"  # the measurement's largest forward: the prompt's prefill
    all_logits: bool = True  # False: its runtime keeps the last position's logits only
    group_size: Optional[int] = None  # its int4/int8 scheme's group (None: ChatGLM's per row)

    @property
    def memory_bytes(self) -> int:
        return round(self.value * (MIB if self.unit == "MiB" else 2**30))


@dataclass(frozen=True)
class Family:
    """One supported model: how to name, tokenize, prompt, stop and plan it."""

    name: str  # repository names: NAME-fp16 / -int8 / -int4, router NAME, streaming NAME-stream
    kind: str  # "chatglm2" | "chatglm3" | "glm4": picks tokenizer class, chat and tool formats
    tokenizer: str  # "sentencepiece" | "tiktoken" | "tokenizers" (tokenizer.json)
    chat_format: str  # "rounds" ([Round n] 问/答), "roles" (ChatGLM3), "glm4-template"
    stop_tokens: tuple[str, ...]  # token names that end an answer ("eos": sentencepiece's </s>)
    spec: ChatGLM2Config  # the published model's config.json: what `--spec NAME` plans from
    hub_id: str  # its repository on the Hugging Face hub
    layout: str = "thudm"  # "thudm" (transformer.encoder.layers.N...) or "transformers"
    tool_format: Optional[str] = None  # None (no tool calls), "chatglm3", "glm4"
    published: tuple[PublishedRow, ...] = ()  # memory figures published for this model
    published_ref: Optional[str] = None  # where they live instead, when another module owns them

    def __post_init__(self):
        for field, allowed in (("kind", KINDS), ("layout", LAYOUTS), ("tokenizer", TOKENIZERS),
                               ("chat_format", CHAT_FORMATS), ("tool_format", TOOL_FORMATS),
                               ("rope_scheme", ROPE_SCHEMES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"Family {self.name}: {field}={getattr(self, field)!r}, "
                                 f"expected one of {list(allowed)}")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", self.name):
            raise ValueError(f"Family name {self.name!r} must be lower-case letters, digits, '.', '-'")

    # -- names ----------------------------------------------------------------------------------
    @property
    def display_name(self) -> str:
        """How reports name it: ``ChatGLM2-6B``, ``GLM-4-9B-Chat``."""
        def word(w: str) -> str:
            if w.startswith("chatglm"):
                return "ChatGLM" + w[len("chatglm"):]
            return {"glm": "GLM", "chat": "Chat"}.get(w, w.upper())
        return "-".join(word(w) for w in self.name.split("-"))

    @property
    def router_name(self) -> str:
        return self.name

    @property
    def stream_router_name(self) -> str:
        return f"{self.name}-stream"

    def variant_name(self, precision: str) -> str:
        """``glm-4-9b-chat-int4``."""
        return f"{self.name}-{precision}"

    @property
    def rope_scheme(self) -> str:
        return self.spec.rope_scheme

    @property
    def tokenizer_file(self) -> str:
        return TOKENIZERS[self.tokenizer]

    # -- a checkpoint of this family ------------------------------------------------------------
    def read_config(self, checkpoint_dir: str | Path) -> ChatGLM2Config:
        """The folder's ``config.json`` as a :class:`ChatGLM2Config`, with this family's rotary
        scheme (transformers' layout is translated to THUDM's field names)."""
        raw = read_json(Path(checkpoint_dir) / CONFIG_FILE)
        if raw is None:
            raise FamilyError(f"{checkpoint_dir} has no {CONFIG_FILE}")
        if self.layout == "transformers":
            config = config_from_transformers(raw)
        else:
            raw = dict(raw)
            if isinstance(raw.get("eos_token_id"), list):  # GLM-4 lists its three end tokens
                raw["eos_token_id"] = raw["eos_token_id"][0]
            config = ChatGLM2Config.from_dict(raw)
        return dataclasses.replace(config, rope_scheme=self.rope_scheme)

    def load_tokenizer(self, checkpoint_dir: str | Path):
        """This family's tokenizer over the folder's tokenizer file."""
        from builder.model import tokenizers

        return tokenizers.load_tokenizer(self, Path(checkpoint_dir))


def config_from_transformers(raw: dict[str, Any]) -> ChatGLM2Config:
    """A transformers ``GlmConfig`` dict (glm-4-9b-chat-hf) in THUDM's field names."""
    rope = dict(raw.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", (raw.get("rope_scaling") or {}).get("rope_type", "default"))
    if rope_type != "default":
        raise UnsupportedCheckpointError(f"unimplemented: config.json rope_type {rope_type!r} "
                                         "(glm-build maps only default GLM rotary)")
    partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))
    if partial != 0.5:
        raise UnsupportedCheckpointError(
            f"unimplemented: config.json partial_rotary_factor {partial!r} (GLM rotates half a head)")
    needed = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings")
    missing = [k for k in needed if k not in raw]
    if missing:
        raise UnsupportedCheckpointError(f"config.json (transformers GLM layout) lacks {missing}")
    eos = raw.get("eos_token_id", 2)
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    return ChatGLM2Config(
        num_layers=raw["num_hidden_layers"], hidden_size=raw["hidden_size"],
        ffn_hidden_size=raw["intermediate_size"],
        kv_channels=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
        num_attention_heads=raw["num_attention_heads"],
        multi_query_group_num=raw["num_key_value_heads"], padded_vocab_size=raw["vocab_size"],
        seq_length=raw["max_position_embeddings"],
        layernorm_epsilon=raw.get("rms_norm_eps", 1e-5), add_qkv_bias=raw.get("attention_bias", True),
        rope_ratio=float(theta) / 10000.0,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        pad_token_id=raw.get("pad_token_id") or 0, eos_token_id=eos[0] if isinstance(eos, list) else eos)


# -- the published configs (--spec NAME) -----------------------------------------------------------
CHATGLM2_6B_32K = dataclasses.replace(CHATGLM2_6B, rope_ratio=16.0, rope_scheme="positions")
CHATGLM3_6B = dataclasses.replace(CHATGLM2_6B, seq_length=8192)
CHATGLM3_6B_32K = dataclasses.replace(CHATGLM2_6B, seq_length=32768, rope_ratio=50.0)
CHATGLM3_6B_128K = dataclasses.replace(CHATGLM2_6B, seq_length=131072, rope_ratio=500.0)
GLM_4_9B_CHAT = ChatGLM2Config(num_layers=40, padded_vocab_size=151552, seq_length=131072,
                               rope_ratio=500.0, layernorm_epsilon=1.5625e-07,
                               torch_dtype="bfloat16", pad_token_id=151329, eos_token_id=151329)
GLM_4_9B_CHAT_1M = dataclasses.replace(GLM_4_9B_CHAT, seq_length=1048576, rope_ratio=10000.0)

# -- the published memory figures ------------------------------------------------------------------
_GLM4_SOURCE = "THUDM/GLM-4 README (basic_demo), GLM-4-9B-Chat"
_GLM4_CONDITIONS = "one A100, THUDM's transformers runtime, batch 1; input length as given"
# GLM-4's own modeling code computes the prefill's logits for the last position only
# (return_last_logit), and its demo's INT4 is bitsandbytes 4-bit: one fp32 absmax per 64 weights,
# which the estimate counts as a 64-weight group.
GLM_4_PUBLISHED = tuple(
    PublishedRow(precision, tokens, mib, "MiB", _GLM4_CONDITIONS, _GLM4_SOURCE, all_logits=False,
                 group_size=64 if precision == "int4" else None)
    for precision, tokens, mib in (
        ("fp16", 1000, 19047), ("fp16", 8000, 20629), ("fp16", 32000, 27779),
        ("fp16", 128000, 57379),  # BF16 in the table; the 16-bit variant compares with it
        ("int4", 1000, 8251), ("int4", 8000, 9613), ("int4", 32000, 16065),
    ))
CHATGLM3_6B_PUBLISHED = (PublishedRow(
    "fp16", None, 13, "GB", "FP16 inference, no length given ('about 13GB')",
    "THUDM/ChatGLM3 README, low-cost deployment"),)

_ROLE_STOPS = ("<|user|>", "<|observation|>")
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("chatglm2-6b", "chatglm2", "sentencepiece", "rounds", ("eos", "eop"), CHATGLM2_6B,
           "THUDM/chatglm2-6b", published_ref="builder.plan.memory.PUBLISHED_TABLE"),
    Family("chatglm2-6b-32k", "chatglm2", "sentencepiece", "rounds", ("eos", "eop"),
           CHATGLM2_6B_32K, "THUDM/chatglm2-6b-32k"),
    Family("chatglm3-6b", "chatglm3", "sentencepiece", "roles", ("eos", *_ROLE_STOPS), CHATGLM3_6B,
           "THUDM/chatglm3-6b", tool_format="chatglm3", published=CHATGLM3_6B_PUBLISHED),
    Family("chatglm3-6b-32k", "chatglm3", "sentencepiece", "roles", ("eos", *_ROLE_STOPS),
           CHATGLM3_6B_32K, "THUDM/chatglm3-6b-32k", tool_format="chatglm3"),
    Family("chatglm3-6b-128k", "chatglm3", "sentencepiece", "roles", ("eos", *_ROLE_STOPS),
           CHATGLM3_6B_128K, "THUDM/chatglm3-6b-128k", tool_format="chatglm3"),
    Family("glm-4-9b-chat", "glm4", "tiktoken", "glm4-template", ("<|endoftext|>", *_ROLE_STOPS),
           GLM_4_9B_CHAT, "THUDM/glm-4-9b-chat", tool_format="glm4", published=GLM_4_PUBLISHED),
    Family("glm-4-9b-chat-1m", "glm4", "tiktoken", "glm4-template", ("<|endoftext|>", *_ROLE_STOPS),
           GLM_4_9B_CHAT_1M, "THUDM/glm-4-9b-chat-1m", tool_format="glm4"),
    Family("glm-4-9b-chat-hf", "glm4", "tokenizers", "glm4-template",
           ("<|endoftext|>", *_ROLE_STOPS), GLM_4_9B_CHAT, "THUDM/glm-4-9b-chat-hf",
           layout="transformers", tool_format="glm4", published=GLM_4_PUBLISHED),
)}

SPECS: dict[str, ChatGLM2Config] = {name: f.spec for name, f in FAMILIES.items()}
"""``--spec NAME``: plan a model from its published config alone."""


# -- detection -------------------------------------------------------------------------------------
def read_json(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FamilyError(f"{path} is not valid JSON: {err}") from err


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*\s+\d+\s*$")


def tokenizer_model_format(path: Path) -> Optional[str]:
    """``"tiktoken"`` (``base64-token rank`` text lines), ``"sentencepiece"`` (a protobuf binary),
    or None when there is no such file. Reads the first 4 KiB only."""
    if not path.is_file():
        return None
    head = path.read_bytes()[:4096]
    lines = [line for line in head.split(b"\n")[:-1] if line.strip()] or [head]
    if all(_TIKTOKEN_LINE.match(line) for line in lines[:8]):
        return "tiktoken"
    return "sentencepiece"


def get_family(name: str) -> Family:
    """The family called ``name`` (a ``--family`` value)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise FamilyError(f"--family {name!r} is unknown; known: {', '.join(FAMILIES)}") from None


def detect_family(checkpoint_dir: str | Path, override: Optional[str] = None) -> Family:
    """The family of the checkpoint in ``checkpoint_dir`` (``override``: a ``--family`` value).

    >>> detect_family("THUDM-chatglm3-6b/").name
    'chatglm3-6b'
    """
    return explain_family(checkpoint_dir, override)[0]


def explain_family(checkpoint_dir: str | Path, override: Optional[str] = None
                   ) -> tuple[Family, list[str]]:
    """:func:`detect_family`, with the signals that decided it, one sentence each."""
    path = Path(checkpoint_dir)
    if override is not None:
        family = get_family(override)
        raw = read_json(path / CONFIG_FILE) or {}
        layout = _layout(raw)
        if raw and layout != family.layout:
            raise FamilyError(f"--family {override}: that family's checkpoints are in "
                              f"{family.layout} layout, but {path / CONFIG_FILE} describes the "
                              f"{layout} layout")
        return family, [f"--family {override}"]
    raw = read_json(path / CONFIG_FILE)
    if raw is None:
        raise FamilyError(f"cannot tell the model family of {path}: it has no {CONFIG_FILE} "
                          f"(give --family, one of {', '.join(FAMILIES)})")
    why: list[str] = []
    if _layout(raw) == "transformers":
        why.append(f"{CONFIG_FILE}: model_type {raw.get('model_type')!r} / architectures "
                   f"{raw.get('architectures')} is transformers' GLM layout")
        return FAMILIES["glm-4-9b-chat-hf"], why
    model_type, archs = raw.get("model_type"), raw.get("architectures") or []
    if model_type != "chatglm" and not any(str(a).startswith("ChatGLM") for a in archs):
        raise FamilyError(
            f"cannot tell the model family of {path}: {CONFIG_FILE} has model_type "
            f"{model_type!r} and architectures {archs}, neither THUDM's ChatGLM layout "
            f"(model_type 'chatglm') nor transformers' GLM one (model_type 'glm', "
            f"GlmForCausalLM); give --family, one of {', '.join(FAMILIES)}")
    seq = raw.get("seq_length")
    rope_ratio = float(raw.get("rope_ratio") or 1.0)
    tok_format = tokenizer_model_format(path / "tokenizer.model")
    vocab = raw.get("padded_vocab_size")
    if tok_format == "tiktoken" or (tok_format is None and vocab == 151552):
        why.append("tokenizer.model is tiktoken text" if tok_format else
                   f"no tokenizer.model; padded_vocab_size {vocab} is GLM-4's")
        long = (seq or 0) >= 1048576 or rope_ratio >= 10000
        why.append(f"seq_length {seq}, rope_ratio {rope_ratio:g}")
        return FAMILIES["glm-4-9b-chat-1m" if long else "glm-4-9b-chat"], why
    # Without a tokenizer.model a THUDM layout that is not GLM-4's size is taken as ChatGLM2/3,
    # and check_checkpoint then names the missing sentencepiece file.
    why.append("tokenizer.model is a sentencepiece model" if tok_format else
               f"no tokenizer.model; padded_vocab_size {vocab} is not GLM-4's")
    generation, reason = _chatglm_generation(path, raw)
    if generation is None:
        if rope_ratio != 1.0:
            raise FamilyError(
                f"cannot tell the model family of {path}: ChatGLM2-6B-32k and ChatGLM3 use "
                f"rope_ratio ({rope_ratio:g}) differently, and nothing says which this is "
                f"(no role tokens in {TOKENIZER_CONFIG_FILE} or {TOKENIZER_CODE_FILE}, no "
                f"chatglm2/chatglm3 in _name_or_path); give --family chatglm2-6b-32k or "
                f"--family chatglm3-6b-32k")
        generation, reason = "chatglm2", "no ChatGLM3 sign (role tokens, name, seq_length 8192)"
    why.append(reason)
    if generation == "chatglm3":
        member = ("chatglm3-6b-128k" if (seq or 0) > 32768 else
                  "chatglm3-6b-32k" if rope_ratio != 1.0 else "chatglm3-6b")
    else:
        member = "chatglm2-6b-32k" if rope_ratio != 1.0 else "chatglm2-6b"
    why.append(f"seq_length {seq}, rope_ratio {rope_ratio:g}")
    return FAMILIES[member], why


def _layout(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    return "transformers" if raw.get("model_type") == "glm" or "GlmForCausalLM" in archs else "thudm"


def _chatglm_generation(path: Path, raw: dict[str, Any]) -> tuple[Optional[str], str]:
    """("chatglm3" | "chatglm2" | None, why) for a sentencepiece checkpoint."""
    tok_config = read_json(path / TOKENIZER_CONFIG_FILE) or {}
    if "<|user|>" in json.dumps(tok_config, ensure_ascii=False):
        return "chatglm3", f"{TOKENIZER_CONFIG_FILE} names the role token <|user|>"
    code = path / TOKENIZER_CODE_FILE
    if code.is_file() and "<|observation|>" in code.read_text(encoding="utf-8", errors="replace"):
        return "chatglm3", f"{TOKENIZER_CODE_FILE} defines the role token <|observation|>"
    for where, name in ((CONFIG_FILE, raw.get("_name_or_path")),
                        (TOKENIZER_CONFIG_FILE, tok_config.get("name_or_path"))):
        for generation in ("chatglm3", "chatglm2"):
            if name and generation in str(name).lower():
                return generation, f"{where} names {name!r}"
    if raw.get("seq_length") == 8192:
        return "chatglm3", "seq_length 8192 is ChatGLM3-6B's (ChatGLM2-6B has 32768)"
    return None, ""
