"""``glm-build``: a ChatGLM2 checkpoint in, a checked Triton model repository out.

    glm-build --quant int4 --gpu p40 --spec chatglm2-6b --dry-run   # does the 6B fit a P40?
    glm-build --quant fp16,int8,int4 --gpu p40x2 --model THUDM/chatglm2-6b
    glm-build --quant fp16,int4 --gpu cpu                           # the embedded demo model
    glm-build deploy --repo generated_repo --replicas 2             # Dockerfile, Kubernetes, KServe
    glm-build capacity --rate 4/s --prompt-tokens 300 --output-tokens 200 --ttft-p95 1.5s --curves c.json

The CLI only parses and calls one library function per command (:func:`builder.build.pipeline.build`,
``builder.profile.run.run_profile``, :func:`builder.deploy.deploy`,
``builder.deploy.capacity.plan_capacity``). Exit status: 0 done, 2 bad input or variants that do not
fit (nothing written), 1 anything else that went wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .build.pipeline import DEFAULT_OUT, SPECS, BuildError, BuildOptions, build, parse_limits
from .plan.placement import CPU_DTYPES, MODEL_NAME, PRECISIONS, PlacementError
from .build.output import OutputExistsError
from .build.weights import QUANTIZE_AT, WEIGHTS
from .plan.routing import FALLBACKS

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
    parser.add_argument("--family", choices=sorted(SPECS), metavar="NAME",
                        help="the checkpoint's GLM family, instead of detecting it from config.json, "
                        "the tokenizer file and tokenizer_config.json; one of: "
                        + ", ".join(sorted(SPECS)))
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
                        "default) or now, into each variant's 1/weights/ (build)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", choices=WEIGHTS, default="link",
                         help="how the checkpoint goes into the repository, so that it moves as one "
                         "folder: hard links where the file system allows, else copies (link, "
                         "default), or copies (copy)")
    weights.add_argument("--weights-uri", metavar="PATH",
                         help="leave the checkpoint out of the repository: the variants read it at "
                         "PATH (or file:///PATH), where the deployment mounts it, e.g. "
                         "/mnt/weights/chatglm2-6b; --model still names a local copy to plan from")
    parser.add_argument("--fallback", choices=FALLBACKS, default="lower",
                        help="when a request's variant is full, down or reloading, the router sends "
                        "it to a lower precision that covers it (lower, default), to any variant that "
                        "covers it (any), or fails it (none)")
    parser.add_argument("--cpu-dtype", choices=CPU_DTYPES, default="bfloat16",
                        help="what the fp16 variant computes in on a CPU: bfloat16 (default; as fast "
                        "as float16 or, with AMX/AVX-512 BF16, 3-5x faster; weights rounded to "
                        "bfloat16's 8-bit significand) or float16 (weights exact). int8/int4 always "
                        "compute in bfloat16 on a CPU, every variant in float16 on a GPU")
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
                        fallback=args.fallback, weights=args.weights,
                        weights_uri=args.weights_uri, cpu_dtype=args.cpu_dtype,
                        family=args.family)


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
    from .profile.run import DEFAULT_OUT as PROFILE_OUT, DEFAULT_WORKLOADS, SPECS as PROFILE_SPECS

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
    """The :class:`builder.profile.run.ProfileOptions` for parsed arguments."""
    from .profile.run import ProfileOptions

    return ProfileOptions(quant=args.quant, device=args.device, model=args.model, spec=args.spec,
                          layers=args.layers, workloads=args.workloads, out=args.out,
                          cache_dir=args.cache_dir, threads=args.threads)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """A subcommand's arguments, or the exit code argparse chose (2 for bad usage, 0 for --help)."""
    try:
        return parser.parse_args(list(argv))
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2


def profile_main(argv: Sequence[str]) -> int:
    """``glm-build profile ...``: 0 done, 2 bad input, 1 a run failed."""
    from .profile import run as profile

    args = _parse(build_profile_parser(), argv)
    if isinstance(args, int):
        return args
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


# -- glm-build deploy ------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_deploy_parser() -> argparse.ArgumentParser:
    """The ``deploy`` subcommand's parser.

    >>> build_deploy_parser().parse_args([]).out
    PosixPath('deploy')
    """
    from .deploy.manifests import DEFAULT_OUT as DEPLOY_OUT

    parser = argparse.ArgumentParser(
        prog=f"{PROG} deploy",
        description="Write a Dockerfile (NVIDIA's Triton image, torch for the target GPU, this "
        "package, glm-serve), Kubernetes manifests (Deployment, Service, PodDisruptionBudget, "
        "HorizontalPodAutoscaler) and a KServe InferenceService for a built repository, from its "
        "own plan (build.json); all or nothing.")
    parser.add_argument("--repo", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="the repository glm-build wrote (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEPLOY_OUT, metavar="DIR",
                        help="folder to write (default: %(default)s)")
    parser.add_argument("--image", metavar="REF",
                        help="the image the Deployment runs, repository inside (default: "
                        "glm-build:VERSION-TORCHBUILD, a local name: push it and pass its name)")
    parser.add_argument("--runtime-image", metavar="REF",
                        help="KServe's image, without the repository (default: IMAGE-runtime)")
    parser.add_argument("--replicas", type=_positive_int, default=1, metavar="N",
                        help="replicas of the Deployment, and the autoscalers' minimum (default: "
                        "%(default)s)")
    parser.add_argument("--max-replicas", type=_positive_int, metavar="N",
                        help="the autoscalers' maximum (default: 2 × --replicas; `glm-build "
                        "capacity` says what a load needs)")
    parser.add_argument("--target-in-flight", type=_positive_float, metavar="X",
                        help="requests in flight per pod the autoscalers aim at (default: from the "
                        "plan's KV pool; `glm-build capacity` measures one)")
    parser.add_argument("--namespace", default="default", help="Kubernetes namespace (default: "
                        "%(default)s)")
    parser.add_argument("--name", default=MODEL_NAME,
                        help="name of every resource (default: %(default)s)")
    parser.add_argument("--storage-uri", metavar="URI",
                        help="where KServe's storage initializer fetches the repository from, e.g. "
                        "s3://bucket/chatglm2-6b (default: pvc://NAME-repository/REPO)")
    parser.add_argument("--weights-claim", metavar="CLAIM",
                        help="PersistentVolumeClaim holding the checkpoint of a repository built "
                        "with --weights-uri (mounted read-only there)")
    parser.add_argument("--gpu-product", action="append", default=[], metavar="LABEL",
                        help="nvidia.com/gpu.product value of the target nodes (repeatable; default: "
                        "the profile's known ones)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing deploy folder")
    return parser


