"""``glm-chat``: ask the router from the command line, once, interactively with history, or with
many clients at once for latency figures (:mod:`.loadtest`). Only parses and calls.

    glm-chat "3只鸡和2只兔子一共有几条腿？"       # gRPC to chatglm2-6b
    glm-chat -c 32 -j 8 "你好"                  # 32 streamed requests from 8 clients: percentiles
"""
from __future__ import annotations

import argparse
import statistics
import sys

from .chat import STREAM_ROUTER, ChatError, ChatGLMClient, ChatResult
from .loadtest import run_load


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-chat", description="Ask ChatGLM2 served by Triton (the chatglm2-6b router). "
        "With no prompt, an interactive chat that keeps the history.")
    parser.add_argument("prompt", nargs="?", help="the question; omit it for an interactive chat")
    parser.add_argument("-ip", "--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("-p", "--port", type=int, help="server port (default 8001 for gRPC, 8000 for HTTP)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default grpc")
    parser.add_argument("-t", "--temperature", type=float, default=0.01, help="sampling temperature; 0 is greedy (default 0.01)")
    parser.add_argument("-m", "--max-token", "--max_token", type=int, default=16000,
                        help="total tokens, prompt included (default 16000)")
    parser.add_argument("-hl", "--history-len", "--history_len", type=int, default=10,
                        help="past question/answer pairs to keep (default 10)")
    parser.add_argument("-c", "--count", "--send_count", type=int, default=1,
                        help="send the prompt this many times and print min/avg/max latency")
    parser.add_argument("-j", "--concurrency", type=int, default=None, metavar="C",
                        help="with -c N: send the N requests from C clients at once, streamed over gRPC, "
                        "and print time-to-first-token, per-token time and tokens/s percentiles")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="with -j: the model's tokenizer.model, to count answer tokens "
                        "(without it answers are counted in characters)")
    parser.add_argument("--stream", action="store_true", help="print the answer as it arrives (gRPC)")
    parser.add_argument("--model", default=None, help="call this model instead of the router")
    return parser


def _ask(client: ChatGLMClient, prompt: str, history, stream: bool, model: str | None) -> ChatResult:
    if not stream:
        result = client.chat(prompt, history, model=model)
        print(result.response, flush=True)
        return result
    shown = ""
    result = None
    for result in client.stream(prompt, history, **({"model": model} if model else {})):
        print(result.response[len(shown):], end="", flush=True)
        shown = result.response
    print(flush=True)
    if result is None:
        raise ChatError("the stream ended without an answer")
    return result


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stream and args.protocol != "grpc":  # Triton streams decoupled models over gRPC only
        parser.error("--stream needs --protocol grpc")
    if args.concurrency is not None:
        if args.concurrency < 1:
            parser.error(f"--concurrency must be >= 1, got {args.concurrency}")
        if args.protocol != "grpc" or args.prompt is None:
            parser.error("--concurrency needs --protocol grpc and a prompt")
    port = args.port or (8001 if args.protocol == "grpc" else 8000)
    if args.concurrency is not None:
        return _load(f"{args.host}:{port}", args)
    client = ChatGLMClient(f"{args.host}:{port}", args.protocol, args.temperature, args.max_token,
                           args.history_len)
    try:
        if args.prompt is None:
            return _interactive(client, args)
        latencies = []
        for i in range(args.count):
            result = _ask(client, args.prompt, [], args.stream, args.model)
            latencies.append(result.latency_s * 1000)
            print(f"[{i}] variant {result.variant}, {latencies[-1]:.0f} ms", file=sys.stderr)
        if args.count > 1:
            print(f"cnt={len(latencies)} min={min(latencies):.0f}ms avg={statistics.mean(latencies):.0f}ms "
                  f"max={max(latencies):.0f}ms", file=sys.stderr)
        return 0
    except ChatError as err:
        print(f"glm-chat: error: {err}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _load(url: str, args) -> int:
    """``-c N -j C``: N streamed requests from C clients at once; percentiles on stderr."""

    count_tokens = None
    if args.tokenizer:
        from ..model.tokenizer import ChatGLM2Tokenizer

        tokenizer = ChatGLM2Tokenizer(args.tokenizer)
        count_tokens = lambda text: len(tokenizer.encode(text))  # noqa: E731
    result = run_load(url, [args.prompt], concurrency=args.concurrency, requests=args.count,
                      max_token=args.max_token, temperature=args.temperature,
                      model=args.model or STREAM_ROUTER, count_tokens=count_tokens)
    for error in result.errors[:3]:
        print(f"glm-chat: error: {error}", file=sys.stderr)
    print(result.summary(), file=sys.stderr)
    return 1 if result.errors else 0


def _interactive(client: ChatGLMClient, args) -> int:
    history: list = []
    print("glm-chat: type a question; 'clear' forgets the history, 'exit' quits.", file=sys.stderr)
    while True:
        try:
            prompt = input("问: ").strip()
        except EOFError:
            return 0
        if prompt in ("exit", "quit"):
            return 0
        if prompt == "clear":
            history = []
            continue
        if not prompt:
            continue
        try:
            print("答: ", end="", flush=True)
            result = _ask(client, prompt, history, args.stream, args.model)
            history = result.history
        except ChatError as err:
            print(f"\nglm-chat: error: {err}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
