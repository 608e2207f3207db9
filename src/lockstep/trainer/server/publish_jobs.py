"""Publish jobs: every publish the trainer coordinates (HTTP, rollback, or a run's checkpoint), with progress.

A job runs the coordinator's two phases, reports each step on the event stream, counts the outcome in the
metrics and keeps the result for ``GET /publishes/{id}``. When another coordinator holds the lease (a replica
handling ``POST /update-model``, say), the job waits for it instead of failing at once.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lockstep.core.clock import Clock
from lockstep.core.errors import Conflict, LockstepError, NotFound
from lockstep.core.settings import CommitPolicy, Settings
from lockstep.models import loader
from lockstep.models.refs import RefKind, parse_ref
from lockstep.store import ModelStore
from lockstep.sync.coordinator import Coordinator, PublishResult, Source, with_lease_wait
from lockstep.sync.rollout import RolloutControl, RolloutPlan
from lockstep.trainer.server.events import EventBus
from lockstep.trainer.server.metrics import TrainerMetrics

log = logging.getLogger(__name__)

KEEP_JOBS = 200  # finished jobs kept in memory for GET /publishes (the shared history keeps every publish)


def check_ref(ref: str, settings: Settings, store: ModelStore) -> None:
    """Refuse a reference that is malformed or names nothing, before anything starts (400/404).

    Repo ids are checked when the job resolves them (a download can take minutes); offline, a repo id
    missing from the cache is refused here.
    """
    parsed = parse_ref(ref)
    if parsed.kind is RefKind.VERSION:
        assert parsed.version is not None
        if parsed.version != 0:
            store.get(parsed.version)
    elif parsed.kind is RefKind.DIRECTORY:
        assert parsed.path is not None
        loader.check_safe_files(parsed.path, settings)
    elif parsed.kind is RefKind.REPO and settings.hf_hub_offline:
        loader.resolve(parsed, settings, store)


@dataclass
class PublishJob:
    """One publish and what became of it."""

    id: str
    kind: str  # publish | rollback | run | rollout
    model: str
    status: str = "running"  # running | done | failed
    phase: str = "queued"  # the coordinator's last progress event
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    run_id: str | None = None
    started_at: float = 0.0
    finished_at: float | None = None
    version: int | None = None  # the version it publishes, once the coordinator named it

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "publish_id": self.id, "kind": self.kind, "model": self.model,
                "status": self.status, "phase": self.phase, "progress": self.progress, "result": self.result,
                "error": self.error, "run_id": self.run_id, "started_at": self.started_at,
                "finished_at": self.finished_at, "version": self.version}

    def brief(self) -> dict[str, Any]:
        """What a refused publish is told about this one."""
        return {"id": self.id, "kind": self.kind, "model": self.model, "version": self.version,
                "phase": self.phase, "run_id": self.run_id, "started_at": self.started_at}


class PublishBusy(Conflict):
    """A publish was asked for while another runs: refused, never queued behind it."""

    code = "publish_in_progress"

    def __init__(self, running: PublishJob) -> None:
        version = f" v{running.version}" if running.version is not None else ""
        super().__init__(f"publish {running.id} ({running.kind}{version} of {running.model}) is running, phase "
                         f"{running.phase}; one publish at a time: follow it on GET /publishes/{running.id} and "
                         "send yours when it has ended")
        self.running = running.brief()


class Publisher:
    """Runs publish jobs through one ``Coordinator`` (one at a time in this process)."""

    def __init__(self, coordinator: Coordinator, *, events: EventBus, metrics: TrainerMetrics,
                 clock: Clock) -> None:
        self.coordinator = coordinator
        self.store: ModelStore = coordinator.store
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self._jobs: OrderedDict[str, PublishJob] = OrderedDict()
        self._lock = threading.Lock()
        self._busy = threading.Lock()  # one publish at a time from this trainer
        self._running: PublishJob | None = None  # the job that holds (or was promised) that one slot
        self.rollout: RolloutControl | None = None  # the rollout running, or the last one

    # ------------------------------------------------------------------ jobs
    def jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.as_dict() for j in reversed(self._jobs.values())]

    def job(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no publish {job_id!r} in this trainer's memory (GET /publishes lists them); a publish "
                           "started before the trainer restarted is in GET /history, by version")
        return job.as_dict()

    @property
    def busy(self) -> bool:
        return self.running() is not None or self._busy.locked()

    def running(self) -> PublishJob | None:
        """The publish job running now (or started and about to run), if any."""
        with self._lock:
            return self._running

    def check_idle(self) -> None:
        """``PublishBusy`` (409, naming the running job) while a publish runs."""
        running = self.running()
        if running is not None:
            raise PublishBusy(running)

    def _new_job(self, kind: str, model: str, run_id: str | None, *, exclusive: bool = False) -> PublishJob:
        """Record a job; ``exclusive``: take the one publish slot now, or raise ``PublishBusy``."""
        job = PublishJob(id=f"pub-{secrets.token_hex(4)}", kind=kind, model=model, run_id=run_id,
                         started_at=self.clock.time())
        with self._lock:
            if exclusive:
                if self._running is not None:
                    raise PublishBusy(self._running)
                self._running = job
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP_JOBS:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].status == "running":
                    break
                self._jobs.popitem(last=False)
        self.events.publish("publish", job.as_dict())
        return job

    def _free(self, job: PublishJob) -> None:
        """Give up the publish slot ``job`` holds (another job may hold it by now: then nothing changes)."""
        with self._lock:
            if self._running is job:
                self._running = None

    def _progress(self, job: PublishJob) -> Any:
        def report(event: str, details: dict[str, Any]) -> None:
            job.phase = event
            if isinstance(details.get("version"), int):
                job.version = details["version"]
            if event == "staging":
                job.progress = dict(details)
            self.events.publish("publish", job.as_dict())

        return report

    # ------------------------------------------------------------------ running
    def submit(self, model: str, *, kind: str = "publish", rollback_to: int | None = None,
               policy: CommitPolicy | None = None, timeout_s: float | None = None, label: str | None = None,
               metadata: dict[str, Any] | None = None, then: Callable[[], None] | None = None,
               run_id: str | None = None, plan: RolloutPlan | None = None) -> dict[str, Any]:
        """Start a publish (or rollback) in the background; the job's id comes back at once.

        ``PublishBusy`` (409) while another publish runs: refused, not queued. ``label`` names the job and the
        new version's MANIFEST ``source`` (default: ``model``); ``then`` runs when the job ends, however it
        ends (not when it was refused); ``run_id``: the run it publishes for (a job run's upload)."""
        job = self._new_job("rollout" if plan else kind, label or model, run_id, exclusive=True)
        if kind == "rollback" and rollback_to is not None:
            job.version = rollback_to
        if kind == "rollback":
            def work(progress: Any) -> PublishResult:
                return self._with_lease_wait(lambda: self.coordinator.rollback(
                    rollback_to, policy=policy, timeout_s=timeout_s, progress=progress))
        elif plan is not None:
            control = self.rollout = RolloutControl(plan)
            work = self._rollout_work(model, label, metadata, timeout_s, control)
        else:
            work = self._ref_work(model, label, metadata, policy, timeout_s)

        def run() -> None:
            try:
                self._execute(job, work)
            except Exception:  # recorded in the job; logged there
                pass
            finally:
                if then is not None:
                    then()

        try:
            threading.Thread(target=run, name=f"publish-{job.id}", daemon=True).start()
        except BaseException:
            self._free(job)
            raise
        return job.as_dict()

    def publish_dir(self, path: Path, *, label: str, metadata: dict[str, Any], run_id: str | None = None,
                    policy: CommitPolicy | None = None, timeout_s: float | None = None) -> PublishResult:
        """Copy a model folder in as the next version and publish it; blocks until committed or aborted."""
        job = self._new_job("run" if run_id else "publish", label, run_id)

        def work(progress: Any) -> PublishResult:
            state = self.coordinator.read_state()
            parent = state.committed.version if state.committed else 0
            manifest = self.store.publish_dir(path, source=label, parent=parent, metadata=metadata,
                                              allow_pickle=self.coordinator.settings.allow_pickle)
            source = Source(manifest.version, ModelStore.ref(manifest.version), manifest.digest)
            return self._with_lease_wait(lambda: self.coordinator.publish(
                ModelStore.ref(manifest.version), source=source, policy=policy, timeout_s=timeout_s,
                progress=progress))

        return self._execute(job, work)

    def publish_ref(self, model: str, *, run_id: str | None = None, policy: CommitPolicy | None = None,
                    timeout_s: float | None = None, metadata: dict[str, Any] | None = None) -> PublishResult:
        """Publish any model reference; blocks until committed or aborted."""
        job = self._new_job("run" if run_id else "publish", model, run_id)
        return self._execute(job, self._ref_work(model, None, metadata, policy, timeout_s))

    def _ref_work(self, model: str, label: str | None, metadata: dict[str, Any] | None,
                  policy: CommitPolicy | None, timeout_s: float | None) -> Callable[[Any], PublishResult]:
        """Both phases for a reference: its files into the store (unless the committed version has them)."""
        def work(progress: Any) -> PublishResult:
            source = self.coordinator.prepare_source(model, metadata=metadata, label=label, progress=progress)
            return self._with_lease_wait(lambda: self.coordinator.publish(
                model, source=source, policy=policy, timeout_s=timeout_s, progress=progress))

        return work

    def _rollout_work(self, model: str, label: str | None, metadata: dict[str, Any] | None, timeout_s: float | None,
                      control: RolloutControl) -> Callable[[Any], PublishResult]:
        """A rollout of a reference: its files into the store, then staged and given its shares step by step."""
        def work(progress: Any) -> PublishResult:
            try:
                source = self.coordinator.prepare_source(model, metadata=metadata, label=label, progress=progress)
                result = self._with_lease_wait(lambda: self.coordinator.rollout(
                    model, control.plan, control=control, source=source, timeout_s=timeout_s, progress=progress))
            except Exception as exc:
                if not control.done:  # it never got as far as a decision of its own
                    control.phase, control.reason = "aborted", str(exc)[:500]
                raise
            if not control.done:  # nothing to roll out: the committed version already has this content
                control.phase, control.reason = "unchanged", result.reason
            return result  # counted in lockstep_rollouts_total from its history record (metrics.HistoryCounts)

        return work

    def export_rollout(self) -> None:
        """The rollout's share and gates as gauges, read at each scrape."""
        control, m = self.rollout, self.metrics
        if control is None or control.done:  # no rollout in progress: no share, step or gate to show
            m.rollout_share.set(0)
            m.rollout_step.set(-1)
            for gauge in (m.rollout_gate_failing, m.rollout_gate_value, m.rollout_gate_threshold):
                gauge.clear()
            return
        view = control.view()
        m.rollout_share.set(view["share"])
        m.rollout_step.set(view["step"])
        for result in control.results:
            if result.value is not None:
                m.rollout_gate_value.labels(gate=result.name).set(result.value)
            m.rollout_gate_threshold.labels(gate=result.name).set(result.threshold)
            m.rollout_gate_failing.labels(gate=result.name).set(1 if result.verdict == "fail" else 0)

    def _with_lease_wait(self, attempt: Callable[[], PublishResult]) -> PublishResult:
        return with_lease_wait(attempt, self.clock)

    def _execute(self, job: PublishJob, work: Any) -> PublishResult:
        with self._busy:
            with self._lock:
                self._running = job
            try:
                result: PublishResult = work(self._progress(job))
            except Exception as exc:
                self._free(job)  # before the job reads as ended: its client may send the next publish at once
                job.status, job.error, job.finished_at = "failed", str(exc), self.clock.time()
                job.phase = "failed"
                self.metrics.publish_total.labels(outcome="failed").inc()
                self.events.publish("publish", job.as_dict())
                if not isinstance(exc, LockstepError):
                    log.exception("publish %s of %s failed", job.id, job.model)
                else:
                    log.warning("publish %s of %s failed: %s", job.id, job.model, exc)
                raise
            finally:
                self._free(job)
        job.status, job.result, job.finished_at = "done", result.as_dict(), self.clock.time()
        job.phase = result.outcome
        if result.outcome == "unchanged":  # no history record: nothing was decided. The rest are counted from
            self.metrics.publish_total.labels(outcome=result.outcome).inc()  # theirs (metrics.HistoryCounts)
        self.events.publish("publish", job.as_dict())
        log.info("publish %s: %s", job.id, result.summary())
        return result
