"""The trainer's Prometheus metrics, in their own registry (several apps may live in one test process)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lockstep.core.atomic import read_json
from lockstep.sync.reports import PublishOutcome
from lockstep.sync.rollout import ENDED

# Every outcome a publish can end with (a rollout that rolls back ends its publish too), then a publish that raised.
PUBLISH_OUTCOMES = (*(outcome.value for outcome in PublishOutcome), "failed")


class TrainerMetrics:
    """Publishes, runs and the cluster as the trainer sees it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.publish_total = Counter("lockstep_publish_total", "Publishes by outcome "
                                     f"({', '.join(PUBLISH_OUTCOMES)})", ["outcome"], registry=r)
        self.publish_duration = Histogram("lockstep_publish_duration_seconds", "Seconds from publish start "
                                          "to commit or abort", registry=r,
                                          buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
        self.runs_total = Counter("lockstep_runs_total", "Runs that ended, by kind and status",
                                  ["kind", "status"], registry=r)
        self.run_active = Gauge("lockstep_run_active", "1 while a run of this kind is active", ["kind"],
                                registry=r)
        self.run_step = Gauge("lockstep_run_step", "Step (finetune) or round (simulation) of the active run",
                              registry=r)
        self.run_progress = Gauge("lockstep_run_progress_ratio", "Fraction of the active run done",
                                  registry=r)
        self.run_reward = Gauge("lockstep_run_reward", "Mean reward of the last finetune step's rollouts",
                                registry=r)
        self.run_eval_reward = Gauge("lockstep_run_eval_reward", "Mean reward on held-out prompts at the "
                                     "last published version", registry=r)
        self.run_loss = Gauge("lockstep_run_loss", "Loss of the last finetune step", registry=r)
        self.committed_version = Gauge("lockstep_committed_version", "Version committed in sync_state.json",
                                       registry=r)
        self.replicas_live = Gauge("lockstep_replicas_live", "Replicas with a fresh heartbeat", registry=r)
        self.replicas_converged = Gauge("lockstep_replicas_converged", "Live replicas ready on the "
                                        "committed version", registry=r)
        self.rollout_share = Gauge("lockstep_rollout_share_percent", "Percent of new requests the rollout's "
                                   "candidate answers fleet-wide (0 when no rollout runs)", registry=r)
        self.rollout_step = Gauge("lockstep_rollout_step", "Step of the rollout in progress (-1: none)", registry=r)
        self.rollout_gate_value = Gauge("lockstep_rollout_gate_value", "Each gate's value on the rollout's "
                                        "candidate", ["gate"], registry=r)
        self.rollout_gate_threshold = Gauge("lockstep_rollout_gate_threshold", "Each gate's threshold", ["gate"],
                                            registry=r)
        self.rollout_gate_failing = Gauge("lockstep_rollout_gate_failing", "1 while a gate fails", ["gate"],
                                          registry=r)
        self.rollout_total = Counter("lockstep_rollouts_total", "Rollouts that ended, by outcome (promoted, "
                                     "rolled back, aborted) and trigger (gates, person, none)",
                                     ["outcome", "trigger"], registry=r)
        self.store_bytes_served = Counter("lockstep_store_bytes_served", "Bytes of versions the trainer's store "
                                          "sent to replicas (chunks and files), by version", ["version"], registry=r)
        self.rollout_step.set(-1)
        for kind in ("simulation", "finetune", "job"):
            self.run_active.labels(kind=kind).set(0)
        for outcome in PUBLISH_OUTCOMES:
            self.publish_total.labels(outcome=outcome)


class HistoryCounts:
    """Every publish and rollout that ends in the history folder, whoever ran it (this trainer, ``lockstep
    publish`` in its pod, a replica's ``/update-model``), counted into the trainer's counters once, at the scrape
    after it ended: the alerts on them cover every way to publish, not only the trainer's own jobs. What ended
    before the trainer started is not counted (a counter starts at 0 with its process)."""

    SETTLED_S = 86_400.0  # a record started this long before the trainer is taken as ended without reading it

    def __init__(self, folder: Path, metrics: TrainerMetrics) -> None:
        self.folder = folder
        self.metrics = metrics
        self._counted: set[str] = set()
        started_ms = (time.time() - self.SETTLED_S) * 1000
        self._counted.update(n for n in self._names() if _started_ms(n) < started_ms)
        self._scan(count=False)

    def update(self) -> None:
        """Count the records that ended since the last call (file reads: call it off the event loop)."""
        self._scan(count=True)

    def _names(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.folder) if n.endswith(".json") and not n.startswith(".")]
        except OSError:
            return []

    def _scan(self, *, count: bool) -> None:
        for name in self._names():
            if name in self._counted:
                continue
            try:
                record = read_json(self.folder / name)
            except (OSError, ValueError):
                continue  # being written, or torn by a crash
            # A decision is kept as soon as it is written, then rewritten with its duration when it ends.
            if not isinstance(record, dict) or not record.get("total_s"):
                continue
            self._counted.add(name)
            if count:
                self._count(record)

    def _count(self, record: dict[str, Any]) -> None:
        m, outcome, seconds = self.metrics, record.get("outcome"), record.get("total_s")
        if outcome in PUBLISH_OUTCOMES:
            m.publish_total.labels(outcome=outcome).inc()
            if isinstance(seconds, (int, float)) and outcome != PublishOutcome.UNCHANGED.value:
                m.publish_duration.observe(float(seconds))
        rollout = record.get("rollout")
        if isinstance(rollout, dict) and rollout.get("phase") in ROLLOUT_ENDINGS:
            trigger = "gates" if rollout.get("automatic_rollback") else "person" if rollout.get("human") else "none"
            m.rollout_total.labels(outcome=rollout["phase"], trigger=trigger).inc()


ROLLOUT_ENDINGS = ENDED - {"unchanged"}  # a rollout of unchanged content never started


def _started_ms(name: str) -> float:
    """``<started_at in ms>-v<N>.json``: when the publish started; infinity for a name of another shape."""
    head = name.split("-", 1)[0]
    return float(head) if head.isdigit() else float("inf")
