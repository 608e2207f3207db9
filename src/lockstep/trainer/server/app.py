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
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from lockstep.core.atomic import read_json
from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import BadRequest, Conflict, LeaseHeld, LockstepError, NotFound
from lockstep.core.guards import install_guard
from lockstep.core.http import check_bearer, error_body, install_error_handlers
from lockstep.core.numbers import parse_decimal
from lockstep.core.settings import Settings
from lockstep.models import loader
from lockstep.store.chunks import MAX_CHUNK_BYTES_ACCEPTED, ChunkEntry
from lockstep.store.manifest import MAX_VERSION, FileEntry, Manifest, check_model_dir
from lockstep.sync import retention
from lockstep.sync.coordinator import NOTHING_TO_ROLL_BACK_TO, Coordinator, ReplicaReport
from lockstep.sync.http_fleet import HttpFleet
from lockstep.sync.rollout import RolloutPlan, make_plan, rollout_in_progress
from lockstep.trainer.cluster.discovery import Discovery
from lockstep.trainer.cluster.view import ClusterView
from lockstep.trainer.runs.manager import RunManager
from lockstep.trainer.runs.store import RunStore
from lockstep.trainer.runs.tasks import get_task
from lockstep.trainer.server.events import STREAM_S, EventBus
from lockstep.trainer.server.metrics import HistoryCounts, TrainerMetrics
from lockstep.trainer.server.monitor import CatchUpLoop, Monitor
from lockstep.trainer.server.publish_jobs import PublishBusy, Publisher, check_ref
from lockstep.trainer.server.schemas import (
    ChunkedFile,
    PublishRequest,
    RollbackRequest,
    RolloutFields,
    RunRequest,
    UploadPublishRequest,
)
from lockstep.trainer.server.task_gate import fleet_task_score
from lockstep.trainer.server.uploads import UploadStore

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
    uploads: UploadStore
    history_counts: HistoryCounts
    catch_up: CatchUpLoop | None = None
    ready: bool = False

    @classmethod
    def build(cls, settings: Settings, *, clock: Clock, discovery: Discovery | None = None) -> Trainer:
        """With a shared folder, the coordinator writes sync_state.json; without one, it drives replicas over
        HTTP and keeps its store, runs and state in its own data folder (LOCKSTEP_TRAINER_DATA_DIR)."""
        owner = f"trainer@{socket.gethostname()}"
        events = EventBus()
        metrics = TrainerMetrics()
        discovery = discovery or Discovery(settings, clock=clock)
        cluster = ClusterView(settings, discovery=discovery, clock=clock)
        if settings.shared_dir is None:
            fleet = HttpFleet(settings, cluster.discovered_urls, clock=clock)
            coordinator = Coordinator.over_http(settings, fleet, clock=clock, owner=owner,
                                                data_dir=settings.trainer_data_path)
            fleet.new_bytes = lambda version: _new_bytes(coordinator, version)
        else:
            coordinator = Coordinator(settings, clock=clock, owner=owner)
        cluster.read_state = coordinator.read_state
        publisher = Publisher(coordinator, events=events, metrics=metrics, clock=clock)
        monitor = Monitor(cluster, events=events, metrics=metrics, clock=clock)
        runs = RunManager(settings, runs=RunStore(coordinator.data_dir / "runs"), coordinator=coordinator,
                          publisher=publisher, cluster=cluster, events=events, metrics=metrics, clock=clock)
        uploads = UploadStore(coordinator.data_dir / "uploads", clock, max_bytes=settings.max_upload_bytes,
                              max_files=settings.max_upload_files, max_open=settings.max_open_uploads)
        trainer = cls(settings, coordinator, events, metrics, publisher, cluster, monitor, runs, uploads,
                      HistoryCounts(coordinator.data_dir / "history", metrics))
        if coordinator.fleet.pushes:
            trainer.catch_up = CatchUpLoop(coordinator, trainer._caught_up)
        return trainer

    @property
    def data_dir(self) -> Path:
        """The shared folder, or (without one) the trainer's own data folder."""
        return self.coordinator.data_dir

    def _caught_up(self, report: ReplicaReport, version: int) -> None:
        self.events.publish("version", {"what": "catch-up", "replica_id": report.replica_id,
                                        "version": version, "outcome": report.outcome, "error": report.error})

    def history(self) -> dict[str, Any]:
        """Publishes recorded in ``<shared>/history`` (by every coordinator) and the replica flips seen."""
        folder = self.data_dir / "history"
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


