"""What a publish did, per replica, and the rule that decides between commit and abort."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from lockstep.core.settings import CommitPolicy


class ReplicaOutcome(StrEnum):
    """What became of one replica in a publish."""

    STAGED = "staged"  # staged the version (or already served it); waiting for the commit
    FAILED = "failed"  # could not stage it (error says why)
    TIMEOUT = "timeout"  # still staging at the deadline, or when another replica failed
    SERVING = "serving"  # serves the committed version, ready
    BEHIND = "behind"  # committed but not serving it yet: unready until it catches up
    LOST = "lost"  # stopped reporting during the prepare: gone from the fleet; it catches up when it returns


class PublishOutcome(StrEnum):
    COMMITTED = "committed"
    ABORTED = "aborted"
    UNCHANGED = "unchanged"  # the committed version already has this content
    ROLLED_BACK = "rolled back"  # a rollout's gates failed, or someone aborted it: the committed version stays


@dataclass
class ReplicaReport:
    replica_id: str
    outcome: ReplicaOutcome
    error: str | None = None
    stage_seconds: float | None = None
    weights_digest: str | None = None

    def __post_init__(self) -> None:
        self.outcome = ReplicaOutcome(self.outcome)  # also from JSON (the trainer's client)


@dataclass
class PublishResult:
    """What a publish did, per replica."""

    version: int
    model: str
    outcome: PublishOutcome
    reason: str | None = None
    activate_at: float | None = None
    started_at: float = 0.0
    prepare_s: float = 0.0
    total_s: float = 0.0
    generation: int = 0
    rollback: bool = False
    replicas: list[ReplicaReport] = field(default_factory=list)
    rollout: dict[str, Any] | None = None  # a rollout's steps and gates (RolloutControl.view)

    def __post_init__(self) -> None:
        self.outcome = PublishOutcome(self.outcome)

    @property
    def ok(self) -> bool:
        return self.outcome in (PublishOutcome.COMMITTED, PublishOutcome.UNCHANGED)

    def summary(self) -> str:
        """One line: the version, what happened and why, and each replica's part (an unchanged one had none)."""
        head = f"v{self.version} {self.outcome}{f' ({self.reason})' if self.reason else ''}"
        if self.outcome is PublishOutcome.UNCHANGED and not self.replicas:
            return head
        return f"{head}: {', '.join(f'{r.replica_id}={r.outcome}' for r in self.replicas) or 'no live replicas'}"

    def as_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "replicas"},
                "replicas": [r.__dict__ for r in self.replicas]}


def commit_refusal(reports: list[ReplicaReport], policy: CommitPolicy) -> str | None:
    """Why a staged version must not be committed (different weights, or too few staged), or None."""
    reports = [r for r in reports if r.outcome is not ReplicaOutcome.LOST]  # gone: neither for nor against
    staged = [r for r in reports if r.outcome is ReplicaOutcome.STAGED]
    bad = [r for r in reports if r.outcome is not ReplicaOutcome.STAGED]
    if len({r.weights_digest for r in staged if r.weights_digest}) > 1:
        detail = ", ".join(f"{r.replica_id}={(r.weights_digest or 'none')[:12]}" for r in staged)
        return f"replicas loaded different weights ({detail}); refusing to commit"
    if not bad:
        return None
    detail = "; ".join(f"{r.replica_id}: {r.outcome}{' — ' + r.error if r.error else ''}" for r in bad)
    if policy is CommitPolicy.STRICT:
        return f"{len(bad)} of {len(reports)} replicas did not stage ({detail})"
    if len(staged) * 2 <= len(reports):
        return f"quorum not reached: {len(staged)} of {len(reports)} staged ({detail})"
    return None
