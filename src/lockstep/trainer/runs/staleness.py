"""How far behind a rollout is, counted in versions this run published, from the version tag of its answer.

A sample's *staleness* is the number of this run's versions published after the version that produced it
(``X-Model-Version``), at the moment the update uses it, a version being published counting as one: the policy
being updated already descends from that checkpoint. 0 = the newest version of the policy. A sample is used only
when its staleness is at most ``max_staleness``; the others are dropped and counted. Answers from a version this
run did not produce (someone else published meanwhile) are *foreign* and never used. Time plays no part: the tag
says which weights wrote the answer.
"""

from __future__ import annotations

import threading
from enum import StrEnum

from pydantic import BaseModel, Field


class Freshness(StrEnum):
    """What the bound says of one sample."""

    FRESH = "fresh"  # at most max_staleness versions behind: used
    STALE = "stale"  # further behind: dropped
    FOREIGN = "foreign"  # not produced by this run: dropped


class VersionSamples(BaseModel):
    """What trained one published version: samples used (by staleness) and dropped; its MANIFEST carries it."""

    used: int = 0
    dropped_stale: int = 0
    foreign: int = 0
    errors: int = 0  # answers that failed (HTTP error, no replica)
    mislabeled: int = 0  # header and body disagreed on the version
    staleness: dict[str, int] = Field(default_factory=dict)  # "0", "1", ...: samples used at that staleness
    versions: dict[str, int] = Field(default_factory=dict)  # samples used, by the version that produced them


class VersionWindow:
    """The versions this run's policy produced, oldest first, and the bound; safe to share between threads."""

    def __init__(self, known: list[int], max_staleness: int) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be ≥ 0, not {max_staleness}")
        self.max_staleness = max_staleness
        self._known = list(dict.fromkeys(known))
        self._publishing = 0  # checkpoints handed to a publish that has not committed yet
        self._started = 0  # publishes started since this window was made, committed or not
        self._changed = threading.Condition()

    @property
    def latest(self) -> int:
        with self._changed:
            return self._known[-1]

    @property
    def known(self) -> list[int]:
        with self._changed:
            return list(self._known)

    @property
    def publishing(self) -> int:
        with self._changed:
            return self._publishing

    @property
    def started(self) -> int:
        """Publishes started since this window was made (each checkpoint handed to a publish counts once)."""
        with self._changed:
            return self._started

    def publishing_started(self) -> None:
        """A checkpoint of the policy is being published: every older version is one further behind."""
        with self._changed:
            self._publishing += 1
            self._started += 1

    def publishing_ended(self, version: int | None) -> None:
        """The publish committed ``version`` (the newest from now on), or failed (None)."""
        with self._changed:
            self._publishing = max(0, self._publishing - 1)
            if version is not None and version not in self._known:
                self._known.append(version)
            self._changed.notify_all()

    def wait_settled(self, timeout_s: float) -> bool:
        """Until no publish of this run is in flight (True), or ``timeout_s`` passed first (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._publishing == 0, timeout=timeout_s)

    def published(self, version: int) -> None:
        """``version`` was committed from this run's policy."""
        self.publishing_started()
        self.publishing_ended(version)

    def staleness(self, version: int | None) -> int | None:
        """This run's versions published (or being published) since ``version``; None when not this run's."""
        with self._changed:
            if version is None or version not in self._known:
                return None
            return len(self._known) - 1 - self._known.index(version) + self._publishing

    def judge(self, version: int | None) -> Freshness:
        behind = self.staleness(version)
        if behind is None:
            return Freshness.FOREIGN
        return Freshness.FRESH if behind <= self.max_staleness else Freshness.STALE


class SampleBook:
    """Counts since the last publish (for the next version's MANIFEST) and since the last step (for metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = VersionSamples()
        self._step = VersionSamples()
        self._last_batch = VersionSamples()  # what the last step used: TRL's num_iterations trains on it again
        self._waited_s = 0.0  # the update's wait for rollouts since the last step

    def used(self, produced_by: int, staleness: int, n: int = 1) -> None:
        with self._lock:
            self._count_use(n, {str(staleness): n}, {str(produced_by): n})

    def _count_use(self, n: int, staleness: dict[str, int], versions: dict[str, int]) -> None:
        for book in (self._version, self._step):
            book.used += n
            for key, count in staleness.items():
                book.staleness[key] = book.staleness.get(key, 0) + count
            for key, count in versions.items():
                book.versions[key] = book.versions.get(key, 0) + count

    def reuse_last_batch(self) -> None:
        """This step trains on the last step's samples again (TRL's ``num_iterations``): they count as used once
        more, at the staleness they were judged at (no publish comes between; FinetuneParams sees to it)."""
        with self._lock:
            batch = self._last_batch
            self._count_use(batch.used, batch.staleness, batch.versions)

    def dropped(self, freshness: Freshness, n: int = 1) -> None:
        with self._lock:
            for book in (self._version, self._step):
                if freshness is Freshness.STALE:
                    book.dropped_stale += n
                elif freshness is Freshness.FOREIGN:
                    book.foreign += n

    def failed(self, *, errors: int = 0, mislabeled: int = 0) -> None:
        with self._lock:
            for book in (self._version, self._step):
                book.errors += errors
                book.mislabeled += mislabeled

    def waited(self, seconds: float) -> None:
        """The update waited ``seconds`` for its rollouts (the fleet, not the trainer, set the pace meanwhile)."""
        with self._lock:
            self._waited_s += seconds

    def take_step(self) -> VersionSamples:
        """What the last update step used and dropped; starts a new count."""
        with self._lock:
            step, self._step = self._step, VersionSamples()
            if step.used:
                self._last_batch = VersionSamples(used=step.used, staleness=dict(step.staleness),
                                                  versions=dict(step.versions))
            return step

    def take_wait(self) -> float:
        """Seconds the last update step waited for rollouts; starts a new count."""
        with self._lock:
            waited, self._waited_s = self._waited_s, 0.0
            return waited

    def take_version(self) -> VersionSamples:
        """What trained the version about to be published; starts a new count."""
        with self._lock:
            version, self._version = self._version, VersionSamples()
            return version