def deploy_options_from_args(args: argparse.Namespace):
    """The :class:`builder.deploy.DeployOptions` for parsed arguments."""
    from .deploy import DeployOptions

    return DeployOptions(repo=args.repo, out=args.out, image=args.image,
                         runtime_image=args.runtime_image, replicas=args.replicas,
                         max_replicas=args.max_replicas, namespace=args.namespace, name=args.name,
                         target_in_flight=args.target_in_flight, storage_uri=args.storage_uri,
                         weights_claim=args.weights_claim, gpu_products=tuple(args.gpu_product),
                         force=args.force)


def deploy_main(argv: Sequence[str]) -> int:
    """``glm-build deploy ...``: 0 written, 2 bad input (nothing written), 1 anything else."""
    from .deploy import deploy

    args = _parse(build_deploy_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        result = deploy(deploy_options_from_args(args))
    except ValueError as err:
        return _error(str(err), 2)
    except OSError as err:
        return _error(f"{err} (the previous deploy folder, if any, is untouched)", 1)
    print(result.summary())
    return 0


COMMANDS["deploy"] = deploy_main


# -- glm-build capacity ----------------------------------------------------------------------------
def _rate(text: str) -> float:
    """``"4"``, ``"4/s"`` → 4.0 requests per second."""
    return _positive_float(text.strip().removesuffix("/s"))


def _seconds(text: str) -> float:
    """``"1.5"``, ``"1.5s"``, ``"800ms"`` → seconds."""
    text = text.strip()
    if text.endswith("ms"):
        return _positive_float(text[:-2]) / 1000
    return _positive_float(text.removesuffix("s"))


def build_capacity_parser() -> argparse.ArgumentParser:
    """The ``capacity`` subcommand's parser.

    >>> build_capacity_parser().parse_args(["--rate", "4/s", "--prompt-tokens", "300",
    ...     "--output-tokens", "200", "--ttft-p95", "800ms", "--curves", "c.json"]).ttft_p95
    0.8
    """
    from .deploy.capacity import BALANCES

    parser = argparse.ArgumentParser(
        prog=f"{PROG} capacity",
        description="How many replicas a load needs: simulate Poisson arrivals over N replicas "
        "behind a Kubernetes Service, each serving with a measured per-replica service curve, and "
        "print the smallest N whose time to first token meets the target, with the autoscaler "
        "bounds to give `glm-build deploy`.")
    parser.add_argument("--rate", type=_rate, required=True, metavar="R/s",
                        help="peak arrival rate, requests per second (e.g. 4 or 4/s)")
    parser.add_argument("--prompt-tokens", type=_positive_float, required=True, metavar="P",
                        help="mean prompt tokens per request (history included)")
    parser.add_argument("--output-tokens", type=_positive_float, required=True, metavar="G",
                        help="mean answer tokens per request")
    parser.add_argument("--ttft-p95", type=_seconds, required=True, metavar="S",
                        help="target 95th-percentile time to first token, seconds (or 800ms)")
    parser.add_argument("--curves", type=Path, required=True, metavar="FILE",
                        help="the replica's measured service curve (JSON, format in "
                        "builder/deploy/curves.py; written by scripts/bench_serving.py)")
    parser.add_argument("--min-rate", type=float, default=0.0, metavar="R/s",
                        help="the lowest rate to keep served without waiting for a scale-up: sets "
                        "minReplicas (default: 0, one replica)")
    parser.add_argument("--balance", choices=BALANCES, default="random",
                        help="how the Service spreads requests: random (kube-proxy, default) or "
                        "least (fewest in flight, an L7 gateway)")
    parser.add_argument("--requests", type=_positive_int, default=4000, metavar="N",
                        help="simulated requests per fleet size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser


def capacity_main(argv: Sequence[str]) -> int:
    """``glm-build capacity ...``: 0 done, 2 bad input or a target no fleet meets."""
    from .deploy.capacity import plan_capacity
    from .deploy.curves import ServiceCurve

    args = _parse(build_capacity_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        curve = ServiceCurve.read(args.curves)
        plan = plan_capacity(curve, rate=args.rate, prompt_tokens=args.prompt_tokens,
                             output_tokens=args.output_tokens, ttft_p95_s=args.ttft_p95,
                             min_rate=args.min_rate, balance=args.balance,
                             requests=args.requests, warmup=args.requests // 10, seed=args.seed)
    except ValueError as err:
        return _error(str(err), 2)
    print(plan.summary(args.ttft_p95))
    return 0


COMMANDS["capacity"] = capacity_main


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
