"""Quality gates for a canary rollout: what the candidate's answers must look like, next to the stable version's.

Pure functions over ``VersionStats`` (no I/O, no clock): replicas report cumulative counts per version, ``merge``
sums them across the fleet, and ``evaluate`` turns the two sums into one ``GateResult`` per gate. A gate fails
only once it has its ``min_samples``; before that it is "waiting", so a few unlucky early answers never roll back.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from lockstep.core.errors import BadRequest
from lockstep.sync.protocol import LATENCY_BUCKETS_S, MAX_GENERATION, VersionStats

Direction = Literal["max", "min"]
Verdict = Literal["pass", "fail", "waiting", "skipped"]
MAX_MIN_SAMPLES = 10**9

# VersionStats' bounds: a sum past them saturates (still associative for non-negative numbers) instead of
# producing a VersionStats that no reader would accept.
_MAX_AGREEMENT_SUM = 1e12
_MAX_KL_SUM = 1e15


class GateSpec(BaseModel):
    """One gate's setting: the threshold it holds the candidate to, and the samples it needs before it may fail."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(allow_inf_nan=False)
    min_samples: int = Field(ge=1, le=MAX_MIN_SAMPLES)
    direction: Direction = "max"  # "max": fails above the threshold; "min": fails below it (a lower bound)


class GateDefault(NamedTuple):
    """A named gate: its default setting, what it measures (for docs and the UI), and the thresholds it accepts."""

    spec: GateSpec
    description: str
    low: float  # inclusive bounds on the threshold (which is always finite)
    high: float
    unit: str  # what the threshold is, for error messages


GATES: Mapping[str, GateDefault] = MappingProxyType({
    "error_rate": GateDefault(
        GateSpec(threshold=0.02, min_samples=50),
        "Candidate error fraction minus the stable version's (samples: candidate answers).",
        0.0, 1.0, "a fraction of answers"),
    "latency_p99": GateDefault(
        GateSpec(threshold=1.5, min_samples=50),
        "Candidate p99 latency divided by the stable version's (samples: answers of each version).",
        1.0, math.inf, "a ratio of p99 latencies"),
    "empty_output": GateDefault(
        GateSpec(threshold=0.05, min_samples=50),
        "Candidate fraction of empty answers minus the stable version's (samples: candidate answers).",
        0.0, 1.0, "a fraction of answers"),
    "nonfinite": GateDefault(
        GateSpec(threshold=0, min_samples=1),
        "Candidate answers whose logits were not finite (samples: candidate answers).",
        0.0, math.inf, "a count of answers"),
    "length_shift": GateDefault(
        GateSpec(threshold=0.5, min_samples=50),
        "Relative change of the mean output length: |candidate mean / stable mean - 1| (samples: answers of each).",
        0.0, math.inf, "a relative change"),
    "token_agreement": GateDefault(
        GateSpec(threshold=0.3, min_samples=20, direction="min"),
        "Mean fraction of the candidate's tokens that agree with the served ones; a lower bound "
        "(samples: compared prompts).",
        0.0, 1.0, "a fraction of tokens"),
    "kl_divergence": GateDefault(
        GateSpec(threshold=1.0, min_samples=20),
        "Mean KL divergence of the candidate's next-token distributions from the stable version's, in nats per "
        "token (samples: compared prompts).",
        0.0, math.inf, "nats per token"),
    "task_score": GateDefault(
        GateSpec(threshold=0.1, min_samples=16),
        "Drop of the trainer's task score (0..1) on the candidate below the stable version's "
        "(samples: evaluation prompts); skipped when no score was computed.",
        0.0, 1.0, "a drop in score"),
})
# Gates fed by the candidate's own answers: a shadow-only step (no traffic share) has none to give them.
TRAFFIC_GATES = frozenset({"error_rate", "latency_p99", "empty_output", "nonfinite", "length_shift"})
DEFAULT_GATES: Mapping[str, GateSpec] = MappingProxyType({name: gate.spec for name, gate in GATES.items()})
GATE_DESCRIPTIONS: Mapping[str, str] = MappingProxyType({name: gate.description for name, gate in GATES.items()})


