"""What a run's code works with: its record and files, the cluster, publishing, progress and stopping."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from lockstep.core.clock import Clock
from lockstep.core.settings import Settings
from lockstep.sync.coordinator import Coordinator
from lockstep.sync.protocol import Heartbeat
from lockstep.trainer.cluster.view import ClusterView
from lockstep.trainer.runs.record import RunRecord
from lockstep.trainer.runs.store import RunFiles
from lockstep.trainer.server.events import EventBus
from lockstep.trainer.server.metrics import TrainerMetrics
from lockstep.trainer.server.publish_jobs import Publisher

log = logging.getLogger(__name__)


class RunStopped(Exception):
    """Raised inside a run when a stop was asked for; the run ends as ``stopped``."""


@dataclass
class RunContext:
    """One run's view of the trainer."""

    record: RunRecord
    files: RunFiles
    settings: Settings
    clock: Clock
    coordinator: Coordinator
    publisher: Publisher
    cluster: ClusterView
    events: EventBus
    metrics: TrainerMetrics
    resume: bool = False
    stop_event: threading.Event = field(default_factory=threading.Event)
    # Set with stop_event when the trainer shuts down: what outlives the process (a job run's Job) is left
    # running, for the resumed run to attach to.
    leaving: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def run_id(self) -> str:
        return self.record.id

    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def check_stop(self) -> None:
        if self.stop_event.is_set():
            raise RunStopped(f"run {self.run_id} was stopped")

    def save(self) -> None:
        """Persist run.json and tell subscribers."""
        with self._lock:
            self.record.updated_at = self.clock.time()
            self.files.write(self.record)
            self.events.publish("run", self.brief())

    def brief(self) -> dict[str, Any]:
        return self.record.model_dump(mode="json")

    def progress(self, step: int, total: int, message: str) -> None:
        self.record.set_progress(step, total, message, self.clock.time())
        self.metrics.run_step.set(step)
        self.metrics.run_progress.set(self.record.progress.fraction)
        log.info("run %s: %s (%d/%d)", self.run_id, message, step, total)
        self.save()

    def metric(self, point: dict[str, Any]) -> None:
        """Append one point to metrics.jsonl (with the time) and tell subscribers."""
        point = {"time": self.clock.time(), **point}
        self.files.append_metric(point)
        if point.get("type") == "step":
            if point.get("reward") is not None:
                self.metrics.run_reward.set(point["reward"])
            if point.get("loss") is not None:
                self.metrics.run_loss.set(point["loss"])
        elif point.get("type") == "eval" and point.get("reward") is not None:
            self.metrics.run_eval_reward.set(point["reward"])
        self.events.publish("run", {"id": self.run_id, "status": self.record.status.value, "point": point,
                                    "progress": self.record.progress.model_dump()})

    def wait_until_serving(self, version: int, timeout_s: float) -> list[Heartbeat]:
        """Block until every live replica (at least one) serves ``version`` and is ready; else Conflict."""
        return self.coordinator.wait_until_serving(version, timeout_s=timeout_s)

    def sample(self, sample: dict[str, Any]) -> None:
        self.files.append_sample({"time": self.clock.time(), **sample})
