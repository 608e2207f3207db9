"""The trainer's HTTP API (docs/api.md): runs, publishes, rollbacks, the cluster view and a live event stream.

A thin layer over ``RunManager``, ``Publisher``, ``ClusterView`` and ``Monitor``; blocking work runs in
threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lockstep.core.atomic import read_json
from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import BadRequest, Conflict, NotFound
from lockstep.core.http import check_bearer, install_error_handlers
from lockstep.core.settings import Settings
from lockstep.sync.coordinator import Coordinator
from lockstep.trainer.cluster import ClusterView
from lockstep.trainer.discovery import Discovery
from lockstep.trainer.events import STREAM_S, EventBus
from lockstep.trainer.manager import RunManager
from lockstep.trainer.metrics import TrainerMetrics
from lockstep.trainer.monitor import Monitor
from lockstep.trainer.publishes import Publisher, check_ref
from lockstep.trainer.run_store import RunStore
from lockstep.trainer.schemas import PublishRequest, RollbackRequest, RunRequest

log = logging.getLogger(__name__)

HISTORY_LIMIT = 200  # publishes returned by GET /history (newest)


@dataclass
class Trainer:
    """Everything the routes use, built once per app."""

    settings: Settings
    coordinator: Coordinator
    events: EventBus
    metrics: TrainerMetrics
    publisher: Publisher
    cluster: ClusterView
    monitor: Monitor
    runs: RunManager
    ready: bool = False

    @classmethod
    def build(cls, settings: Settings, *, clock: Clock, discovery: Discovery | None = None) -> Trainer:
        if settings.shared_dir is None:
            raise BadRequest("the trainer needs the shared folder: set LOCKSTEP_SHARED_DIR or pass "
                             "--shared DIR")
        coordinator = Coordinator(settings, clock=clock, owner=f"trainer@{socket.gethostname()}")
        events = EventBus()
        metrics = TrainerMetrics()
        publisher = Publisher(coordinator, events=events, metrics=metrics, clock=clock)
        cluster = ClusterView(settings, discovery=discovery or Discovery(settings, clock=clock),
                              read_state=coordinator.read_state, clock=clock)
        monitor = Monitor(cluster, events=events, metrics=metrics, clock=clock)
        runs = RunManager(settings, runs=RunStore(settings.shared_dir / "runs"), coordinator=coordinator,
                          publisher=publisher, cluster=cluster, events=events, metrics=metrics, clock=clock)
        return cls(settings, coordinator, events, metrics, publisher, cluster, monitor, runs)

    def history(self) -> dict[str, Any]:
        """Publishes recorded in ``<shared>/history`` (by every coordinator) and the replica flips seen."""
        assert self.settings.shared_dir is not None
        folder = self.settings.shared_dir / "history"
        publishes = []
        names = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
        for name in names[-HISTORY_LIMIT:]:
            try:
                publishes.append(read_json(folder / name))
            except (OSError, ValueError):
                continue  # being written, or torn by a crash: skipped
        return {"publishes": publishes, "flips": list(self.monitor.flips)}

    def versions(self) -> dict[str, Any]:
        manifests = self.coordinator.store.list()
        committed = self.coordinator.read_state().committed
        return {"committed": committed.version if committed else 0,
                "versions": [{**m.model_dump(mode="json", exclude={"files"}), "size": m.total_size,
                              "files": len(m.files)} for m in manifests]}


def _sse_stream(bus: EventBus, last_id: int | None) -> AsyncIterator[bytes]:
    async def stream() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"  # milliseconds before a browser reconnects
        async for event in bus.subscribe(last_id, max_s=STREAM_S):
            yield b": keepalive\n\n" if event is None else event.sse()

    return stream()


def create_app(settings: Settings, *, clock: Clock = SYSTEM_CLOCK,
               discovery: Discovery | None = None) -> FastAPI:
    """The trainer app; fails at once (BadRequest) without a shared folder."""
    trainer = Trainer.build(settings, clock=clock, discovery=discovery)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        interrupted = await asyncio.to_thread(trainer.runs.recover)
        if interrupted:
            log.warning("runs interrupted by the last shutdown: %s", ", ".join(interrupted))
        trainer.monitor.start()
        trainer.ready = True
        log.info("trainer ready (shared folder %s, discovery %s)", settings.shared_dir,
                 trainer.cluster.discovery.configured.value)
        try:
            yield
        finally:
            trainer.ready = False
            await asyncio.to_thread(trainer.runs.shutdown)
            trainer.monitor.stop()
            trainer.cluster.close()

    app = FastAPI(title="Lockstep trainer", version="1", lifespan=lifespan)
    app.state.trainer = trainer
    install_error_handlers(app)

    def mutate(request: Request) -> None:
        check_bearer(request, settings.api_token)

    # ------------------------------------------------------------------ probes
    @app.get("/healthz", summary="The process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="200 once past startup (runs recovered, monitor running)")
    async def ready() -> JSONResponse:
        active = trainer.runs.active()
        body = {"ready": trainer.ready, "active_run": active.id if active else None}
        return JSONResponse(body, status_code=200 if trainer.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(trainer.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ the cluster
    @app.get("/cluster", summary="Committed and pending versions, every replica, convergence, discovery")
    async def cluster() -> dict[str, Any]:
        snap = await asyncio.to_thread(trainer.cluster.snapshot)
        return snap.as_dict()

    @app.get("/versions", summary="Published versions (their MANIFEST without the file list)")
    async def versions() -> dict[str, Any]:
        return await asyncio.to_thread(trainer.versions)

    @app.get("/history", summary="Publishes and replica flips, for the timeline")
    async def history() -> dict[str, Any]:
        return await asyncio.to_thread(trainer.history)

    # ------------------------------------------------------------------ publishing
    def refuse_during_run() -> None:
        active = trainer.runs.active()
        if active is not None:
            raise Conflict(f"run {active.id} ({active.kind}) is active and publishes versions itself; "
                           f"stop it first (POST /runs/{active.id}/stop)")
        if trainer.publisher.busy:
            raise Conflict("a publish is already in progress; follow it on GET /publishes and retry when "
                           "it ends")
        trainer.coordinator.check_free()

    @app.post("/publish", status_code=202, summary="Publish a model reference to every replica (two phases)")
    async def publish(body: PublishRequest, request: Request) -> dict[str, Any]:
        mutate(request)
        refuse_during_run()
        await asyncio.to_thread(check_ref, body.model, settings, trainer.coordinator.store)
        return trainer.publisher.submit(body.model, policy=body.policy, timeout_s=body.timeout_s)

    @app.post("/rollback", status_code=202, summary="Commit an earlier version again")
    async def rollback(body: RollbackRequest, request: Request) -> dict[str, Any]:
        mutate(request)
        refuse_during_run()
        if body.to is not None and body.to != 0:
            await asyncio.to_thread(trainer.coordinator.store.get, body.to)  # 404 names what is published
        if body.to is None:
            committed = (await asyncio.to_thread(trainer.coordinator.read_state)).committed
            if committed is None or committed.version == 0:
                raise NotFound("nothing to roll back to: no version was committed after the initial model")
        label = f"versions/{body.to}" if body.to is not None else "the version before the committed one"
        return trainer.publisher.submit(label, kind="rollback", rollback_to=body.to, policy=body.policy,
                                        timeout_s=body.timeout_s)

    @app.get("/publishes", summary="Publish jobs of this trainer, newest first")
    async def publishes() -> dict[str, Any]:
        return {"publishes": trainer.publisher.jobs()}

    @app.get("/publishes/{publish_id}", summary="One publish job and its result")
    async def publish_job(publish_id: str) -> dict[str, Any]:
        return trainer.publisher.job(publish_id)

    # ------------------------------------------------------------------ runs
    @app.post("/runs", status_code=201, summary="Start a run (409 while another is active)")
    async def create_run(body: RunRequest, request: Request) -> dict[str, Any]:
        mutate(request)
        return await asyncio.to_thread(trainer.runs.create, body.kind, body.params)

    @app.get("/runs", summary="Every run, newest first")
    async def list_runs() -> dict[str, Any]:
        return {"runs": await asyncio.to_thread(trainer.runs.list)}

    @app.get("/runs/{run_id}", summary="One run with its metrics, evaluations, rounds and samples")
    async def get_run(run_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(trainer.runs.get, run_id)

    @app.post("/runs/{run_id}/stop", status_code=202, summary="Stop a run at its next step")
    async def stop_run(run_id: str, request: Request) -> dict[str, Any]:
        mutate(request)
        return await asyncio.to_thread(trainer.runs.stop, run_id)

    @app.post("/runs/{run_id}/resume", status_code=202, summary="Resume a run from its last checkpoint")
    async def resume_run(run_id: str, request: Request) -> dict[str, Any]:
        mutate(request)
        return await asyncio.to_thread(trainer.runs.resume, run_id)

    # ------------------------------------------------------------------ events
    @app.get("/events", summary="Server-sent events: cluster (every second), run, publish, version")
    async def events(request: Request) -> StreamingResponse:
        raw = request.headers.get("last-event-id", "")
        last_id = int(raw) if raw.isdigit() else None
        return StreamingResponse(_sse_stream(trainer.events, last_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app