class GateResult(BaseModel):
    """What one gate concluded about the candidate, with the sentence that explains it."""

    name: str
    value: float | None  # None when there is nothing to measure yet, or the measure is not a finite number
    threshold: float
    direction: Direction
    samples: int
    min_samples: int
    verdict: Verdict
    reason: str


def merge(stats: Iterable[VersionStats], version: int) -> VersionStats:
    """Sum every replica's stats for ``version`` (others are ignored); latency buckets add elementwise."""
    total = VersionStats(version=version)
    counts = {"requests": 0, "errors": 0, "empty": 0, "nonfinite": 0, "output_tokens": 0, "compared": 0,
              "shadow_dropped": 0}
    latency: list[int] = []
    agreement = kl = 0.0
    for one in stats:
        if one.version != version:
            continue
        for name in counts:
            counts[name] = min(counts[name] + getattr(one, name), MAX_GENERATION)
        if len(one.latency) > len(latency):
            latency.extend([0] * (len(one.latency) - len(latency)))
        for i, n in enumerate(one.latency):
            latency[i] = min(latency[i] + n, MAX_GENERATION)
        agreement = min(agreement + one.agreement_sum, _MAX_AGREEMENT_SUM)
        kl = min(kl + one.kl_sum, _MAX_KL_SUM)
    return total.model_copy(update={**counts, "latency": latency, "agreement_sum": agreement, "kl_sum": kl})


def latency_quantile(stats: VersionStats, q: float) -> float | None:
    """The upper bound of the latency bucket holding the ``q`` quantile (nearest rank), in seconds.

    None when there are no answers; ``math.inf`` when it falls in the last bucket (longer than every bound).
    """
    if isinstance(q, bool) or not isinstance(q, int | float) or not 0 <= q <= 1:
        raise BadRequest(f"quantile must be a number from 0 to 1, got {q!r}")
    total = sum(stats.latency)
    if total <= 0:
        return None
    # Rounded first: 0.07 * 100 is 7.000000000000001 in binary, and its ceiling would skip an answer.
    rank = max(1, math.ceil(round(q * total, 9)))
    seen = 0
    for i, n in enumerate(stats.latency):
        seen += n
        if seen >= rank:
            return LATENCY_BUCKETS_S[i] if i < len(LATENCY_BUCKETS_S) else math.inf
    return math.inf  # unreachable: the last bucket reaches the total


def bucket_of(latency_s: float) -> int:
    """The index in ``VersionStats.latency`` where an answer that took ``latency_s`` seconds is counted."""
    return bisect_left(LATENCY_BUCKETS_S, latency_s)


# --- parsing -----------------------------------------------------------------------------------------------------


def _allowed_names() -> str:
    return ", ".join(GATES)


def _gate(name: object) -> GateDefault:
    if not isinstance(name, str) or name not in GATES:
        raise BadRequest(f"unknown gate {name!r}; the gates are {_allowed_names()}")
    return GATES[name]


def _range_text(gate: GateDefault) -> str:
    if math.isinf(gate.high):
        return f"{gate.unit}, a finite number of at least {gate.low:g}"
    return f"{gate.unit}, a number from {gate.low:g} to {gate.high:g}"


def _threshold(name: str, value: object) -> float:
    gate = GATES[name]
    # bool is an int in Python; "true" as a threshold is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"gate {name!r}: threshold {value!r} is a {type(value).__name__}; expected "
                         f"{_range_text(gate)}")
    number = float(value)
    if not math.isfinite(number) or not gate.low <= number <= gate.high:
        raise BadRequest(f"gate {name!r}: threshold {value!r} is out of range; expected {_range_text(gate)}")
    return number


