"""The engine end to end on a small Llama: HF-equal greedy output, batching, sampling, admission, life."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lockstep.core.errors import BadRequest, NotReady, Overloaded
from lockstep.engine import Engine, FinalEvent, FinishReason, SamplingParams, TokenEvent
from lockstep.engine.engine import queue_full

from . import CORPUS, encode, hf_greedy, llama, tokenizer

PROMPTS = [
    "The quick brown fox",
    "Emoji 😀 and 🚀",
    "a",
    "Numbers: one two three four five six seven eight nine ten. The engine streams tokens",
    "Café, naïve",
    "The client reads them",
    "日本語",
    "A small model writes a short story about",
]
TIMEOUT = 60.0  # seconds a test waits for a request before failing (a hang, not a speed check)


@pytest.fixture(scope="module")
def model() -> Any:
    return llama(seed=0)


@pytest.fixture
def engine(model: Any) -> Iterator[Engine]:
    eng = Engine(model, tokenizer(), max_batch_size=8, max_queue=64, max_context=256)
    yield eng
    eng.close()


class Gate:
    """Blocks the engine thread inside a forward (hook on lm_head) until opened: a deterministic pause."""

    def __init__(self, model: Any) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self._hook = model.lm_head.register_forward_hook(self._wait)

    def _wait(self, module: Any, args: Any, output: Any) -> None:
        self.entered.set()
        assert self.open.wait(TIMEOUT), "gate never opened"

    def remove(self) -> None:
        self.open.set()
        self._hook.remove()


def open_when_stopping(eng: Engine, gate: Gate) -> None:
    for _ in range(int(TIMEOUT * 1000)):  # bounded wait for stop() to run in the test thread
        if not eng.accepting:
            break
        time.sleep(0.001)
    gate.open.set()


def first_token(handle: Any) -> TokenEvent:
    for event in handle:
        if isinstance(event, TokenEvent):
            return event
    raise AssertionError("request ended without a token")


def test_greedy_matches_hf_generate_alone(engine: Engine, model: Any) -> None:
    engine.start()
    prompt = encode(PROMPTS[0])
    final = engine.generate(prompt, SamplingParams(max_new_tokens=24), timeout=TIMEOUT)
    assert list(final.token_ids) == hf_greedy(model, prompt, 24)
    assert engine.backend == "llama"
    assert final.prompt_tokens == len(prompt)
    assert final.completion_tokens == len(final.token_ids)


def test_greedy_matches_hf_when_eight_join_at_different_times(engine: Engine, model: Any) -> None:
    engine.start()
    lengths = [24, 9, 17, 30, 5, 21, 12, 27]  # leave at different steps: slots get compacted
    handles = []
    for text, n in zip(PROMPTS, lengths, strict=True):
        handles.append(engine.submit(encode(text), SamplingParams(max_new_tokens=n)))
        first_token(handles[-1])  # the next one joins only after this one is decoding
    for text, n, handle in zip(PROMPTS, lengths, handles, strict=True):
        assert list(handle.result(TIMEOUT).token_ids) == hf_greedy(model, encode(text), n), text


def test_greedy_matches_hf_with_padded_prefill_and_a_queue(model: Any) -> None:
    # Submitted before start: one padded prefill, and batch 3 < 8 requests, so slots are reused.
    eng = Engine(model, tokenizer(), max_batch_size=3, max_context=128, prefill_token_budget=64)
    try:
        lengths = [7, 15, 3, 11, 9, 1, 13, 5]
        handles = [eng.submit(encode(t), SamplingParams(max_new_tokens=n))
                   for t, n in zip(PROMPTS, lengths, strict=True)]
        eng.start()
        for text, n, handle in zip(PROMPTS, lengths, handles, strict=True):
            assert list(handle.result(TIMEOUT).token_ids) == hf_greedy(model, encode(text), n), text
    finally:
        eng.close()


def test_streamed_text_is_the_final_text(engine: Engine) -> None:
    engine.start()
    handle = engine.submit(encode(PROMPTS[1]), SamplingParams(max_new_tokens=30, temperature=1.0, seed=3))
    events = list(handle)
    final = events[-1]
    assert isinstance(final, FinalEvent)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert "".join(e.text for e in tokens) == final.text
    assert [t for e in tokens for t in e.token_ids] == list(final.token_ids)
    assert final.text == tokenizer().decode(list(final.token_ids), skip_special_tokens=True)
    assert final.ttft_s is not None and 0 <= final.ttft_s <= final.latency_s


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    engine.start()
    prompt = encode(PROMPTS[0])
    params = SamplingParams(max_new_tokens=20, temperature=1.5, top_p=0.95, top_k=100, seed=1234)
    alone = engine.generate(prompt, params, timeout=TIMEOUT).token_ids
    # Again, this time sharing the batch with other sampled requests.
    others = [engine.submit(encode(t), SamplingParams(max_new_tokens=20, temperature=1.0))
              for t in PROMPTS[1:4]]
    together = engine.generate(prompt, params, timeout=TIMEOUT).token_ids
    reseeded = engine.generate(prompt, SamplingParams(**{**params.__dict__, "seed": 99}), timeout=TIMEOUT)
    for handle in others:
        handle.result(TIMEOUT)
    assert alone == together
    assert reseeded.token_ids != alone


def test_logprobs_are_the_models_for_each_generated_token(engine: Engine, model: Any) -> None:
    """Each token's log-probability is the model's, in the distribution the request draws from, also batched."""
    engine.start()
    asks = [(PROMPTS[0], SamplingParams(max_new_tokens=12, logprobs=True)),
            (PROMPTS[3], SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, seed=11, logprobs=True)),
            (PROMPTS[5], SamplingParams(max_new_tokens=12, temperature=1.2, seed=12))]
    handles = [engine.submit(encode(text), params) for text, params in asks]
    events = [list(h) for h in handles]
    for (text, params), stream in zip(asks, events, strict=True):
        final = stream[-1]
        assert isinstance(final, FinalEvent)
        if not params.logprobs:
            assert final.logprobs is None and all(e.logprobs is None for e in stream[:-1])
            continue
        assert final.logprobs is not None and len(final.logprobs) == len(final.token_ids)
        assert [x for e in stream[:-1] if isinstance(e, TokenEvent) for x in e.logprobs or ()] == list(final.logprobs)
        prompt = encode(text)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(final.token_ids)])).logits[0, len(prompt) - 1: -1].float()
        scaled = logits / (params.temperature or 1.0)
        if params.top_k:
            scaled = scaled.masked_fill(scaled < scaled.topk(params.top_k, -1).values[:, -1:], float("-inf"))
        expected = torch.log_softmax(scaled, -1).gather(-1, torch.tensor(final.token_ids).unsqueeze(-1))
        torch.testing.assert_close(torch.tensor(final.logprobs), expected.squeeze(-1), atol=1e-3, rtol=0)


def test_asking_for_logprobs_keeps_the_answer(engine: Engine) -> None:
    engine.start()
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=5)
    plain = engine.generate(encode(PROMPTS[1]), params, timeout=TIMEOUT)
    asked = engine.generate(encode(PROMPTS[1]), SamplingParams(**{**params.__dict__, "logprobs": True}),
                            timeout=TIMEOUT)
    assert asked.token_ids == plain.token_ids and plain.logprobs is None


def test_top_k_one_is_greedy(engine: Engine) -> None:
    engine.start()
    prompt = encode(PROMPTS[3])
    greedy = engine.generate(prompt, SamplingParams(max_new_tokens=16), timeout=TIMEOUT)
    top1 = engine.generate(prompt, SamplingParams(max_new_tokens=16, temperature=1.3, top_k=1, seed=7),
                           timeout=TIMEOUT)
    assert top1.token_ids == greedy.token_ids


def test_stop_string_cuts_the_text_before_it(engine: Engine) -> None:
    engine.start()
    prompt = encode(PROMPTS[0])
    full = engine.generate(prompt, SamplingParams(max_new_tokens=30, ignore_eos=True), timeout=TIMEOUT)
    assert len(full.text) > 12
    stop = full.text[8:11]
    cut = full.text[: full.text.find(stop)]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, stop=(stop, "\x00never"))
    handle = engine.submit(prompt, params)
    events = list(handle)
    final = events[-1]
    assert isinstance(final, FinalEvent)
    assert final.finish_reason == FinishReason.STOP == "stop"
    assert final.text == cut
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == cut
    assert final.completion_tokens < 30


def test_max_new_tokens_ends_with_length(engine: Engine) -> None:
    engine.start()
    params = SamplingParams(max_new_tokens=7, ignore_eos=True)
    final = engine.generate(encode(PROMPTS[2]), params, timeout=TIMEOUT)
    assert final.finish_reason == "length"
    assert final.completion_tokens == len(final.token_ids) == 7


def test_eos_ends_with_stop(model: Any) -> None:
    eos = tokenizer().eos_token_id
    with torch.no_grad():
        saved = model.lm_head.weight[eos].clone()
        model.lm_head.weight[eos] = model.lm_head.weight.sum(0)  # eos now wins after a few tokens
    eng = Engine(model, tokenizer(), max_batch_size=2).start()
    try:
        prompt = encode(PROMPTS[0])
        final = eng.generate(prompt, SamplingParams(max_new_tokens=50), timeout=TIMEOUT)
        assert final.finish_reason == "stop"
        assert final.token_ids[-1] == eos
        assert list(final.token_ids) == hf_greedy(model, prompt, 50)
        ignoring = eng.generate(prompt, SamplingParams(max_new_tokens=50, ignore_eos=True), timeout=TIMEOUT)
        assert ignoring.completion_tokens == 50
    finally:
        eng.close()
        with torch.no_grad():
            model.lm_head.weight[eos] = saved


def test_context_length_is_checked_at_submit(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_context=32)
    try:
        with pytest.raises(BadRequest, match="32"):
            eng.submit(list(range(2, 30)), SamplingParams(max_new_tokens=5))
        eng.submit(list(range(2, 30)), SamplingParams(max_new_tokens=4))  # exactly 32: accepted
        with pytest.raises(BadRequest, match="empty"):
            eng.submit([], SamplingParams())
        with pytest.raises(BadRequest, match="vocabulary"):
            eng.submit([5, 10_000], SamplingParams())
    finally:
        eng.close()


def test_full_queue_raises_overloaded(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=1, max_queue=2)
    try:
        first = eng.submit([5, 6], SamplingParams(max_new_tokens=2))  # the free slot's, at the next step
        eng.submit([7, 8], SamplingParams(max_new_tokens=2))
        eng.submit([3, 4], SamplingParams(max_new_tokens=2))
        with pytest.raises(Overloaded) as err:
            eng.submit([9], SamplingParams(max_new_tokens=2))
        assert err.value.retry_after_s > 0
        assert eng.queue_depth == 3
        first.cancel()  # a queued request leaves at once, making room
        assert first.result(0).finish_reason == "cancelled"
        eng.submit([9], SamplingParams(max_new_tokens=2))
    finally:
        eng.close()


def test_a_full_queue_says_how_many_wait_and_the_retry_after_it_sends(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=1, max_queue=2)  # not started: what is queued stays queued
    try:
        # A burst before the engine steps: the free slot takes one, and two more may wait for a slot.
        for prompt in ([4, 5], [5, 6], [7, 8]):
            eng.submit(prompt, SamplingParams(max_new_tokens=2))
        with pytest.raises(Overloaded) as err:
            eng.submit([9], SamplingParams(max_new_tokens=2))
        header = max(1, round(err.value.retry_after_s))  # what core.http puts in Retry-After
        assert "(2 requests waiting, at most 2)" in str(err.value)
        assert f"retry after {header} s" in str(err.value) and err.value.retry_after_s == header
    finally:
        eng.close()


@pytest.mark.parametrize(("latency_s", "retry_s"), [(None, 1), (0.05, 1), (2.4, 3), (500.0, 30)])
def test_the_retry_time_of_a_full_queue_is_whole_seconds_as_retry_after_carries(
    latency_s: float | None, retry_s: int
) -> None:
    refusal = queue_full(3, 4, latency_s)
    assert refusal.retry_after_s == retry_s and f"retry after {retry_s} s" in str(refusal)
    assert "(3 requests waiting, at most 4)" in str(refusal)


def test_cancel_frees_the_slot(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=1).start()
    gate = Gate(model)
    try:
        long = eng.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=200, ignore_eos=True))
        gate.entered.wait(TIMEOUT)
        waiting = eng.submit(encode(PROMPTS[1]), SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert (eng.running, eng.queue_depth) == (1, 1)
        long.cancel()
        gate.remove()
        cancelled = long.result(TIMEOUT)
        assert cancelled.finish_reason == "cancelled"
        assert cancelled.completion_tokens < 200
        assert waiting.result(TIMEOUT).completion_tokens == 4
        assert eng.wait_idle(TIMEOUT) and eng.running == 0
    finally:
        gate.remove()
        eng.close()


def test_stop_with_drain_completes_admitted_requests(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=2).start()
    handles = [eng.submit(encode(t), SamplingParams(max_new_tokens=10, ignore_eos=True)) for t in PROMPTS[:5]]
    assert eng.stop(drain=True, timeout=TIMEOUT)
    assert [h.result(0).finish_reason for h in handles] == ["length"] * 5
    assert not eng.is_running
    with pytest.raises(NotReady):
        eng.submit([5], SamplingParams())
    eng.close()


def test_stop_without_drain_cancels(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=1).start()
    gate = Gate(model)
    try:
        running = eng.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=100, ignore_eos=True))
        gate.entered.wait(TIMEOUT)
        queued = eng.submit(encode(PROMPTS[1]), SamplingParams(max_new_tokens=100))
        opener = threading.Thread(target=open_when_stopping, args=(eng, gate))
        opener.start()  # the blocked step ends only after stop() flagged the engine
        assert eng.stop(drain=False) is False
        assert running.result(0).finish_reason == "cancelled"
        assert queued.result(0).finish_reason == "cancelled"
        assert queued.result(0).completion_tokens == 0
        opener.join()
    finally:
        gate.remove()
        eng.close()


def test_pause_wait_idle_resume(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=4).start()
    gate = Gate(model)
    try:
        running = eng.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=6, ignore_eos=True))
        gate.entered.wait(TIMEOUT)
        eng.pause_admission()
        queued = eng.submit(encode(PROMPTS[1]), SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert eng.wait_idle(timeout=0.05) is False  # the gated request still runs
        gate.remove()
        assert eng.wait_idle(timeout=TIMEOUT) is True
        assert running.result(0).finish_reason == "length"
        assert not queued.done and eng.queue_depth == 1 and eng.running == 0
        eng.resume_admission()
        assert queued.result(TIMEOUT).completion_tokens == 6
    finally:
        gate.remove()
        eng.close()


def test_async_iteration(engine: Engine) -> None:
    engine.start()

    async def collect(text: str) -> list[Any]:
        handle = engine.submit(encode(text), SamplingParams(max_new_tokens=12, ignore_eos=True))
        return [event async for event in handle.aiter()]

    async def main() -> list[list[Any]]:
        return await asyncio.gather(*(collect(t) for t in PROMPTS[:3]))

    for text, events in zip(PROMPTS[:3], asyncio.run(main()), strict=True):
        final = events[-1]
        assert isinstance(final, FinalEvent) and final.completion_tokens == 12
        assert sum(isinstance(e, TokenEvent) for e in events) == 12
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        sync = engine.generate(encode(text), params, timeout=TIMEOUT)
        assert final.token_ids == sync.token_ids


def test_nan_logits_fail_only_that_request(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=4)

    def poison_row0(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if output.shape[0] == 2:  # the step that holds both requests: slot 0 is the first one
            output = output.clone()
            output[0] = float("nan")
        return output

    hook = model.lm_head.register_forward_hook(poison_row0)
    try:
        victim = eng.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=8, ignore_eos=True))
        healthy = eng.submit(encode(PROMPTS[1]), SamplingParams(max_new_tokens=8, ignore_eos=True))
        eng.start()
        failed = victim.result(TIMEOUT)
        assert failed.finish_reason == "error" and "non-finite" in (failed.error or "")
        assert healthy.result(TIMEOUT).finish_reason == "length"
    finally:
        hook.remove()
    assert eng.generate([5, 6, 7], SamplingParams(max_new_tokens=3), timeout=TIMEOUT).completion_tokens == 3
    eng.close()


def test_a_step_that_keeps_failing_fails_its_request_not_the_engine(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=4).start()
    calls = {"n": 0}

    def boom(module: Any, args: Any, output: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] >= 3:  # every decode step from the second on, the retry of the step alone included
            raise RuntimeError("injected failure")

    hook = model.lm_head.register_forward_hook(boom)
    try:
        final = eng.generate(encode(PROMPTS[0]), SamplingParams(max_new_tokens=8), timeout=TIMEOUT)
    finally:
        hook.remove()
    assert final.finish_reason == "error"
    assert "injected failure" in (final.error or "")
    assert final.completion_tokens == 2
    assert eng.is_running
    after = eng.generate([5, 6, 7], SamplingParams(max_new_tokens=3), timeout=TIMEOUT)
    assert after.finish_reason == "length"
    assert eng.finished_total == {"error": 1, "length": 1}
    eng.close()


def test_counters(engine: Engine) -> None:
    engine.start()
    before = engine.generated_tokens_total
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    handles = [engine.submit(encode(t), params) for t in PROMPTS[:3]]
    for handle in handles:
        handle.result(TIMEOUT)
    assert engine.generated_tokens_total - before == 15
    assert engine.wait_idle(TIMEOUT)
    assert (engine.queue_depth, engine.running) == (0, 0)
    assert engine.requests_total >= 3


def test_close_releases_the_model() -> None:
    model = llama(seed=2)
    ref = weakref.ref(model)
    eng = Engine(model, tokenizer(), max_batch_size=2).start()
    eng.generate([5, 6, 7], SamplingParams(max_new_tokens=3), timeout=TIMEOUT)
    eng.close()
    assert eng.kv_cache_bytes == 0
    del model
    gc.collect()
    assert ref() is None


def test_generic_backend_matches_llama_backend(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=4, backend="hf").start()
    try:
        assert eng.backend == "hf"
        handles = [eng.submit(encode(t), SamplingParams(max_new_tokens=10)) for t in PROMPTS[:4]]
        for text, handle in zip(PROMPTS[:4], handles, strict=True):
            assert list(handle.result(TIMEOUT).token_ids) == hf_greedy(model, encode(text), 10)
    finally:
        eng.close()


class ArrivalsDuringSteps:
    """Wraps an engine's runner so that requests arrive at the first interleave point of decode steps.

    ``plan`` holds (prompt, params) to submit, one per step; ``inside`` records, per arrival, how many
    tokens the engine generated during the interleave call that followed it (1: the newcomer's first
    token came inside the step, before the running batch's tokens).
    """

    def __init__(self, eng: Engine, plan: list[tuple[list[int], SamplingParams]]) -> None:
        self.eng, self.plan = eng, list(plan)
        self.handles: list[Any] = []
        self.inside: list[int] = []
        self.interleave_given: list[bool] = []
        runner = eng._runner
        assert runner is not None
        self._decode = runner.decode
        runner.decode = self._wrapped  # type: ignore[method-assign]

    def _wrapped(self, tokens: list[int], positions: list[int], interleave: Any = None) -> torch.Tensor:
        self.interleave_given.append(interleave is not None)
        if not self.plan or interleave is None:
            return self._decode(tokens, positions, interleave)
        prompt, params = self.plan.pop(0)
        pending = [True]

        def arrive_then_interleave() -> None:
            if pending:
                pending.clear()
                self.handles.append(self.eng.submit(prompt, params))
                before = self.eng.generated_tokens_total
                interleave()
                self.inside.append(self.eng.generated_tokens_total - before)
            else:
                interleave()

        return self._decode(tokens, positions, arrive_then_interleave)


@pytest.mark.parametrize("backend", ["llama", "hf"])
def test_arrivals_are_prefilled_inside_a_running_step_and_stay_exact(model: Any, backend: str) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=8, max_context=256, backend=backend, interleave_prefill=True)
    try:
        # Lengths include 1 (ends inside the step it joined: its slot goes to another newcomer) and short
        # ones that leave while long ones run, so slots are compacted around the newcomers.
        lengths = [1, 9, 2, 17, 1, 5]
        plan = [(encode(t), SamplingParams(max_new_tokens=n)) for t, n in zip(PROMPTS[2:], lengths, strict=True)]
        arrivals = ArrivalsDuringSteps(eng, plan)
        # Two running requests: the generic backend's interleave points lie between sequences.
        running = [eng.submit(encode(t), SamplingParams(max_new_tokens=40)) for t in PROMPTS[:2]]
        eng.start()
        for text, handle in zip(PROMPTS[:2], running, strict=True):
            assert list(handle.result(TIMEOUT).token_ids) == hf_greedy(model, encode(text), 40)
        assert arrivals.inside == [1] * len(lengths)  # each first token came before its step ended
        for (prompt, params), handle in zip(plan, arrivals.handles, strict=True):
            assert list(handle.result(TIMEOUT).token_ids) == hf_greedy(model, prompt, params.max_new_tokens)
        assert eng.wait_idle(TIMEOUT) and eng.running == 0
    finally:
        eng.close()


def test_interleaving_can_be_turned_off(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=4, max_context=256, interleave_prefill=False)
    try:
        arrivals = ArrivalsDuringSteps(eng, [])
        eng.start()
        eng.generate(encode(PROMPTS[0]), SamplingParams(max_new_tokens=6), timeout=TIMEOUT)
        assert arrivals.interleave_given and not any(arrivals.interleave_given)
    finally:
        eng.close()


@pytest.mark.parametrize("backend", ["llama", "hf"])
def test_without_interleaving_arrivals_join_the_next_steps_forward_pass_and_stay_exact(model: Any,
                                                                                       backend: str) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=8, max_context=256, backend=backend, interleave_prefill=False)
    runner = eng._runner
    assert runner is not None
    fused: list[tuple[int, int]] = []  # (decode rows, prompts) of each fused step
    real_step = runner.step

    def recording_step(tokens: list[int], positions: list[int], prompts: list[list[int]],
                       slots: list[int]) -> torch.Tensor:
        fused.append((len(tokens), len(prompts)))
        return real_step(tokens, positions, prompts, slots)

    runner.step = recording_step  # type: ignore[method-assign]
    try:
        running = eng.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=40))
        eng.start()
        first_token(running)
        # Lengths include 1 (ends in the step it joined) and short ones that leave while the long one runs.
        lengths = [1, 9, 2, 17, 1, 5]
        handles = []
        for text, n in zip(PROMPTS[2:], lengths, strict=True):
            handles.append(eng.submit(encode(text), SamplingParams(max_new_tokens=n)))
            first_token(handles[-1])
        for text, n, handle in zip(PROMPTS[2:], lengths, handles, strict=True):
            assert list(handle.result(TIMEOUT).token_ids) == hf_greedy(model, encode(text), n), text
        assert list(running.result(TIMEOUT).token_ids) == hf_greedy(model, encode(PROMPTS[0]), 40)
        assert len(fused) == len(lengths) and all(rows >= 1 and prompts == 1 for rows, prompts in fused)
    finally:
        eng.close()


def test_a_burst_joins_a_running_batch_in_waves_within_the_step_budget(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=8, max_context=256, step_prefill_tokens=8)
    runner = eng._runner
    assert runner is not None
    waves: list[int] = []
    real_prefill = runner.prefill

    def recording_prefill(prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        waves.append(len(prompts))
        return real_prefill(prompts, slots)

    real_step = runner.step

    def recording_step(tokens: list[int], positions: list[int], prompts: list[list[int]],
                       slots: list[int]) -> torch.Tensor:
        waves.append(len(prompts))  # newcomers fused into a decode step
        return real_step(tokens, positions, prompts, slots)

    runner.prefill = recording_prefill  # type: ignore[method-assign]
    runner.step = recording_step  # type: ignore[method-assign]
    burst = [[5 + i, 9, 11, 13] for i in range(6)]  # 4 tokens each: two fit in a step's 8
    try:
        idle = [eng.submit(p, SamplingParams(max_new_tokens=3)) for p in burst[:4]]
        eng.start()
        for handle in idle:
            handle.result(TIMEOUT)
        assert waves == [4]  # an idle engine takes everything waiting (within prefill_token_budget)
        waves.clear()
        gate = Gate(model)
        long = eng.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=30))
        assert gate.entered.wait(TIMEOUT)  # the engine is inside long's prefill: the burst queues up
        handles = [eng.submit(p, SamplingParams(max_new_tokens=5)) for p in burst]
        gate.remove()
        for prompt, handle in zip(burst, handles, strict=True):
            assert list(handle.result(TIMEOUT).token_ids) == hf_greedy(model, prompt, 5)
        assert list(long.result(TIMEOUT).token_ids) == hf_greedy(model, encode(PROMPTS[0]), 30)
        assert waves == [1, 2, 2, 2]  # long alone, then the burst two per step beside it
    finally:
        eng.close()


class ChunkLog:
    """Records each ``prefill_chunk`` call: (start, tokens, tokens generated so far by the engine)."""

    def __init__(self, eng: Engine, after_first: Any = None) -> None:
        self.calls: list[tuple[int, int, int]] = []
        runner = eng._runner
        assert runner is not None
        real = runner.prefill_chunk

        def recording(tokens: list[int], slot: int, start: int) -> torch.Tensor:
            self.calls.append((start, len(tokens), eng.generated_tokens_total))
            logits = real(tokens, slot, start)
            if after_first is not None and len(self.calls) == 1:
                after_first()
            return logits

        runner.prefill_chunk = recording  # type: ignore[method-assign]


LONG_TEXT = " ".join(CORPUS[:4])  # about 100 tokens: several 16-token chunks


@pytest.mark.parametrize("backend", ["llama", "hf"])
def test_long_prompts_are_prefilled_in_chunks_while_the_batch_decodes_and_stay_exact(
        model: Any, backend: str) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=4, max_context=256, backend=backend, prefill_chunk_tokens=16)
    chunks = ChunkLog(eng)
    long_a, long_b = encode(LONG_TEXT), encode(" ".join(CORPUS[2:4]))
    assert len(long_a) > 3 * 16 and len(long_b) > 16
    try:
        eng.start()
        running = eng.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=120))
        first_token(running)
        # Two long prompts (one at a time in the chunk slot, FIFO) and a short one queued behind them; B ends
        # on its first token, right after it joins.
        handles = [(long_a, 12, eng.submit(long_a, SamplingParams(max_new_tokens=12))),
                   (long_b, 1, eng.submit(long_b, SamplingParams(max_new_tokens=1))),
                   (encode(PROMPTS[2]), 6, eng.submit(encode(PROMPTS[2]), SamplingParams(max_new_tokens=6)))]
        for prompt, n, handle in handles:
            assert list(handle.result(TIMEOUT).token_ids) == hf_greedy(model, prompt, n)
        assert list(running.result(TIMEOUT).token_ids) == hf_greedy(model, encode(PROMPTS[0]), 120)
        starts = [start for start, _, _ in chunks.calls]
        assert starts == list(range(0, len(long_a), 16)) + list(range(0, len(long_b), 16))
        assert sum(n for _, n, _ in chunks.calls) == len(long_a) + len(long_b)
        generated = [g for _, _, g in chunks.calls[: len(range(0, len(long_a), 16))]]
        assert generated == sorted(set(generated))  # the batch decoded between every two chunks
        assert eng.wait_idle(TIMEOUT) and eng.running == 0
    finally:
        eng.close()


def test_an_idle_engine_prefills_a_long_prompt_whole_and_zero_turns_chunking_off(model: Any) -> None:
    for chunk_tokens in (16, 0):
        eng = Engine(model, tokenizer(), max_batch_size=4, max_context=256, prefill_chunk_tokens=chunk_tokens)
        chunks = ChunkLog(eng)
        try:
            eng.start()
            alone = eng.generate(encode(LONG_TEXT), SamplingParams(max_new_tokens=4), timeout=TIMEOUT)
            assert list(alone.token_ids) == hf_greedy(model, encode(LONG_TEXT), 4)
            assert chunks.calls == []  # nobody was decoding: nothing to keep waiting
            running = eng.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=40))
            first_token(running)
            beside = eng.generate(encode(LONG_TEXT), SamplingParams(max_new_tokens=4), timeout=TIMEOUT)
            assert list(beside.token_ids) == hf_greedy(model, encode(LONG_TEXT), 4)
            assert bool(chunks.calls) == bool(chunk_tokens), chunk_tokens
            running.result(TIMEOUT)
        finally:
            eng.close()


def test_a_long_prompt_cancelled_between_chunks_frees_its_slot(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=2, max_context=256, prefill_chunk_tokens=16)
    handles: list[Any] = []
    ChunkLog(eng, after_first=lambda: handles[0].cancel())
    try:
        eng.start()
        running = eng.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=60))
        first_token(running)
        handles.append(eng.submit(encode(LONG_TEXT), SamplingParams(max_new_tokens=8)))
        assert handles[0].result(TIMEOUT).finish_reason == FinishReason.CANCELLED
        # The slot is free again: with batch 2, the next long prompt can only be prefilled in it.
        again = eng.submit(encode(LONG_TEXT), SamplingParams(max_new_tokens=8))
        assert list(again.result(TIMEOUT).token_ids) == hf_greedy(model, encode(LONG_TEXT), 8)
        assert list(running.result(TIMEOUT).token_ids) == hf_greedy(model, encode(PROMPTS[0]), 60)
        assert eng.wait_idle(TIMEOUT) and eng.running == 0
    finally:
        eng.close()


def test_a_fused_step_that_fails_is_retried_as_prefill_then_decode(model: Any) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=8, max_context=256)
    runner = eng._runner
    assert runner is not None
    failed: list[int] = []

    def failing_step(tokens: list[int], positions: list[int], prompts: list[list[int]],
                     slots: list[int]) -> torch.Tensor:
        failed.append(len(prompts))
        raise RuntimeError("fused forward failed")

    runner.step = failing_step  # type: ignore[method-assign]
    try:
        running = eng.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=30))
        eng.start()
        first_token(running)
        late = [eng.submit(encode(t), SamplingParams(max_new_tokens=8)) for t in PROMPTS[1:4]]
        for text, handle in zip(PROMPTS[1:4], late, strict=True):
            assert list(handle.result(TIMEOUT).token_ids) == hf_greedy(model, encode(text), 8), text
        assert list(running.result(TIMEOUT).token_ids) == hf_greedy(model, encode(PROMPTS[0]), 30)
        assert failed  # the newcomers did go through the failing fused step
        assert eng.finished_total == {"length": 4}
    finally:
        eng.close()
