"""Watches the cluster every second: version changes and replica flips (for the timeline), gauges, and the
``cluster`` snapshot on the event stream while someone listens."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from lockstep.core.clock import Clock
from lockstep.sync.coordinator import Coordinator, ReplicaReport
from lockstep.trainer.cluster.view import ClusterSnapshot, ClusterView
from lockstep.trainer.server.events import EventBus
from lockstep.trainer.server.metrics import TrainerMetrics

log = logging.getLogger(__name__)

INTERVAL_S = 1.0  # seconds between snapshots
KEEP_FLIPS = 2000  # replica flips remembered for GET /history


class Monitor:
    """A background thread; ``tick()`` is one pass (tests call it directly)."""

    def __init__(self, cluster: ClusterView, *, events: EventBus, metrics: TrainerMetrics,
                 clock: Clock) -> None:
        self.cluster = cluster
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self.flips: deque[dict[str, Any]] = deque(maxlen=KEEP_FLIPS)
        self.latest: ClusterSnapshot | None = None
        self._serving: dict[str, int | None] = {}
        self._committed: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the monitor must outlive a bad read; the next tick tries again
                log.exception("cluster monitor tick failed")
            self._stop.wait(INTERVAL_S)

    def tick(self) -> ClusterSnapshot:
        listening = self.events.subscribers > 0
        snap = self.cluster.snapshot(probe=listening, discover=listening)
        self.latest = snap
        conv = snap.convergence()
        self.metrics.committed_version.set(snap.committed_version)
        tracked = [r for r in snap.replicas if (r.in_heartbeats if self.cluster.uses_heartbeats else r.reachable)]
        self.metrics.replicas_live.set(len(tracked))
        self.metrics.replicas_converged.set(conv["at_version"])
        if self._committed != snap.committed_version:
            if self._committed is not None:
                self.events.publish("version", {"what": "commit", "version": snap.committed_version,
                                                "previous": self._committed, "committed": snap.committed})
            self._committed = snap.committed_version
        for replica in tracked:
            seen = self._serving.get(replica.replica_id, -1)
            if replica.serving_version is not None and replica.serving_version != seen:
                flip = {"replica_id": replica.replica_id, "version": replica.serving_version,
                        "at": replica.serving_since or snap.time}
                self.flips.append(flip)
                if seen != -1:
                    self.events.publish("version", {"what": "flip", **flip, "previous": seen})
            self._serving[replica.replica_id] = replica.serving_version
        if listening:
            self.events.publish("cluster", snap.as_dict())
        return snap


class CatchUpLoop:
    """A thread that runs the coordinator's ``catch_up`` every ``interval_s`` and reports what it did."""

    def __init__(self, coordinator: Coordinator, report: Callable[[ReplicaReport, int], None],
                 interval_s: float = 1.0) -> None:
        self.coordinator = coordinator
        self.report = report
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="catch-up", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                done = self.coordinator.catch_up()
                committed = self.coordinator.read_state().committed if done else None
                for report in done:
                    self.report(report, committed.version if committed else 0)
            except Exception:  # the loop must outlive one bad pass; the next one tries again
                log.exception("catching up replicas failed")
