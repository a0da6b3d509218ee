"""One profiling run, in a process of its own: load a variant, run a workload, read the peak.

:func:`measure_in_fresh_process` forks a new process from a server that has imported torch and
transformers once (``multiprocessing``'s forkserver: the imports take seconds, and no run's memory
can leak into the next). In it:

1. **warm-up**: the embedded tiny model is loaded the same way and decodes two tokens, then is
   dropped. What every model needs and no model's size changes is then in place: the code of the
   load, quantization and forward paths (a forked process starts with its libraries' pages
   unmapped and faults them back in on first use: ~70 MiB that would otherwise be charged to the
   model), thread pools, lazily imported modules;
2. **baseline**: the resident set now (CPU), or the CUDA context (GPU);
3. **load**: :func:`builder.load_chatglm2` with the variant's bits and dtype, as the variant's
   Triton ``initialize`` does; on a CPU every weight is then read once, since a float checkpoint
   loaded in its own dtype stays memory-mapped and only a server that has seen the whole
   vocabulary has all of its embedding resident;
4. **workload**, after resetting the peak: ``encode`` one prefill of N tokens through
   :func:`builder.model.generation.generate_ids` (logits of the last position only, as ``builder.chat``
   does), ``generate`` greedy decoding from a 16-token prompt to N tokens, stop ids ignored.

CPU readings come from ``/proc/self/status`` (``VmRSS``, and ``VmHWM`` reset through
``/proc/self/clear_refs``); CUDA readings from the caching allocator's statistics and
``torch.cuda.mem_get_info``, with one reading before the context exists from NVML (or
``nvidia-smi``) asked for the card by the PCI bus id CUDA gives for the run's device, never by an
index: CUDA numbers devices fastest first, NVML in PCI order. The per-process overhead measured
(context + allocator reserve) is set beside the figure of the GPU profile matching the card.

>>> from builder import TINY_CHECKPOINT
>>> run = Run("cpu", str(TINY_CHECKPOINT), bits=4, group_size=None, dtype="bfloat16",
...           phase="encode", tokens=64, vocab=832)
>>> measure_in_fresh_process(run)["measured_bytes"]
"""
from __future__ import annotations

import multiprocessing
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

PROMPT_TOKENS = 16  # generate:N decodes from a prompt this long
# What a run imports before its baseline; the fork server imports them once for every run.
_PRELOAD = ["torch", "safetensors.torch", "transformers.models.glm.modeling_glm",
            "builder.model.checkpoint", "builder.model.quantization", "builder.model.generation", "builder.profile.measure"]
_MIB = 2**20


class RunFailedError(RuntimeError):
    """A run's process raised or died (killed for memory, most likely)."""


@dataclass(frozen=True)
class Run:
    """One variant running one workload: what the run's process needs to know."""

    device: str  # "cpu" or "cuda"
    checkpoint: str  # THUDM-layout checkpoint folder
    bits: int  # 16, 8 or 4, as load_chatglm2 takes it
    group_size: Optional[int]  # group-wise int4, or None
    dtype: str  # torch dtype name of the unquantized parts: "float16", "bfloat16"
    phase: str  # "encode" or "generate"
    tokens: int  # prefill length, or total length with the prompt
    vocab: int  # token ids are drawn from [3, vocab)
    threads: Optional[int] = None  # torch.set_num_threads in the run; None: torch's choice
    concurrency: int = 1  # requests at once, through the variant's continuous batcher
    gpu_profile: Optional[str] = None  # cuda: the profile whose overhead to compare; None: detect