# Path parameters, bounded like the bodies (/openapi.json states it): ids are short, versions have 12 digits.
PublishId = Annotated[str, PathParam(min_length=1, max_length=64)]
RunId = Annotated[str, PathParam(min_length=1, max_length=128)]
UploadId = Annotated[str, PathParam(min_length=1, max_length=64)]
Version = Annotated[int, PathParam(ge=0, le=MAX_VERSION)]
FilePath = Annotated[str, PathParam(min_length=1, max_length=1024)]
ChunkId = Annotated[str, PathParam(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]


def _new_bytes(coordinator: Coordinator, version: int) -> int | None:
    """What version ``version`` adds to the store (its MANIFEST's new_bytes), or None when it cannot be read."""
    try:
        return coordinator.store.get(version).new_bytes if coordinator.store is not None else None
    except LockstepError:
        return None


def entry_size(manifest: Manifest, path: str) -> int:
    """The size the MANIFEST gives file ``path`` (0 when it lists none)."""
    return next((f.size for f in manifest.files if f.path == path), 0)


def is_upload_file(method: str, path: str) -> bool:
    """PUT /store/uploads/{id}/files/{path} (bounded while streamed to disk: LOCKSTEP_MAX_UPLOAD_BYTES) and
    PUT /store/uploads/{id}/chunks/{sha256} (bounded to a chunk's largest size while read)."""
    # By position, not by substring: /store/uploads/{id}/chunked/files/x is a JSON body, bounded like the others.
    parts = path.split("/")  # ["", "store", "uploads", id, kind, ...]
    if method != "PUT" or len(parts) < 6 or parts[1:3] != ["store", "uploads"]:
        return False
    return parts[4] == "files" or (parts[4] == "chunks" and len(parts) == 6)


def create_app(settings: Settings, *, clock: Clock = SYSTEM_CLOCK,
               discovery: Discovery | None = None) -> FastAPI:
    """The trainer app, over the shared folder, or (without one) over HTTP with its own data folder."""
    trainer = Trainer.build(settings, clock=clock, discovery=discovery)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        interrupted = await asyncio.to_thread(trainer.runs.recover)
        if interrupted:
            log.warning("runs interrupted by the last shutdown: %s", ", ".join(interrupted))
        await asyncio.to_thread(trainer.coordinator.recover)
        await asyncio.to_thread(retention.collect_quietly, trainer.coordinator, "at trainer start")
        trainer.monitor.start()
        if trainer.catch_up is not None:
            trainer.catch_up.start()
        trainer.ready = True
        where = (f"shared folder {settings.shared_dir}" if settings.shared_dir is not None else
                 f"no shared folder: data in {trainer.data_dir}, replicas driven over HTTP")
        log.info("trainer ready (%s, discovery %s)", where, trainer.cluster.discovery.configured.value)
        try:
            yield
        finally:
            trainer.ready = False
            if trainer.catch_up is not None:
                trainer.catch_up.stop()
            await asyncio.to_thread(trainer.runs.shutdown)
            trainer.monitor.stop()
            trainer.cluster.close()
            trainer.coordinator.close()
            trainer.uploads.close()

    app = FastAPI(title="Lockstep trainer", version="1", lifespan=lifespan)
    app.state.trainer = trainer
    install_error_handlers(app)
    install_guard(app, settings, unbounded=is_upload_file)

    @app.exception_handler(PublishBusy)
    async def _publish_busy(request: Request, exc: PublishBusy) -> JSONResponse:
        # The error body, plus what is running, so a client can follow it (GET /publishes/{id}).
        return JSONResponse({**error_body(str(exc), exc.code), "running": exc.running}, status_code=409)

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

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        trainer.publisher.export_rollout()
        await asyncio.to_thread(trainer.history_counts.update)
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
    def refuse_during_run(own: bool = False) -> None:
        """409 while a run is active (unless this is its ``own`` publish), a publish runs, or the lease is held."""
        active = trainer.runs.active()
        if active is not None and not own:
            hint = (f"; its Job's pods publish with metadata run_id={active.id}" if active.kind == "job" else "")
            raise Conflict(f"run {active.id} ({active.kind}) is active and publishes versions itself{hint}; "
                           f"stop it first (POST /runs/{active.id}/stop)")
        trainer.publisher.check_idle()  # 409 naming the running publish; submit checks again, atomically
        trainer.coordinator.check_free()

    async def rollout_plan(body: RolloutFields) -> RolloutPlan | None:
        """The checked plan of a publish that asks for a rollout (None: a plain publish); 400/409 before anything."""
        if not body.is_rollout:
            return None
        score = None if body.task is None else fleet_task_score(trainer.coordinator, get_task(body.task),
                                                                 body.task_prompts, settings.api_token)
        plan = make_plan(body.canary, step_seconds=body.step_seconds, min_requests=body.min_requests,
                         shadow=body.shadow, gate_specs=body.gate_specs(), task_score=score)
        gate = plan.gates.get("task_score") if body.task else None
        if gate is not None and body.task_prompts < gate.min_samples:
            raise BadRequest(f"task_prompts is {body.task_prompts} but the task_score gate needs {gate.min_samples} "
                             "answers before it may decide; raise task_prompts or the gate's min_samples")
        if (busy := rollout_in_progress(await asyncio.to_thread(trainer.coordinator.read_state))) is not None:
            raise Conflict(busy)
        return plan

    @app.post("/publish", status_code=202, summary="Publish a model reference to every replica (two phases)")
    async def publish(body: PublishRequest, request: Request) -> dict[str, Any]:
        mutate(request)
        refuse_during_run()
        plan = await rollout_plan(body)
        await asyncio.to_thread(check_ref, body.model, settings, trainer.coordinator.store)
        return trainer.publisher.submit(body.model, policy=body.policy, timeout_s=body.timeout_s, plan=plan)

    @app.get("/rollout", summary="The rollout in progress, or the last one: steps, shares, gates")
    async def rollout() -> dict[str, Any]:
        control = trainer.publisher.rollout
        if control is not None and not control.done:
            return control.view()
        state = await asyncio.to_thread(trainer.coordinator.read_state)
        if state.pending is not None and state.pending.phase.value == "canary" and (
                control is None or state.pending.rollout != control.id):  # not driven from here
            view = {"id": state.pending.rollout, "version": state.pending.version, "model": state.pending.model,
                    "phase": "orphaned", "share": state.split.share if state.split else 0.0,
                    "step": state.split.step if state.split else -1,
                    "reason": "its coordinator is gone; POST /rollout/abort rolls it back"}
            try:
                await asyncio.to_thread(trainer.coordinator.check_free)
            except LeaseHeld as exc:  # alive elsewhere (a `lockstep publish --canary`): not ours to end
                view.update(phase="elsewhere", reason=f"{exc}; stop it there (Ctrl-C rolls it back)")
            return view
        if control is not None:  # this trainer's last one, ended
            return control.view()
        raise NotFound("no rollout has run on this trainer; start one with POST /publish and canary or shadow")

    @app.post("/rollout/promote", status_code=202, summary="Promote the rollout now (a person's call wins)")
    async def rollout_promote(request: Request) -> dict[str, Any]:
        mutate(request)
        control = trainer.publisher.rollout
        if control is None or control.done:
            raise NotFound("no rollout is in progress")
        control.promote()
        return control.view()

    @app.post("/rollout/abort", status_code=202, summary="Roll the rollout back now (a person's call wins)")
    async def rollout_abort(request: Request) -> dict[str, Any]:
        mutate(request)
        control = trainer.publisher.rollout
        if control is not None and not control.done:
            control.abort()
            return control.view()
        result = await asyncio.to_thread(trainer.coordinator.end_rollout, "aborted by a person (POST /rollout/abort)")
        if result is None:
            raise NotFound("no rollout is in progress")
        return dict(result.rollout or {"phase": "rolled back", "version": result.version, "reason": result.reason})

    @app.post("/rollback", status_code=202, summary="Commit an earlier version again")
    async def rollback(body: RollbackRequest, request: Request) -> dict[str, Any]:
        mutate(request)
        refuse_during_run()
        if body.to is not None and body.to != 0:
            await asyncio.to_thread(trainer.coordinator.store.get, body.to)  # 404 names what is published
            await asyncio.to_thread(trainer.coordinator.check_rollback_target, body.to)  # 409: it only aborted
        if body.to is None:
            committed = (await asyncio.to_thread(trainer.coordinator.read_state)).committed
            if committed is None or committed.version == 0:
                raise NotFound(NOTHING_TO_ROLL_BACK_TO)
        label = f"versions/{body.to}" if body.to is not None else "the version before the committed one"
        return trainer.publisher.submit(label, kind="rollback", rollback_to=body.to, policy=body.policy,
                                        timeout_s=body.timeout_s)

    @app.get("/publishes", summary="Publish jobs of this trainer, newest first")
    async def publishes() -> dict[str, Any]:
        return {"publishes": trainer.publisher.jobs()}

    @app.get("/publishes/{publish_id}", summary="One publish job and its result")
    async def publish_job(publish_id: PublishId) -> dict[str, Any]:
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
    async def get_run(run_id: RunId) -> dict[str, Any]:
        return await asyncio.to_thread(trainer.runs.get, run_id)

    @app.get("/runs/{run_id}/logs", summary="The pod logs of a job run, oldest pod first",
             response_class=PlainTextResponse)
    async def run_logs(run_id: RunId) -> PlainTextResponse:
        return PlainTextResponse(await asyncio.to_thread(trainer.runs.logs, run_id))

    @app.post("/runs/{run_id}/stop", status_code=202, summary="Stop a run at its next step")
    async def stop_run(run_id: RunId, request: Request) -> dict[str, Any]:
        mutate(request)
        return await asyncio.to_thread(trainer.runs.stop, run_id)

    @app.delete("/runs/{run_id}", status_code=204, summary="Delete an ended run and its files (409 while active)")
    async def delete_run(run_id: RunId, request: Request) -> Response:
        mutate(request)
        await asyncio.to_thread(trainer.runs.delete, run_id)
        return Response(status_code=204)

    @app.post("/runs/{run_id}/resume", status_code=202, summary="Resume a run from its last checkpoint")
    async def resume_run(run_id: RunId, request: Request) -> dict[str, Any]:
        mutate(request)
        return await asyncio.to_thread(trainer.runs.resume, run_id)

    # ------------------------------------------------------------------ replicas without a shared volume
    store = trainer.coordinator.store

    @app.get("/sync/committed", summary="The committed version (a replica asks at boot, without a shared folder)")
    async def sync_committed() -> dict[str, Any]:
        state = await asyncio.to_thread(trainer.coordinator.read_state)
        fleet = trainer.coordinator.fleet
        # Where a booting replica gets the committed version's chunks first: the replicas that serve it.
        peers = fleet.holders(state.committed.version) if state.committed and isinstance(fleet, HttpFleet) else []
        return {"committed": state.committed.model_dump(mode="json") if state.committed else None,
                "generation": state.generation, "peers": peers}

    @app.get("/store/versions/{version}/manifest", summary="A published version's MANIFEST.json (token)")
    async def store_manifest(version: Version, request: Request) -> Response:
        check_bearer(request, settings.api_token)
        manifest = await asyncio.to_thread(store.get, version)
        return Response(manifest.to_json(), media_type="application/json")

    @app.get("/store/versions/{version}/files/{path:path}", summary="One file of a published version (token)")
    async def store_file(version: Version, path: FilePath, request: Request) -> FileResponse:
        check_bearer(request, settings.api_token)
        manifest = await asyncio.to_thread(store.get, version)
        if manifest.kind == "repo":
            raise NotFound(f"version {version} records repo {manifest.repo_id}@{manifest.revision}; replicas "
                           "download its files from the Hugging Face Hub")
        served = trainer.metrics.store_bytes_served.labels(version=str(version))
        if manifest.stored == "chunks":
            entry = next((f for f in manifest.files if f.path == path), None)
            if entry is None:
                raise NotFound(f"version {version} has no file {path!r} in its MANIFEST.json")
            parts = await asyncio.to_thread(store.file_chunks, version, path)

            async def stream() -> AsyncIterator[bytes]:
                for _ in range(len(entry.chunks or ())):
                    data = await asyncio.to_thread(next, parts)
                    served.inc(len(data))
                    yield data

            return StreamingResponse(stream(), media_type="application/octet-stream",
                                     headers={"Content-Length": str(entry.size)})
        # Listed in the MANIFEST and inside the version's folder (no symlink out), or 404.
        real = await asyncio.to_thread(store.file_path, version, path)
        served.inc(entry_size(manifest, path))
        return FileResponse(real, media_type="application/octet-stream")

    @app.get("/store/versions/{version}/chunks/{sha256}", summary="One chunk of a published version (token)")
    async def store_chunk(version: Version, sha256: ChunkId, request: Request) -> Response:
        check_bearer(request, settings.api_token)
        data = await asyncio.to_thread(store.chunk_bytes, version, sha256)  # only chunks the version lists
        trainer.metrics.store_bytes_served.labels(version=str(version)).inc(len(data))
        return Response(data, media_type="application/octet-stream")

    # ------------------------------------------------------------------ uploads (publishing from elsewhere)
    @app.post("/store/uploads", status_code=201, summary="Start uploading a model folder to publish (token)")
    async def create_upload(request: Request) -> dict[str, Any]:
        mutate(request)
        return {"upload_id": await trainer.uploads.run(trainer.uploads.create)}

    @app.put("/store/uploads/{upload_id}/files/{path:path}", summary="One file of an upload (token; sha256 header)")
    async def upload_file(upload_id: UploadId, path: FilePath, request: Request) -> dict[str, Any]:
        mutate(request)
        length = request.headers.get("content-length")
        size = parse_decimal(length)
        if length is not None and size is None:
            raise BadRequest(f"Content-Length must be a number of bytes, got {length[:40]!r}")
        return await trainer.uploads.receive(upload_id, path, request.stream(),
                                             request.headers.get("x-content-sha256"), size)

    @app.put("/store/uploads/{upload_id}/chunked/{path:path}",
             summary="One file of an upload as its chunks; answers the chunks the store lacks (token)")
    async def upload_chunked_file(upload_id: UploadId, path: FilePath, body: ChunkedFile,
                                  request: Request) -> dict[str, Any]:
        mutate(request)
        try:
            entry = FileEntry(path=path, size=body.size, sha256=body.sha256, chunks=body.chunks)
        except ValidationError as exc:  # chunks that do not add up to the file, or a path out of the upload
            raise BadRequest(f"{path}: {exc.errors()[0]['msg']}") from None
        return await trainer.uploads.run(trainer.uploads.assemble, upload_id, entry, store.chunks)

    @app.put("/store/uploads/{upload_id}/chunks/{sha256}", summary="One chunk of an upload, named by its sha256 "
             "(token)")
    async def upload_chunk(upload_id: UploadId, sha256: ChunkId, request: Request) -> dict[str, Any]:
        mutate(request)
        length = parse_decimal(request.headers.get("content-length"))
        if length is None or not 0 < length <= MAX_CHUNK_BYTES_ACCEPTED:
            raise BadRequest(f"a chunk needs a Content-Length of 1 to {MAX_CHUNK_BYTES_ACCEPTED} bytes")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > length:
                raise BadRequest(f"the chunk's body is longer than its Content-Length ({length} bytes)")
        chunk = ChunkEntry(offset=0, size=len(data), sha256=sha256)
        return await trainer.uploads.run(trainer.uploads.receive_chunk, upload_id, chunk, bytes(data), store.chunks)

    @app.post("/store/uploads/{upload_id}/publish", status_code=202,
              summary="Publish an upload as the next version (two phases); the upload is removed after")
    async def publish_upload(upload_id: UploadId, body: UploadPublishRequest, request: Request) -> dict[str, Any]:
        mutate(request)
        # A job run's pods publish its versions through here, naming the run in the metadata.
        run = trainer.runs.uploading_run(body.metadata.get("run_id"))
        refuse_during_run(own=run is not None)
        plan = await rollout_plan(body)
        folder = await asyncio.to_thread(trainer.uploads.seal, upload_id)
        try:
            await asyncio.to_thread(check_model_dir, folder, settings.allow_pickle)  # what the store would refuse
            await asyncio.to_thread(loader.check_safe_files, folder, settings)  # remote code
            return trainer.publisher.submit(str(folder), label=body.label or f"upload {upload_id}",
                                            metadata=body.metadata, policy=body.policy, timeout_s=body.timeout_s,
                                            then=lambda: trainer.uploads.release(upload_id),
                                            run_id=run.id if run is not None else None, plan=plan)
        except Exception:
            trainer.uploads.unseal(upload_id)  # refused before it started: the client may fix it and try again
            raise

    @app.delete("/store/uploads/{upload_id}", status_code=204, summary="Drop an upload (token)")
    async def delete_upload(upload_id: UploadId, request: Request) -> Response:
        mutate(request)
        await trainer.uploads.run(trainer.uploads.discard, upload_id)
        return Response(status_code=204)

    # ------------------------------------------------------------------ events
    @app.get("/events", summary="Server-sent events: cluster (every second), run, publish, version")
    async def events(request: Request) -> StreamingResponse:
        last_id = parse_decimal(request.headers.get("last-event-id"))  # an event id, never a huge number
        return StreamingResponse(_sse_stream(trainer.events, last_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app

