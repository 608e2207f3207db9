"""One request's failure ends that request only: hostile settings, failed draws and failed steps in a batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lockstep.engine import Engine, FinalEvent, SamplingParams
from lockstep.engine import engine as engine_module
from lockstep.engine.sampling_params import MAX_SEED, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE, MAX_TOP_K

from . import encode, hf_greedy, llama, tokenizer

TIMEOUT = 60.0  # seconds a test waits for a request before failing (a hang, not a speed check)
NORMAL = ["The quick brown fox", "Café, naïve", "The client reads them", "A small model writes"]
NORMAL_NEW = 12  # tokens per normal request

# Settings SamplingParams accepts that sit at the edge of what float32 arithmetic represents: before the
# sampler handled each row on its own, any one of them ended every request of its batch.
HOSTILE = [
    SamplingParams(max_new_tokens=12, temperature=5e-324),
    SamplingParams(max_new_tokens=12, temperature=1e-40, top_k=MAX_TOP_K),
    SamplingParams(max_new_tokens=12, temperature=1.0, top_p=5e-324, seed=MAX_SEED),
    SamplingParams(max_new_tokens=12, temperature=MAX_TEMPERATURE, top_k=MAX_TOP_K, top_p=1e-300),
    SamplingParams(max_new_tokens=12, temperature=1.5, stop=("é" * MAX_STOP_CHARS,) * MAX_STOP_STRINGS),
]


@pytest.fixture(scope="module")
def model() -> Any:
    return llama(seed=0)


@pytest.fixture(scope="module")
def reference(model: Any) -> dict[str, list[int]]:
    """Each normal prompt's greedy tokens, generated alone by HF generate."""
    return {text: hf_greedy(model, encode(text), NORMAL_NEW) for text in NORMAL}


def submit_all(eng: Engine, hostile: list[SamplingParams]) -> tuple[list[Any], list[Any]]:
    """Normal greedy requests interleaved with hostile ones, queued before the engine starts: one batch."""
    normal, bad = [], []
    for i, text in enumerate(NORMAL):
        normal.append(eng.submit(encode(text), SamplingParams(max_new_tokens=NORMAL_NEW)))
        if i < len(hostile):
            bad.append(eng.submit(encode(NORMAL[-1 - i]), hostile[i]))
    bad += [eng.submit(encode("a b"), p) for p in hostile[len(NORMAL):]]
    eng.start()
    return normal, bad


def assert_exact(normal: list[Any], reference: dict[str, list[int]]) -> None:
    for text, handle in zip(NORMAL, normal, strict=True):
        final = handle.result(TIMEOUT)
        assert final.finish_reason == "length", (text, final.error)
        assert list(final.token_ids) == reference[text], text


def test_hostile_sampling_settings_in_the_batch_leave_every_normal_request_exact(
    model: Any, reference: dict[str, list[int]]
) -> None:
    eng = Engine(model, tokenizer(), max_batch_size=len(NORMAL) + len(HOSTILE), max_context=128)
    try:
        normal, bad = submit_all(eng, HOSTILE)
        assert_exact(normal, reference)
        for params, handle in zip(HOSTILE, bad, strict=True):
            final: FinalEvent = handle.result(TIMEOUT)
            assert final.finish_reason in ("length", "stop"), (params, final.error)
        assert eng.wait_idle(TIMEOUT)  # the counters are updated just after the final event
        assert eng.finished_total.get("error", 0) == 0 and eng.is_running
    finally:
        eng.close()


