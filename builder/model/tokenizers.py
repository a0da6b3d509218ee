"""ChatGLM3's and GLM-4's tokenizers and chat prompts, with ChatGLM2Tokenizer's interface.

Every tokenizer here has ``encode``, ``decode``, ``stop_ids``, ``pad_id``, ``eos_id``,
``vocab_size`` and ``build_chat_input(query, history, system=None, tools=None)``, so
``builder.model.generation`` and the batcher take any of them. ``history`` holds (query, answer) pairs,
like the router's, or message dicts (``{"role", "content", "metadata"}``) for tool calls and
observations; :meth:`encode_messages` takes a whole conversation.

>>> tok = detect_family("glm-4-9b-chat/").load_tokenizer("glm-4-9b-chat/")
>>> tok.decode(tok.build_chat_input("你好", system="Be brief."))  # role markers are skipped
'\nBe brief.\n你好'
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from builder.model.tokenizer import ChatGLM2Tokenizer

ROLES = ("system", "user", "assistant", "observation")

CHATGLM3_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                           "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
"""After the sentencepiece vocabulary, in this order (THUDM chatglm3-6b tokenization_chatglm.py)."""

GLM4_SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                       "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                       "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                       "<|end_of_video|>")
"""Numbered from the number of mergeable ranks, in this order (THUDM glm-4-9b-chat)."""

GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""GLM-4's pre-tokenization regex (its tokenization_chatglm.py ``pat_str``; cl100k's)."""

Message = Mapping[str, Any]


