"""Quality gates: each gate passes a healthy candidate and stops a degraded one, waits below its samples, and
refuses bad settings by name; merge and the latency quantile against brute force."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockstep.core.errors import BadRequest
from lockstep.sync.gates import (
    DEFAULT_GATES,
    GATE_DESCRIPTIONS,
    GATES,
    GateResult,
    GateSpec,
    bucket_of,
    evaluate,
    latency_quantile,
    merge,
    parse_gate_option,
    parse_gates,
    verdict,
)
from lockstep.sync.protocol import LATENCY_BUCKETS_S, VersionStats

STABLE_V, CANDIDATE_V = 2, 3
N = 200  # answers per version: above every default min_samples


def latencies(n: int, seconds: float) -> list[int]:
    """``n`` answers that all took ``seconds``, as bucket counts."""
    counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
    counts[bucket_of(seconds)] = n
    return counts


def healthy(version: int, n: int = N, **changes: Any) -> VersionStats:
    """``n`` good answers: no errors, 20 tokens each, 0.1 s, and (on a candidate) close to the served tokens."""
    fields: dict[str, Any] = {"version": version, "requests": n, "output_tokens": 20 * n,
                              "latency": latencies(n, 0.1), "compared": n, "agreement_sum": 0.9 * n,
                              "kl_sum": 0.05 * n}
    return VersionStats(**{**fields, **changes})


def result(name: str, stable: VersionStats, candidate: VersionStats, **kwargs: Any) -> GateResult:
    (only,) = evaluate({name: DEFAULT_GATES[name]}, stable, candidate, **kwargs)
    assert only.name == name
    return only


# What ruins each gate, on N candidate answers; task_score is judged from the arguments instead.
DEGRADED: dict[str, dict[str, Any]] = {
    "error_rate": {"errors": N // 10},
    "latency_p99": {"latency": latencies(N, 0.3)},
    "empty_output": {"empty": N // 5},
    "nonfinite": {"nonfinite": 1},
    "length_shift": {"output_tokens": 60 * N},
    "token_agreement": {"agreement_sum": 0.1 * N},
    "kl_divergence": {"kl_sum": 3.0 * N},
}
TASK_HEALTHY = {"task_score": 0.78, "baseline_score": 0.8, "task_samples": 32}
TASK_DEGRADED = {"task_score": 0.5, "baseline_score": 0.8, "task_samples": 32}


def test_every_gate_has_a_default_a_description_and_a_degraded_case() -> None:
    assert set(GATES) == set(DEFAULT_GATES) == set(GATE_DESCRIPTIONS) == {*DEGRADED, "task_score"}
    for name, text in GATE_DESCRIPTIONS.items():
        assert text and "\n" not in text, name
    assert DEFAULT_GATES["token_agreement"].direction == "min"
    assert {n for n, s in DEFAULT_GATES.items() if s.direction == "max"} == set(GATES) - {"token_agreement"}


def test_defaults() -> None:
    table = {n: (s.threshold, s.min_samples) for n, s in DEFAULT_GATES.items()}
    assert table == {"error_rate": (0.02, 50), "latency_p99": (1.5, 50), "empty_output": (0.05, 50),
                     "nonfinite": (0, 1), "length_shift": (0.5, 50), "token_agreement": (0.3, 20),
                     "kl_divergence": (1.0, 20), "task_score": (0.1, 16)}


@pytest.mark.parametrize("name", sorted(DEGRADED))
def test_a_gate_passes_a_healthy_candidate_and_fails_a_degraded_one(name: str) -> None:
    stable = healthy(STABLE_V)
    good = result(name, stable, healthy(CANDIDATE_V))
    bad = result(name, stable, healthy(CANDIDATE_V, **DEGRADED[name]))
    assert good.verdict == "pass", good.reason
    assert bad.verdict == "fail", bad.reason
    assert bad.value is not None and bad.samples >= bad.min_samples
    assert "over" in bad.reason or "under" in bad.reason


def test_task_score_passes_a_small_drop_and_fails_a_large_one() -> None:
    stable, candidate = healthy(STABLE_V), healthy(CANDIDATE_V)
    good = result("task_score", stable, candidate, **TASK_HEALTHY)
    bad = result("task_score", stable, candidate, **TASK_DEGRADED)
    assert good.verdict == "pass", good.reason
    assert bad.verdict == "fail", bad.reason
    assert bad.value == pytest.approx(0.3)


def test_task_score_is_skipped_without_a_score_or_a_baseline() -> None:
    stable, candidate = healthy(STABLE_V), healthy(CANDIDATE_V)
    assert result("task_score", stable, candidate).verdict == "skipped"
    assert result("task_score", stable, candidate, task_score=0.0, task_samples=32).verdict == "skipped"
    results = evaluate(parse_gates(None), stable, candidate)
    assert verdict(results) == "pass"  # skipped counts as passing


@pytest.mark.parametrize("name", sorted(DEGRADED))
def test_a_degraded_gate_waits_below_its_min_samples(name: str) -> None:
    few = DEFAULT_GATES[name].min_samples - 1
    if few == 0:  # nonfinite needs a single answer: with none it waits
        got = result(name, healthy(STABLE_V), healthy(CANDIDATE_V, n=0, nonfinite=1))
    else:
        changes = {k: (v * few) // N if isinstance(v, int) else v * few / N for k, v in DEGRADED[name].items()
                   if k != "latency"}
        if name == "latency_p99":
            changes = {"latency": latencies(few, 0.3)}
        got = result(name, healthy(STABLE_V), healthy(CANDIDATE_V, n=few, **changes))
    assert got.verdict == "waiting", got.reason
    assert got.samples < got.min_samples
    assert f"{got.samples} of {got.min_samples} samples" in got.reason


def test_two_version_gates_wait_for_the_stable_version_too() -> None:
    for name in ("latency_p99", "length_shift"):
        got = result(name, healthy(STABLE_V, n=10), healthy(CANDIDATE_V, **DEGRADED[name]))
        assert (got.verdict, got.samples) == ("waiting", 10), got.reason


def test_task_score_waits_for_enough_evaluation_prompts() -> None:
    got = result("task_score", healthy(STABLE_V), healthy(CANDIDATE_V), **{**TASK_DEGRADED, "task_samples": 8})
    assert got.verdict == "waiting" and got.samples == 8


def test_nothing_answered_yet_waits_everywhere() -> None:
    results = evaluate(parse_gates(None), VersionStats(version=STABLE_V), VersionStats(version=CANDIDATE_V))
    assert {r.name: r.verdict for r in results} == {**dict.fromkeys(DEGRADED, "waiting"), "task_score": "skipped"}
    assert all(r.value is None for r in results)
    assert verdict(results) == "waiting"


def test_the_reason_says_what_was_measured_and_what_is_allowed() -> None:
    stable = healthy(STABLE_V, n=100)
    got = result("error_rate", stable, healthy(CANDIDATE_V, n=100, errors=12))
    assert got.reason == "error rate 12.0% on v3 vs 0.0% on v2: +12.0 points, over the +2.0 points allowed"
    low = result("token_agreement", stable, healthy(CANDIDATE_V, n=100, agreement_sum=10.0))
    assert low.reason.endswith("10.0%, under the 30.0% required")


def test_length_shift_from_a_silent_stable_version() -> None:
    silent = healthy(STABLE_V, output_tokens=0)
    assert result("length_shift", silent, healthy(CANDIDATE_V)).value == 1.0
    assert result("length_shift", silent, healthy(CANDIDATE_V, output_tokens=0)).value == 0.0


def test_error_rate_without_stable_answers_is_held_to_an_absolute_bound() -> None:
    got = result("error_rate", VersionStats(version=STABLE_V), healthy(CANDIDATE_V, errors=N // 10))
    assert got.verdict == "fail" and got.value == pytest.approx(0.1)


def test_non_finite_measures_fail_with_a_reason_instead_of_crashing() -> None:
    nan_kl = healthy(CANDIDATE_V).model_copy(update={"kl_sum": math.nan})  # past validation, as a bug would be
    got = result("kl_divergence", healthy(STABLE_V), nan_kl)
    assert got.verdict == "fail" and got.value is None and "not a finite number" in got.reason

    slow = 10_000.0  # seconds: past the last bucket (about 9 minutes)
    both_slow = result("latency_p99", healthy(STABLE_V, latency=latencies(N, slow)),
                       healthy(CANDIDATE_V, latency=latencies(N, slow)))
    assert both_slow.verdict == "fail" and "cannot be compared" in both_slow.reason
    only_candidate = result("latency_p99", healthy(STABLE_V), healthy(CANDIDATE_V, latency=latencies(N, slow)))
    assert only_candidate.verdict == "fail"
    only_stable = result("latency_p99", healthy(STABLE_V, latency=latencies(N, slow)), healthy(CANDIDATE_V))
    assert only_stable.verdict == "pass"

    for score in (math.nan, math.inf, 1.5):
        got = result("task_score", healthy(STABLE_V), healthy(CANDIDATE_V), task_score=score, baseline_score=0.5,
                     task_samples=32)
        assert got.verdict == "fail", score
    assert "Infinity" not in got.model_dump_json()


def test_evaluate_refuses_unknown_gates_and_flipped_directions() -> None:
    with pytest.raises(BadRequest, match="unknown gate 'speed'.*error_rate"):
        evaluate({"speed": GateSpec(threshold=1, min_samples=1)}, healthy(STABLE_V), healthy(CANDIDATE_V))
    with pytest.raises(BadRequest, match="token_agreement.*'min'"):
        evaluate({"token_agreement": GateSpec(threshold=0.3, min_samples=20)}, healthy(STABLE_V),
                 healthy(CANDIDATE_V))
    with pytest.raises(BadRequest, match="task_samples"):
        evaluate({}, healthy(STABLE_V), healthy(CANDIDATE_V), task_samples=-1)


def gate_result(v: str) -> GateResult:
    return GateResult(name="x", value=None, threshold=0, direction="max", samples=0, min_samples=1,
                      verdict=v, reason="")


@pytest.mark.parametrize(("verdicts", "overall"), [
    ([], "pass"), (["pass", "skipped"], "pass"), (["pass", "waiting", "skipped"], "waiting"),
    (["waiting", "fail", "pass"], "fail"), (["skipped"], "pass"),
])
def test_verdict(verdicts: list[str], overall: str) -> None:
    assert verdict([gate_result(v) for v in verdicts]) == overall


# --- merge --------------------------------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=10**6)
version_stats = st.builds(
    VersionStats, version=st.sampled_from([STABLE_V, CANDIDATE_V]), requests=counts, errors=counts, empty=counts,
    nonfinite=counts, output_tokens=counts, compared=counts, shadow_dropped=counts,
    latency=st.lists(counts, max_size=len(LATENCY_BUCKETS_S) + 1),
    agreement_sum=st.floats(min_value=0, max_value=1e6), kl_sum=st.floats(min_value=0, max_value=1e6))


def same(a: VersionStats, b: VersionStats) -> bool:
    """Equal counts, and sums equal up to float rounding (addition order changes the last bits)."""
    floats = ("agreement_sum", "kl_sum")
    exact = a.model_dump(exclude=set(floats)) == b.model_dump(exclude=set(floats))
    return exact and all(math.isclose(getattr(a, f), getattr(b, f), rel_tol=1e-9, abs_tol=1e-9) for f in floats)


@given(version_stats, version_stats, version_stats)
def test_merge_is_commutative_and_associative(a: VersionStats, b: VersionStats, c: VersionStats) -> None:
    v = CANDIDATE_V
    assert same(merge([a, b], v), merge([b, a], v))
    left, right = merge([merge([a, b], v), c], v), merge([a, merge([b, c], v)], v)
    assert same(left, right) and same(left, merge([a, b, c], v))
    assert same(merge([a], v), a if a.version == v else VersionStats(version=v))


@given(st.lists(version_stats, max_size=6))
def test_merge_sums_one_version_and_pads_latency(stats: list[VersionStats]) -> None:
    mine = [s for s in stats if s.version == CANDIDATE_V]
    got = merge(stats, CANDIDATE_V)
    assert got.version == CANDIDATE_V
    assert got.requests == sum(s.requests for s in mine) and got.errors == sum(s.errors for s in mine)
    width = max((len(s.latency) for s in mine), default=0)
    assert got.latency == [sum(s.latency[i] for s in mine if i < len(s.latency)) for i in range(width)]
    VersionStats.model_validate(got.model_dump())  # still what a reader accepts


def test_merge_of_nothing_is_empty() -> None:
    assert merge([], 7) == VersionStats(version=7)
    assert merge([healthy(STABLE_V)], 7) == VersionStats(version=7)


# --- latency quantile ---------------------------------------------------------------------------------------------


def brute_bucket(seconds: float) -> int:
    for i, bound in enumerate(LATENCY_BUCKETS_S):
        if seconds <= bound:
            return i
    return len(LATENCY_BUCKETS_S)


def brute_quantile(samples: list[float], q: Fraction) -> float:
    """Nearest rank on the raw latencies, reported as the upper bound of its bucket (inf past the last)."""
    ordered = sorted(samples)
    value = ordered[max(1, math.ceil(q * len(ordered))) - 1]
    i = brute_bucket(value)
    return LATENCY_BUCKETS_S[i] if i < len(LATENCY_BUCKETS_S) else math.inf


seconds = st.one_of(st.floats(min_value=0, max_value=700, allow_nan=False), st.sampled_from(LATENCY_BUCKETS_S))


@settings(max_examples=300)
@given(st.lists(seconds, min_size=1, max_size=300), st.integers(min_value=0, max_value=1000))
def test_quantile_matches_brute_force(samples: list[float], permille: int) -> None:
    counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
    for s in samples:
        assert bucket_of(s) == brute_bucket(s)
        counts[bucket_of(s)] += 1
    q = Fraction(permille, 1000)
    assert latency_quantile(VersionStats(version=1, latency=counts), float(q)) == brute_quantile(samples, q)


def test_quantile_edges() -> None:
    assert latency_quantile(VersionStats(version=1), 0.99) is None
    assert latency_quantile(VersionStats(version=1, latency=[0, 0, 0]), 0.5) is None
    hundred = VersionStats(version=1, latency=[93, 6, 1])  # 0.99 is the 99th answer: the second bucket
    assert latency_quantile(hundred, 0.99) == LATENCY_BUCKETS_S[1]
    assert latency_quantile(hundred, 1.0) == LATENCY_BUCKETS_S[2]
    assert latency_quantile(hundred, 0.93) == LATENCY_BUCKETS_S[0]
    # 0.07 * 100 is 7.000000000000001 in binary: still the 7th answer, not the 8th
    assert latency_quantile(VersionStats(version=1, latency=[7, 93]), 0.07) == LATENCY_BUCKETS_S[0]
    assert latency_quantile(VersionStats(version=1, latency=latencies(5, 1e4)), 0.5) == math.inf
    for bad in (-0.1, 1.5, math.nan, True):
        with pytest.raises(BadRequest, match="from 0 to 1"):
            latency_quantile(hundred, bad)


# --- parsing ------------------------------------------------------------------------------------------------------


def test_parse_gates_defaults_overrides_and_disabling() -> None:
    assert parse_gates(None) == dict(DEFAULT_GATES)
    assert parse_gates(None, use_defaults=False) == {}
    gates = parse_gates({"error_rate": 0.05, "kl_divergence": {"min_samples": 100}, "latency_p99": None,
                         "task_score": False, "nonfinite": 2})
    assert gates["error_rate"] == GateSpec(threshold=0.05, min_samples=50)
    assert gates["kl_divergence"] == GateSpec(threshold=1.0, min_samples=100)
    assert gates["nonfinite"].threshold == 2.0
    assert "latency_p99" not in gates and "task_score" not in gates
    only = parse_gates({"token_agreement": {"threshold": 0.5}, "error_rate": {}}, use_defaults=False)
    assert only == {"token_agreement": GateSpec(threshold=0.5, min_samples=20, direction="min"),
                    "error_rate": DEFAULT_GATES["error_rate"]}
    assert parse_gates({"token_agreement": DEFAULT_GATES["token_agreement"].model_dump()})["token_agreement"] == \
        DEFAULT_GATES["token_agreement"]  # a spec read back from JSON round-trips


def test_a_disabled_gate_is_not_evaluated() -> None:
    results = evaluate(parse_gates({"error_rate": None}), healthy(STABLE_V), healthy(CANDIDATE_V, errors=N // 2))
    assert "error_rate" not in {r.name for r in results} and verdict(results) == "pass"


def test_unknown_gate_names_the_allowed_ones() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_gates({"eror_rate": 0.1})
    assert "'eror_rate'" in str(caught.value)
    assert all(name in str(caught.value) for name in GATES)


@pytest.mark.parametrize(("raw", "says"), [
    ({"error_rate": True}, "error_rate': True is a bool; expected a threshold"),
    ({"error_rate": "0.05"}, "error_rate': '0.05' is a str"),
    ({"error_rate": math.nan}, "error_rate': threshold nan is out of range; expected a fraction of answers"),
    ({"kl_divergence": math.inf}, "kl_divergence': threshold inf is out of range"),
    ({"error_rate": -0.01}, "from 0 to 1"),
    ({"token_agreement": 1.5}, "from 0 to 1"),
    ({"latency_p99": 0.5}, "at least 1"),
    ({"error_rate": [0.1]}, "is a list"),
    ({"error_rate": {"threshold": True}}, "threshold True is a bool"),
    ({"error_rate": {"threshold": "x"}}, "threshold 'x' is a str"),
    ({"error_rate": {"min_samples": 0}}, "min_samples 0 is not allowed; expected a whole number from 1"),
    ({"error_rate": {"min_samples": 10.0}}, "min_samples 10.0"),
    ({"error_rate": {"min_samples": True}}, "min_samples True"),
    ({"error_rate": {"min_samples": 10**10}}, "to 1000000000"),
    ({"error_rate": {"limit": 1}}, "unknown field.*limit; allowed: threshold, min_samples"),
    ({"token_agreement": {"direction": "max"}}, "direction is 'min' and cannot be changed"),
    ({1: 0.1}, "unknown gate 1"),
])
def test_parse_gates_refuses_bad_input_by_name(raw: dict[Any, Any], says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        parse_gates(raw)


def test_parse_gates_refuses_a_non_mapping() -> None:
    with pytest.raises(BadRequest, match="must be an object.*error_rate"):
        parse_gates([("error_rate", 0.1)])  # type: ignore[arg-type]


def test_parse_gate_option() -> None:
    assert parse_gate_option("error_rate=0.05") == ("error_rate", 0.05)
    assert parse_gate_option(" kl_divergence = 2 ") == ("kl_divergence", 2.0)
    assert parse_gate_option("latency_p99=off") == ("latency_p99", None)
    for text, says in [("error_rate", "not NAME=THRESHOLD"), ("=0.1", "not NAME=THRESHOLD"),
                       ("error_rate=", "not NAME=THRESHOLD"), ("speed=1", "unknown gate 'speed'.*error_rate"),
                       ("error_rate=lots", "'lots' is not a number; expected a fraction"),
                       ("error_rate=nan", "out of range"), ("latency_p99=inf", "out of range")]:
        with pytest.raises(BadRequest, match=says):
            parse_gate_option(text)


@given(st.lists(version_stats, max_size=4), st.lists(version_stats, max_size=4),
       st.dictionaries(st.sampled_from(sorted(GATES)), st.integers(min_value=1, max_value=10**6)),
       st.one_of(st.none(), st.floats(allow_nan=True)), st.one_of(st.none(), st.floats(0, 1)),
       st.integers(min_value=0, max_value=100))
def test_no_gate_fails_below_its_min_samples(stable: list[VersionStats], candidate: list[VersionStats],
                                             min_samples: dict[str, int], score: float | None,
                                             baseline: float | None, task_samples: int) -> None:
    specs = parse_gates({name: {"min_samples": n} for name, n in min_samples.items()})
    results = evaluate(specs, merge(stable, STABLE_V), merge(candidate, CANDIDATE_V), task_score=score,
                       baseline_score=baseline, task_samples=task_samples)
    assert [r.name for r in results] == list(specs)
    for r in results:
        assert r.reason
        if r.samples < r.min_samples:
            assert r.verdict in ("waiting", "skipped"), r
        if r.value is not None:
            assert math.isfinite(r.value)
