"""Replica side of the sync protocol: poll ``sync_state.json``, stage, flip at ``activate_at``, heartbeat.

The shared folder may be NFS-like: the watcher opens and reads the file every poll interval (close-to-open
consistency) instead of trusting stat(). A torn, empty or invalid file keeps the last good state. A valid
state whose commit this replica cannot apply (an ``activate_at`` that is no time, a raw path instead of a
published version) is refused by name: the replica goes unready with the reason in ``last_error``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any

from pydantic import ValidationError

from lockstep.core.clock import Clock
from lockstep.core.errors import Conflict, LeaseHeld
from lockstep.core.settings import Settings
from lockstep.sync.protocol import (
    Committed,
    Heartbeat,
    LegacyRequest,
    Phase,
    StageState,
    SyncState,
    activate_at_problem,
    decode_sync_state,
    legacy_problem,
    read_sync_state_bytes,
    reference_problem,
    write_heartbeat,
)

log = logging.getLogger(__name__)

CATCH_UP_RETRY_S = 5.0  # seconds between attempts to load a committed version that failed to load
# After staging, poll at ``commit_poll_interval_s`` for this long while the commit is expected: long enough
# for the other replicas to finish their loads, short enough that a coordinator that died after prepare
# does not leave every replica reading the shared folder fifty times a second until the deadline.
COMMIT_POLL_WINDOW_S = 15.0
MAX_SLEEP_S = 60.0  # one sleep of sleep_until at most: time.sleep refuses very long waits


class Doorbell:
    """Cuts the sync thread's wait short when something changed (a load ended, a flip happened).

    A bare lock instead of ``threading.Event``: the thread waits ten times a second, and Event's wait builds
    a Condition round (a new lock, four acquisitions) each time. Rung = released; the waiter takes it back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # already rung, not yet answered
            pass

    def wait(self, timeout: float) -> bool:
        """True when rung (the ring is consumed), False after ``timeout`` seconds."""
        return self._lock.acquire(timeout=timeout)


def sleep_until(clock: Clock, wall_time: float) -> None:
    """Sleep until ``wall_time``: coarse sleeps, then 0.2 ms steps for the last 2 ms (flip skew matters).

    ``ValueError`` for a time that is not finite: nothing ever reaches it (and NaN would compare as "now").
    """
    if not math.isfinite(wall_time):
        raise ValueError(f"cannot wait until {wall_time!r}: it is not a finite wall-clock time")
    # Within a microsecond is there: a smaller step may not move a float clock near 1.7e9 at all.
    while (remaining := wall_time - clock.time()) > 1e-6:
        clock.sleep(min(MAX_SLEEP_S, remaining - 0.002) if remaining > 0.003 else min(remaining, 0.0002))


