"""Runs: create (one active at a time; a second is refused with 409), execute in a thread, stop, resume, and
recover after a restart (a run whose trainer process is gone becomes ``interrupted``)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from lockstep.core.clock import Clock
from lockstep.core.errors import BadRequest, Conflict, LockstepError, NotFound
from lockstep.core.settings import Settings
from lockstep.store import ModelStore
from lockstep.sync.coordinator import Coordinator
from lockstep.trainer.cluster.view import ClusterView
from lockstep.trainer.jobs.template import job_name
from lockstep.trainer.runs.context import RunContext, RunStopped
from lockstep.trainer.runs.finetune import FinetuneKind
from lockstep.trainer.runs.job import JobKind
from lockstep.trainer.runs.record import RESUMABLE, Owner, RunRecord, RunStatus
from lockstep.trainer.runs.rewards import RewardError
from lockstep.trainer.runs.simulation import SimulationKind
from lockstep.trainer.runs.store import RunFiles, RunStore, UnreadableRun
from lockstep.trainer.server.events import EventBus
from lockstep.trainer.server.metrics import TrainerMetrics
from lockstep.trainer.server.publish_jobs import Publisher

log = logging.getLogger(__name__)

FOREIGN_STALE_S = 120.0  # seconds without an update before a run owned by another host counts as interrupted
SAMPLES_IN_LIST = 8  # samples per run in GET /runs (GET /runs/{id} has them all)


class RunKind(Protocol):
    """What a kind of run provides: its parameters, a check before it starts, and the work."""

    @property
    def name(self) -> str: ...

    @property
    def params_model(self) -> type[BaseModel]: ...

    def check(self, params: Any, settings: Settings, store: ModelStore) -> None: ...

    def execute(self, ctx: RunContext, params: Any) -> None: ...


KINDS: dict[str, RunKind] = {k.name: k for k in (SimulationKind(), FinetuneKind(), JobKind())}
# Kinds whose versions arrive through the upload API from pods of their own: while such a run is active, an
# upload publish that names it (metadata run_id) is its own, not one competing with it.
UPLOADING_KINDS = frozenset({JobKind.name})
ENDED = frozenset({RunStatus.FAILED, RunStatus.STOPPED, RunStatus.SUCCEEDED})  # for good, unless resumed


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(["params", *(str(p) for p in err.get("loc", ()))])  # a check of the whole: "params"
        if err.get("type") == "extra_forbidden":
            parts.append(f"{where} is not a parameter of this run kind")
        else:
            parts.append(f"{where}: {str(err.get('msg')).removeprefix('Value error, ')}")
    return "; ".join(parts)


def _owner_gone(owner: Owner | None, updated_at: float | None, now: float, instance: str) -> bool:
    """Whether the process that ran a run is gone (so the run was interrupted)."""
    if owner is None or owner.instance == instance:
        return owner is None
    if owner.host != socket.gethostname():
        return now - (updated_at or 0.0) > FOREIGN_STALE_S
    if owner.pid == os.getpid():
        return True  # our pid, another instance: a restarted container reuses pids
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RunManager:
    """Owns the runs of this trainer."""

    def __init__(self, settings: Settings, *, runs: RunStore, coordinator: Coordinator, publisher: Publisher,
                 cluster: ClusterView, events: EventBus, metrics: TrainerMetrics, clock: Clock) -> None:
        self.settings = settings
        self.runs = runs
        self.coordinator = coordinator
        self.publisher = publisher
        self.cluster = cluster
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self.instance = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._active: tuple[RunContext, threading.Thread] | None = None
        self._starting = False  # a run's parameters are being checked: the one run slot is taken
        self._shutting_down = False

    # ------------------------------------------------------------------ startup and shutdown
    def recover(self) -> list[str]:
        """Mark runs whose trainer process is gone as interrupted; returns their ids."""
        marked = []
        now = self.clock.time()
        for record in self.runs.load_all():
            if record.status.active and _owner_gone(record.owner, record.updated_at, now, self.instance):
                who = f"{record.owner.host} pid {record.owner.pid}" if record.owner else "no process"
                record.move(RunStatus.INTERRUPTED, now, error=f"interrupted: the trainer running it ({who}) "
                            f"went away; POST /runs/{record.id}/resume continues from its last checkpoint")
                self.runs.files(record.id).write(record)
                marked.append(record.id)
                log.warning("run %s was %s when its trainer went away: marked interrupted", record.id,
                            record.kind)
        return marked

    def shutdown(self, wait_s: float = 30.0) -> None:
        """Stop the active run at its next check; it ends as interrupted (resumable), not stopped."""
        with self._lock:
            self._shutting_down = True
            active = self._active
        if active is not None:
            active[0].leaving = True
            active[0].stop_event.set()
            active[1].join(timeout=wait_s)

    # ------------------------------------------------------------------ commands
    def active(self) -> RunRecord | None:
        with self._lock:
            return self._active[0].record if self._active else None

    def uploading_run(self, run_id: Any) -> RunRecord | None:
        """The active run when ``run_id`` names it and its pods publish through the upload API (a job run).

        409 when it names such a run that has ended (failed, stopped, succeeded): its Job, still running somewhere
        (a failure to delete it), would publish versions that no run tracks. An interrupted run's Job goes on
        publishing: its versions are listed when the run is resumed."""
        with self._lock:
            active = self._active[0].record if self._active else None
        if active is not None and active.id == run_id and active.kind in UPLOADING_KINDS:
            return active
        if not isinstance(run_id, str):
            return None
        try:
            record = self.runs.get(run_id)
        except (BadRequest, NotFound, UnreadableRun):
            return None  # not one of this trainer's runs: an ordinary publish that names its own run
        if record.kind in UPLOADING_KINDS and record.status in ENDED:
            raise Conflict(f"run {run_id} ({record.kind}) is {record.status.value}, so the publishes of its pods "
                           f"are refused; delete its Job (kubectl delete job {job_name(run_id)}), or resume the run "
                           f"(POST /runs/{run_id}/resume) to follow it again")
        return None

    def logs(self, run_id: str) -> str:
        """``GET /runs/{id}/logs``: the pod logs a job run copied, oldest pod first (empty for other kinds)."""
        self._record(run_id)  # 404 for an unknown run
        logs = self.runs.files(run_id).logs()
        return "".join(f"==> {name} <==\n{text.rstrip()}\n" for name, text in logs.items())

    def _refuse_if_active(self) -> None:
        """Conflict while a run is active or starting, or a publish runs; the caller holds ``self._lock``."""
        if self._shutting_down:
            raise Conflict("the trainer is shutting down; start the run on the restarted trainer")
        active = self._active[0].record if self._active else None
        if active is not None:
            raise Conflict(f"run {active.id} ({active.kind}) is {active.status.value}; one run at a time: "
                           f"stop it (POST /runs/{active.id}/stop) or wait for it to finish. Runs are "
                           "refused, not queued")
        if self._starting:
            raise Conflict("another run is being started (its parameters are being checked); one run at a time")
        self.publisher.check_idle()  # a run publishes versions itself: not while another publish runs

    @contextmanager
    def _starting_run(self) -> Iterator[None]:
        """Take the one run slot while a new run's parameters are checked. The checks build TRL's config, and
        transformers resets accelerate's process-wide state when it does: beside a running trainer that kills
        it, so a run is refused (409) before its checks, never after them."""
        with self._lock:
            self._refuse_if_active()
            self._starting = True
        try:
            yield
        finally:
            with self._lock:
                self._starting = False

    def _parse(self, kind_name: str, params: dict[str, Any], *, stored: bool = False) -> tuple[RunKind, BaseModel]:
        """``params`` parsed against the kind's schema (400); ``stored``: read back from a run's record (every
        default written out)."""
        kind = KINDS.get(kind_name)
        if kind is None:
            raise BadRequest(f"unknown run kind {kind_name!r}; allowed: {', '.join(sorted(KINDS))}")
        try:
            parsed = kind.params_model.model_validate(params, context={"stored": stored})
        except ValidationError as exc:
            raise BadRequest(_describe(exc)) from None
        return kind, parsed

    def create(self, kind_name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Validate and start a run; 400 for bad parameters, 409 while another run is active."""
        kind, parsed = self._parse(kind_name, params)
        with self._starting_run():
            kind.check(parsed, self.settings, self.coordinator.store)
            with self._lock:
                self.publisher.check_idle()  # one may have started while the parameters were checked
                record = RunRecord(id=self.runs.new_id(kind.name), kind=kind.name,
                                   params=parsed.model_dump(mode="json", by_alias=True), created_at=self.clock.time())
                self._launch(kind, parsed, record, resume=False)
        return self.view(record)

    def resume(self, run_id: str) -> dict[str, Any]:
        """Continue an interrupted or stopped run from its last checkpoint (409 when it cannot be)."""
        record = self.runs.get(run_id)
        if record.status not in RESUMABLE:
            raise Conflict(f"run {run_id} is {record.status.value}; only an interrupted or stopped run can "
                           "be resumed")
        kind, parsed = self._parse(record.kind, record.params, stored=True)
        with self._starting_run():
            kind.check(parsed, self.settings, self.coordinator.store)
            with self._lock:
                self.publisher.check_idle()
                self.runs.get(run_id)  # 404 when it was deleted meanwhile
                record.resumes += 1
                self._launch(kind, parsed, record, resume=True)
        return self.view(record)

    def delete(self, run_id: str) -> None:
        """Remove an ended run and its files (checkpoints included); 409 while it is queued or running. A run
        whose run.json cannot be read is removed too (it cannot be the active run, which is held in memory)."""
        try:
            record = self._record(run_id)  # 404 for an unknown run
        except UnreadableRun:
            with self._lock:
                self.runs.delete(run_id)
            log.warning("run %s deleted, with its unreadable run.json", run_id)
            return
        with self._lock:
            active = self._active is not None and self._active[0].record.id == run_id
            if active or record.status.active:
                raise Conflict(f"run {run_id} is {record.status.value}; stop it (POST /runs/{run_id}/stop) and "
                               "delete it once it has ended")
            self.runs.delete(run_id)
        log.info("run %s deleted", run_id)

    def stop(self, run_id: str) -> dict[str, Any]:
        """Ask the active run to stop at its next check (between steps or rounds)."""
        record = self.runs.get(run_id)
        with self._lock:
            active = self._active
        if active is None or active[0].record.id != run_id:
            raise Conflict(f"run {run_id} is {record.status.value}, not active; nothing to stop")
        active[0].stop_event.set()
        active[0].record.set_progress(active[0].record.progress.step, active[0].record.progress.total,
                                      "stopping at the next step", self.clock.time())
        active[0].save()
        return self.view(active[0].record)

    # ------------------------------------------------------------------ execution
    def _launch(self, kind: RunKind, params: BaseModel, record: RunRecord, *, resume: bool) -> None:
        if record.status is not RunStatus.QUEUED:
            record.move(RunStatus.QUEUED, self.clock.time())
        files = self.runs.files(record.id)
        ctx = RunContext(record=record, files=files, settings=self.settings, clock=self.clock,
                         coordinator=self.coordinator, publisher=self.publisher, cluster=self.cluster,
                         events=self.events, metrics=self.metrics, resume=resume)
        ctx.save()
        thread = threading.Thread(target=self._execute, args=(kind, params, ctx), name=f"run-{record.id}",
                                  daemon=True)
        self._active = (ctx, thread)
        thread.start()

    def _execute(self, kind: RunKind, params: BaseModel, ctx: RunContext) -> None:
        record = ctx.record
        record.owner = Owner.current(self.instance)
        record.move(RunStatus.RUNNING, self.clock.time())
        ctx.save()
        self.metrics.run_active.labels(kind=kind.name).set(1)
        final, error = RunStatus.SUCCEEDED, None
        try:
            kind.execute(ctx, params)
        except RunStopped:
            final = RunStatus.INTERRUPTED if self._shutting_down else RunStatus.STOPPED
            error = "interrupted: the trainer shut down" if self._shutting_down else None
        except (RewardError, LockstepError) as exc:
            final, error = RunStatus.FAILED, str(exc)
            log.warning("run %s failed: %s", record.id, exc)
        except Exception as exc:  # a bug or a library error: recorded, the trainer keeps serving
            final, error = RunStatus.FAILED, f"{type(exc).__name__}: {exc}"
            log.exception("run %s failed", record.id)
        finally:
            record.move(final, self.clock.time(), error=error)
            if final is RunStatus.SUCCEEDED:
                record.set_progress(record.progress.total, record.progress.total, "done", self.clock.time())
            else:  # not what it was busy with when it ended ("step 6: evaluating v48...")
                ended = {RunStatus.STOPPED: "stopped", RunStatus.INTERRUPTED: "interrupted"}.get(final, "failed")
                record.set_progress(record.progress.step, record.progress.total,
                                    f"{ended} after step {record.progress.step} of {record.progress.total}"
                                    + ("; resume it to go on" if final in RESUMABLE else ""), self.clock.time())
            if final not in RESUMABLE:  # only a resume reads them; record.checkpoint still says which it was
                ctx.files.drop_checkpoints()
            self.metrics.run_active.labels(kind=kind.name).set(0)
            self.metrics.runs_total.labels(kind=kind.name, status=final.value).inc()
            # Saved and let go together: a client that reads the run as ended may resume it (or start the next
            # one) at once, without a 409 from the moment in between.
            with self._lock:
                ctx.save()
                if self._active is not None and self._active[0] is ctx:
                    self._active = None
            log.info("run %s %s%s", record.id, final.value, f": {error}" if error else "")

    # ------------------------------------------------------------------ views
    def _record(self, run_id: str) -> RunRecord:
        with self._lock:
            if self._active is not None and self._active[0].record.id == run_id:
                return self._active[0].record
        return self.runs.get(run_id)

    def view(self, record: RunRecord, *, samples: int | None = None) -> dict[str, Any]:
        """A run as the API shows it: the record plus its metric points, evaluations, rounds and samples."""
        files: RunFiles = self.runs.files(record.id)
        lines = files.metrics()
        steps: dict[int, dict[str, Any]] = {}
        for point in lines:
            if point.get("type") == "step":
                # A resumed run redoes the steps after its checkpoint: the last point of a step wins.
                steps[int(point["step"])] = point
        all_samples = files.samples()
        return {**record.model_dump(mode="json"),
                "metrics": [steps[k] for k in sorted(steps)],
                "evals": [p for p in lines if p.get("type") == "eval"],
                "rounds": [p for p in lines if p.get("type") == "round"],
                "samples": all_samples if samples is None else all_samples[-samples:],
                "active": record.status.active}

    def get(self, run_id: str) -> dict[str, Any]:
        return self.view(self._record(run_id))

    def list(self) -> list[dict[str, Any]]:
        records = {r.id: r for r in self.runs.load_all()}
        with self._lock:
            if self._active is not None:
                records[self._active[0].record.id] = self._active[0].record
        ordered = sorted(records.values(), key=lambda r: r.created_at, reverse=True)
        return [self.view(r, samples=SAMPLES_IN_LIST) for r in ordered]
