#!/usr/bin/env python3
"""Fidelity of ChatGLM2's INT8/INT4 quantization on the embedded tiny model (or any checkpoint).

    .venv/bin/python scripts/fidelity_report.py [--checkpoint DIR] [--dialogues 300]

Prints a markdown table: held-out perplexity, top-1 agreement with fp32 over the held-out answer
positions, and exact-answer accuracy on held-out templated questions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder import TINY_CHECKPOINT  # noqa: E402
from builder.corpus import dialogues  # noqa: E402
from builder.evaluate import fidelity_table  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=TINY_CHECKPOINT, help="checkpoint directory")
    parser.add_argument("--dialogues", type=int, default=300, help="held-out dialogues scored")
    parser.add_argument("--accuracy", type=int, default=100, help="held-out questions answered")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    heldout = dialogues("heldout")[:args.dialogues]
    rows = fidelity_table(args.checkpoint, heldout, accuracy_count=args.accuracy)
    print(f"checkpoint: {args.checkpoint}; {len(heldout)} held-out dialogues "
          f"({sum(1 for _ in heldout)} scored for perplexity/agreement, {args.accuracy} answered)\n")
    print("| scheme | perplexity | vs fp32 | top-1 agreement | answer accuracy |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['perplexity']:.4f} | {r['perplexity_change']:+.2%} | "
              f"{r['top1_agreement']:.2%} | {r['accuracy']:.0%} |")


if __name__ == "__main__":
    main()
