"""A run's record and lifecycle: ``RunStatus`` moves only through ``RunRecord.move``."""

from __future__ import annotations

import os
import socket
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lockstep.core.errors import Conflict
from lockstep.trainer.runs.staleness import VersionSamples


class RunStatus(StrEnum):
    """Where a run is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    INTERRUPTED = "interrupted"  # its trainer process went away while it ran

    @property
    def active(self) -> bool:
        return self in (RunStatus.QUEUED, RunStatus.RUNNING)


# Allowed moves. A resumed run goes from interrupted or stopped back to running.
_MOVES: dict[RunStatus, set[RunStatus]] = {
    RunStatus.QUEUED: {RunStatus.RUNNING, RunStatus.FAILED, RunStatus.STOPPED, RunStatus.INTERRUPTED},
    RunStatus.RUNNING: {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.STOPPED, RunStatus.INTERRUPTED},
    RunStatus.INTERRUPTED: {RunStatus.QUEUED},
    RunStatus.STOPPED: {RunStatus.QUEUED},
    RunStatus.SUCCEEDED: set(),
    RunStatus.FAILED: set(),
}
RESUMABLE = (RunStatus.INTERRUPTED, RunStatus.STOPPED)


class Progress(BaseModel):
    """How far a run is: ``step`` of ``total`` (fraction in [0, 1]) and what it is doing now."""

    step: int = 0
    total: int = 0
    fraction: float = 0.0
    message: str = ""


class Owner(BaseModel):
    """The trainer process executing a run; a restarted trainer compares it with itself."""

    model_config = ConfigDict(extra="ignore")

    host: str
    pid: int
    instance: str  # random per trainer process: a reused pid (pid 1 in a container) is not mistaken for us

    @classmethod
    def current(cls, instance: str) -> Owner:
        return cls(host=socket.gethostname(), pid=os.getpid(), instance=instance)


class Checkpoint(BaseModel):
    """The last checkpoint a run published (``checkpoints/checkpoint-<step>/``)."""

    step: int
    path: str  # relative to the run's folder
    version: int | None = None  # the version it was published as


class RunRecord(BaseModel):
    """``runs/<id>/run.json``: everything about a run except its metric and sample streams."""

    model_config = ConfigDict(extra="ignore")

    id: str
    kind: str
    params: dict[str, Any]
    status: RunStatus = RunStatus.QUEUED
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    progress: Progress = Field(default_factory=Progress)
    error: str | None = None
    owner: Owner | None = None
    versions: list[int] = Field(default_factory=list)  # versions this run published, in order
    start_version: int | None = None  # what the cluster served when the run began
    checkpoint: Checkpoint | None = None
    # finetune: what trained each version this run published (samples used by staleness, dropped), by version
    version_samples: dict[str, VersionSamples] = Field(default_factory=dict)
    summary: dict[str, Any] = Field(default_factory=dict)
    resumes: int = 0

    def move(self, status: RunStatus, now: float, error: str | None = None) -> None:
        """The one place a run's status changes."""
        if status not in _MOVES[self.status]:
            raise Conflict(f"run {self.id} is {self.status.value}; it cannot become {status.value}")
        self.status = status
        self.updated_at = now
        if status is RunStatus.RUNNING and self.started_at is None:
            self.started_at = now
        if status is RunStatus.QUEUED:
            self.finished_at = None
            self.error = None
        if not status.active:
            self.finished_at = now
        if error is not None:
            self.error = error

    def set_progress(self, step: int, total: int, message: str, now: float) -> None:
        fraction = min(1.0, step / total) if total > 0 else 0.0
        self.progress = Progress(step=step, total=total, fraction=round(fraction, 4), message=message)
        self.updated_at = now
