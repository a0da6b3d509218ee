"""``chat()`` and ``stream_chat()``: ChatGLM2's ``model.chat`` on a ``GlmForCausalLM``.

>>> response, history = chat(model, tokenizer, "3只鸡和2只兔子一共有几条腿？", temperature=0)
"""
from __future__ import annotations

import logging
import os
from typing import Iterator, Sequence

import torch

History = Sequence[tuple[str, str]]

log = logging.getLogger("glm-build.generation")

GRAPHS_ENV = "GLM_BUILD_CUDA_GRAPHS"
"""``0`` (or ``off``/``false``/``no``) turns CUDA graphs off, in our own loop and in the served
batchers alike (``builder.serving.batcher``): one GPU run can compare both."""

STATIC_CACHE_STEP = 256
"""A static cache's length is the request's ``max_length`` rounded up to this many tokens, so a
captured step is reused by every request of about the same length."""

_said: set[str] = set()


class PromptTooLongError(ValueError):
    """The query alone does not fit in ``max_length``."""


def fit_history(tokenizer, query: str, history: History, max_length: int) -> tuple[list[int], list]:
    """The prompt ids, dropping the oldest rounds until at least one new token fits."""
    history = [tuple(pair) for pair in history]
    while True:
        ids = tokenizer.build_chat_input(query, history)
        if len(ids) < max_length:
            return ids, history
        if not history:
            raise PromptTooLongError(
                f"the query alone is {len(ids)} tokens, which leaves no room to answer within "
                f"max_length={max_length}")
        history = history[1:]


NUCLEUS_FIRST_K = 64
"""Where :func:`sample_rows` first looks for a row's nucleus: its 64 most likely tokens, then 8×
as many until the nucleus ends inside them (a peaked row never sorts its whole vocabulary)."""


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> int:
    """Next token from last-position logits [vocab]: greedy when temperature ≤ 0, else top-p."""
    return int(sample_rows(logits[None], torch.tensor([float(temperature)]),
                           torch.tensor([float(top_p)]), generator)[0])


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generator: torch.Generator | None = None, *, sync_free: bool = False) -> torch.Tensor:
    """Each row's next token from ``logits`` [rows, vocab]: its first arg-max where ``temperature``
    [rows] is ≤ 0 (greedy), else a draw, after dividing by the temperature, from the smallest set of
    most likely tokens whose probability reaches ``top_p`` [rows] (the nucleus; the top token always
    stays). Returns [rows] int64 on the logits' device.

    Greedy rows cost an arg-max only, and a sampled row's nucleus is looked for among its
    :data:`NUCLEUS_FIRST_K` most likely tokens first. Both decisions read values on the host, which a
    CUDA graph cannot: ``sync_free`` computes every row the same way, sorting the whole vocabulary.

    >>> sample_rows(torch.tensor([[0., 3., 1.]]), torch.tensor([0.]), torch.tensor([1.]))
    tensor([1])
    """
    logits = logits.float()
    temperature, top_p = temperature.to(logits.device), top_p.to(logits.device)
    tokens = logits.argmax(-1)
    sampled = temperature > 0
    if sync_free:
        draws = _nucleus_draws(logits, temperature.clamp_min(1e-6), top_p, generator,
                               first_k=logits.size(-1))
        return torch.where(sampled, draws, tokens)
    rows = sampled.nonzero().flatten()
    if rows.numel():
        tokens[rows] = _nucleus_draws(logits[rows], temperature[rows], top_p[rows], generator,
                                      first_k=NUCLEUS_FIRST_K)
    return tokens


