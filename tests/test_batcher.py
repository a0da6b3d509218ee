"""The continuous batcher on the embedded tiny model: chat()'s answers, streamed, one request's
trouble kept to itself."""
from __future__ import annotations

import dataclasses
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from builder import TINY_CHECKPOINT, chat, load_chatglm2
from builder.model.generation import NUCLEUS_FIRST_K, PromptTooLongError, sample_rows
from builder.serving.batcher import (Batcher, BatcherConfig, BatcherFullError, BatcherStoppedError,
                                     ChatSampling)

PAST = [("你好", "你好！"), ("1加1等于多少？", "1加1等于2。")]
# (query, history): greetings, arithmetic and 鸡兔同笼 in both languages, one with two past rounds.
QUESTIONS = [("你好", []), ("Who are you?", []), ("3只鸡和2只兔子一共有几条腿？", []),
             ("What is 2 plus 3?", []), ("4加5等于多少？", []), ("2乘以3等于多少？", PAST),
             ("鸡兔同笼，共有10个头，28只脚，鸡和兔子各有几只？", []),
             ("How many legs do 5 chickens and 3 rabbits have?", [])]
LONG_QUESTION = "A cage holds chickens and rabbits: 21 heads and 60 feet. How many of each?"
CONFIG = BatcherConfig(num_blocks=64, block_size=16, max_batch_tokens=256)


def off_main_thread(fn):
    """``fn()`` run in a worker thread, as the batcher's generation loop runs: on a busy 2-core
    machine the main thread's OpenMP team makes a tiny model's decode ~40x slower."""
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def answers(model, tok, questions=QUESTIONS) -> list[tuple[str, list]]:
    return off_main_thread(lambda: [chat(model, tok, q, h, temperature=0) for q, h in questions])


class Updates:
    """The ``(text, history, finished, error)`` calls one request received."""

    def __init__(self):
        self.calls = []

    def __call__(self, text, history, finished, error):
        self.calls.append((text, history, finished, error))

    @property
    def texts(self) -> list[str]:
        return [text for text, *_ in self.calls]


