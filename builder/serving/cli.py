"""``glm-serve REPO``: run Triton Inference Server on a model repository until Ctrl-C or SIGTERM.

    glm-serve generated_repo --http-port 8000 --grpc-port 8001 --metrics-port 8002
    glm-serve generated_repo --address 10.0.0.5 -- --grpc-use-ssl=true --grpc-server-cert=cert.pem ...

Arguments after ``--`` go to ``tritonserver`` as they are (TLS, thread counts), except the flags
glm-serve manages itself (model control and the restricted protocols). The CLI only parses and calls ``builder.serving.service.serve``.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from .server import ServerNotFoundError, ServerOptions, ServerStartError
from .service import serve


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``glm-serve`` argument parser.

    >>> build_parser().parse_args(["generated_repo", "--http-port", "9000"]).http_port
    9000
    """
    parser = argparse.ArgumentParser(
        prog="glm-serve",
        description="Start Triton Inference Server on a model repository, print its endpoints, "
        "and stop it (with every Python-backend process) on Ctrl-C or SIGTERM.",
    )
    parser.add_argument("repo", type=Path, help="model repository folder (e.g. the one `glm-build` wrote)")
    parser.add_argument("--address", default="0.0.0.0",
                        help="address to listen on; 127.0.0.1 keeps the server on this machine (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port, needed for streaming (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default: %(default)s)")
    parser.add_argument("--metrics-address", metavar="ADDRESS",
                        help="address for the metrics port alone, e.g. 127.0.0.1 to keep metrics off the "
                        "network (default: the same as --address)")
    parser.add_argument(
        "--model-config-name",
        metavar="NAME",
        help="load each model's configs/NAME.pbtxt instead of config.pbtxt (e.g. a GPU profile name)",
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's log verbosity; 1 logs every request (default: 0)")
    parser.add_argument("--log-file", type=Path, help="write the server's log to this file instead of stdout")
    parser.add_argument("--start-timeout", type=_seconds, default=300.0, metavar="SECONDS",
                        help="give up, print per model why it did not load, and exit 1 when the "
                        "models are not all ready after this long (default: %(default)s)")
    parser.add_argument("--openai-port", type=int, default=9000, metavar="PORT",
                        help="serve the OpenAI-compatible API (/v1/chat/completions, /v1/models) on "
                        "this port of --address once the router is ready; 0 turns it off (default: %(default)s)")
    parser.add_argument("--openai-api-key", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on the OpenAI port (default: the "
                        "GLM_OPENAI_API_KEY environment variable; none: anyone who reaches it may ask)")
    parser.epilog = ("Flags after -- go to tritonserver as they are (e.g. -- --grpc-use-ssl=true "
                     "--grpc-server-cert=cert.pem), except the ones glm-serve sets itself.")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None,
               parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """Parse glm-serve's flags; what follows ``--`` lands in ``triton_args``.

    >>> parse_args(["repo", "--", "--grpc-use-ssl=true"]).triton_args
    ['--grpc-use-ssl=true']
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = (parser or build_parser()).parse_args(argv[:split])
    args.triton_args = argv[split + 1:]
    return args


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """The ``ServerOptions`` for parsed arguments; ``ValueError`` naming the field when one is wrong.

    >>> options_from_args(build_parser().parse_args(["generated_repo"])).grpc_port
    8001
    """
    return ServerOptions(
        model_repository=args.repo,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_config_name=args.model_config_name,
        log_verbose=args.log_verbose,
        log_file=args.log_file,
        address=args.address,
        metrics_address=args.metrics_address,
        extra_args=tuple(getattr(args, "triton_args", ())),
    )


def _interrupt(signum, frame):
    # SIGTERM (docker stop, systemd) unwinds like Ctrl-C, through TritonServer.stop().
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``glm-serve``; returns the exit code.

    >>> main(["generated_repo", "--grpc-port", "9001"])   # blocks until Ctrl-C
    """
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        options = options_from_args(args)
    except ValueError as error:
        parser.error(str(error))  # exits with code 2 and the usage line
    ports = (options.http_port, options.grpc_port, options.metrics_port)
    if args.openai_port and (not 1 <= args.openai_port <= 65535 or args.openai_port in ports):
        parser.error(f"--openai-port={args.openai_port}: must be a free port number in 1..65535 "
                     f"other than the HTTP, gRPC and metrics ports {ports}, or 0")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return serve(options, ready_timeout=args.start_timeout, openai_port=args.openai_port,
                     openai_api_key=args.openai_api_key)
    except KeyboardInterrupt:
        print("glm-serve: stopped", file=sys.stderr)
        return 0
    except (ServerNotFoundError, ServerStartError) as error:
        print(f"glm-serve: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
