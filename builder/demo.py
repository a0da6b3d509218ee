"""`make demo`: the main job on the embedded tiny model, start to finish.

1. answer locally with chat(), in fp32, int8 and int4, with each model's resident size;
2. `glm-build --quant fp16,int8,int4 --gpu cpu` into generated_repo/ (and the ChatGLM2-6B plan
   for a Tesla P40 beside it);
3. `glm-build deploy`: the Dockerfile and the Kubernetes / KServe manifests for that repository,
   into deploy/ beside it (where they are, what one pod asks for);
4. start Triton on it (`glm-serve`), ask one question through the router, print the answer, the
   variant that served it and the latency; stream one; ask a few at once; ask one through the
   OpenAI-compatible endpoint with the `openai` SDK;
5. print the memory report and stop the server.

    .venv/bin/python -m builder.demo
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from . import TINY_CHECKPOINT

QUESTION = "3只鸡和2只兔子一共有几条腿？"
OUT = Path("generated_repo")


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def answer_locally() -> None:
    """Load the embedded model in each precision and answer one held-out question with chat()."""
    import torch

    from . import chat, load_chatglm2
    from .model.quantization import QuantizedLinear

    banner(f"The embedded demo model (a tiny ChatGLM2, NOT ChatGLM2-6B): {TINY_CHECKPOINT}")
    for label, bits, dtype in (("fp32", 16, torch.float32), ("int8", 8, torch.bfloat16),
                               ("int4", 4, torch.bfloat16)):
        start = time.perf_counter()
        model, tokenizer = load_chatglm2(TINY_CHECKPOINT, bits=bits, dtype=dtype)
        loaded = time.perf_counter() - start
        projections = sum(m.resident_bytes() if isinstance(m, QuantizedLinear) else
                          m.weight.nbytes for n, m in model.named_modules()
                          if n.endswith(("_proj", "gate_up_proj", "down_proj")))
        total = sum(t.nbytes for t in model.state_dict().values()) if bits == 16 else None
        start = time.perf_counter()
        response, _ = chat(model, tokenizer, QUESTION, temperature=0)
        print(f"[{label}] {QUESTION} → {response}")
        print(f"       projections resident {projections / 2**20:.2f} MiB"
              + (f" (whole model {total / 2**20:.2f} MiB)" if total else "")
              + f"; loaded in {loaded:.2f} s, answered in {time.perf_counter() - start:.2f} s; "
              f"process RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB")


def build_repository():
    from .build.pipeline import BuildOptions, build

    banner("glm-build --quant fp16,int8,int4 --gpu p40 --spec chatglm2-6b --dry-run  (the real model's plan)")
    try:
        build(BuildOptions(quant=("fp16", "int8", "int4"), gpu="p40", spec="chatglm2-6b", dry_run=True),
              progress=False)
    except ValueError as err:  # the refusal is the point: three variants do not fit one P40
        print(f"refused, as expected: {err}")
    print(build(BuildOptions(quant=("int8", "int4"), gpu="p40", spec="chatglm2-6b", dry_run=True),
                progress=False).summary())
    banner(f"glm-build --quant fp16,int8,int4 --gpu cpu --out {OUT} --force  (the demo model, served here)")
    result = build(BuildOptions(quant=("fp16", "int8", "int4"), gpu="cpu", out=OUT, force=True),
                   progress=False)
    print(result.summary())
    return result


def write_deploy(repo: Path) -> None:
    from .deploy import DeployOptions, deploy

    out = repo.parent / "deploy"
    banner(f"glm-build deploy --repo {repo} --out {out} --force  (container, Kubernetes, KServe)")
    print(deploy(DeployOptions(repo=repo, out=out, force=True)).summary())


def serve_and_ask(repo: Path) -> None:
    from .client.chat import ChatGLMClient
    from .serving.server import ServerOptions, TritonServer

    banner(f"glm-serve {repo}  (Triton Inference Server on this machine's CPU)")
    options = ServerOptions.on_loopback(repo, log_file=repo / "server.log")
    start = time.perf_counter()
    with TritonServer(options, ready_timeout=300) as server:
        group = server.pid  # the server leads its own process group; its stubs are in it
        print(f"ready in {time.perf_counter() - start:.1f} s: HTTP {server.urls['http']}, "
              f"gRPC {server.urls['grpc']} (log: {options.log_file})")
        client = ChatGLMClient(server.urls["grpc"], temperature=0, max_token=256)
        banner(f"glm-chat: {QUESTION}  (through the router, model chatglm2-6b)")
        result = client.chat(QUESTION)
        print(f"answer:  {result.response}\nvariant: {result.variant}\nlatency: "
              f"{result.latency_s * 1000:.0f} ms")
        print("streamed: ", end="", flush=True)
        for part in client.stream("What is 2 plus 3?"):
            print(".", end="", flush=True)
        print(f" {part.response}  (variant {part.variant})")
        client.close()
        ask_together(server.urls["grpc"])
        ask_openai(server)
        print_report(repo)
        banner("stopping the server")
    left = [p.pid for p in psutil.process_iter() if _group_of(p) == group]
    print(f"stopped: {'no server or stub process left' if not left else f'processes left: {left}'}")


TOGETHER = ("5只鸡和4只兔子一共有几条腿？", "How many legs do 2 chickens and 6 rabbits have?",
            "7只兔子有几条腿？", "How many legs do 8 chickens have?")


def ask_together(url: str) -> None:
    """A few questions at once: each variant answers them in one running batch."""
    import concurrent.futures

    from .client.chat import ChatGLMClient

    banner(f"{len(TOGETHER)} questions at once (continuous batching in the variant)")

    def ask(question):
        client = ChatGLMClient(url, temperature=0, max_token=256)
        try:
            return client.chat(question)
        finally:
            client.close()

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(TOGETHER)) as pool:
        results = list(pool.map(ask, TOGETHER))
    for question, result in zip(TOGETHER, results):
        print(f"{question} → {result.response}  ({result.variant}, {result.latency_s * 1000:.0f} ms)")
    print(f"all {len(TOGETHER)} answered in {(time.perf_counter() - start) * 1000:.0f} ms")


def ask_openai(server) -> None:
    """One question through the OpenAI-compatible endpoint (what `glm-serve` serves on 9000)."""
    from openai import OpenAI

    from .serving.openai.gateway import beside
    from .serving.server import free_port

    banner("the OpenAI API: client.chat.completions.create(model='chatglm2-6b', ...)")
    with beside(server, free_port()) as gateway:
        with OpenAI(base_url=gateway.url, api_key="unused", max_retries=0) as client:
            start = time.perf_counter()
            reply = client.chat.completions.create(
                model="chatglm2-6b", messages=[{"role": "user", "content": QUESTION}],
                temperature=0, max_tokens=128)
        print(f"answer:  {reply.choices[0].message.content}\nserved:  {reply.system_fingerprint} "
              f"(finish_reason {reply.choices[0].finish_reason}, {reply.usage.total_tokens} tokens, "
              f"{(time.perf_counter() - start) * 1000:.0f} ms)")


def _group_of(proc: psutil.Process) -> int | None:
    try:
        return None if proc.status() == psutil.STATUS_ZOMBIE else os.getpgid(proc.pid)
    except (ProcessLookupError, psutil.Error):
        return None


def print_report(repo: Path) -> None:
    banner(f"memory report: {repo / 'report.md'}")
    print((repo / "report.md").read_text())


def main() -> None:
    answer_locally()
    result = build_repository()
    write_deploy(result.out)
    serve_and_ask(result.out)


if __name__ == "__main__":
    main()