class SyncWatcher:
    """Drives one replica from the shared folder; owns its heartbeat."""

    def __init__(self, replica: Any, settings: Settings, *, store: Any, clock: Clock, replica_id: str,
                 url: str | None, token_rate: Any = None) -> None:
        assert settings.shared_dir is not None and settings.sync_state_path is not None
        self.replica = replica
        self.settings = settings
        self.store = store
        self.clock = clock
        self.replica_id = replica_id
        self.url = url
        self.token_rate = token_rate
        self.path = settings.sync_state_path
        self.shared_dir = settings.shared_dir
        self.last_good: SyncState | None = None
        self._last_problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._work: threading.Thread | None = None  # the one stage or catch-up load in progress
        self._work_key: tuple[str, int, str] | None = None  # (kind, version, model)
        self._attempted: set[tuple[int, str, int]] = set()  # (version, model, generation) prepares tried
        self._flip_scheduled: int | None = None
        self._behind_scheduled: int | None = None
        self._early_stage: int | None = None  # a committed version tried to stage before activate_at
        self._last_bytes: bytes | None = None  # the file as last read
        self._catch_up_failed_at: float | None = None
        self._legacy_seen: str | None = None
        self._publish_thread: threading.Thread | None = None
        self._beat_due = 0.0
        self._wake = Doorbell()
        self._initial = Committed(version=0, model=settings.initial_model_repo_id)
        self._commit_poll_until: float | None = None  # fast polling: staged, waiting for the commit
        self._commit_poll_version: int | None = None
        self._refused: tuple[int, int, str] | None = None  # (generation, version, model) of a refused commit
        self._applicable_commit: Committed | None = None  # the last commit read that it could apply

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"sync-{self.replica_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the watcher must outlive any one bad tick
                log.exception("sync tick failed on %s", self.replica_id)
            self._wake.wait(self._poll_interval())

    def _poll_interval(self) -> float:
        """The normal interval, or the fast one while this replica has staged a prepare and waits for its commit."""
        if self._commit_poll_until is not None:
            return min(self.settings.commit_poll_interval_s, self.settings.poll_interval_s)
        return self.settings.poll_interval_s

    def _end_commit_poll(self) -> None:
        """Back to the normal interval once the prepare is committed, aborted or superseded, or the window ends."""
        until = self._commit_poll_until
        if until is None:
            return
        pending = self.last_good.pending if self.last_good else None
        if (self.clock.time() >= until or pending is None or pending.phase is not Phase.PREPARE
                or pending.version != self._commit_poll_version):
            self._commit_poll_until = None
            self._beat_due = 0.0  # say so now: the coordinator sizes the commit margin from it

    # ------------------------------------------------------------------ one poll
    def tick(self) -> None:
        state = self._read()
        if self.settings.sync_mode != "naive" or self.replica.serving is None:
            self._apply(state)  # naive mode (benchmark baseline) only boots through it
        self._end_commit_poll()
        now = self.clock.time()
        if now >= self._beat_due:
            self.beat()

    def _problem(self, message: str) -> None:
        if message != self._last_problem:  # say it once, not ten times a second
            log.warning("%s: %s; keeping the last good state (generation %s)", self.replica_id, message,
                        self.last_good.generation if self.last_good else None)
            self._last_problem = message

    def _read(self) -> SyncState | None:
        try:
            data = read_sync_state_bytes(self.path)
        except ValueError as exc:
            self._problem(str(exc))
            return self.last_good
        if data is None or data == self._last_bytes:
            return self.last_good  # unchanged since the last poll: already handled (parsing costs CPU)
        self._last_bytes = data
        try:
            state = decode_sync_state(data, self.path)
        except ValueError as exc:
            self._problem(str(exc))
            return self.last_good
        if isinstance(state, LegacyRequest):
            self._last_bytes = None  # handled on every poll until a coordinator replaces it
            if (problem := legacy_problem(state.desired_model_repo_id)) is not None:
                self._problem(problem)
                return self.last_good
            if self.settings.sync_mode == "naive":
                self._naive_update(state.desired_model_repo_id)
            else:
                self._on_legacy(state.desired_model_repo_id)
            return self.last_good
        last = self.last_good
        # A commit this replica refused was never served: going "back" from it is no flip-flop, so the
        # rules below compare with the last commit it could apply.
        applicable = self._applicable_commit
        if last is not None:
            if state.generation < last.generation:
                self._problem(f"sync_state generation {state.generation} is lower than {last.generation}; ignored")
                return last
            if (state.committed and applicable and state.committed.version < applicable.version
                    and not state.committed.rollback):
                self._problem(f"sync_state commits v{state.committed.version} below v{applicable.version} "
                              "without a rollback; ignored (use lockstep rollback)")
                return last
            if state.committed is None and applicable is not None:  # would mean "serve the initial model"
                self._problem(f"sync_state has no committed version but v{applicable.version} was committed; "
                              "ignored (use lockstep rollback --to 0)")
                return last
        self._last_problem = None
        self._legacy_seen = None  # a legacy line written again later is a new request
        self.last_good = state
        if state.committed is not None and self._commit_problem(state.committed) is None:
            self._applicable_commit = state.committed
        return state

    def _commit_problem(self, committed: Committed) -> str | None:
        """Why this replica cannot apply ``committed`` (a raw path, an activate_at that is no time), or None."""
        return (reference_problem(committed.version, committed.model, self.settings.initial_model_repo_id)
                or activate_at_problem(committed))

    def target(self, state: SyncState | None) -> Committed:
        """What this replica must serve: the committed version, or the initial model as version 0."""
        if state is not None and state.committed is not None:
            return state.committed
        return self._initial

    def _apply(self, state: SyncState | None) -> None:
        replica = self.replica
        pending = state.pending if state else None
        now = self.clock.time()
        if pending is not None:
            expired = pending.deadline is not None and now > pending.deadline
            info = replica.stage_info
            if pending.phase is Phase.PREPARE and not expired:
                key = (pending.version, pending.model, state.generation if state else 0)
                serving = replica.serving
                already = serving is not None and serving.version == pending.version
                # A replica that is still booting loads the committed version first, then stages.
                if key not in self._attempted and not already and serving is not None:
                    self._attempted.add(key)
                    problem = reference_problem(pending.version, pending.model, self.settings.initial_model_repo_id)
                    if problem is not None:  # reported as a failed stage: the coordinator aborts at once
                        replica.refuse_stage(pending.version, pending.model, f"refusing the prepare of "
                                             f"v{pending.version} in sync_state.json: {problem}")
                        self._beat_due = 0.0
                    else:
                        log.info("%s saw the prepare of v%d (generation %d); staging %s", self.replica_id,
                                 pending.version, key[2], pending.model)
                        self._start_work("stage", pending.version, pending.model, pending.digest)
            elif pending.phase is Phase.ABORT or (pending.phase is Phase.PREPARE and expired):
                if info is not None and info.version == pending.version and not self._busy("stage", pending.version):
                    if replica.abort(pending.version):
                        log.info("%s dropped staged v%d (%s)", self.replica_id, pending.version,
                                 pending.reason or "prepare expired")
                        self._beat_due = 0.0

        target = self.target(state)
        serving = replica.serving
        if serving is not None and serving.version == target.version and (
                not target.digest or not serving.digest or serving.digest == target.digest):
            if replica.committed_version != target.version:
                replica.set_committed(target.version, target.digest)
            return
        if self._flip_scheduled == target.version:
            return
        problem = self._commit_problem(target)
        if problem is not None:
            self._refuse_commit(state, target, problem)
            return
        activate_at = target.activate_at or now
        if replica.staged_plan_version() == target.version:
            if target.activate_at is not None:
                # Seen after activate_at means a late flip: the commit margin is too short for this replica's polls.
                early = target.activate_at - now
                (log.info if early > 0 else log.warning)("%s saw the commit of v%d %.0f ms %s activate_at",
                                                         self.replica_id, target.version, abs(early) * 1000,
                                                         "before" if early > 0 else "after")
            self._schedule_flip(target.version, target.digest, activate_at)
            return
        if self._busy("stage", target.version) or self._busy("catch-up", target.version):
            if replica.committed_version != target.version:
                self._schedule_behind(target.version, target.digest, activate_at)  # unready from activate_at
            return
        if serving is not None and now < activate_at:
            # Committed but not staged here (a quorum commit, or this replica joined late). Until activate_at
            # the served version stays right: stage beside it once, flip at activate_at if that worked in time.
            if self._early_stage != target.version:
                self._early_stage = target.version
                self._start_work("stage", target.version, target.model, target.digest)
            self._schedule_behind(target.version, target.digest, activate_at)
            return
        # Not staged and not loading: go unready and load it (the boot path is the same operation).
        if self._catch_up_failed_at is not None and now - self._catch_up_failed_at < CATCH_UP_RETRY_S:
            return
        replica.set_committed(target.version, target.digest)
        self._beat_due = 0.0
        self._start_work("catch-up", target.version, target.model, target.digest)

    def _refuse_commit(self, state: SyncState | None, target: Committed, problem: str) -> None:
        """A commit this replica cannot apply: unready, with the reason, until a valid state replaces it."""
        key = (state.generation if state else 0, target.version, target.model)
        if self._refused == key and self.replica.committed_version == target.version:
            return  # said once; the file is read again ten times a second
        self._refused = key
        self.replica.refuse_commit(target.version, target.digest, f"refusing the commit of v{target.version} in "
                                   f"sync_state.json: {problem}; unready until a valid commit replaces it")
        self._beat_due = 0.0

    # ------------------------------------------------------------------ background work
    def _busy(self, kind: str, version: int) -> bool:
        return (self._work is not None and self._work.is_alive() and self._work_key is not None
                and self._work_key[0] == kind and self._work_key[1] == version)

    def _start_work(self, kind: str, version: int, model: str, digest: str | None) -> None:
        if self._work is not None and self._work.is_alive():
            # One load at a time; a newer request waits for the next tick after this one ends.
            if kind == "stage":
                self._attempted.discard(next((k for k in self._attempted if k[0] == version and k[1] == model),
                                             (-1, "", -1)))
            return

        def run() -> None:
            try:
                if kind == "stage":
                    info = self.replica.stage(model, version, digest)
                    log.info("%s stage v%d: %s", self.replica_id, version, info.state.value)
                    if info.state is StageState.STAGED:  # the commit may come any moment now: watch closely
                        self._commit_poll_version = version
                        self._commit_poll_until = self.clock.time() + COMMIT_POLL_WINDOW_S
                else:
                    self.replica.boot(model, version, digest)
                    self._catch_up_failed_at = None
            except Exception as exc:
                self._catch_up_failed_at = self.clock.time()
                log.error("%s could not load v%d (%s): %s", self.replica_id, version, model, exc)
            finally:
                self._beat_due = 0.0
                self._wake.set()

        self._work_key = (kind, version, model)
        self._work = threading.Thread(target=run, name=f"{kind}-v{version}", daemon=True)
        self._work.start()

    def _schedule_behind(self, version: int, digest: str | None, activate_at: float) -> None:
        """At ``activate_at``, go unready unless the flip to ``version`` happened: never serve stale as ready."""
        if self._behind_scheduled == version:
            return
        self._behind_scheduled = version

        def mark() -> None:
            try:
                sleep_until(self.clock, activate_at)
            except ValueError as exc:  # no time to wait for: unready now rather than never
                log.error("%s: %s", self.replica_id, exc)
            serving = self.replica.serving
            if serving is None or serving.version != version:
                self.replica.set_committed(version, digest)
                log.warning("%s is behind: v%d committed but not loaded yet; unready until it is", self.replica_id,
                            version)
            self._behind_scheduled = None
            self._beat_due = 0.0
            self._wake.set()

        threading.Thread(target=mark, name=f"behind-v{version}", daemon=True).start()

    def _schedule_flip(self, version: int, digest: str | None, activate_at: float) -> None:
        self._flip_scheduled = version

        def flip() -> None:
            try:
                sleep_until(self.clock, activate_at)
                self.replica.flip(version)
            except Exception as exc:  # never ready on the old version while the cluster serves the new one
                self.replica.refuse_commit(version, digest, f"could not flip to v{version}: {exc}; unready "
                                           "until it catches up")
            finally:
                self._flip_scheduled = None
                self._beat_due = 0.0
                self._wake.set()

        threading.Thread(target=flip, name=f"flip-v{version}", daemon=True).start()

    # ------------------------------------------------------------------ heartbeat
    def beat(self) -> None:
        r = self.replica
        queued, running = r.engine_load()
        fast_until = self._commit_poll_until
        try:
            beat = Heartbeat(
                replica_id=self.replica_id, url=self.url, pid=os.getpid(), state=r.state, ready=r.ready,
                serving=r.serving_info(), staged=r.stage_info, last_error=r.last_error,
                generation_seen=self.last_good.generation if self.last_good else None,
                update_mode=self.settings.update_mode.value, queue_depth=queued, running=running,
                tokens_per_s=self.token_rate.rate() if self.token_rate else 0.0, time=self.clock.time(),
                started_at=r.started_at, commit_poll_until=fast_until,
                commit_poll_s=None if fast_until is None else min(self.settings.commit_poll_interval_s,
                                                                  self.settings.poll_interval_s),
            )
            write_heartbeat(self.shared_dir, beat)
        except ValidationError as exc:  # readers would skip it anyway; say why instead of failing every tick
            self._problem(f"cannot write heartbeat: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
        except OSError as exc:
            self._problem(f"cannot write heartbeat: {exc}")
        self._beat_due = self.clock.time() + self.settings.heartbeat_interval_s

    # ------------------------------------------------------------------ publishing from a replica
    def _on_legacy(self, model: str) -> None:
        """The seed's format: any pod may write it; this replica tries to coordinate the publish."""
        if self._legacy_seen == model:
            return
        self._legacy_seen = model
        try:
            self.start_publish(model, origin="legacy sync_state.json", legacy=True)
        except (Conflict, LeaseHeld) as exc:
            log.info("%s leaves the legacy request to another coordinator: %s", self.replica_id, exc)
        except Exception as exc:
            log.error("legacy request for %s refused: %s", model, exc)

    def _naive_update(self, model: str) -> None:
        """The seed's design, kept as a benchmark baseline: load, then flip on our own, whenever ready."""
        if self._legacy_seen == model or (self._work is not None and self._work.is_alive()):
            return
        self._legacy_seen = model
        version = (self.replica.serving.version if self.replica.serving else 0) + 1

        def run() -> None:
            info = self.replica.stage(model, version)
            if info.state is StageState.STAGED:
                self.replica.flip(version)
            self._beat_due = 0.0

        self._work_key = ("naive", version, model)
        self._work = threading.Thread(target=run, name=f"naive-v{version}", daemon=True)
        self._work.start()

    def start_publish(self, model: str, *, origin: str, legacy: bool = False) -> dict[str, Any]:
        """Run a cluster-wide publish of ``model`` with this replica as coordinator (in the background)."""
        from lockstep.sync.coordinator import Coordinator

        if self._publish_thread is not None and self._publish_thread.is_alive():
            raise Conflict("this replica is already coordinating a publish; watch GET /status or lockstep status")
        coordinator = Coordinator(self.settings, store=self.store, clock=self.clock, owner=self.replica_id)
        coordinator.check_free()  # 409 now rather than a failure in the background
        coordinator.check_ref(model)  # a malformed or missing reference is a 4xx now

        def run() -> None:
            try:
                if legacy:
                    result = coordinator.publish_legacy(model)
                else:
                    result = coordinator.publish(model)
                if result is not None:
                    log.info("publish of %s from %s: %s", model, origin, result.summary())
            except Exception as exc:
                log.error("publish of %s from %s failed: %s", model, origin, exc)

        self._publish_thread = threading.Thread(target=run, name="publish", daemon=True)
        self._publish_thread.start()
        return {"status": "accepted", "scope": "cluster", "model": model, "coordinator": self.replica_id,
                "origin": origin}
