"""``glm-build``: a ChatGLM2 checkpoint in, a checked Triton model repository out.

    glm-build --quant int4 --gpu p40 --spec chatglm2-6b --dry-run   # does the 6B fit a P40?
    glm-build --quant fp16,int8,int4 --gpu p40x2 --model THUDM/chatglm2-6b
    glm-build --quant fp16,int4 --gpu cpu                           # the embedded demo model

The CLI only parses and calls :func:`builder.build.build`. Exit status: 0 done, 2 bad input or
variants that do not fit (nothing written), 1 anything else that went wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .build import DEFAULT_OUT, SPECS, BuildError, BuildOptions, build, parse_limits
from .plan import PRECISIONS, PlacementError
from .render import QUANTIZE_AT, OutputExistsError
from .routing import FALLBACKS

PROG = "glm-build"

# Subcommands by first argument (`glm-build profile ...`, registered below). Without one, the
# arguments are the build's.
COMMANDS: dict[str, Callable[[list[str]], int]] = {}


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _limits(text: str) -> dict[str, int]:
    try:
        return parse_limits(text)
    except BuildError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    """The build command's parser.

    >>> build_parser().parse_args(["--quant", "int4", "--gpu", "p40"]).out
    PosixPath('generated_repo')
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Turn a ChatGLM2 checkpoint into a Triton model repository with one model "
        "per precision, check before deployment that they fit the target GPU, and route each "
        "request to the best variant that can serve its length.")
    parser.add_argument("--quant", required=True, metavar="LIST",
                        help=f"comma-separated precisions, one variant each: "
                        f"{', '.join(PRECISIONS)} (int4-g128: group-wise int4)")
    parser.add_argument("--gpu", required=True, metavar="NAME[xCOUNT]",
                        help="target profile from profiles/ (p40, t4, a100-80gb, ...); p40x2 "
                        "means two P40s; cpu means CPU instances with this host's memory")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR|HUB_ID",
                        help="ChatGLM2 checkpoint folder (THUDM layout) or a Hugging Face hub id "
                        "such as THUDM/chatglm2-6b, read from the local cache (never downloaded); "
                        "default: the embedded demo model, which is not ChatGLM2-6B")
    source.add_argument("--spec", choices=sorted(SPECS),
                        help="plan the real model from its config alone, without weights "
                        "(only with --dry-run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="output repository (default: %(default)s); written only when the "
                        "whole build succeeded")
    parser.add_argument("--max-tokens", type=_positive_int, metavar="N",
                        help="cap on every variant's routing limit, prompt + max_token "
                        "(default: the model's seq_length)")
    parser.add_argument("--min-tokens", type=_positive_int, default=2048, metavar="N",
                        help="every variant must take requests at least this long; placement "
                        "sizes variants at it (default: %(default)s)")
    parser.add_argument("--limits", type=_limits, default={}, metavar="P=N[,P=N...]",
                        help="override computed routing limits, e.g. int4=32768,fp16=2048; "
                        "each must still fit its GPU")
    parser.add_argument("--quantize-at", choices=QUANTIZE_AT, default="initialize",
                        help="quantize int8/int4 weights when each variant loads (initialize, "
                        "default) or now, into OUT/weights/ (build)")
    parser.add_argument("--fallback", choices=FALLBACKS, default="lower",
                        help="when a request's variant is full, down or reloading, the router sends "
                        "it to a lower precision that covers it (lower, default), to any variant that "
                        "covers it (any), or fails it (none)")
    parser.add_argument("--profile-dir", type=Path, metavar="DIR",
                        help="a folder with profile.md/profile.json to link from report.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and the memory report; write nothing")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output folder (the old one stays if the "
                        "build fails)")
    return parser


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    """The :class:`BuildOptions` for parsed arguments (``BuildError`` naming the field)."""
    return BuildOptions(quant=args.quant, gpu=args.gpu, model=args.model, spec=args.spec,
                        out=args.out, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                        quantize_at=args.quantize_at, dry_run=args.dry_run, force=args.force,
                        limits=args.limits, profile_dir=args.profile_dir,
                        fallback=args.fallback)


