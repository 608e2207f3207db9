"""The trainer's coordinator for clusters without a shared volume.

Everything the shared folder holds for the trainer lives in its own data folder
(``LOCKSTEP_TRAINER_DATA_DIR``): ``versions/`` (the model store), ``sync_state.json`` (the committed version:
written by this trainer only, read by nobody else), ``history/``, ``runs/`` and ``locks/``. Replicas are
driven over HTTP at the URLs discovery finds (``HttpCoordinator``); they download ``versions/N`` from the
trainer (``GET /store/versions/N/...``) and verify every file themselves.

The committed version is decided here first and only then told to the replicas, so a trainer that crashes
mid-publish never finds replicas ahead of what it recorded. Replicas that missed a commit, or joined later,
are brought to the committed version by ``catch_up`` (the monitor calls it every second): each one is told
the committed version (it goes unready at once), then staged and committed on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from lockstep.core.clock import Clock
from lockstep.core.errors import BadRequest, VerificationError
from lockstep.core.http import bearer_headers
from lockstep.core.settings import CommitPolicy, Settings
from lockstep.store import Manifest
from lockstep.sync.coordinator import Coordinator, ProgressFn, PublishResult, ReplicaReport, Source
from lockstep.sync.http_coordinator import HttpCoordinator
from lockstep.sync.protocol import (
    Committed,
    Heartbeat,
    LegacyRequest,
    Pending,
    Phase,
    ReplicaState,
    ServingInfo,
    StagedInfo,
    StageState,
    SyncState,
    read_sync_state,
)

log = logging.getLogger(__name__)

CATCH_UP_BACKOFF_S = (5.0, 120.0)  # first and longest wait before catching up a replica that failed to
REBUILD_EVERY_S = 2.0  # seconds a state rebuilt from the replicas (no sync_state.json yet) is reused


def beat_from_status(url: str, status: dict[str, Any], now: float) -> Heartbeat:
    """A replica's ``GET /status`` read as the heartbeat it would have written to a shared folder."""
    serving = None
    if status.get("serving_version") is not None:
        serving = ServingInfo(version=int(status["serving_version"]), model=str(status.get("model") or ""),
                              digest=status.get("digest"), weights_digest=status.get("weights_digest"),
                              since=status.get("serving_since"))
    staged = status.get("staged")
    try:
        state = ReplicaState(status.get("state") or "starting")
    except ValueError:
        state = ReplicaState.STARTING
    return Heartbeat(replica_id=str(status.get("replica_id") or url), url=url, state=state,
                     ready=bool(status.get("ready")), serving=serving,
                     staged=StagedInfo.model_validate(staged) if isinstance(staged, dict) else None,
                     last_error=status.get("last_error"), update_mode=status.get("update_mode"),
                     queue_depth=int(status.get("queue_depth") or 0), running=int(status.get("running") or 0),
                     tokens_per_s=float(status.get("tokens_per_s") or 0.0), time=now)


def local_settings(settings: Settings) -> Settings:
    """The settings with the trainer's data folder standing in for the shared one (its own paths kept)."""
    data = settings.trainer_data_path
    return settings.model_copy(update={
        "shared_dir": data, "sync_state_file": data / "sync_state.json",
        "hf_home": settings.hf_home_path, "builtin_dir": settings.builtin_path})