def _nucleus_draws(logits, temperature, top_p, generator, first_k: int) -> torch.Tensor:
    """One top-p draw per row (every temperature > 0). The nucleus is exact whatever ``first_k``:
    the top k is widened until every row's nucleus ends inside it."""
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    vocab, k = probs.size(-1), min(first_k, probs.size(-1))
    while True:
        top, order = probs.sort(-1, descending=True) if k == vocab else probs.topk(k, -1)
        keep = top.cumsum(-1) - top < top_p[:, None]  # the mass before each token is under top_p
        if k == vocab or not bool(keep[:, -1].any()):
            break
        k = min(k * 8, vocab)
    choice = torch.multinomial(top * keep, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def decode_answer(tokenizer, new_ids: Sequence[int], *, final: bool = True) -> str | None:
    """The answer text of ``new_ids`` as ``stream_chat`` shows it (stripped); ``None`` for a partial
    answer that ends inside a multi-byte character (wait for the next token).

    >>> decode_answer(tokenizer, tokenizer.encode("你好"), final=False)
    '你好'
    """
    text = tokenizer.decode(new_ids)
    if not final and text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
        return None
    return text.strip()


def graphs_switched_off() -> str | None:
    """``"GLM_BUILD_CUDA_GRAPHS=0"`` when the switch turns CUDA graphs off, else None."""
    value = os.environ.get(GRAPHS_ENV, "").strip().lower()
    return f"{GRAPHS_ENV}={value}" if value in ("0", "off", "false", "no") else None


def decode_step_kind(device: torch.device | str) -> tuple[str, str]:
    """``(kind, why)``: how :func:`generate_ids` decodes on ``device``. ``"graph"``: a static KV
    cache and one CUDA graph replayed per token (CUDA, unless :data:`GRAPHS_ENV` says 0);
    ``"eager"``: a dynamic cache, one forward per token (a CPU: launches cost nothing there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "eager", f"the model is on {device.type}, not CUDA: no graph to capture"
    off = graphs_switched_off()
    if off:
        return "eager", off
    return "graph", "a CUDA device: static cache, captured decode step"


def static_cache_tokens(max_length: int, seq_length: int) -> int:
    """The static cache's length for a request of ``max_length`` tokens in all: rounded up to
    :data:`STATIC_CACHE_STEP`, not past the model's ``seq_length`` unless the request is longer.

    >>> static_cache_tokens(300, 32768), static_cache_tokens(3900, 4000)
    (512, 4000)
    """
    rounded = -(-max_length // STATIC_CACHE_STEP) * STATIC_CACHE_STEP
    return max(max_length, min(rounded, seq_length))


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


class StaticDecoder:
    """One sequence over a static KV cache of ``tokens`` positions: an eager prefill, then decode
    steps whose every input lives at a fixed address (token id, position, a 4-D mask made from the
    position inside the step), so the step can be captured once in a CUDA graph and replayed.

    ``capture=False`` runs the same steps eagerly (a CPU, or graphs switched off); a capture that
    fails is said once in the log and the steps stay eager.

    >>> decoder = StaticDecoder(model, 512, capture=True)
    >>> logits = decoder.prefill(prompt_ids)  # [vocab]; then decoder.step(next_id) per token
    """

    def __init__(self, model, tokens: int, *, capture: bool):
        from transformers import StaticCache

        self.model, self.tokens, self.capture = model, tokens, capture
        device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.cache = StaticCache(config=model.config, max_cache_len=tokens)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]
        self.position = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]
        self.slots = torch.arange(tokens, device=device).view(1, 1, 1, tokens)  # [1, 1, 1, kv]
        self.graph = None
        self.logits = None  # the graph's output: last-position logits [vocab]
        self.length = 0  # tokens in the cache

    def prefill(self, input_ids: Sequence[int]) -> torch.Tensor:
        """Reset the cache and run the prompt: its last-position logits [vocab]."""
        if not 0 < len(input_ids) < self.tokens:
            raise ValueError(f"a prompt of {len(input_ids)} tokens does not fit a static cache of "
                             f"{self.tokens}")
        self.cache.reset()
        device = self.ids.device
        ids = torch.tensor([input_ids], device=device)  # [1, seq]
        positions = torch.arange(len(input_ids), device=device)[None]  # [1, seq]
        out = self.model(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True,
                         logits_to_keep=1)
        self.length = len(input_ids)
        return out.logits[0, -1]

    def _step(self) -> torch.Tensor:
        """The decode step, from the fixed-address inputs only (what a graph captures)."""
        # additive, in the activations' dtype: eager attention adds it, SDPA takes it as it is
        keep = self.slots <= self.position.view(1, 1, 1, 1)  # [1, 1, 1, kv]: the cache so far
        mask = torch.zeros(keep.shape, dtype=self.dtype, device=keep.device).masked_fill_(
            ~keep, torch.finfo(self.dtype).min)
        out = self.model(input_ids=self.ids, position_ids=self.position, attention_mask=mask,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]  # [vocab]

    def step(self, token: int) -> torch.Tensor:
        """Append ``token``: the next position's logits [vocab] (a view the next step overwrites
        when the step is a graph)."""
        if self.length >= self.tokens:
            raise ValueError(f"the static cache of {self.tokens} tokens is full")
        self.ids.fill_(token)
        self.position.fill_(self.length)
        self.length += 1
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        logits = self._step()  # eager; on CUDA also the warm-up a capture needs
        if self.capture:
            self._capture()
        return logits

    def _capture(self) -> None:
        self.capture = False  # one try per decoder
        graph = torch.cuda.CUDAGraph()
        # the step adds one to the cache's length tensor: keep it as the eager step left it
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        try:
            with torch.cuda.graph(graph):
                logits = self._step()
        except Exception as err:  # a kernel that cannot be captured: stay eager, say so once
            _say_once(f"capturing the decode step in a CUDA graph failed ({type(err).__name__}: "
                      f"{err}); decoding eagerly")
            return
        finally:
            for layer, length in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(length)
        self.graph, self.logits = graph, logits


def _static_decoder(model, max_length: int) -> StaticDecoder:
    """The model's captured decoder for requests up to ``max_length`` (made again, and captured
    again, when the length rounds to another static cache size)."""
    tokens = static_cache_tokens(max_length, getattr(model.config, "max_position_embeddings",
                                                     max_length))
    decoder = getattr(model, "_glm_static_decoder", None)
    if decoder is None or decoder.tokens != tokens:
        decoder = StaticDecoder(model, tokens, capture=True)
        model._glm_static_decoder = decoder
    return decoder


@torch.inference_mode()
def generate_ids(model, input_ids: list[int], *, max_length: int, temperature: float,
                 top_p: float, stop_ids: Sequence[int],
                 generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids until a stop id or ``max_length`` tokens in total (prompt included).

    On CUDA the decode steps replay one captured CUDA graph over a static cache
    (:class:`StaticDecoder`); on a CPU, or with :data:`GRAPHS_ENV` at 0, each step is a forward
    over a dynamic cache (:func:`decode_step_kind`).
    """
    device = model.get_input_embeddings().weight.device
    kind, why = decode_step_kind(device)
    if kind == "graph":
        _say_once(f"generate_ids: {why}")
        decoder = _static_decoder(model, max_length)
        logits = decoder.prefill(input_ids)
        for _ in range(max_length - len(input_ids)):
            next_id = sample_next(logits, temperature, top_p, generator)
            if next_id in stop_ids:
                return
            yield next_id
            if decoder.length + 1 >= max_length:
                return
            logits = decoder.step(next_id)
        return

    from transformers import DynamicCache

    cache = DynamicCache()
    tokens = torch.tensor([input_ids], device=device)  # [1, seq]
    for _ in range(max_length - len(input_ids)):
        out = model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1)
        next_id = sample_next(out.logits[0, -1], temperature, top_p, generator)
        if next_id in stop_ids:
            return
        yield next_id
        tokens = torch.tensor([[next_id]], device=device)