def to_messages(query: Optional[str], history: Iterable = (), system: Optional[str] = None,
                role: str = "user") -> list[dict[str, Any]]:
    """The conversation as message dicts: ``system`` first, then ``history`` ((query, answer)
    pairs or message dicts), then ``query`` under ``role`` (None: no new message)."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    for item in history:
        if isinstance(item, Mapping):
            messages.append(dict(item))
        else:
            q, a = item
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if query is not None:
        messages.append({"role": role, "content": query})
    for m in messages:
        if m.get("role") not in ROLES:
            raise ValueError(f"message role {m.get('role')!r} is not one of {list(ROLES)}")
    return messages


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3-6B: ChatGLM2's sentencepiece model with four role tokens after ``eop``.

    A prompt is ``[gMASK] sop``, then per message ``<|role|>`` + ``encode(metadata + "\\n")`` +
    ``encode(content)``, ending ``<|assistant|>`` (THUDM's ``build_chat_input``).
    """

    def __init__(self, model_file: str | Path):
        super().__init__(model_file)
        self.special_ids = {name: self.n_sp + i for i, name in enumerate(CHATGLM3_SPECIAL_TOKENS)}
        # chat() stops at eos and at the roles that hand the turn back (THUDM's chat()).
        self.stop_ids = (self.eos_id, self.special_ids["<|user|>"], self.special_ids["<|observation|>"])

    @property
    def vocab_size(self) -> int:
        return self.n_sp + len(CHATGLM3_SPECIAL_TOKENS)

    def token_id(self, name: str) -> int:
        """Id of a special token name (``"eos"`` is sentencepiece's ``</s>``)."""
        return self.eos_id if name == "eos" else self.special_ids[name]

    def build_single_message(self, role: str, metadata: str, content: str) -> list[int]:
        return [self.special_ids[f"<|{role}|>"], *self.sp.encode(f"{metadata}\n"), *self.sp.encode(content)]

    def encode_messages(self, messages: Sequence[Message], tools: Optional[Sequence] = None,
                        add_generation_prompt: bool = True) -> list[int]:
        """Ids of a whole conversation; ``tools`` go into the system message (ChatGLM3's format)."""
        from builder.model.tools import chatglm3_system_message

        messages = list(messages)
        if tools:
            system = next((m for m in messages if m["role"] == "system"), None)
            messages = [chatglm3_system_message(tools, system and system["content"])] + [
                m for m in messages if m is not system]
        ids = list(self.prefix_ids)
        for m in messages:
            content = m.get("content") or ""
            if m["role"] == "system" and m.get("tools"):
                import json

                content = content + "\n" + json.dumps(m["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(m["role"], m.get("metadata") or "", content)
        if add_generation_prompt:
            ids.append(self.special_ids["<|assistant|>"])
        return ids

    def build_chat_input(self, query: Optional[str], history: Iterable = (), system: Optional[str] = None,
                         tools: Optional[Sequence] = None, role: str = "user") -> list[int]:
        """Ids of the chat prompt for ``query`` after ``history`` (pairs or message dicts)."""
        return self.encode_messages(to_messages(query, history, system, role), tools)


class GLM4Tokenizer:
    """GLM-4-9B-chat: byte-level BPE with 14 special tokens numbered from the number of ranks.

    Reads THUDM's ``tokenizer.model`` (tiktoken text, ``base64-token rank`` per line) through
    ``tiktoken``, or glm-4-9b-chat-hf's ``tokenizer.json`` through ``tokenizers``. The prompt is
    GLM-4's chat template: ``[gMASK]<sop>``, then per message ``<|role|>{metadata}\\n{content}``
    (a message with empty content is left out), ending ``<|assistant|>``; tools come first, as a
    system block of ``## name`` sections.
    """

    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        if self.model_file.suffix == ".json":
            self._load_tokenizers_json()
        else:
            self._load_tiktoken()
        self.special_ids = {name: self.n_ranks + i for i, name in enumerate(GLM4_SPECIAL_TOKENS)}
        self.eos_id = self.special_ids["<|endoftext|>"]
        self.pad_id = self.eos_id  # glm-4-9b-chat's pad_token_id is <|endoftext|> (151329)
        self.bos_id = None
        self.gmask_id = self.special_ids["[gMASK]"]
        self.sop_id = self.special_ids["<sop>"]
        self.eop_id = self.special_ids["<eop>"]
        self.stop_ids = tuple(self.special_ids[n] for n in ("<|endoftext|>", "<|user|>", "<|observation|>"))

    def _load_tiktoken(self) -> None:
        import tiktoken

        ranks: dict[bytes, int] = {}
        for number, line in enumerate(self.model_file.read_text(encoding="ascii").splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as err:
                raise ValueError(f"{self.model_file}:{number}: expected 'base64-token rank', "
                                 f"got {line[:60]!r}") from err
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{self.model_file}: ranks must be 0..{len(ranks) - 1}, each once")
        self.n_ranks = len(ranks)
        specials = {name: self.n_ranks + i for i, name in enumerate(GLM4_SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(name=f"glm4:{self.model_file}", pat_str=GLM4_PATTERN,
                                           mergeable_ranks=ranks, special_tokens=specials)
        self._hf = None

    def _load_tokenizers_json(self) -> None:
        from tokenizers import Tokenizer

        self._hf = Tokenizer.from_file(str(self.model_file))
        vocab = self._hf.get_vocab(with_added_tokens=True)
        missing = [t for t in GLM4_SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{self.model_file} lacks GLM-4's special tokens {missing}")
        self.n_ranks = vocab["<|endoftext|>"]
        wrong = [t for i, t in enumerate(GLM4_SPECIAL_TOKENS) if vocab[t] != self.n_ranks + i]
        if wrong:
            raise ValueError(f"{self.model_file}: special tokens {wrong} are not numbered "
                             f"{self.n_ranks}+i in GLM-4's order")
        self._encoding = None

    @property
    def vocab_size(self) -> int:
        return self.n_ranks + len(GLM4_SPECIAL_TOKENS)

    @property
    def prefix_ids(self) -> list[int]:
        return [self.gmask_id, self.sop_id]

    def token_id(self, name: str) -> int:
        return self.special_ids[name]

    def encode(self, text: str, *, add_prefix: bool = False) -> list[int]:
        """Ids of ``text`` as plain text (special-token names in it are not special)."""
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encoding.encode_ordinary(text)
        return self.prefix_ids + ids if add_prefix else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping special tokens; a split character decodes as U+FFFD."""
        kept = [int(i) for i in ids if int(i) < self.n_ranks]
        if self._hf is not None:
            return self._hf.decode(kept, skip_special_tokens=True)
        return self._encoding.decode(kept, errors="replace")

    def render_parts(self, messages: Sequence[Message], tools: Optional[Sequence] = None,
                     add_generation_prompt: bool = True) -> list[tuple[bool, str]]:
        """The chat template's output as ``(is_special, text)`` parts, in order."""
        from builder.model.tools import glm4_tools_system_text

        parts: list[tuple[bool, str]] = [(True, "[gMASK]"), (True, "<sop>")]
        if tools:
            parts += [(True, "<|system|>"), (False, glm4_tools_system_text(tools))]
        for m in messages:
            if m.get("tools"):  # a system message carrying its own tools, as THUDM's demos pass them
                parts += [(True, "<|system|>"), (False, glm4_tools_system_text(m["tools"]))]
            if m.get("content"):
                parts += [(True, f"<|{m['role']}|>"), (False, f"{m.get('metadata') or ''}\n{m['content']}")]
        if add_generation_prompt:
            parts.append((True, "<|assistant|>"))
        return parts

    def render_chat(self, messages: Sequence[Message], tools: Optional[Sequence] = None,
                    add_generation_prompt: bool = True) -> str:
        """The chat template's text (what ``apply_chat_template(..., tokenize=False)`` gives)."""
        return "".join(text for _, text in self.render_parts(messages, tools, add_generation_prompt))

    def encode_messages(self, messages: Sequence[Message], tools: Optional[Sequence] = None,
                        add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered template; role markers are special ids, message text is plain
        text (a ``<|user|>`` typed in a message stays text), as tiktoken splits at specials."""
        ids: list[int] = []
        for special, text in self.render_parts(messages, tools, add_generation_prompt):
            ids += [self.special_ids[text]] if special else self.encode(text)
        return ids

    def build_chat_input(self, query: Optional[str], history: Iterable = (), system: Optional[str] = None,
                         tools: Optional[Sequence] = None, role: str = "user") -> list[int]:
        """Ids of the chat prompt for ``query`` after ``history`` (pairs or message dicts)."""
        return self.encode_messages(to_messages(query, history, system, role), tools)


def load_tokenizer(family, checkpoint_dir: Path):
    """The tokenizer ``family`` uses, over the file in ``checkpoint_dir``.

    GLM-4 reads ``tokenizer.model`` (tiktoken) when there is one, else ``tokenizer.json``.
    """
    if family.kind == "chatglm2":
        return ChatGLM2Tokenizer(checkpoint_dir / "tokenizer.model")
    if family.kind == "chatglm3":
        return ChatGLM3Tokenizer(checkpoint_dir / "tokenizer.model")
    for name in ("tokenizer.model", "tokenizer.json"):
        if (checkpoint_dir / name).is_file():
            return GLM4Tokenizer(checkpoint_dir / name)
    raise FileNotFoundError(f"{checkpoint_dir} has neither tokenizer.model (tiktoken) nor "
                            f"tokenizer.json: {family.name} needs one")