class HttpClusterCoordinator(Coordinator):
    """``Coordinator`` over the trainer's data folder and replica URLs instead of a shared volume."""

    def __init__(self, settings: Settings, *, urls: Callable[[], list[str]], clock: Clock, owner: str) -> None:
        data = settings.trainer_data_path
        try:
            data.mkdir(parents=True, exist_ok=True)
            probe = data / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise BadRequest(f"the trainer's data folder {data} is not writable ({exc}); set "
                             "LOCKSTEP_TRAINER_DATA_DIR to a writable folder (a volume, to keep versions and runs "
                             "across restarts)") from exc
        super().__init__(local_settings(settings), clock=clock, owner=owner)
        self.data_dir: Path = data
        self.urls = urls
        self.client = httpx.Client(timeout=10.0, headers=bearer_headers(settings.api_token))
        self.drive_lock = threading.Lock()  # one set of stage/commit requests at a time: a publish or a catch-up
        self._rebuilt: tuple[float, SyncState] | None = None
        self._retry: dict[str, tuple[float, float]] = {}  # url → (monotonic time of the next try, backoff)

    def close(self) -> None:
        self.client.close()

    def _http(self, urls: list[str]) -> HttpCoordinator:
        return HttpCoordinator(self.settings, urls, clock=self.clock, client=self.client)

    # ------------------------------------------------------------------ reading the cluster
    def live_replicas(self) -> list[Heartbeat]:
        """Replicas that answer ``GET /status`` at the discovered URLs."""
        urls = self.urls()
        if not urls:
            return []
        now = self.clock.time()
        beats = []
        for url, status in self._http(urls).statuses().items():
            if status is None:
                continue
            try:
                beats.append(beat_from_status(url, status, now))
            except (ValueError, TypeError, OverflowError) as exc:  # a /status we cannot read: not counted as live
                log.warning("ignoring the GET /status answer of %s: %s", url, exc)
        return beats

    def read_state(self) -> SyncState:
        """The trainer's own ``sync_state.json``; without one, what the replicas serve (logged)."""
        try:
            state = read_sync_state(self.path)
        except ValueError as exc:
            log.warning("%s is unreadable (%s); going on from what the replicas serve", self.path, exc)
            state = None
        if isinstance(state, SyncState):
            return state
        if isinstance(state, LegacyRequest):
            log.warning("%s holds the seed's legacy format, which only a shared folder uses; ignored", self.path)
        now = time.monotonic()
        if self._rebuilt is not None and now - self._rebuilt[0] < REBUILD_EVERY_S:
            return self._rebuilt[1]
        rebuilt = self._state_from_heartbeats()
        if rebuilt.committed is not None and rebuilt.committed.version > 0:
            # The data folder was lost (not on a volume?): never reuse a number the replicas know.
            self.store.min_next = max(self.store.min_next, rebuilt.committed.version + 1)
            log.warning("no committed state in %s but replicas serve v%d; going on from it (new versions are "
                        "numbered after it)", self.path, rebuilt.committed.version)
        else:
            rebuilt = SyncState(generation=rebuilt.generation)
        self._rebuilt = (now, rebuilt)
        return rebuilt

    def _verify(self, manifest: Manifest) -> None:
        """A cheap check here (every file present with its size); each replica hashes what it downloads."""
        if manifest.kind == "repo":
            super()._verify(manifest)
            return
        folder = self.store.path_of(manifest.version)
        for entry in manifest.files:
            try:
                size = (folder / entry.path).stat().st_size
            except OSError:
                raise VerificationError(f"version {manifest.version}: {entry.path} is missing from the trainer's "
                                        f"store {folder}; it cannot be published") from None
            if size != entry.size:
                raise VerificationError(f"version {manifest.version}: {entry.path} has size {size} bytes in the "
                                        f"trainer's store, MANIFEST.json says {entry.size}; it cannot be published")

    # ------------------------------------------------------------------ the two phases over HTTP
    def _two_phases(self, source: Source, policy: CommitPolicy, timeout_s: float, started: float,
                    progress: ProgressFn | None) -> PublishResult:
        # Live replicas only (they answer GET /status), as over the shared folder; one that is down now boots
        # into the committed version when it comes back, and catch_up handles one that missed the commit.
        urls = [b.url for b in self.live_replicas() if b.url]
        state = self.read_state()
        if not urls:
            result = PublishResult(source.version, source.model, "aborted", started_at=started,
                                   rollback=source.rollback, generation=state.generation,
                                   reason="no live replicas to publish to: none of the discovered URLs answers "
                                   f"GET /status ({', '.join(self.urls()) or 'discovery found none'}; see "
                                   "GET /cluster)")
            self._record(result)
            return result
        now = self.clock.time()
        pending = Pending(version=source.version, model=source.model, digest=source.digest, phase=Phase.PREPARE,
                          coordinator=self.owner, started_at=now, deadline=now + timeout_s, rollback=source.rollback)
        box = {"state": self._write(state, pending=pending)}
        log.info("prepare v%d (%s) on %d replicas", source.version, source.model, len(urls))

        def decide(result: PublishResult) -> str | None:
            """Record the outcome before any replica hears of it."""
            current = box["state"]
            if result.outcome == "committed":
                committed = Committed(version=source.version, model=source.model, digest=source.digest,
                                      activate_at=result.activate_at, committed_at=self.clock.time(),
                                      rollback=source.rollback)
                box["state"] = self._write(current, committed=committed, pending=pending.model_copy(
                    update={"phase": Phase.COMMIT, "activate_at": result.activate_at}))
            else:
                box["state"] = self._write(current, pending=pending.model_copy(
                    update={"phase": Phase.ABORT, "reason": result.reason}))
            return None

        with self.drive_lock:
            result = self._http(urls).publish(source.model, version=source.version, digest=source.digest,
                                              policy=policy, timeout_s=timeout_s, progress=progress,
                                              rollback=source.rollback, decide=decide)
        result.started_at, result.generation = started, box["state"].generation
        result.total_s = self.clock.time() - started
        self._record(result)
        return result

    def recover(self) -> None:
        """At startup: a prepare left by a crashed trainer is aborted on every replica (they free what they staged)."""
        state = self.read_state()
        pending = state.pending
        if pending is None or pending.phase is not Phase.PREPARE:
            return
        log.warning("aborting the unfinished prepare of v%d left by the last trainer", pending.version)
        urls = self.urls()
        if urls:
            self._http(urls).tell("/admin/abort", {"version": pending.version})
        self._write(state, pending=pending.model_copy(update={"phase": Phase.ABORT,
                                                              "reason": "the trainer restarted during prepare"}))

    # ------------------------------------------------------------------ replicas that are behind
    def catch_up(self) -> list[tuple[str, ReplicaReport]]:
        """Bring every live replica that does not serve the committed version to it; skipped during a publish.

        Returns (url, report) for each replica it worked on. A replica that fails is retried with a growing wait.
        """
        if not self.drive_lock.acquire(blocking=False):
            return []
        try:
            # Read under the lock: a publish that just finished must not be undone with the version before it.
            committed = self.read_state().committed
            if committed is None:
                return []
            beats = self.live_replicas()
            fleet = {b.serving.weights_digest for b in beats if b.ready and b.serving is not None
                     and b.serving.version == committed.version and b.serving.weights_digest}
            now = time.monotonic()
            behind = [b for b in beats if self._behind(b, committed) and b.url
                      and self._retry.get(b.url, (0.0, 0.0))[0] <= now]
            if not behind:
                return []
            with ThreadPoolExecutor(max_workers=min(8, len(behind)), thread_name_prefix="catch-up") as pool:
                done = list(pool.map(lambda b: self._catch_up_one(b, committed, fleet), behind))
            return done
        finally:
            self.drive_lock.release()

    @staticmethod
    def _behind(beat: Heartbeat, committed: Committed) -> bool:
        if beat.state is ReplicaState.STARTING:
            return False  # booting: it asked the trainer for the committed version, or will be told
        if beat.staged is not None and beat.staged.state is StageState.STAGING:
            return False  # loading something already; looked at again when it is done
        serves_it = beat.serving is not None and beat.serving.version == committed.version
        return not (serves_it and beat.ready)

    def _catch_up_one(self, beat: Heartbeat, committed: Committed, fleet: set[str]) -> tuple[str, ReplicaReport]:
        assert beat.url is not None
        http = self._http([beat.url])
        serving = beat.serving.version if beat.serving else None
        log.info("replica %s serves v%s but v%d is committed: catching it up", beat.replica_id, serving,
                 committed.version)
        # Told first, so it stops taking traffic at once (it answers 409 unless it already serves the version).
        http.tell("/admin/commit", {"version": committed.version})
        if beat.serving is not None and beat.serving.version == committed.version:
            report = ReplicaReport(beat.replica_id, "serving")
        else:
            def same_weights(result: PublishResult) -> str | None:
                loaded = {r.weights_digest for r in result.replicas if r.weights_digest}
                if fleet and loaded and not loaded <= fleet:
                    return (f"{beat.replica_id} loaded weights {next(iter(loaded))[:12]} but the replicas serving "
                            f"v{committed.version} hold {next(iter(fleet))[:12]}; refusing to commit")
                return None

            result = http.publish(committed.model, version=committed.version, digest=committed.digest,
                                  policy=CommitPolicy.STRICT, activate_now=True, decide=same_weights)
            report = result.replicas[0] if result.replicas else ReplicaReport(beat.replica_id, "timeout")
            if result.outcome != "committed":
                report.error = report.error or result.reason
        if report.outcome == "serving":
            self._retry.pop(beat.url, None)
            log.info("replica %s caught up: serving v%d", beat.replica_id, committed.version)
        else:
            wait = min(CATCH_UP_BACKOFF_S[1], max(CATCH_UP_BACKOFF_S[0], 2 * self._retry.get(beat.url, (0, 0))[1]))
            self._retry[beat.url] = (time.monotonic() + wait, wait)
            log.warning("replica %s could not catch up to v%d (%s: %s); retrying in %.0fs", beat.replica_id,
                        committed.version, report.outcome, report.error, wait)
        return beat.url, report


class CatchUpLoop:
    """A thread that runs ``catch_up`` every ``interval_s`` and reports what it did on the event stream."""

    def __init__(self, coordinator: HttpClusterCoordinator, report: Callable[[str, ReplicaReport, int], None],
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
                for url, report in done:
                    self.report(url, report, committed.version if committed else 0)
            except Exception:  # the loop must outlive one bad pass; the next one tries again
                log.exception("catching up replicas failed")
