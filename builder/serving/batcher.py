"""Continuous batching for a variant: many chats share one running batch over a paged KV cache.

New requests join the batch at the next decode step and finished ones leave it; each streams its
own answer through its ``on_update`` callback. The work is done by transformers' own
``ContinuousBatchingManager`` (``model.init_continuous_batching()``); this module sizes it from the
memory plan, keeps ``stream_chat``'s contract (``max_length`` counts the prompt, temperature 0 is
greedy, ChatGLM2's stop ids, the same answer text and history) and isolates requests from each
other. Nothing here imports Triton.

>>> batcher = Batcher(model, tokenizer, BatcherConfig(num_blocks=512, block_size=64))
>>> batcher.start()
>>> handle = batcher.submit("你好", [], max_length=2048, temperature=0,
...                         on_update=lambda text, history, finished, error: print(text))
>>> handle.wait(); batcher.stop()
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import RequestStatus
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessorList)
from transformers.generation.logits_process import LogitsProcessorList

from ..model.cuda_quant import FUSED_MAX_TOKENS
from ..model.generation import decode_answer, fit_history, graphs_switched_off, sample_rows

log = logging.getLogger("glm-build.batcher")

# on_update(response_so_far, history, finished, error): called from the batcher's thread.
OnUpdate = Callable[[str, list, bool, "Exception | None"], None]


class BatcherFullError(RuntimeError):
    """Too many requests wait for a place in the batch: hand this one to another variant."""


class BatcherStoppedError(RuntimeError):
    """The batcher is not running (not started, stopped, or its generation loop died)."""


class RequestFailedError(RuntimeError):
    """The generation loop failed this request (the message is transformers')."""


@dataclass(frozen=True)
class BatcherConfig:
    num_blocks: int  # KV blocks in the pool: the plan's KV headroom / bytes per block, never guessed
    block_size: int = 64  # tokens per block (transformers' page_size); at least 4
    max_batch_tokens: int = 512  # tokens per forward step, prefill chunks included
    max_queue: int = 64  # requests waiting for a place in the batch before submit() refuses
    max_running: int | None = None  # requests in one step (None: transformers' default, 1024)
    prefix_sharing: bool = True  # reuse the KV blocks of an identical prompt prefix (multi-turn chats)
    seed: int | None = None  # the sampling RNG's seed (shared by every request of the batch)
    # CUDA graphs for the batch steps on a CUDA device (None: on unless GLM_BUILD_CUDA_GRAPHS=0);
    # never on a CPU. See continuous_batching_config().
    cuda_graphs: bool | None = None
    async_batching: bool = True  # with graphs: prepare the next step while the GPU runs this one

    def __post_init__(self):
        for name, low in (("num_blocks", 1), ("block_size", 4), ("max_batch_tokens", 1),
                          ("max_queue", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"BatcherConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.max_running is not None and (not isinstance(self.max_running, int)
                                             or isinstance(self.max_running, bool) or self.max_running < 1):
            raise ValueError(f"BatcherConfig.max_running must be None or an integer >= 1, "
                             f"got {self.max_running!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"BatcherConfig.seed must be None or an integer >= 0, got {self.seed!r}")
        if self.cuda_graphs not in (None, True, False):
            raise ValueError(f"BatcherConfig.cuda_graphs must be None, True or False, got {self.cuda_graphs!r}")

    @property
    def max_tokens(self) -> int:
        """The pool's capacity in tokens: the longest ``max_length`` one request may ask for."""
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class BatcherStats:
    running_requests: int  # in the running batch (prefilling or decoding)
    queued_requests: int  # submitted, not yet in the batch
    kv_blocks_total: int
    kv_blocks_used: int  # held by requests; blocks kept only for prefix reuse count as free
    kv_blocks_free: int
    generated_tokens: int  # answer tokens streamed since start (stop tokens not counted)
    prompt_tokens: int  # prompt tokens of the requests submitted since start
    reused_prompt_tokens: int  # of those, the ones found in the pool (a prefix computed before)
    finished_requests: int
    failed_requests: int
    cancelled_requests: int
    time_to_first_token_s: tuple[float, ...]  # of the latest requests (up to 256), oldest first


class BatchRequest:
    """One submitted chat: the handle ``submit()`` returns. ``cancel()`` removes it from the batch."""

    def __init__(self, batcher: "Batcher", request_id: str, query: str, history: list,
                 prompt_tokens: int, on_update: OnUpdate):
        self.request_id = request_id
        self.query = query
        self.history = history  # the caller's history; the answer's history is this + (query, answer)
        self.prompt_tokens = prompt_tokens
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.response = ""
        self.error: Exception | None = None
        self.cancelled = False
        self._batcher = batcher
        self._on_update = on_update
        self._tokens_seen = 0
        self._last_sent: str | None = None
        self._done = False
        # on_update and cancel() never overlap; on_update may call cancel() (a re-entrant lock)
        self._lock = threading.RLock()
        self._finished = threading.Event()

    @property
    def time_to_first_token_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request finished, failed or was cancelled; False on timeout."""
        return self._finished.wait(timeout)

    def cancel(self) -> bool:
        """Leave the batch and free the KV blocks; ``on_update`` is not called again once this
        returns. False when the request had already ended."""
        with self._lock:
            if self._done:
                return False
            self._done = self.cancelled = True
        self._batcher._end(self, "cancelled")
        self._batcher._manager.cancel_request(self.request_id)
        self._finished.set()
        return True


class ChatSampling(ContinuousBatchingLogitsProcessorList):
    """Every request's own sampling in one pass over the batch's logits (:func:`sample_rows`):
    greedy at temperature 0 (the first arg-max, as ``sample_next``), else temperature and top-p.

    It stands in for transformers' list of per-request processors, whose top-p sorts every row's
    whole vocabulary, greedy ones included, before a multinomial draw over it: 15-17 ms a step for
    8 rows of ChatGLM2's 65,024 logits on 2 cores, against 0.5 ms for 8 greedy rows here. Each
    row comes back with only its chosen token finite, and the manager (built with
    ``do_sample=False``) takes that arg-max. Two argument rows per request: temperature, top-p.
    """

    GREEDY = {"temperature": 0.0, "top_p": 1.0}  # the arguments, and a request's defaults

    def __init__(self):
        super().__init__(LogitsProcessorList())
        self.tensors_required = len(self.GREEDY)
        self.supported_keys = {key: float for key in self.GREEDY}
        self.do_processing = True

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(torch.tensor([[v] for v in self.GREEDY.values()]).view(torch.int32))

    def prepare_tensor_args(self, requests_in_batch, arg_storage: torch.Tensor) -> torch.Tensor:
        rows = [r.state.logit_processor_kwargs for r in requests_in_batch if r.has_new_token]
        values = torch.tensor([[row.get(key, default) for row in rows]
                               for key, default in self.GREEDY.items()], dtype=torch.float32)
        arg_storage[:, : len(rows)] = values.view(torch.int32).to(arg_storage.device)
        return arg_storage

    def __call__(self, input_ids, scores: torch.Tensor, logits_processor_args: torch.Tensor):
        args = logits_processor_args[:, : scores.size(0)].view(torch.float32)
        tokens = sample_rows(scores, args[0], args[1], sync_free=scores.device.type != "cpu")
        chosen = torch.full_like(scores, -math.inf)
        return chosen.scatter_(-1, tokens[:, None], 0.0)


Q_PADDING_TOKENS = FUSED_MAX_TOKENS
"""Query rows a graphed step is padded to a multiple of: a decode step of up to 8 requests stays
at 8 rows, which the fused int8/int4 kernel takes (padded past it, the step would dequantize every
weight) and which costs fp16's cuBLAS GEMV no more weight reads than one row."""

KV_BUCKETS = 8
"""Key lengths a graphed step is padded to: the pool's tokens in this many steps (whole blocks).
A graph is captured per (query rows, key length) pair seen, so this bounds the graphs at
``max_batch_tokens / Q_PADDING_TOKENS × KV_BUCKETS``; finer buckets pad less but capture more."""

_graphs_said: set[str] = set()


def cuda_graphs_decision(config: BatcherConfig, device) -> tuple[bool, str]:
    """``(on, why)``: whether a batcher on ``device`` captures its steps in CUDA graphs."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the model is on {device.type}, not CUDA: CUDA graphs do not apply"
    if config.cuda_graphs is not None:
        return config.cuda_graphs, f"BatcherConfig(cuda_graphs={config.cuda_graphs})"
    off = graphs_switched_off()  # GLM_BUILD_CUDA_GRAPHS=0, where cuda_graphs is left at None
    if off:
        return False, off
    return True, "a CUDA device (the default)"


def kv_padding_tokens(num_blocks: int, block_size: int) -> int:
    """Key-length padding of a graphed step: the pool in :data:`KV_BUCKETS` steps of whole blocks.

    >>> kv_padding_tokens(256, 256)  # a 65536-token pool: 8 buckets of 8192 tokens
    8192
    """
    return -(-num_blocks // KV_BUCKETS) * block_size


def continuous_batching_config(config: BatcherConfig, device) -> dict:
    """The ``ContinuousBatchingConfig`` keyword arguments of a batcher on ``device``.

    Everywhere: the plan's KV pool, per-request sampling, prefix sharing, the seed. On CUDA with
    graphs on (:func:`cuda_graphs_decision`), the batch steps are captured in CUDA graphs and
    replayed: the varlen path (every step under paged SDPA, whose mask would otherwise keep
    transformers from graphing it) and the decode fast path (flash attention, where installed),
    padded to :data:`Q_PADDING_TOKENS` query rows and :func:`kv_padding_tokens` keys, with async
    batching (a second set of input buffers, counted by ``builder.plan.memory.cuda_graph_bytes``). On a
    CPU nothing is added: transformers' own defaults, which leave graphs off there.

    >>> continuous_batching_config(BatcherConfig(num_blocks=64), "cpu")["page_size"]
    64
    """
    kwargs = dict(num_blocks=config.num_blocks, page_size=config.block_size,
                  max_batch_tokens=config.max_batch_tokens,
                  allow_block_sharing=config.prefix_sharing, seed=config.seed,
                  max_requests_per_batch=config.max_running)
    on, _ = cuda_graphs_decision(config, device)
    if torch.device(device).type == "cuda":
        kwargs.update(use_cuda_graph=on, use_async_batching=on and config.async_batching)
        if on:
            kwargs.update(q_padding_interval_size=Q_PADDING_TOKENS,
                          kv_padding_interval_size=kv_padding_tokens(config.num_blocks,
                                                                     config.block_size))
    return kwargs


def _say_graphs_once(config: BatcherConfig, device) -> None:
    on, why = cuda_graphs_decision(config, device)
    message = f"CUDA graphs {'on' if on else 'off'} for the batch steps: {why}"
    if message not in _graphs_said:
        _graphs_said.add(message)
        log.warning(message)


def _make_manager(model, tokenizer, config: BatcherConfig):
    """transformers' manager, sized from ``config``, sampling per request (:class:`ChatSampling`);
    on CUDA with graphs on, its steps are captured here (warm-up) so the first request does not pay."""
    # do_sample=False: the manager's own step takes the arg-max of what ChatSampling leaves
    generation_config = GenerationConfig(do_sample=False, eos_token_id=list(tokenizer.stop_ids),
                                         pad_token_id=tokenizer.pad_id)
    device = model.device
    _say_graphs_once(config, device)
    cb_config = ContinuousBatchingConfig(**continuous_batching_config(config, device))
    manager = model.init_continuous_batching(generation_config=generation_config,
                                             continuous_batching_config=cb_config)
    # transformers has no public hook for per-request sampling of one's own: put ours in place of
    # its (empty) list, before start() sizes the per-request argument rows from tensors_required.
    manager.logit_processor = ChatSampling()
    if any(manager.continuous_batching_config.cuda_graph_booleans):
        # Captures the largest step (and the decode fast path's sizes) into the graph pool now;
        # the generation loop reuses this batch processor. Later buckets are captured on first use.
        start = time.perf_counter()
        try:
            with torch.inference_mode():  # as the generation thread runs
                manager.warmup()
        except Exception:  # a step that cannot be captured: serve without graphs rather than not
            if config.cuda_graphs:
                raise
            log.exception("capturing the batch steps in CUDA graphs failed; serving without graphs")
            del manager
            torch.cuda.empty_cache()
            return _make_manager(model, tokenizer, dataclasses.replace(config, cuda_graphs=False))
        log.warning("CUDA graphs captured at warm-up in %.1f s", time.perf_counter() - start)
    return manager


def _loop_view(manager) -> tuple[int, int, int, int]:
    """``(running, queued, kv_used, kv_total)`` read from the generation loop's scheduler and cache
    (plain int reads of another thread's state: a snapshot for metrics, not a synchronised one)."""
    processor = manager.batch_processor
    if processor is None:
        return 0, manager.input_queue.qsize(), 0, 0
    scheduler, cache = processor.scheduler, processor.cache
    running = len(scheduler.active_requests)
    queued = len(scheduler.waiting_requests) + manager.input_queue.qsize()
    used = total = 0
    for allocator in cache.cache_allocators.values():  # GLM: one group, full attention
        free = (cache.pool.num_free_sectors * allocator.blocks_per_sector
                + cache.pool.count_free_blocks(allocator.index) + len(allocator.ledger.cached_blocks))
        total += allocator.num_blocks
        used += allocator.num_blocks - free
    return running, queued, used, total


class Batcher:
    """A running batch of chats over ``model`` (a ``GlmForCausalLM``, quantized or not).

    ``start()`` starts transformers' generation thread and this batcher's delivery thread, which
    decodes each request's tokens and calls its ``on_update``; ``stop()`` ends both and fails the
    requests still running with :class:`BatcherStoppedError`.
    """

    def __init__(self, model, tokenizer, config: BatcherConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self._stop_ids = tuple(tokenizer.stop_ids)
        self._manager = _make_manager(model, tokenizer, config)
        self._lock = threading.Lock()
        self._requests: dict[str, BatchRequest] = {}
        self._next_id = 0
        self._counts = {"generated": 0, "prompt": 0, "reused": 0, "finished": 0, "failed": 0,
                        "cancelled": 0}
        self._ttfts: deque[float] = deque(maxlen=256)
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        """Start generating; raises if the generation loop cannot build its KV pool. A stopped
        batcher does not start again: make a new one."""
        if self._stopping or self._thread is not None:
            raise BatcherStoppedError("start() once per batcher: this one was started already")
        with torch.inference_mode():  # the generation thread inherits the caller's mode
            self._manager.start()
        deadline = time.monotonic() + timeout
        while self._manager.batch_processor is None:
            if not self._manager.is_running() or time.monotonic() > deadline:
                self._manager.stop(block=True, timeout=timeout)
                raise BatcherStoppedError(f"the generation loop did not start: {self._fatal_error()}")
            time.sleep(0.01)
        self._count_reuse(self._manager.batch_processor.cache)
        self._accepting = True
        self._thread = threading.Thread(target=self._deliver_loop, name="glm-batcher", daemon=True)
        self._thread.start()

    def _count_reuse(self, cache) -> None:
        """Count the prompt tokens each request finds in the pool (``stats().reused_prompt_tokens``).
        transformers' scheduler asks the cache's ``search_prefix_match`` once per new request and
        keeps no total, so the cache's method is wrapped (a transformers without it: not counted)."""
        search = getattr(cache, "search_prefix_match", None)
        if search is None:
            log.warning("this transformers' cache has no search_prefix_match: prefix reuse is not counted")
            return

        def counted(*args, **kwargs):
            found = search(*args, **kwargs)
            with self._lock:
                self._counts["reused"] += found
            return found

        cache.search_prefix_match = counted

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop now: requests still running get ``on_update(..., finished=True, error=...)``."""
        self._accepting, self._stopping = False, True
        if self._manager.is_running():
            self._manager.stop(block=True, timeout=timeout, hard_stop=True)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_open(BatcherStoppedError("the batcher was stopped"))

    def __enter__(self) -> "Batcher":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- requests -------------------------------------------------------------------------------
    def submit(self, prompt: str, history: Sequence[tuple[str, str]] = (), *, max_length: int,
               temperature: float = 0.8, top_p: float = 0.8, on_update: OnUpdate) -> BatchRequest:
        """Queue a chat; it joins the batch at the next step. Raises at once for a bad value
        (``ValueError``, ``PromptTooLongError``), a full queue (:class:`BatcherFullError`) or a
        stopped batcher; later failures come through ``on_update`` with ``error`` set.

        ``max_length`` counts prompt and answer tokens, as in ``stream_chat``; the oldest rounds
        of ``history`` are dropped when the prompt does not fit.
        """
        sampling = self._check(max_length, temperature, top_p)
        prompt_ids, _ = fit_history(self.tokenizer, prompt, history, max_length)
        return self._add(prompt, history, prompt_ids, max_length, sampling, on_update,
                         list(self._stop_ids))

    def submit_prompt_ids(self, prompt_ids: Sequence[int], query: str = "",
                          history: Sequence[tuple[str, str]] = (), *, max_length: int,
                          temperature: float = 0.8, top_p: float = 0.8,
                          on_update: OnUpdate) -> BatchRequest:
        """:meth:`submit` for a prompt already in token ids (a conversation in the family's roles,
        tools included: ``tokenizer.encode_messages``); nothing is dropped from it. ``query`` and
        ``history`` only make the answer's history."""
        sampling = self._check(max_length, temperature, top_p)
        if len(prompt_ids) >= max_length:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens, which leaves no room to "
                             f"answer within max_length={max_length}")
        return self._add(query, history, list(prompt_ids), max_length, sampling, on_update,
                         list(self._stop_ids))

    def _check(self, max_length, temperature, top_p) -> dict:
        """The request's sampling arguments, after checking its values (``ValueError``)."""
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        if max_length > self.config.max_tokens:
            raise ValueError(f"max_length={max_length} is more than the KV pool holds for one request: "
                             f"{self.config.max_tokens} tokens (num_blocks={self.config.num_blocks} "
                             f"x block_size={self.config.block_size})")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if temperature > 0:
            return {"temperature": float(temperature), "top_p": float(top_p)}
        return dict(ChatSampling.GREEDY)

    def submit_ids(self, prompt_ids: Sequence[int], *, max_length: int,
                   ignore_stop: bool = False) -> BatchRequest:
        """A greedy request from token ids (benchmarks and memory profiles: a fixed amount of
        work); ``ignore_stop`` decodes to ``max_length`` whatever comes out. Wait on the handle."""
        if not isinstance(max_length, int) or max_length <= len(prompt_ids):
            raise ValueError(f"max_length must exceed the prompt's {len(prompt_ids)} tokens, got {max_length!r}")
        if max_length > self.config.max_tokens:
            raise ValueError(f"max_length={max_length} is more than the KV pool holds for one request: "
                             f"{self.config.max_tokens} tokens")
        sampling = dict(ChatSampling.GREEDY)
        return self._add("", (), list(prompt_ids), max_length, sampling, lambda *update: None,
                         [] if ignore_stop else list(self._stop_ids))

    def _add(self, prompt, history, prompt_ids, max_length, sampling, on_update, stop_ids) -> BatchRequest:
        with self._lock:
            if not self._accepting or not self._manager.is_running():
                raise BatcherStoppedError(f"the batcher is not running: {self._fatal_error()}")
            waiting = sum(1 for r in self._requests.values() if r.first_token_at is None)
            if waiting >= self.config.max_queue:
                raise BatcherFullError(f"{waiting} requests already wait for the batch "
                                       f"(max_queue={self.config.max_queue})")
            request_id = f"chat-{self._next_id}"
            self._next_id += 1
            handle = BatchRequest(self, request_id, prompt, [tuple(p) for p in history],
                                  len(prompt_ids), on_update)
            self._requests[request_id] = handle
        added = self._manager.add_request(prompt_ids, request_id=request_id, streaming=True,
                                          max_new_tokens=max_length - len(prompt_ids),
                                          eos_token_id=stop_ids, **sampling)
        if added is None:  # the manager refused it: it is stopping
            with self._lock:
                self._requests.pop(request_id, None)
            raise BatcherStoppedError(f"the batcher is not running: {self._fatal_error()}")
        with self._lock:
            self._counts["prompt"] += len(prompt_ids)
        return handle

    def stats(self) -> BatcherStats:
        running, queued, used, total = _loop_view(self._manager)
        total = total or self.config.num_blocks
        with self._lock:
            return BatcherStats(running, queued, total, used, total - used, self._counts["generated"],
                                self._counts["prompt"], self._counts["reused"],
                                self._counts["finished"], self._counts["failed"],
                                self._counts["cancelled"], tuple(self._ttfts))

    # -- delivery thread ------------------------------------------------------------------------
    def _deliver_loop(self) -> None:
        while True:
            running = self._manager.is_running()
            for output in self._take_outputs():
                self._deliver(output)
            if not running:  # everything it produced before it ended has been delivered
                error = BatcherStoppedError(f"the generation loop stopped: {self._fatal_error()}")
                self._fail_open(error)
                self._accepting = False
                return

    def _take_outputs(self) -> list:
        """The latest output of each request (they are cumulative), waiting up to 0.1 s for one."""
        output = self._manager.get_result(timeout=0.1)
        latest = {}
        while output is not None:
            latest[output.request_id] = output
            output = self._manager.get_result(timeout=0)
        return list(latest.values())

    def _deliver(self, output) -> None:
        with self._lock:
            handle = self._requests.get(output.request_id)
        if handle is None:  # cancelled, or already ended
            return
        tokens = list(output.generated_tokens)
        if tokens and tokens[-1] in self._stop_ids:
            tokens.pop()
        with handle._lock:
            if handle._done:
                return
            if handle.first_token_at is None and output.generated_tokens:
                handle.first_token_at = time.monotonic()
                with self._lock:
                    self._ttfts.append(handle.time_to_first_token_s)
            with self._lock:
                self._counts["generated"] += max(0, len(tokens) - handle._tokens_seen)
            handle._tokens_seen = max(handle._tokens_seen, len(tokens))
            if output.error is not None or output.status == RequestStatus.FAILED:
                error = (BatcherStoppedError("the batcher was stopped") if self._stopping
                         else RequestFailedError(output.error or "generation failed"))
                self._finish(handle, decode_answer(self.tokenizer, tokens), error)
            elif output.is_finished():
                self._finish(handle, decode_answer(self.tokenizer, tokens), None)
            else:
                partial = decode_answer(self.tokenizer, tokens, final=False)
                if partial is not None and partial != handle._last_sent:
                    self._update(handle, partial)

    def _update(self, handle: BatchRequest, text: str) -> None:
        """A partial answer; an ``on_update`` that raises ends (only) its own request."""
        handle.response = handle._last_sent = text
        try:
            handle._on_update(text, handle.history + [(handle.query, text)], False, None)
        except Exception as err:
            log.exception("%s: on_update raised; cancelling the request", handle.request_id)
            if not handle._done:
                self._manager.cancel_request(handle.request_id)
                self._finish(handle, text, err)

    def _finish(self, handle: BatchRequest, text: str, error: Exception | None) -> None:
        """The last ``on_update`` of a request (the caller holds ``handle._lock``)."""
        handle._done = True
        handle.response, handle.error = text, error
        self._end(handle, "finished" if error is None else "failed")
        try:
            handle._on_update(text, handle.history + [(handle.query, text)], True, error)
        except Exception:
            log.exception("%s: on_update raised on the final answer", handle.request_id)
        handle._finished.set()  # after the last on_update: wait() then sees everything

    def _end(self, handle: BatchRequest, outcome: str) -> None:
        with self._lock:
            self._requests.pop(handle.request_id, None)
            self._counts[outcome] += 1

    def _fail_open(self, error: Exception) -> None:
        with self._lock:
            handles = list(self._requests.values())
        for handle in handles:
            with handle._lock:
                if not handle._done:
                    self._finish(handle, handle.response, error)

    def _fatal_error(self) -> str:
        error = getattr(self._manager.background_thread_status, "fatal_error", None)
        return "no error recorded" if error is None else f"{type(error).__name__}: {error}"