def settled(batcher: Batcher, timeout: float = 10.0):
    """The stats once nothing runs, waits or holds a KV block (the loop frees them a step later)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = batcher.stats()
        idle = stats.running_requests == stats.queued_requests == stats.kv_blocks_used == 0
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


@pytest.fixture(scope="module")
def int4():
    return load_chatglm2(TINY_CHECKPOINT, bits=4, dtype=torch.bfloat16)


@pytest.mark.parametrize("field, value", [("num_blocks", 0), ("block_size", 2),
                                          ("max_batch_tokens", -1), ("max_queue", 1.5)])
def test_config_names_the_bad_field_and_value(field, value):
    kwargs = {"num_blocks": 8, field: value}
    with pytest.raises(ValueError, match=rf"BatcherConfig\.{field} .*got {value!r}"):
        BatcherConfig(**kwargs)


def test_chat_sampling_takes_each_request_s_own_greedy_or_top_p():
    rows = [SimpleNamespace(has_new_token=True, state=SimpleNamespace(logit_processor_kwargs=kwargs))
            for kwargs in ({"temperature": 0.0, "top_p": 1.0}, {"temperature": 0.75, "top_p": 0.625}, {})]
    sampling = ChatSampling()
    storage = torch.zeros(sampling.tensors_required, 4, dtype=torch.int32)
    sampling.fill_defaults(storage[:, 3:])
    args = sampling.prepare_tensor_args(rows, storage)
    assert args.view(torch.float32)[:, :3].tolist() == [[0.0, 0.75, 0.0], [1.0, 0.625, 1.0]]
    assert args.view(torch.float32)[:, 3].tolist() == [0.0, 1.0]  # the defaults: greedy
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.5], [0.0, 3.0, 1.0, 2.9], [1.0, 3.0, 3.0, 0.5]])
    torch.manual_seed(0)
    draws = [sampling(None, scores, args).argmax(-1).tolist() for _ in range(40)]
    assert {d[0] for d in draws} == {1} and {d[2] for d in draws} == {1}  # the first best, ties too
    assert {d[1] for d in draws} == {1, 3}  # top-p 0.625 keeps only the two leading tokens
    out = sampling(None, scores, args)
    assert (out.isfinite().sum(-1) == 1).all()  # only the chosen token is left to the arg-max


@pytest.mark.parametrize("sync_free", [False, True])
def test_sample_rows_finds_the_whole_nucleus_beyond_its_first_guess(sync_free):
    vocab = 4 * NUCLEUS_FIRST_K
    logits = torch.zeros(2, vocab)  # flat: the nucleus of top-p 0.9 holds 90% of the vocabulary
    logits[1, 7] = 50.0  # peaked: its nucleus is one token
    temperature, top_p = torch.tensor([1.0, 1.0]), torch.tensor([0.9, 0.9])
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_rows(logits, temperature, top_p, g, sync_free=sync_free)
                         for _ in range(300)])
    assert draws[:, 1].unique().tolist() == [7]
    assert draws[:, 0].unique().numel() > NUCLEUS_FIRST_K  # drawn from past the first 64
    assert torch.equal(sample_rows(logits, torch.zeros(2), top_p, sync_free=sync_free),
                       torch.tensor([0, 7]))


def check_eight_questions(model, tok):
    expected = answers(model, tok)
    updates = [Updates() for _ in QUESTIONS]
    with Batcher(model, tok, CONFIG) as batcher:
        handles = [batcher.submit(q, h, max_length=256, temperature=0, on_update=u)
                   for (q, h), u in zip(QUESTIONS, updates)]
        assert all(handle.wait(30) for handle in handles)
        stats = settled(batcher)
    for (response, history), u, handle in zip(expected, updates, handles):
        assert u.calls[-1] == (response, history, True, None)
        assert [finished for _, _, finished, _ in u.calls] == [False] * (len(u.calls) - 1) + [True]
        assert all(b.startswith(a) for a, b in zip(u.texts, u.texts[1:]))  # a growing answer
        assert handle.time_to_first_token_s > 0
    assert stats.finished_requests == 8 and stats.failed_requests == stats.cancelled_requests == 0
    assert stats.kv_blocks_free == stats.kv_blocks_total == 64
    assert len(stats.time_to_first_token_s) == 8 and stats.generated_tokens > 8


def test_eight_questions_at_once_get_chats_answers_streamed(tiny):
    check_eight_questions(*tiny)


def test_int4_bfloat16_model_gets_chats_answers_too(int4):
    check_eight_questions(*int4)


def test_a_cancelled_request_leaves_the_batch_and_gives_its_blocks_back(tiny):
    model, tok = tiny
    (short, short_history), = answers(model, tok, [QUESTIONS[2]])
    others = [Updates(), Updates()]
    with Batcher(model, tok, CONFIG) as batcher:
        cancelled, submitted, seen = Updates(), threading.Event(), {}

        def cancel_at_first_update(*call):
            # recorded here, asserted below: the batcher only logs what on_update raises
            cancelled(*call)
            submitted.wait(5)
            seen["blocks_before"] = batcher.stats().kv_blocks_used
            seen["cancel"] = long_request.cancel()  # from inside on_update: no further call after this

        long_request = batcher.submit(LONG_QUESTION, max_length=256, temperature=0,
                                      on_update=cancel_at_first_update)
        submitted.set()
        handles = [batcher.submit(QUESTIONS[2][0], max_length=256, temperature=0, on_update=u)
                   for u in others]
        assert all(handle.wait(30) for handle in handles)
        # The long answer needs ~40 steps, the short ones ~20: had it stayed, it would still run.
        stats = settled(batcher)
        assert stats.running_requests == 0 and stats.kv_blocks_used == 0
    assert seen == {"blocks_before": seen["blocks_before"], "cancel": True}
    assert seen["blocks_before"] > 0
    assert long_request.cancelled and long_request.done and not long_request.cancel()
    assert len(cancelled.calls) == 1 and cancelled.calls[0][2] is False
    assert [u.calls[-1] for u in others] == [(short, short_history, True, None)] * 2
    assert (stats.cancelled_requests, stats.finished_requests) == (1, 2)
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_a_chats_next_turn_reuses_its_history_s_blocks_and_answers_the_same(tiny):
    """Each turn of a chat resends its history: with 16-token pages (a CPU plan's) the next turn
    finds the previous turns' whole blocks in the pool instead of prefilling them again (counted in
    ``reused_prompt_tokens``), and answers what ``chat()`` answers from scratch."""
    model, tok = tiny
    turns = [q for q, _ in QUESTIONS[4:7]]
    expected, history = [], []
    for query in turns:
        (response, history), = answers(model, tok, [(query, history)])
        expected.append((response, history))
    prompts = [len(tok.build_chat_input(q, h)) for q, (_, h) in zip(turns, [([], [])] + expected)]
    got, history, reused = [], [], []
    with Batcher(model, tok, CONFIG) as batcher:
        for query in turns:
            update, before = Updates(), batcher.stats().reused_prompt_tokens
            assert batcher.submit(query, history, max_length=256, temperature=0,
                                  on_update=update).wait(30)
            got.append(update.calls[-1][:2])
            history = got[-1][1]
            reused.append(batcher.stats().reused_prompt_tokens - before)
        stats = settled(batcher)
    assert got == expected
    # the first turn finds nothing; each later one at least its previous prompt's whole blocks
    assert reused[0] == 0, (reused, prompts)
    for turn in (1, 2):
        assert reused[turn] >= prompts[turn - 1] // 16 * 16 > 0, (reused, prompts)
        assert reused[turn] < prompts[turn]
    assert stats.prompt_tokens == sum(prompts) and stats.reused_prompt_tokens == sum(reused)
    assert stats.kv_blocks_used == 0 and stats.finished_requests == 3


def test_without_prefix_sharing_nothing_is_found_in_the_pool(tiny):
    model, tok = tiny
    (response, history), = answers(model, tok, [(QUESTIONS[4][0], [])])
    with Batcher(model, tok, dataclasses.replace(CONFIG, prefix_sharing=False)) as batcher:
        for query, past in ((QUESTIONS[4][0], []), (QUESTIONS[5][0], history)):
            assert batcher.submit(query, past, max_length=256, temperature=0,
                                  on_update=Updates()).wait(30)
        stats = settled(batcher)
    assert stats.reused_prompt_tokens == 0 and stats.prompt_tokens > 0


def test_bad_requests_fail_alone(tiny):
    model, tok = tiny
    expected = answers(model, tok, QUESTIONS[:2])
    good = [Updates(), Updates()]
    broken = Updates()

    def send_fails(*call):
        broken(*call)
        if not call[2]:
            raise ConnectionError("client went away")

    with Batcher(model, tok, CONFIG) as batcher:
        handles = [batcher.submit(q, h, max_length=256, temperature=0, on_update=u)
                   for (q, h), u in zip(QUESTIONS[:2], good)]
        failing = batcher.submit(LONG_QUESTION, max_length=256, temperature=0, on_update=send_fails)
        with pytest.raises(PromptTooLongError, match="max_length=8"):
            batcher.submit(QUESTIONS[2][0], max_length=8, temperature=0, on_update=Updates())
        with pytest.raises(ValueError, match="KV pool holds .* 1024 tokens"):
            batcher.submit("你好", max_length=2048, temperature=0, on_update=Updates())
        with pytest.raises(ValueError, match="temperature .* got -0.5"):
            batcher.submit("你好", max_length=64, temperature=-0.5, on_update=Updates())
        with pytest.raises(ValueError, match="top_p .* got 0"):
            batcher.submit("你好", max_length=64, temperature=0.5, top_p=0, on_update=Updates())
        assert all(handle.wait(30) for handle in handles + [failing])
        stats = settled(batcher)
    assert [u.calls[-1] for u in good] == [(r, h, True, None) for r, h in expected]
    assert isinstance(failing.error, ConnectionError) and broken.calls[-1][2] is True
    assert (stats.finished_requests, stats.failed_requests, stats.kv_blocks_used) == (2, 1, 0)
    with pytest.raises(BatcherStoppedError):
        batcher.submit("你好", max_length=64, temperature=0, on_update=Updates())


def test_sampling_and_greedy_requests_share_the_batch(tiny):
    model, tok = tiny
    (response, history), = answers(model, tok, QUESTIONS[:1])
    greedy, sampled = Updates(), Updates()
    with Batcher(model, tok, BatcherConfig(num_blocks=64, block_size=16, seed=0)) as batcher:
        handles = [batcher.submit("Hello", max_length=256, temperature=0.9, top_p=0.9,
                                  on_update=sampled),
                   batcher.submit(QUESTIONS[0][0], max_length=256, temperature=0, on_update=greedy)]
        assert all(handle.wait(30) for handle in handles)
    assert greedy.calls[-1] == (response, history, True, None)
    text, sampled_history, finished, error = sampled.calls[-1]
    assert finished and error is None and sampled_history == [("Hello", text)]


def test_a_full_queue_refuses_and_stop_fails_what_still_runs(tiny):
    model, tok = tiny
    batcher = Batcher(model, tok, BatcherConfig(num_blocks=64, block_size=16, max_queue=2))
    batcher.start()
    waiting = [Updates(), Updates()]
    with batcher._manager.pause():  # transformers' loop holds still: nothing gets a first token
        handles = [batcher.submit(q, max_length=256, temperature=0, on_update=u)
                   for (q, _), u in zip(QUESTIONS, waiting)]
        with pytest.raises(BatcherFullError, match="max_queue=2"):
            batcher.submit("你好", max_length=256, temperature=0, on_update=Updates())
        assert batcher.stats().queued_requests == 2
    batcher.stop()
    for handle, u in zip(handles, waiting):
        assert handle.done and u.calls[-1][2] is True
        assert isinstance(handle.error, BatcherStoppedError)  # never a finished answer
