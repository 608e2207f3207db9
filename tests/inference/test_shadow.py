"""Shadow: a sample of served prompts also runs on the candidate, bounded, on idle capacity, with real engines.

"Busy" is made deterministic by pausing an engine's admission with a request queued (its queue_depth stays 1),
and the queue bound by leaving the worker stopped while offering; assertions read counters, never timings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockstep.engine import Engine, FinalEvent, FinishReason
from lockstep.inference.rollout_stats import RolloutStats
from lockstep.inference.shadow import Sampler, Shadow, ShadowCounters
from lockstep.inference.slot import ModelSlot
from tests.inference.rollout_slots import GREEDY, PROMPTS, encode, engine, load, slot
from tests.support.cluster import wait_for

WAIT_S = 120.0  # a bound for a loaded 2-core machine, never a measurement


@pytest.fixture(scope="module")
def pair(builtin_dir: Path) -> Iterator[tuple[ModelSlot, ModelSlot]]:
    """Stable v1 and candidate v2: the same tiny weights loaded twice, each with its own started engine, so a
    shadowed answer must agree fully and show no divergence."""
    stable_model, candidate_model = load(builtin_dir, "tiny-s0"), load(builtin_dir, "tiny-s0")
    stable, candidate = slot(1, stable_model, engine(stable_model)), slot(2, candidate_model, engine(candidate_model))
    yield stable, candidate
    for s in (stable, candidate):
        s.engine.close()


def serve(s: ModelSlot, prompt: str) -> tuple[list[int], FinalEvent]:
    ids = encode(s, prompt)
    return ids, s.engine.submit(ids, GREEDY).result(timeout=WAIT_S)


def requests(s: ModelSlot) -> int:
    assert isinstance(s.engine, Engine)
    return s.engine.requests_total


def test_the_sampler_picks_exact_shares() -> None:
    tenth = Sampler(10)
    assert [i for i in range(100) if tenth.take()] == list(range(9, 100, 10))
    half = Sampler(50)
    assert [half.take() for _ in range(6)] == [False, True] * 3
    assert not any(Sampler(0).take() for _ in range(50))
    every = Sampler(100)
    assert all(every.take() for _ in range(50))
    third = Sampler(100 / 3)
    assert sum(third.take() for _ in range(999)) == 333
    for bad in (-1, 100.5, float("nan")):
        with pytest.raises(ValueError, match="percent"):
            Sampler(bad)


def test_half_of_the_served_prompts_are_shadowed_and_compared_on_the_candidate(
        pair: tuple[ModelSlot, ModelSlot]) -> None:
    stable, candidate = pair
    stats = RolloutStats("r1")
    served = [serve(stable, PROMPTS[i % len(PROMPTS)]) for i in range(6)]
    before = (requests(stable), requests(candidate))
    shadow = Shadow(50, stats, generate=True)
    try:
        queued = []
        for ids, final in served:
            queued.append(shadow.offer(stable, candidate, ids, GREEDY, final))
            assert shadow.wait_idle(WAIT_S)
    finally:
        shadow.close()
    assert queued == [False, True] * 3
    assert shadow.counters == ShadowCounters(offered=6, sampled=3, dropped=0, compared=3, failed=0)
    assert (requests(stable), requests(candidate)) == (before[0], before[1] + 3)  # generated on the candidate only
    cand, stab = stats.snapshot([candidate.version, stable.version])
    assert cand.compared == 3 and cand.agreement_sum == 3.0 and cand.kl_sum == pytest.approx(0.0, abs=1e-5)
    assert cand.requests == 0 and cand.shadow_dropped == 0  # a shadow answer is not a served answer
    assert stab.compared == 0 and stab.requests == 0


def test_a_full_queue_drops_and_counts_what_it_cannot_hold(pair: tuple[ModelSlot, ModelSlot]) -> None:
    stable, candidate = pair
    stats = RolloutStats("r1")
    ids, final = serve(stable, PROMPTS[0])
    shadow = Shadow(100, stats, start=False)  # the worker waits: offers only queue
    try:
        assert [shadow.offer(stable, candidate, ids, GREEDY, final) for _ in range(5)] == [True, True] + [False] * 3
        assert shadow.pending == 2 and shadow.counters.dropped == 3
        assert stats.snapshot([candidate.version])[0].shadow_dropped == 3
        shadow.start()
        assert shadow.wait_idle(WAIT_S)
    finally:
        shadow.close()
    assert shadow.counters == ShadowCounters(offered=5, sampled=5, dropped=3, compared=2, failed=0)
    (cand,) = stats.snapshot([candidate.version])
    assert cand.compared == 2 and cand.agreement_sum == 2.0 and cand.shadow_dropped == 3


@pytest.mark.parametrize("busy", ["stable", "candidate"])
def test_a_job_is_skipped_while_an_engine_has_requests_waiting(pair: tuple[ModelSlot, ModelSlot], busy: str) -> None:
    stable, candidate = pair
    stats = RolloutStats("r1")
    ids, final = serve(stable, PROMPTS[1])
    busy_engine = (stable if busy == "stable" else candidate).engine
    assert isinstance(busy_engine, Engine)
    shadow = Shadow(100, stats, start=False)
    busy_engine.pause_admission()
    waiting = busy_engine.submit(ids, GREEDY)  # stays queued while admission is paused
    try:
        assert busy_engine.queue_depth == 1
        assert shadow.offer(stable, candidate, ids, GREEDY, final)
        before = requests(candidate)
        shadow.start()
        assert shadow.wait_idle(WAIT_S)
        assert requests(candidate) == before  # nothing was submitted for the shadow
    finally:
        shadow.close()
        busy_engine.resume_admission()
    assert waiting.result(timeout=WAIT_S).finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert shadow.counters == ShadowCounters(offered=1, sampled=1, dropped=1, compared=0, failed=0)
    (cand,) = stats.snapshot([candidate.version])
    assert cand.shadow_dropped == 1 and cand.compared == 0


def test_canary_answers_are_compared_with_the_stable_version_without_generating(
        pair: tuple[ModelSlot, ModelSlot]) -> None:
    stable, candidate = pair
    stats = RolloutStats("r1")
    ids, final = serve(candidate, PROMPTS[2])  # the candidate served it
    before = (requests(stable), requests(candidate))
    shadow = Shadow(0, stats, canary_percent=100)  # no shadowing: canary comparisons only
    try:
        assert not shadow.offer(stable, candidate, ids, GREEDY, final)
        assert shadow.offer_canary(stable, candidate, ids, final)
        assert shadow.wait_idle(WAIT_S)
    finally:
        shadow.close()
    assert (requests(stable), requests(candidate)) == before  # teacher-forced: no engine was asked
    assert shadow.counters == ShadowCounters(offered=2, sampled=1, dropped=0, compared=1, failed=0)
    (cand,) = stats.snapshot([candidate.version])
    assert cand.compared == 1 and cand.agreement_sum == 1.0 and cand.kl_sum == pytest.approx(0.0, abs=1e-5)


def test_answers_that_say_nothing_are_not_sampled(pair: tuple[ModelSlot, ModelSlot]) -> None:
    stable, candidate = pair
    ids, good = serve(stable, PROMPTS[3])
    unusable = [FinalEvent(FinishReason.ERROR, "", (), len(ids), 0, None, 0.1, error="boom"),
                FinalEvent(FinishReason.CANCELLED, "", (), len(ids), 0, None, 0.1),
                FinalEvent(FinishReason.STOP, "", (), len(ids), 0, None, 0.1)]
    shadow = Shadow(50, RolloutStats("r1"), start=False)
    try:
        assert not any(shadow.offer(stable, candidate, ids, GREEDY, f) for f in unusable)
        assert not shadow.offer(stable, candidate, [], GREEDY, good)
        assert [shadow.offer(stable, candidate, ids, GREEDY, good) for _ in range(2)] == [False, True]
    finally:
        shadow.close()
    assert shadow.counters == ShadowCounters(offered=2, sampled=1)


def test_by_default_a_shadowed_prompt_is_one_teacher_forced_pass_with_no_generation(
        pair: tuple[ModelSlot, ModelSlot]) -> None:
    stable, candidate = pair
    stats = RolloutStats("r1")
    served = [serve(stable, PROMPTS[i % len(PROMPTS)]) for i in range(4)]
    before = (requests(stable), requests(candidate))
    shadow = Shadow(100, stats)
    try:
        for ids, final in served:
            assert shadow.offer(stable, candidate, ids, GREEDY, final)
            assert shadow.wait_idle(WAIT_S)
    finally:
        shadow.close()
    assert (requests(stable), requests(candidate)) == before  # no engine generated anything for it
    (cand,) = stats.snapshot([candidate.version])
    assert cand.compared == 4 and cand.agreement_sum == 4.0  # the pair is one model twice: full agreement


def test_a_failed_job_is_logged_and_recorded_as_nothing(pair: tuple[ModelSlot, ModelSlot],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    stable, candidate = pair
    stats = RolloutStats("r1")
    ids, final = serve(stable, PROMPTS[0])
    freed = slot(candidate.version, candidate.loaded)  # its engine refuses every request
    shadow = Shadow(100, stats, generate=True)
    try:
        with caplog.at_level(logging.WARNING, logger="lockstep.inference.shadow"):
            assert shadow.offer(stable, freed, ids, GREEDY, final)
            assert shadow.wait_idle(WAIT_S)
    finally:
        shadow.close()
    assert shadow.counters == ShadowCounters(offered=1, sampled=1, compared=0, failed=1)
    assert "shadow comparison of v2 with v1 failed: RuntimeError: v2 was freed" in caplog.text
    (cand,) = stats.snapshot([candidate.version])
    assert cand.compared == 0 and cand.shadow_dropped == 0


def test_close_cancels_the_job_in_flight_and_stops_the_worker(pair: tuple[ModelSlot, ModelSlot]) -> None:
    stable, candidate = pair
    assert isinstance(candidate.engine, Engine)
    stats = RolloutStats("r1")
    ids, final = serve(stable, PROMPTS[1])
    shadow = Shadow(100, stats, generate=True)
    candidate.engine.pause_admission()  # the shadow's own request will wait in the candidate's queue
    try:
        assert shadow.offer(stable, candidate, ids, GREEDY, final)
        wait_for(lambda: candidate.engine.queue_depth == 1, WAIT_S, what="the shadow's request queued")
        shadow.close()
        assert not shadow.alive
        assert candidate.engine.queue_depth == 0  # cancelled: a queued request ends at once
    finally:
        shadow.close()
        candidate.engine.resume_admission()
    assert shadow.counters == ShadowCounters(offered=1, sampled=1)  # cancelled by close: not a failure
    assert not shadow.offer(stable, candidate, ids, GREEDY, final)  # closed: nothing more is taken
    assert shadow.counters.offered == 1 and stats.snapshot([candidate.version])[0].compared == 0