def _error(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def build_main(argv: Sequence[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:  # argparse has printed usage and the error (or --help)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        options = options_from_args(args)
        result = build(options)
    except PlacementError as err:  # raised before anything is written
        return _error(str(err), 2)
    except (ValueError, FileNotFoundError, OutputExistsError) as err:  # bad input
        return _error(str(err), 2)
    except OSError as err:
        return _error(f"{err} (the previous output, if any, is untouched)", 1)
    print(result.summary())
    return 0


# -- glm-build profile -----------------------------------------------------------------------------
def build_profile_parser() -> argparse.ArgumentParser:
    """The ``profile`` subcommand's parser.

    >>> build_profile_parser().parse_args(["--quant", "int4", "--device", "cpu"]).workloads
    'encode:2048,generate:8192'
    """
    from .profile import DEFAULT_OUT as PROFILE_OUT, DEFAULT_WORKLOADS, SPECS as PROFILE_SPECS

    parser = argparse.ArgumentParser(
        prog=f"{PROG} profile",
        description="Measure each variant's peak memory per workload, each run in a fresh "
        "process, beside builder.estimate_memory and THUDM's published table; writes "
        "profile.json, profile.md and profile.png.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, metavar="DIR",
                        help="ChatGLM2 checkpoint folder (THUDM layout); default: the embedded "
                        "demo model, which is not ChatGLM2-6B")
    source.add_argument("--spec", choices=sorted(PROFILE_SPECS),
                        help="random weights with the real model's shapes, written once as a "
                        "checkpoint into --cache-dir; no download needed")
    parser.add_argument("--layers", type=_positive_int, metavar="N",
                        help="with --spec: decoder layers to build (default: all, 28 for "
                        "chatglm2-6b); a few keep a CPU profile small")
    parser.add_argument("--quant", required=True, metavar="LIST",
                        help=f"comma-separated precisions, one variant each: "
                        f"{', '.join(PRECISIONS)}")
    parser.add_argument("--device", required=True, choices=("cpu", "cuda"),
                        help="where the variants run: cpu (peak RSS) or cuda (peak allocator "
                        "bytes plus the CUDA context)")
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS, metavar="LIST",
                        help="comma-separated PHASE:TOKENS, encode:N one prefill of N tokens, "
                        "generate:N decoding until N tokens in total (default: %(default)s, the "
                        "published table's)")
    parser.add_argument("--out", type=Path, default=PROFILE_OUT, metavar="DIR",
                        help="folder for profile.json, profile.md, profile.png "
                        "(default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="where --spec writes its random-weight checkpoint and finds it "
                        "again (default: the temp dir)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="torch threads in each run (default: torch's own choice)")
    return parser


def profile_options_from_args(args: argparse.Namespace):
    """The :class:`builder.profile.ProfileOptions` for parsed arguments."""
    from .profile import ProfileOptions

    return ProfileOptions(quant=args.quant, device=args.device, model=args.model, spec=args.spec,
                          layers=args.layers, workloads=args.workloads, out=args.out,
                          cache_dir=args.cache_dir, threads=args.threads)


def profile_main(argv: Sequence[str]) -> int:
    """``glm-build profile ...``: 0 done, 2 bad input, 1 a run failed."""
    from . import profile

    try:
        args = build_profile_parser().parse_args(list(argv))
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        records = profile.run_profile(profile_options_from_args(args))
    except (ValueError, FileNotFoundError) as err:  # ProfilingError, a missing checkpoint
        return _error(str(err), 2)
    except (profile.RunFailedError, OSError) as err:
        return _error(str(err), 1)
    print(f"{len(records)} runs; wrote {args.out / 'profile.md'}, profile.json, profile.png")
    for r in records:
        print(f"  {r.variant} {r.workload}: measured {r.measured_bytes / 2**20:,.0f} MiB, "
              f"estimated {r.estimated_bytes / 2**20:,.0f} MiB ({r.error:+.1%})")
    return 0


COMMANDS["profile"] = profile_main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``glm-build``; returns the exit status.

    >>> main(["--quant", "int4", "--gpu", "p40", "--spec", "chatglm2-6b", "--dry-run"])  # doctest: +ELLIPSIS
    glm-build plan: ChatGLM2-6B on p40 ...
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return build_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