def _min_samples(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MIN_SAMPLES:
        raise BadRequest(f"gate {name!r}: min_samples {value!r} is not allowed; expected a whole number "
                         f"from 1 to {MAX_MIN_SAMPLES}")
    return value


def _spec(name: str, value: object) -> GateSpec:
    default = GATES[name].spec
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in ("threshold", "min_samples", "direction"))
        if unknown:
            raise BadRequest(f"gate {name!r}: unknown field(s) {', '.join(unknown)}; allowed: threshold, "
                             "min_samples")
        if "direction" in value and value["direction"] != default.direction:
            raise BadRequest(f"gate {name!r}: direction is {default.direction!r} and cannot be changed "
                             f"(got {value['direction']!r})")
        threshold = _threshold(name, value["threshold"]) if "threshold" in value else default.threshold
        samples = _min_samples(name, value["min_samples"]) if "min_samples" in value else default.min_samples
        return GateSpec(threshold=threshold, min_samples=samples, direction=default.direction)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"gate {name!r}: {value!r} is a {type(value).__name__}; expected a threshold "
                         f"({_range_text(GATES[name])}), an object {{\"threshold\": x, \"min_samples\": n}}, "
                         "or null/false to turn the gate off")
    return GateSpec(threshold=_threshold(name, value), min_samples=default.min_samples, direction=default.direction)


def parse_gates(raw: Mapping[str, Any] | None, *, use_defaults: bool = True) -> dict[str, GateSpec]:
    """Gate settings from a request: name → threshold, ``{"threshold", "min_samples"}``, or null/false (off)."""
    gates = dict(DEFAULT_GATES) if use_defaults else {}
    if raw is None:
        return gates
    if not isinstance(raw, Mapping):
        raise BadRequest(f"gates must be an object mapping gate names to thresholds, got {type(raw).__name__}; "
                         f"the gates are {_allowed_names()}")
    for name, value in raw.items():
        _gate(name)
        if value is None or value is False:
            gates.pop(name, None)
        else:
            gates[name] = _spec(name, value)
    return gates


def parse_gate_option(text: str) -> tuple[str, float | None]:
    """``NAME=THRESHOLD`` (or ``NAME=off``) from the command line, checked like ``parse_gates`` checks a threshold."""
    name, sep, number = text.partition("=")
    name, number = name.strip(), number.strip()
    if not sep or not name or not number:
        raise BadRequest(f"gate option {text!r} is not NAME=THRESHOLD (e.g. error_rate=0.05); "
                         f"the gates are {_allowed_names()}")
    _gate(name)
    if number.lower() == "off":
        return name, None
    try:
        value = float(number)
    except ValueError:
        raise BadRequest(f"gate option {text!r}: {number!r} is not a number; expected "
                         f"{_range_text(GATES[name])}") from None
    return name, _threshold(name, value)


# --- evaluation --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    stable: VersionStats
    candidate: VersionStats
    task_score: float | None
    baseline_score: float | None
    task_samples: int


@dataclass(frozen=True)
class _Measure:
    """What a gate measured: the value (None: nothing yet), its samples, and the sentence without the verdict."""

    value: float | None
    samples: int
    text: str
    skipped: bool = False


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _fraction(part: float, whole: int) -> float | None:
    return part / whole if whole > 0 else None


def _versions(i: _Inputs) -> str:
    return f"v{i.candidate.version} and v{i.stable.version}"


def _fraction_gate(field: str, label: str) -> Callable[[_Inputs], _Measure]:
    def measure(i: _Inputs) -> _Measure:
        cand = _fraction(getattr(i.candidate, field), i.candidate.requests)
        stable = _fraction(getattr(i.stable, field), i.stable.requests)
        if cand is None:
            return _Measure(None, 0, f"{label}: no answers from v{i.candidate.version} yet")
        # No stable answers yet (the whole share on the candidate): hold the candidate to an absolute bound.
        base = 0.0 if stable is None else stable
        shown = "no answers" if stable is None else _pct(stable)
        return _Measure(cand - base, i.candidate.requests,
                        f"{label} {_pct(cand)} on v{i.candidate.version} vs {shown} on v{i.stable.version}")
    return measure