def measure_in_fresh_process(run: Run, stage: Callable[[str], None] = lambda text: None
                             ) -> dict:
    """Run ``run`` in a new process forked from the preloaded server; its readings, bytes.

    ``stage`` is called with what the run is doing now ("loading", "generate 512/8192 tokens").
    The dict holds ``measured_bytes``, ``baseline_bytes``, ``peak_bytes``, ``load_seconds``,
    ``run_seconds`` and the device's other readings (see :func:`_measure_cpu`,
    :func:`_measure_cuda`).
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(run, sender), daemon=True)
    process.start()
    sender.close()  # the child holds the only sender now: EOF when it is gone
    what = f"{run.bits}-bit {run.phase}:{run.tokens} on {run.device}"
    try:
        while True:
            try:
                kind, payload = receiver.recv()
            except EOFError:
                process.join()
                raise RunFailedError(
                    f"the run {what} died with exit code {process.exitcode}"
                    + (" (killed: out of memory?)" if process.exitcode and process.exitcode < 0
                       else "")) from None
            if kind == "stage":
                stage(payload)
            elif kind == "error":
                raise RunFailedError(f"the run {what} failed:\n{payload}")
            else:
                return payload
    finally:
        receiver.close()
        process.join()


# -- inside a run's process ---------------------------------------------------------------------
def _child(run: Run, sender) -> None:
    try:
        measure = _measure_cuda if run.device == "cuda" else _measure_cpu
        sender.send(("result", measure(run, lambda text: sender.send(("stage", text)))))
    except BaseException:  # noqa: BLE001 — reported to the parent, which raises
        sender.send(("error", traceback.format_exc()))
    finally:
        sender.close()


def _measure_cpu(run: Run, stage: Callable[[str], None]) -> dict:
    import resource

    import torch

    from ..model.checkpoint import load_chatglm2

    if run.threads:
        torch.set_num_threads(run.threads)
    stage("warming up")
    _warm_up(run)
    baseline = _rss()["VmRSS"]
    scoped = _reset_peak_rss()
    stage("loading")
    start = time.perf_counter()
    model, _ = load_chatglm2(run.checkpoint, device="cpu", dtype=getattr(torch, run.dtype),
                             bits=run.bits, group_size=run.group_size)
    load_seconds = time.perf_counter() - start
    load_peak = _rss()["VmHWM"] if scoped else None
    model_bytes = _touch_weights(model)  # memory-mapped weights become resident, as in serving
    loaded = _rss()["VmRSS"]
    scoped = scoped and _reset_peak_rss()
    run_seconds = _run_workload(model, run, stage)
    now = _rss()
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    process_peak *= 1 if sys.platform == "darwin" else 1024  # KiB on Linux, bytes on macOS
    peak = now["VmHWM"] if scoped else process_peak
    return {"measured_bytes": peak - baseline, "baseline_bytes": baseline, "peak_bytes": peak,
            "load_seconds": load_seconds, "run_seconds": run_seconds,
            "load_peak_bytes": None if load_peak is None else load_peak - baseline,
            "loaded_bytes": loaded - baseline, "model_tensor_bytes": model_bytes,
            "process_peak_rss_bytes": process_peak, "peak_scope": "workload" if scoped
            else "process (load included: the high-water mark could not be reset)"}


def _measure_cuda(run: Run, stage: Callable[[str], None]) -> dict:
    import torch

    from ..model.checkpoint import load_chatglm2

    index = torch.cuda.current_device()  # initializes CUDA, makes no context
    bus_id = _cuda_pci_bus_id(index)
    used_before = _device_used_by_pci(bus_id)  # before this process has a context
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info(index)  # the context exists from here on
    context_at_init = total - free - (used_before or 0)
    stage("warming up")
    _warm_up(run)
    torch.cuda.empty_cache()
    stage("loading")
    start = time.perf_counter()
    model, _ = load_chatglm2(run.checkpoint, device="cuda", dtype=getattr(torch, run.dtype),
                             bits=run.bits, group_size=run.group_size)
    torch.cuda.synchronize()
    load_seconds = time.perf_counter() - start
    allocated_after_load = torch.cuda.memory_allocated()
    reserved_after_load = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    run_seconds = _run_workload(model, run, stage)
    torch.cuda.synchronize()
    peak_allocated = torch.cuda.max_memory_allocated()
    peak_reserved = torch.cuda.max_memory_reserved()
    free, total = torch.cuda.mem_get_info(index)
    used_after = total - free - (used_before or 0)
    # everything this process holds outside the allocator: the context with its lazily loaded
    # kernels, cuBLAS/cuDNN handles
    context = used_after - torch.cuda.memory_reserved()
    name = torch.cuda.get_device_name(index)
    overhead = overhead_against_profile(
        context, peak_reserved, peak_allocated, run.gpu_profile,
        (name, torch.cuda.get_device_capability(index), total))
    return {**overhead, "measured_bytes": context + peak_reserved,
            "baseline_bytes": used_before or 0, "pci_bus_id": bus_id,
            "peak_bytes": peak_reserved, "load_seconds": load_seconds,
            "run_seconds": run_seconds, "context_bytes": context,
            "context_at_init_bytes": context_at_init, "peak_allocated_bytes": peak_allocated,
            "peak_reserved_bytes": peak_reserved, "allocated_after_load_bytes":
            allocated_after_load, "reserved_after_load_bytes": reserved_after_load,
            "device_used_after_bytes": used_after, "device_total_bytes": total,
            "gpu": name, "context_method": "NVML by PCI bus id before, mem_get_info after"
            if used_before is not None else "mem_get_info only: assumes no other process on "
            "the GPU"}


def overhead_against_profile(context: int, peak_reserved: int, peak_allocated: int,
                             profile_name: Optional[str], device: tuple) -> dict:
    """The per-process overhead measured (context + what the allocator reserved beyond live
    tensors at the peak) beside the GPU profile's ``process_overhead_bytes``: the profile named,
    else the one matching ``device`` (name, compute capability, total bytes), else the A100's
    default (``profile_match`` says which).
    """
    from ..plan.memory import DEFAULT_CUDA_PROCESS_OVERHEAD
    from ..plan.profiles import load_profile, match_device

    profile = load_profile(profile_name) if profile_name else match_device(*device)
    expected = DEFAULT_CUDA_PROCESS_OVERHEAD if profile is None else profile.process_overhead_bytes
    measured = context + peak_reserved - peak_allocated
    return {"gpu_profile": None if profile is None else profile.name,
            "profile_match": "named" if profile_name else "detected" if profile else
            "none: the A100 default", "profile_overhead_bytes": expected,
            "overhead_measured_bytes": measured, "overhead_error_bytes": measured - expected}


def _warm_up(run: Run) -> None:
    """Load the embedded tiny model the same way and decode two tokens, then drop it.

    What every model needs and no model's size changes is then in place before the baseline:
    the code of the load, quantization and forward paths (a forked process starts with its
    libraries' pages unmapped and faults them in on first use), thread pools, lazily imported
    modules. The run's own figures are then the model's alone.
    """
    import gc

    import torch

    from .. import TINY_CHECKPOINT
    from ..model.checkpoint import load_chatglm2
    from ..model.generation import generate_ids

    model, _ = load_chatglm2(TINY_CHECKPOINT, device=run.device,
                             dtype=getattr(torch, run.dtype), bits=run.bits,
                             group_size=run.group_size)
    for _ in generate_ids(model, list(range(3, 11)), max_length=10, temperature=0, top_p=1.0,
                          stop_ids=()):
        pass
    del model
    gc.collect()


def _run_workload(model, run: Run, stage: Callable[[str], None]) -> float:
    """Run ``encode:N`` or ``generate:N`` as ``builder.chat`` does; the seconds it took."""
    import torch

    from ..model.generation import generate_ids

    if run.concurrency > 1:
        return _run_batched(model, run, stage)
    g = torch.Generator().manual_seed(0)
    tokens, encode = run.tokens, run.phase == "encode"
    prompt = torch.randint(3, run.vocab, (tokens if encode else PROMPT_TOKENS,),
                           generator=g).tolist()
    every = max(1, tokens // 20)
    stage(f"{run.phase} {len(prompt)} tokens")
    start = time.perf_counter()
    # encode: max_length one past the prompt, so exactly one forward (the prefill) runs
    ids = generate_ids(model, prompt, max_length=tokens + 1 if encode else tokens,
                       temperature=0, top_p=1.0, stop_ids=())
    for count, _ in enumerate(ids, start=len(prompt) + 1):
        if not encode and count % every == 0:
            stage(f"generate {count}/{tokens} tokens")
    return time.perf_counter() - start


def _run_batched(model, run: Run, stage: Callable[[str], None]) -> float:
    """``run.concurrency`` requests of the workload at once through the serving path (the
    variant's continuous batcher, its KV pool sized for exactly them); the seconds it took."""
    import torch

    from ..plan.placement import batch_pool, kv_page_size
    from ..serving.batcher import Batcher, BatcherConfig
    from ..model.tokenizer import ChatGLM2Tokenizer

    from .. import TINY_CHECKPOINT

    page = kv_page_size(run.device)
    blocks, step = batch_pool(run.tokens, run.concurrency, page)
    tokenizer = ChatGLM2Tokenizer(TINY_CHECKPOINT / "tokenizer.model")  # only its stop ids matter
    g = torch.Generator().manual_seed(0)
    encode = run.phase == "encode"
    stage(f"{run.concurrency} × {run.phase} {run.tokens} tokens")
    start = time.perf_counter()
    with Batcher(model, tokenizer, BatcherConfig(num_blocks=blocks, block_size=page,
                                                 max_batch_tokens=step, prefix_sharing=False,
                                                 max_queue=run.concurrency)) as batcher:
        handles = []
        for _ in range(run.concurrency):
            prompt = torch.randint(3, run.vocab, (run.tokens if encode else PROMPT_TOKENS,),
                                   generator=g).tolist()
            handles.append(batcher.submit_ids(prompt, max_length=run.tokens + 1 if encode else run.tokens,
                                              ignore_stop=True))
        for handle in handles:
            handle.wait()
            if handle.error is not None:
                raise handle.error
    return time.perf_counter() - start


def _touch_weights(model) -> int:
    """Read every weight once; the bytes of the model's distinct tensor storages."""
    import torch

    storages = {}
    with torch.inference_mode():
        for tensor in [*model.parameters(), *model.buffers()]:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in storages:
                storages[storage.data_ptr()] = storage.nbytes()
                tensor.sum()
    return sum(storages.values())


def _rss() -> dict[str, int]:
    """VmRSS and VmHWM (peak since the last reset) of this process, in bytes."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}  # "123 kB"
    except OSError:
        import psutil

        rss = psutil.Process().memory_info().rss
        return {"VmRSS": rss, "VmHWM": rss}


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cuda_pci_bus_id(index: int) -> Optional[str]:
    """``"00000000:3B:00.0"``: the PCI bus id of CUDA device ``index``, as NVML and nvidia-smi
    take it; None where this torch does not report it."""
    import torch

    props = torch.cuda.get_device_properties(index)
    try:
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except AttributeError:
        return None


def _device_used_by_pci(bus_id: Optional[str]) -> Optional[int]:
    """Bytes in use on the card at PCI ``bus_id``, through NVML (``nvidia-ml-py``), else
    ``nvidia-smi -i BUS_ID``; None when neither answers. Never by index: CUDA's device 0 is the
    fastest card, NVML's and nvidia-smi's is the first on the PCI bus."""
    import subprocess

    if bus_id is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(
                pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 — not installed, no driver library, unknown bus id
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits", "-i", bus_id], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        return int(out.strip().splitlines()[0]) * _MIB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
