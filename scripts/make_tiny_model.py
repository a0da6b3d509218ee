#!/usr/bin/env python3
"""Re-create the embedded tiny ChatGLM2 checkpoint (builder/assets/tiny-chatglm2).

Deterministic: the corpus, the sentencepiece model and the training run are seeded, and torch runs
on a fixed number of threads, so rerunning on the same software gives the same files.

    .venv/bin/python scripts/make_tiny_model.py [--steps 1000] [--out DIR]

It generates bilingual chat dialogues (builder.corpus), trains a byte-fallback sentencepiece
tokenizer on them with identity normalization (so decode(encode(x)) == x), trains a small
GlmForCausalLM on the answers, and writes the checkpoint in THUDM's layout (fp16 safetensors).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder import TINY_CHECKPOINT  # noqa: E402
from builder.checkpoint import glm_to_thudm  # noqa: E402
from builder.config import ChatGLM2Config  # noqa: E402
from builder.corpus import dialogues  # noqa: E402
from builder.evaluate import answer_accuracy, answer_example, heldout_perplexity  # noqa: E402
from builder.tokenizer import ChatGLM2Tokenizer, build_prompt  # noqa: E402

SEED = 0
SP_VOCAB = 1024


def train_tokenizer(texts: list[str], out: Path) -> Path:
    """A sentencepiece model that round-trips any text exactly (identity normalization, bytes)."""
    import sentencepiece as spm

    corpus = out / "corpus.txt"
    # sentencepiece reads one sentence per line: keep newlines inside a dialogue as their own pieces
    corpus.write_text("\n".join(line for t in texts for line in t.split("\n") if line), encoding="utf-8")
    # Relative paths: the model records them, and a temporary folder's name would differ per run.
    cwd = os.getcwd()
    os.chdir(out)
    try:
        train_sentencepiece(spm)
    finally:
        os.chdir(cwd)
    return out / "tokenizer.model"


def train_sentencepiece(spm) -> None:
    spm.SentencePieceTrainer.train(
        input="corpus.txt", model_prefix="tokenizer", vocab_size=SP_VOCAB,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n"], hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, seed_sentencepiece_size=100000,
        shuffle_input_sentence=False, minloglevel=2)


def tiny_config(vocab: int) -> ChatGLM2Config:
    padded = -(-vocab // 64) * 64  # like ChatGLM2's 65024, a multiple of 64
    return ChatGLM2Config(num_layers=3, hidden_size=256, ffn_hidden_size=512, kv_channels=32,
                          num_attention_heads=8, multi_query_group_num=2, padded_vocab_size=padded,
                          seq_length=2048, torch_dtype="float16")


def batches(examples, batch_size: int, rng: random.Random, pad_id: int):
    """Endless right-padded batches: ids [batch, seq] and labels (-100 outside the answers)."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[j] for j in order[i:i + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((batch_size, width), pad_id)
            labels = torch.full((batch_size, width), -100)
            for row, (tokens, start) in enumerate(chunk):
                ids[row, :len(tokens)] = torch.tensor(tokens)
                labels[row, start:len(tokens)] = torch.tensor(tokens[start:])
            yield ids, labels


def train(model, examples, steps: int, pad_id: int, batch_size: int = 32, lr: float = 3e-3):
    rng = random.Random(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    start = time.time()
    for step, (ids, labels) in zip(range(steps), batches(examples, batch_size, rng, pad_id)):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}/{steps}  loss {loss.item():.3f}  {time.time() - start:6.0f}s",
                  flush=True)
    model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    parser.add_argument("--out", type=Path, default=TINY_CHECKPOINT, help="checkpoint directory")
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    train_set, heldout = dialogues("train"), dialogues("heldout")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = [build_prompt(d.query, d.history) + d.answer for d in train_set]
        sp_model = train_tokenizer(texts, tmp)
        tokenizer = ChatGLM2Tokenizer(sp_model)
        config = tiny_config(tokenizer.vocab_size)

        from transformers import GlmForCausalLM

        model = GlmForCausalLM(config.to_glm_config(torch.float32))
        examples = [answer_example(tokenizer, d) for d in train_set]
        print(f"{len(examples)} training dialogues, {sum(len(e[0]) for e in examples)} tokens; "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
        train(model, examples, args.steps, tokenizer.pad_id)

        # Evaluate what is shipped: the fp16 weights.
        model.half().float()
        sample = heldout[:300]
        ppl = heldout_perplexity(model, tokenizer, sample)
        accuracy = answer_accuracy(model, tokenizer, heldout[:100])

        staging = Path(tempfile.mkdtemp(dir=args.out.parent, prefix=".tiny-"))
        staging.chmod(0o755)
        from safetensors.torch import save_file

        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        save_file(glm_to_thudm(state), str(staging / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(sp_model, staging / "tokenizer.model")
        (staging / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        report = {
            "command": "make tiny-model",
            "parameters": sum(p.numel() for p in model.parameters()),
            "steps": args.steps,
            "heldout_answer_perplexity": round(ppl, 3),
            "uniform_perplexity": tokenizer.vocab_size,
            "heldout_answer_accuracy": accuracy,
            "heldout_dialogues_scored": {"perplexity": len(sample), "accuracy": 100},
        }
        (staging / "training.json").write_text(json.dumps(report, indent=2) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        staging.rename(args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
