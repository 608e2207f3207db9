"""Replica side of the shared-folder transport: ``sync_state.json`` read into the replica's agent, heartbeats.

The shared folder may be NFS-like: the watcher opens and reads the file every poll interval (close-to-open
consistency) instead of trusting stat(). A torn, empty or invalid file keeps the last good state. A valid
state whose commit this replica cannot apply (an ``activate_at`` that is no time, a raw path instead of a
published version) is refused by name: the replica goes unready with the reason in ``last_error``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from lockstep.core.clock import Clock
from lockstep.core.errors import Conflict, LeaseHeld
from lockstep.core.settings import Settings
from lockstep.sync import agent, protocol, shared_files
from lockstep.sync.agent import CATCH_UP_RETRY_S as CATCH_UP_RETRY_S
from lockstep.sync.agent import COMMIT_POLL_WINDOW_S as COMMIT_POLL_WINDOW_S
from lockstep.sync.agent import Rules, Transport
from lockstep.sync.ledger import with_lease_wait
from lockstep.sync.protocol import Committed, LegacyRequest, StageState, SyncState
from lockstep.sync.replica_agent import Driven, ReplicaAgent

if TYPE_CHECKING:
    from lockstep.store import ModelStore

log = logging.getLogger(__name__)

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


class Reporting(Driven, Protocol):
    """What a replica's report reads of it, besides what its agent uses."""

    @property
    def state(self) -> protocol.ReplicaState: ...

    @property
    def ready(self) -> bool: ...

    @property
    def last_error(self) -> str | None: ...

    @property
    def started_at(self) -> float: ...

    def engine_load(self) -> tuple[int, int]: ...

    def serving_info(self) -> protocol.ServingInfo | None: ...

    def rollout_report(self) -> protocol.RolloutReport | None: ...

    def transfer_report(self) -> protocol.TransferReport | None: ...

    def step_pins(self) -> tuple[str, int, list[str]] | None: ...


class Rate(Protocol):
    def rate(self) -> float: ...


def heartbeat_of(replica: Reporting, settings: Settings, *, replica_id: str, url: str | None, clock: Clock,
                 token_rate: Rate | None, generation_seen: int | None = None,
                 commit_poll_until: float | None = None) -> protocol.Heartbeat:
    """A replica's report, the one shape of its heartbeat and of its ``GET /status`` (which adds a few fields)."""
    queued, running = replica.engine_load()
    return protocol.Heartbeat(
        replica_id=replica_id, url=url, pid=os.getpid(), state=replica.state, ready=replica.ready,
        serving=replica.serving_info(), staged=replica.stage_info, last_error=replica.last_error,
        generation_seen=generation_seen, update_mode=settings.update_mode.value, queue_depth=queued,
        running=running, tokens_per_s=round(token_rate.rate(), 2) if token_rate else 0.0, time=clock.time(),
        started_at=replica.started_at, commit_poll_until=commit_poll_until, rollout=replica.rollout_report(),
        transfer=replica.transfer_report(),
        commit_poll_s=None if commit_poll_until is None else min(settings.commit_poll_interval_s,
                                                                  settings.poll_interval_s))