def test_a_request_whose_sampling_fails_ends_alone(
    model: Any, reference: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    culprit_seed = 13
    real_sample = engine_module.sample

    def failing_for_the_culprit(logits: torch.Tensor, params: list[SamplingParams], gens: list[Any]) -> Any:
        if any(p.seed == culprit_seed for p in params):
            raise RuntimeError("injected sampler failure")
        return real_sample(logits, params, gens)

    monkeypatch.setattr(engine_module, "sample", failing_for_the_culprit)
    eng = Engine(model, tokenizer(), max_batch_size=8, max_context=128)
    try:
        normal, bad = submit_all(eng, [SamplingParams(max_new_tokens=12, temperature=1.0, seed=culprit_seed)])
        assert_exact(normal, reference)
        failed = bad[0].result(TIMEOUT)
        assert failed.finish_reason == "error" and "injected sampler failure" in (failed.error or "")
        assert failed.completion_tokens == 0
        assert eng.wait_idle(TIMEOUT)
        assert eng.finished_total == {"length": len(NORMAL), "error": 1}
    finally:
        eng.close()


def test_a_batch_that_cannot_be_sampled_together_is_sampled_row_by_row(
    model: Any, reference: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sample = engine_module.sample

    def failing_for_batches(logits: torch.Tensor, params: list[SamplingParams], gens: list[Any]) -> Any:
        if len(params) > 1:
            raise RuntimeError("injected batch failure")
        return real_sample(logits, params, gens)

    monkeypatch.setattr(engine_module, "sample", failing_for_batches)
    eng = Engine(model, tokenizer(), max_batch_size=8, max_context=128)
    try:
        normal, _ = submit_all(eng, [])
        assert_exact(normal, reference)
    finally:
        eng.close()


class FailOnce:
    """Raises inside the n-th decode forward (one new token per row) of the model, once."""

    def __init__(self, model: Any, nth: int) -> None:
        self.nth, self.seen, self.fired = nth, 0, False
        self._hook = model.model.embed_tokens.register_forward_pre_hook(self._maybe_fail)

    def _maybe_fail(self, module: Any, args: Any) -> None:
        ids = args[0]
        if ids.shape[-1] != 1 or self.fired:
            return
        self.seen += 1
        if self.seen == self.nth:
            self.fired = True
            raise RuntimeError("injected transient step failure")

    def remove(self) -> None:
        self._hook.remove()


@pytest.mark.parametrize("backend", ["llama", "hf"])
def test_a_step_that_fails_once_is_retried_per_sequence_and_stays_exact(
    model: Any, reference: dict[str, list[int]], backend: str
) -> None:
    # The generic backend steps one sequence per forward: the 3rd forward is the third sequence of the first
    # step, after the first two already appended to their caches (which the retry must roll back).
    eng = Engine(model, tokenizer(), max_batch_size=8, max_context=128, backend=backend)
    fail = FailOnce(model, nth=3)
    try:
        normal, _ = submit_all(eng, [])
        assert_exact(normal, reference)
        assert fail.fired
        assert eng.wait_idle(TIMEOUT)
        assert eng.finished_total == {"length": len(NORMAL)}
    finally:
        fail.remove()
        eng.close()


class FailAtPosition:
    """Raises whenever the model is asked for a token at ``position``: a failure that belongs to the one
    request long enough to reach it."""

    def __init__(self, model: Any, position: int) -> None:
        self.position, self.fired = position, 0
        self._hook = model.model.rotary_emb.register_forward_pre_hook(self._maybe_fail, with_kwargs=True)

    def _maybe_fail(self, module: Any, args: Any, kwargs: Any) -> None:
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if positions is not None and bool((positions == self.position).any()):
            self.fired += 1
            raise RuntimeError(f"injected failure at position {self.position}")

    def remove(self) -> None:
        self._hook.remove()


@pytest.mark.parametrize("backend", ["llama", "hf"])
def test_a_request_whose_own_step_keeps_failing_ends_alone(
    model: Any, reference: dict[str, list[int]], backend: str
) -> None:
    culprit_prompt = encode("Numbers: one two three four five six seven eight nine ten. " * 2)
    assert len(culprit_prompt) + 4 < 100 and all(len(encode(t)) + NORMAL_NEW < 60 for t in NORMAL)
    position = len(culprit_prompt) + 4  # its 5th decode step; no normal request gets that far
    eng = Engine(model, tokenizer(), max_batch_size=8, max_context=128, backend=backend)
    fail = FailAtPosition(model, position)
    try:
        normal = [eng.submit(encode(t), SamplingParams(max_new_tokens=NORMAL_NEW)) for t in NORMAL[:2]]
        culprit = eng.submit(culprit_prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))
        normal += [eng.submit(encode(t), SamplingParams(max_new_tokens=NORMAL_NEW)) for t in NORMAL[2:]]
        eng.start()
        assert_exact(normal, reference)
        failed = culprit.result(TIMEOUT)
        assert failed.finish_reason == "error" and f"position {position}" in (failed.error or "")
        assert failed.completion_tokens == 5
        assert list(failed.token_ids) == hf_greedy(model, culprit_prompt, 5)
        assert fail.fired >= 2  # the batched step, then the culprit's step alone
    finally:
        fail.remove()
    after = eng.generate(culprit_prompt, SamplingParams(max_new_tokens=8), timeout=TIMEOUT)
    assert list(after.token_ids) == hf_greedy(model, culprit_prompt, 8)  # the failed slot left nothing behind
    eng.close()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # A tiny model gains nothing from a second thread, and a shared 2-core machine makes it much slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
