"""ChatGLM2's tokenizer: a thin class over sentencepiece that reads THUDM's ``tokenizer.model``.

Five special tokens follow the sentencepiece vocabulary: ``[MASK] [gMASK] [sMASK] sop eop`` get ids
``n_sp + 0..4``. Every input starts with ``[gMASK] sop``; bos=1, eos=2, pad=0 (sentencepiece's unk).

>>> tok = ChatGLM2Tokenizer(TINY_CHECKPOINT / "tokenizer.model")
>>> tok.decode(tok.encode("你好")) == "你好"
True
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")


def build_prompt(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """ChatGLM2's chat format, rounds numbered from 1."""
    prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, 1))
    return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


class ChatGLM2Tokenizer:
    """Encode and decode text, and build chat inputs, as ChatGLM2's own tokenizer does."""

    def __init__(self, model_file: str | Path):
        from sentencepiece import SentencePieceProcessor

        self.model_file = Path(model_file)
        self.sp = SentencePieceProcessor(model_file=str(self.model_file))
        self.n_sp = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()  # 1
        self.eos_id = self.sp.eos_id()  # 2
        self.pad_id = self.sp.unk_id()  # 0: ChatGLM2 pads with sentencepiece's unk
        self.special_ids = {name: self.n_sp + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.gmask_id = self.special_ids["[gMASK]"]
        self.sop_id = self.special_ids["sop"]
        self.eop_id = self.special_ids["eop"]
        # Ids that end an answer: eos, and eop as ChatGLM2's chat() also stops there.
        self.stop_ids = (self.eos_id, self.eop_id)

    @property
    def vocab_size(self) -> int:
        return self.n_sp + len(SPECIAL_TOKENS)

    @property
    def prefix_ids(self) -> list[int]:
        return [self.gmask_id, self.sop_id]

    def encode(self, text: str, *, add_prefix: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_prefix`` they start with ``[gMASK] sop``."""
        ids = self.sp.encode(text)
        return self.prefix_ids + ids if add_prefix else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping special, bos, eos and pad tokens."""
        skip = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([int(i) for i in ids if int(i) < self.n_sp and int(i) not in skip])

    def build_chat_input(self, query: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Ids of the chat prompt for ``query`` after ``history`` (pairs of query and response)."""
        return self.encode(build_prompt(query, history), add_prefix=True)
