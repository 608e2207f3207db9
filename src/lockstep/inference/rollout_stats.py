"""Per-version counters of the rollout in progress, reported as ``VersionStats`` in each heartbeat."""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from lockstep.engine import FinalEvent, FinishReason
from lockstep.sync.protocol import LATENCY_BUCKETS_S, MAX_GENERATION, VersionStats

log = logging.getLogger(__name__)

MAX_VERSIONS = 4  # a rollout has two (stable, candidate); a few more absorb answers straddling a reset
# A comparison whose KL is not finite (non-finite logits) or absurd counts as this many nats per token: far above
# any gate, yet the sum stays within VersionStats' bound for as many prompts as a Count can hold.
MAX_KL = 100.0
_MAX_AGREEMENT_SUM = 1e12  # VersionStats' bounds on the sums
_MAX_KL_SUM = 1e15


@dataclass
class _Counters:
    requests: int = 0
    errors: int = 0
    empty: int = 0
    nonfinite: int = 0
    output_tokens: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    compared: int = 0
    agreement_sum: float = 0.0
    kl_sum: float = 0.0
    shadow_dropped: int = 0


def latency_bucket(latency_s: float) -> int:
    """Index into ``VersionStats.latency``: the first bound of ``LATENCY_BUCKETS_S`` at or above ``latency_s``,
    or ``len(LATENCY_BUCKETS_S)`` (the overflow bucket) above the last one or when not a number."""
    if not math.isfinite(latency_s):
        return len(LATENCY_BUCKETS_S)
    return bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)


def _add(count: int, n: int) -> int:
    return min(count + n, MAX_GENERATION)  # saturates instead of producing a report the schema refuses


class RolloutStats:
    """Thread-safe per-version accumulators since the rollout began; only counters, so memory stays bounded."""

    def __init__(self, rollout_id: str | None = None) -> None:
        self._lock = threading.Lock()
        self._rollout_id = rollout_id
        self._versions: dict[int, _Counters] = {}
        self._ignored = 0

    @property
    def rollout_id(self) -> str | None:
        """The rollout the counters belong to (None before the first ``reset``)."""
        with self._lock:
            return self._rollout_id

    @property
    def ignored(self) -> int:
        """Records dropped because ``MAX_VERSIONS`` versions were already counted."""
        with self._lock:
            return self._ignored

    def reset(self, rollout_id: str) -> bool:
        """Start counting for ``rollout_id``: all counters go back to zero when it is a new rollout.

        Returns True when it was; the same id again changes nothing, so callers may call it on every poll."""
        with self._lock:
            if rollout_id == self._rollout_id:
                return False
            self._rollout_id = rollout_id
            self._versions.clear()
            self._ignored = 0
            return True

    def _counters(self, version: int) -> _Counters | None:  # under the lock
        counters = self._versions.get(version)
        if counters is None:
            if len(self._versions) >= MAX_VERSIONS:
                if self._ignored == 0:
                    log.warning("rollout stats: already counting v%s; records of v%d are ignored",
                                sorted(self._versions), version)
                self._ignored += 1
                return None
            counters = self._versions[version] = _Counters()
        return counters

    def record_answer(self, version: int, final: FinalEvent, nonfinite: bool = False) -> None:
        """Count one finished answer of ``version``: its outcome, tokens and latency."""
        error = final.finish_reason == FinishReason.ERROR
        with self._lock:
            c = self._counters(version)
            if c is None:
                return
            c.requests = _add(c.requests, 1)
            if error:
                c.errors = _add(c.errors, 1)
            elif final.completion_tokens == 0:
                c.empty = _add(c.empty, 1)
            if nonfinite:
                c.nonfinite = _add(c.nonfinite, 1)
            c.output_tokens = _add(c.output_tokens, max(0, final.completion_tokens))
            bucket = latency_bucket(final.latency_s)
            c.latency[bucket] = _add(c.latency[bucket], 1)

    def record_comparison(self, version: int, agreement: float, kl: float) -> None:
        """Count one prompt compared with the other version: token agreement (0..1) and mean KL (nats/token)."""
        agreement = min(1.0, max(0.0, agreement)) if math.isfinite(agreement) else 0.0
        kl = min(MAX_KL, max(0.0, kl)) if math.isfinite(kl) else MAX_KL  # a rounding -1e-9 is 0; NaN is the worst
        with self._lock:
            c = self._counters(version)
            if c is None:
                return
            c.compared = _add(c.compared, 1)
            c.agreement_sum = min(c.agreement_sum + agreement, _MAX_AGREEMENT_SUM)
            c.kl_sum = min(c.kl_sum + kl, _MAX_KL_SUM)

    def record_shadow_dropped(self, version: int) -> None:
        """Count one prompt sampled for shadowing (or a canary comparison) that was skipped: the bound was reached."""
        with self._lock:
            c = self._counters(version)
            if c is not None:
                c.shadow_dropped = _add(c.shadow_dropped, 1)

    def snapshot(self, versions: Iterable[int]) -> list[VersionStats]:
        """The counters of ``versions`` (zeros for a version with no record yet), in the order given."""
        with self._lock:
            copies = {v: replace(c, latency=list(c.latency)) if (c := self._versions.get(v)) else _Counters()
                      for v in versions}
        return [VersionStats(version=v, requests=c.requests, errors=c.errors, empty=c.empty,
                             nonfinite=c.nonfinite, output_tokens=c.output_tokens, latency=c.latency,
                             compared=c.compared, agreement_sum=c.agreement_sum, kl_sum=c.kl_sum,
                             shadow_dropped=c.shadow_dropped)
                for v, c in copies.items()]
