#!/usr/bin/env python3
"""Fidelity of ChatGLM2's INT8/INT4 quantization on the embedded tiny model (or any checkpoint).

    .venv/bin/python scripts/fidelity_report.py [--checkpoint DIR] [--per-family 150]

Prints a markdown table: held-out perplexity, top-1 agreement with fp32 over the held-out answer
positions, and exact-answer accuracy on held-out templated questions. The held-out dialogues are
the first ``--per-family`` of each family (corpus.by_family: leg counts, 鸡兔同笼, sums, products;
fewer where a family has fewer), the sample scripts/make_tiny_model.py scores in training.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder import TINY_CHECKPOINT  # noqa: E402
from builder.evaluate.corpus import DEMO_FAMILIES, by_family, dialogues, family  # noqa: E402
from builder.evaluate.score import fidelity_table  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=TINY_CHECKPOINT, help="checkpoint directory")
    parser.add_argument("--per-family", type=int, default=150,
                        help="held-out dialogues per family (default 150)")
    parser.add_argument("--accuracy", type=int, default=None,
                        help="held-out questions answered (default: all of them)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    heldout = by_family(dialogues("heldout"), args.per_family)
    answered = len(heldout) if args.accuracy is None else min(args.accuracy, len(heldout))
    demo = [d for d in heldout[:answered] if family(d) in DEMO_FAMILIES]
    rows = fidelity_table(args.checkpoint, heldout, accuracy_count=answered,
                          group=lambda d: "demo" if family(d) in DEMO_FAMILIES else "other")
    print(f"checkpoint: {args.checkpoint}; {len(heldout)} held-out dialogues "
          f"({len(heldout)} scored for perplexity/agreement, {answered} answered)\n")
    print(f"| scheme | perplexity | vs fp32 | top-1 agreement | answer accuracy "
          f"| demo families ({len(demo)}) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['perplexity']:.4f} | {r['perplexity_change']:+.2%} | "
              f"{r['top1_agreement']:.2%} | {r['accuracy']:.1%} | {r['accuracy_by'].get('demo', 0.0):.1%} |")


if __name__ == "__main__":
    main()