def stream_chat(model, tokenizer, query: str, history: History = (), *, max_length: int = 8192,
                temperature: float = 0.8, top_p: float = 0.8,
                generator: torch.Generator | None = None) -> Iterator[tuple[str, list]]:
    """Yield ``(response_so_far, history)`` as the answer grows; the last one is final."""
    prompt_ids, _ = fit_history(tokenizer, query, history, max_length)
    history = [tuple(pair) for pair in history]
    new_ids: list[int] = []
    response = ""
    for token in generate_ids(model, prompt_ids, max_length=max_length, temperature=temperature,
                              top_p=top_p, stop_ids=tokenizer.stop_ids, generator=generator):
        new_ids.append(token)
        partial = decode_answer(tokenizer, new_ids, final=False)
        if partial is None:
            continue
        response = partial
        yield response, history + [(query, response)]
    response = decode_answer(tokenizer, new_ids)
    yield response, history + [(query, response)]


def chat(model, tokenizer, query: str, history: History = (), *, max_length: int = 8192,
         temperature: float = 0.8, top_p: float = 0.8,
         generator: torch.Generator | None = None) -> tuple[str, list]:
    """Answer ``query`` after ``history`` (query/response pairs); returns ``(response, history)``.

    ``max_length`` counts prompt and answer tokens; the oldest rounds are dropped when the prompt
    does not fit. ``temperature`` ≤ 0 is greedy. The returned history is the input history plus
    ``(query, response)``.
    """
    response, new_history = "", list(history) + [(query, "")]
    for response, new_history in stream_chat(model, tokenizer, query, history, max_length=max_length,
                                             temperature=temperature, top_p=top_p,
                                             generator=generator):
        pass
    return response, new_history