def _latency_p99(i: _Inputs) -> _Measure:
    samples = min(sum(i.candidate.latency), sum(i.stable.latency))
    cand, stable = latency_quantile(i.candidate, 0.99), latency_quantile(i.stable, 0.99)
    if cand is None or stable is None:
        return _Measure(None, samples, f"p99 latency: {_versions(i)} have not both answered yet")
    text = f"p99 latency {cand:g} s on v{i.candidate.version} vs {stable:g} s on v{i.stable.version}"
    if math.isinf(cand) and math.isinf(stable):
        return _Measure(math.nan, samples, text + " (both past the last bucket, so they cannot be compared)")
    return _Measure(cand / stable, samples, text)


def _nonfinite(i: _Inputs) -> _Measure:
    n, answers = i.candidate.nonfinite, i.candidate.requests
    if n == 0 and answers == 0:
        return _Measure(None, 0, f"non-finite logits: no answers from v{i.candidate.version} yet")
    return _Measure(float(n), answers,
                    f"{n} of {answers} answers on v{i.candidate.version} had non-finite logits")


def _length_shift(i: _Inputs) -> _Measure:
    samples = min(i.candidate.requests, i.stable.requests)
    cand = _fraction(i.candidate.output_tokens, i.candidate.requests)
    stable = _fraction(i.stable.output_tokens, i.stable.requests)
    if cand is None or stable is None:
        return _Measure(None, samples, f"mean output length: {_versions(i)} have not both answered yet")
    text = f"mean output {cand:.1f} tokens on v{i.candidate.version} vs {stable:.1f} on v{i.stable.version}"
    if stable == 0:
        # Any output where the stable version said nothing is a full shift; nothing from both is none.
        return _Measure(1.0 if cand > 0 else 0.0, samples, text)
    return _Measure(abs(cand / stable - 1), samples, text)


def _per_compared(field: str, label: str) -> Callable[[_Inputs], _Measure]:
    def measure(i: _Inputs) -> _Measure:
        n = i.candidate.compared
        mean = _fraction(getattr(i.candidate, field), n)
        if mean is None:
            return _Measure(None, 0, f"{label} on v{i.candidate.version}: no prompts compared yet")
        return _Measure(mean, n, f"{label} on v{i.candidate.version} over {n} compared prompts")
    return measure


def _task_score(i: _Inputs) -> _Measure:
    score, base = i.task_score, i.baseline_score
    if score is None:
        return _Measure(None, i.task_samples, "no task score was computed for the candidate", skipped=True)
    if base is None:
        return _Measure(None, i.task_samples, f"task score {score:.2f} on v{i.candidate.version}, but no baseline "
                        f"score for v{i.stable.version} to compare with", skipped=True)
    text = f"task score {score:.2f} on v{i.candidate.version} vs {base:.2f} on v{i.stable.version}"
    if not (0 <= score <= 1 and 0 <= base <= 1):
        return _Measure(math.nan, i.task_samples, text + " (scores must lie in 0..1)")
    return _Measure(base - score, i.task_samples, text)


_MEASURES: Mapping[str, Callable[[_Inputs], _Measure]] = MappingProxyType({
    "error_rate": _fraction_gate("errors", "error rate"),
    "latency_p99": _latency_p99,
    "empty_output": _fraction_gate("empty", "empty answers"),
    "nonfinite": _nonfinite,
    "length_shift": _length_shift,
    "token_agreement": _per_compared("agreement_sum", "token agreement"),
    "kl_divergence": _per_compared("kl_sum", "KL divergence"),
    "task_score": _task_score,
})


