"""RolloutStats: per-version counters of a rollout, reported as the protocol's VersionStats."""

from __future__ import annotations

import math
import threading

from lockstep.engine import FinalEvent, FinishReason
from lockstep.inference.rollout_stats import MAX_KL, MAX_VERSIONS, RolloutStats, latency_bucket
from lockstep.sync.protocol import LATENCY_BUCKETS_S, RolloutReport, VersionStats


def final(reason: FinishReason = FinishReason.STOP, tokens: int = 3, latency_s: float = 0.01) -> FinalEvent:
    return FinalEvent(finish_reason=reason, text="x" * tokens, token_ids=tuple(range(tokens)), prompt_tokens=4,
                      completion_tokens=tokens, ttft_s=None if tokens == 0 else latency_s / 2, latency_s=latency_s,
                      error="boom" if reason is FinishReason.ERROR else None)


def test_latency_buckets_are_upper_bounds_with_an_overflow_bucket() -> None:
    last = len(LATENCY_BUCKETS_S)
    assert latency_bucket(0.0) == 0
    assert latency_bucket(LATENCY_BUCKETS_S[0]) == 0  # a bound belongs to its own bucket
    assert latency_bucket(LATENCY_BUCKETS_S[0] * 1.01) == 1
    assert latency_bucket(LATENCY_BUCKETS_S[10]) == 10
    assert latency_bucket(LATENCY_BUCKETS_S[-1]) == last - 1
    assert latency_bucket(LATENCY_BUCKETS_S[-1] * 1.01) == last
    assert latency_bucket(math.inf) == last and latency_bucket(math.nan) == last


def test_answers_are_counted_by_outcome_tokens_and_latency() -> None:
    stats = RolloutStats("r1")
    stats.record_answer(1, final(tokens=5, latency_s=0.0005))
    stats.record_answer(1, final(FinishReason.LENGTH, tokens=8, latency_s=LATENCY_BUCKETS_S[3]))
    stats.record_answer(1, final(FinishReason.ERROR, tokens=0, latency_s=1e6))  # an error, not an empty answer
    stats.record_answer(1, final(FinishReason.STOP, tokens=0))  # empty: nothing generated, not an error
    stats.record_answer(1, final(FinishReason.CANCELLED, tokens=0))
    stats.record_answer(1, final(tokens=2), nonfinite=True)
    stats.record_answer(2, final(tokens=7))
    one, two = stats.snapshot([1, 2])
    assert (one.version, one.requests, one.errors, one.empty, one.nonfinite, one.output_tokens) == (1, 6, 1, 2, 1, 15)
    assert len(one.latency) == len(LATENCY_BUCKETS_S) + 1 and sum(one.latency) == 6
    assert one.latency[0] == 1 and one.latency[3] == 1 and one.latency[-1] == 1
    assert one.latency[latency_bucket(0.01)] == 3
    assert (two.requests, two.output_tokens, two.errors, two.empty) == (1, 7, 0, 0)


def test_comparisons_and_drops_are_summed_within_the_protocols_bounds() -> None:
    stats = RolloutStats("r1")
    stats.record_comparison(2, agreement=0.75, kl=0.5)
    stats.record_comparison(2, agreement=1.0, kl=0.25)
    stats.record_comparison(2, agreement=1.5, kl=-1e-9)  # rounding: clamped to 1 and 0
    stats.record_comparison(2, agreement=math.nan, kl=math.nan)  # non-finite logits: the worst
    stats.record_comparison(2, agreement=0.5, kl=math.inf)
    stats.record_shadow_dropped(2)
    stats.record_shadow_dropped(2)
    (s,) = stats.snapshot([2])
    assert s.compared == 5 and s.shadow_dropped == 2 and s.requests == 0
    assert s.agreement_sum == 0.75 + 1.0 + 1.0 + 0.0 + 0.5
    assert s.kl_sum == 0.5 + 0.25 + 0.0 + MAX_KL + MAX_KL
    VersionStats.model_validate(s.model_dump())  # what a heartbeat carries parses back


def test_a_snapshot_is_zeros_for_an_unseen_version_and_a_copy() -> None:
    stats = RolloutStats()
    assert stats.rollout_id is None
    (s,) = stats.snapshot([7])
    assert s == VersionStats(version=7, latency=[0] * (len(LATENCY_BUCKETS_S) + 1))
    stats.record_answer(7, final())
    s.latency[0] = 99  # the caller's copy: the counters are not touched
    (again,) = stats.snapshot([7])
    assert again.requests == 1 and again.latency[0] == 0
    report = RolloutReport(rollout="r", version=7, step=1, share=10.0, stats=stats.snapshot([6, 7]))
    assert [v.version for v in RolloutReport.model_validate_json(report.model_dump_json()).stats] == [6, 7]


def test_reset_zeroes_on_a_new_rollout_only() -> None:
    stats = RolloutStats()
    assert stats.reset("r1") is True
    stats.record_answer(1, final())
    assert stats.reset("r1") is False  # the same rollout: an idempotent call from every poll
    assert stats.snapshot([1])[0].requests == 1
    assert stats.reset("r2") is True and stats.rollout_id == "r2"
    assert stats.snapshot([1])[0].requests == 0


def test_memory_is_bounded_to_a_few_versions() -> None:
    stats = RolloutStats("r1")
    for version in range(MAX_VERSIONS + 3):
        stats.record_answer(version, final())
        stats.record_comparison(version, 1.0, 0.0)
    counted = stats.snapshot(range(MAX_VERSIONS + 3))
    assert [s.requests for s in counted] == [1] * MAX_VERSIONS + [0] * 3
    assert stats.ignored == 6  # three versions, two records each


def test_records_from_many_threads_are_all_counted() -> None:
    stats = RolloutStats("r1")
    per_thread = 400

    def work(version: int) -> None:
        for i in range(per_thread):
            stats.record_answer(version, final(tokens=1, latency_s=0.001 * (i % 3 + 1)))
            stats.record_comparison(version, 0.5, 0.25)

    threads = [threading.Thread(target=work, args=(v % 2,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stats.snapshot([0, 1]):
        assert s.requests == 2 * per_thread == sum(s.latency) == s.output_tokens == s.compared
        assert s.agreement_sum == 0.5 * 2 * per_thread and s.kl_sum == 0.25 * 2 * per_thread