class SyncWatcher:
    """Drives one replica from the shared folder through its agent; owns its heartbeat."""

    def __init__(self, replica: Reporting, settings: Settings, *, store: ModelStore | None, clock: Clock,
                 replica_id: str, url: str | None, token_rate: Rate | None = None) -> None:
        assert settings.shared_dir is not None and settings.sync_state_path is not None
        self.replica, self.settings, self.store, self.clock = replica, settings, store, clock
        self.replica_id, self.url, self.token_rate = replica_id, url, token_rate
        self.path, self.shared_dir = settings.sync_state_path, settings.shared_dir
        self._wake = Doorbell()
        self.agent = ReplicaAgent(replica, Rules(Transport.FOLDER, settings.initial_model_repo_id), clock,
                                  replica_id, beat=self._beat_soon, wake=self._wake.set)
        self._last_problem: str | None = None
        self._last_bytes: bytes | None = None  # the file as last read
        self._unreadable = False  # the state file is there but cannot be read (torn, garbage)
        self._legacy_seen: str | None = None
        self._naive: threading.Thread | None = None
        self._publish_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat_due = 0.0
        self._pins_written: tuple[str, int] | None = None  # (rollout, step) whose session pins are in pins/

    @property
    def last_good(self) -> SyncState | None:
        return self.agent.memory.view

    @property
    def _flip_scheduled(self) -> int | None:
        return self.agent.memory.flip

    @property
    def _work_key(self) -> tuple[str, int, str] | None:
        """(kind, version, model) of the load in progress."""
        load = self.agent.memory.load
        return None if load is None else (type(load).__name__.lower(), load.version, load.model)

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
        if self.agent.memory.poll is not None:
            return min(self.settings.commit_poll_interval_s, self.settings.poll_interval_s)
        return self.settings.poll_interval_s

    def _beat_soon(self) -> None:
        self._beat_due = 0.0

    # ------------------------------------------------------------------ one poll
    def tick(self) -> None:
        self._read()
        if self._unreadable and self.last_good is None and self.replica.serving is None:
            # A cluster's state exists but says nothing yet: booting the initial model would serve v0 as ready
            # while the fleet serves what was committed. Stay unready until a coordinator rewrites the file.
            self._problem(f"{self.path} exists but cannot be read, and no good state was seen since this replica "
                          "started; not booting until a coordinator writes it again (lockstep publish or "
                          "lockstep rollback)")
        elif self.settings.sync_mode != "naive" or self.replica.serving is None:
            self.agent.step()  # naive mode (benchmark baseline) only boots through it
        self._write_pins()
        if self.clock.time() >= self._beat_due:
            self.beat()

    def _write_pins(self) -> None:
        """Once per rollout step in force: the sessions the committed version answered before it, for the
        coordinator to collect (the HTTP transport asks ``GET /admin/split/sessions`` instead)."""
        step = self.replica.step_pins()
        if step is None or step[:2] == self._pins_written:
            return
        try:
            shared_files.write_pins(self.shared_dir, protocol.SessionPins(
                replica_id=self.replica_id, rollout=step[0], step=step[1], pins=step[2][:protocol.MAX_PINS]))
            self._pins_written = step[:2]
        except OSError as exc:
            self._problem(f"cannot write the session pins of rollout step {step[1]}: {exc}")

    def _problem(self, message: str) -> None:
        if message != self._last_problem:  # say it once, not ten times a second
            log.warning("%s: %s; keeping the last good state (generation %s)", self.replica_id, message,
                        self.last_good.generation if self.last_good else None)
            self._last_problem = message

    def _read(self) -> SyncState | None:
        try:
            data = shared_files.read_sync_state_bytes(self.path)
            if data is None:
                self._unreadable = False  # no cluster state at all: a new cluster, the initial model is right
                return self.last_good
            if data == self._last_bytes:
                return self.last_good  # unchanged since the last poll: already handled (parsing costs CPU)
            self._last_bytes = data
            state = shared_files.decode_sync_state(data, self.path)
        except ValueError as exc:
            self._unreadable = True
            self._problem(str(exc))
            return self.last_good
        self._unreadable = False
        if isinstance(state, LegacyRequest):
            self._last_bytes = None  # handled on every poll until a coordinator replaces it
            if (problem := protocol.legacy_problem(state.desired_model_repo_id)) is not None:
                self._problem(problem)
            elif self.settings.sync_mode == "naive":
                self._naive_update(state.desired_model_repo_id)
            else:
                self._on_legacy(state.desired_model_repo_id)
        elif (problem := self.agent.observe(state)) is not None:
            self._problem(problem)
        else:
            self._last_problem = None
            self._legacy_seen = None  # a legacy line written again later is a new request
        return self.last_good

    def target(self, state: SyncState | None) -> Committed:
        """What this replica must serve: the committed version, or the initial model as version 0."""
        goal = agent.target(self.agent.rules, state)
        assert goal is not None  # the shared folder always names one
        return goal

    # ------------------------------------------------------------------ heartbeat
    def heartbeat(self) -> protocol.Heartbeat:
        """What this replica reports: its heartbeat file, and the core of its ``GET /status``."""
        poll = self.agent.memory.poll
        return heartbeat_of(self.replica, self.settings, replica_id=self.replica_id, url=self.url, clock=self.clock,
                            token_rate=self.token_rate, generation_seen=self.last_good.generation if self.last_good
                            else None, commit_poll_until=poll[1] if poll else None)

    def beat(self) -> None:
        try:
            shared_files.write_heartbeat(self.shared_dir, self.heartbeat())
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
        if self._legacy_seen == model or self.agent.memory.load or (self._naive and self._naive.is_alive()):
            return
        self._legacy_seen = model
        version = (self.replica.serving.version if self.replica.serving else 0) + 1

        def run() -> None:
            info = self.replica.stage(model, version)
            if info.state is StageState.STAGED:
                self.replica.flip(version)
            self._beat_due = 0.0

        self._naive = threading.Thread(target=run, name=f"naive-v{version}", daemon=True)
        self._naive.start()

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
                # Another replica's /update-model may take the lease first (both passed check_free): this one
                # then waits for it, as the trainer's publishes do, instead of failing where only the log says so.
                if legacy:
                    result = with_lease_wait(lambda: coordinator.publish_legacy(model), self.clock)
                else:
                    result = with_lease_wait(lambda: coordinator.publish(model), self.clock)
                if result is not None:
                    log.info("publish of %s from %s: %s", model, origin, result.summary())
            except Exception as exc:
                log.error("publish of %s from %s failed: %s", model, origin, exc)

        self._publish_thread = threading.Thread(target=run, name="publish", daemon=True)
        self._publish_thread.start()
        return {"status": "accepted", "scope": "cluster", "model": model, "coordinator": self.replica_id,
                "origin": origin}