def _points(x: float) -> str:
    return f"{x * 100:+.1f} points"


# How a gate's value and threshold read in a reason: (value, threshold).
_TEXTS: Mapping[str, tuple[Callable[[float], str], Callable[[float], str]]] = MappingProxyType({
    "error_rate": (_points, _points),
    "latency_p99": (lambda x: f"{x:.2f}x", lambda x: f"{x:.2f}x"),
    "empty_output": (_points, _points),
    "nonfinite": (lambda x: f"{x:g}", lambda x: f"{x:g}"),
    "length_shift": (lambda x: f"{x * 100:.0f}% shift", lambda x: f"{x * 100:.0f}% shift"),
    "token_agreement": (_pct, _pct),
    "kl_divergence": (lambda x: f"{x:.3g} nats/token", lambda x: f"{x:.3g} nats/token"),
    "task_score": (lambda x: f"down {x:.2f}" if x >= 0 else f"up {-x:.2f}", lambda x: f"drop of {x:.2f}"),
})


def _judge(name: str, spec: GateSpec, m: _Measure) -> GateResult:
    def result(verdict: Verdict, reason: str, value: float | None = m.value) -> GateResult:
        return GateResult(name=name, value=value, threshold=spec.threshold, direction=spec.direction,
                          samples=m.samples, min_samples=spec.min_samples, verdict=verdict, reason=reason)

    if m.skipped:
        return result("skipped", m.text + "; gate skipped")
    value_text, limit_text = _TEXTS[name]
    if m.samples < spec.min_samples or m.value is None:
        shown = m.value if m.value is not None and math.isfinite(m.value) else None
        so_far = f"{m.samples} of {spec.min_samples} samples so far"
        return result("waiting", f"{m.text}: {value_text(shown)}, {so_far}" if shown is not None
                      else f"{m.text}: {so_far}", shown)
    if not math.isfinite(m.value):
        return result("fail", f"{m.text}: the measure is not a finite number, so the candidate cannot be "
                              "shown to be healthy", None)
    bound = "allowed" if spec.direction == "max" else "required"
    limit = f"{limit_text(spec.threshold)} {bound}"
    failed = m.value > spec.threshold if spec.direction == "max" else m.value < spec.threshold
    if failed:
        side = "over" if spec.direction == "max" else "under"
        return result("fail", f"{m.text}: {value_text(m.value)}, {side} the {limit}")
    return result("pass", f"{m.text}: {value_text(m.value)}, within the {limit}")


def evaluate(specs: dict[str, GateSpec], stable: VersionStats, candidate: VersionStats, *,
             task_score: float | None = None, baseline_score: float | None = None,
             task_samples: int = 0) -> list[GateResult]:
    """One result per gate in ``specs`` (in their order): the candidate's merged stats against the stable's."""
    if isinstance(task_samples, bool) or not isinstance(task_samples, int) or task_samples < 0:
        raise BadRequest(f"task_samples must be a whole number of evaluation prompts, 0 or more; got {task_samples!r}")
    for name, spec in specs.items():
        expected = _gate(name).spec.direction
        if spec.direction != expected:
            # A lower bound judged as an upper one would pass exactly the candidates it should stop.
            raise BadRequest(f"gate {name!r} has direction {expected!r}; got a spec with {spec.direction!r} "
                             "(build specs with parse_gates)")
    inputs = _Inputs(stable, candidate, task_score, baseline_score, task_samples)
    return [_judge(name, spec, _MEASURES[name](inputs)) for name, spec in specs.items()]


def verdict(results: Iterable[GateResult]) -> Literal["pass", "fail", "waiting"]:
    """"fail" if any gate fails, else "waiting" if any waits for samples, else "pass" (skipped gates pass)."""
    verdicts = {r.verdict for r in results}
    if "fail" in verdicts:
        return "fail"
    if "waiting" in verdicts:
        return "waiting"
    return "pass"
