"""Replica side of the sync protocol: the agent's actions carried out, and the shared folder read into it.

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from lockstep.core.clock import Clock
from lockstep.core.errors import Conflict, LeaseHeld
from lockstep.core.settings import Settings
from lockstep.sync import agent, protocol, shared_files
from lockstep.sync.agent import CATCH_UP_RETRY_S as CATCH_UP_RETRY_S
from lockstep.sync.agent import COMMIT_POLL_WINDOW_S as COMMIT_POLL_WINDOW_S
from lockstep.sync.agent import Action, Memory, Rules, Snapshot, Transport
from lockstep.sync.protocol import Committed, LegacyRequest, StagedInfo, StageState, SyncState

if TYPE_CHECKING:
    from lockstep.inference.generation import TokenRate
    from lockstep.inference.replica import Replica
    from lockstep.inference.slot import ModelSlot
    from lockstep.store import ModelStore

log = logging.getLogger(__name__)

MAX_SLEEP_S = 60.0  # one sleep of sleep_until at most: time.sleep refuses very long waits


class Driven(Protocol):
    """What ``ReplicaAgent`` uses of a replica (``lockstep.inference.replica.Replica``)."""

    serving: ModelSlot | None
    stage_info: StagedInfo | None
    committed_version: int | None

    def staged_plan_version(self) -> int | None: ...
    def stage(self, model_ref: str, version: int, digest: str | None = None) -> StagedInfo: ...
    def boot(self, model_ref: str, version: int, digest: str | None = None) -> None: ...
    def flip(self, version: int) -> None: ...
    def abort(self, version: int | None = None) -> bool: ...
    def refuse_stage(self, version: int, model_ref: str, reason: str) -> StagedInfo: ...
    def refuse_commit(self, version: int, digest: str | None, reason: str) -> None: ...
    def set_committed(self, version: int | None, digest: str | None = None) -> None: ...


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


class ReplicaAgent:
    """The agent's memory behind one lock; carries its actions out, loads and timed flips in threads."""

    def __init__(self, replica: Driven, rules: Rules, clock: Clock, name: str, *, beat: Callable[[], None],
                 wake: Callable[[], object]) -> None:
        self.replica, self.rules, self.clock, self.name = replica, rules, clock, name
        self._beat, self._wake = beat, wake  # beat soon; decide again (a thread reported)
        self._lock = threading.RLock()
        self.memory = Memory()

    def observe(self, state: SyncState) -> str | None:
        """Take ``state`` as the last good one, or say why it is ignored."""
        with self._lock:
            self.memory, problem = agent.observe(self.rules, self.memory, state)
        return problem

    def tell(self, **changes: Any) -> list[Action]:
        """Over HTTP: a request of the trainer as the next state of a view only it writes; carried out at once."""
        with self._lock:
            view = self.memory.view or SyncState()
            self.observe(view.model_copy(update={"generation": view.generation + 1, **changes}))
            return self.step()

    def step(self) -> list[Action]:
        """Decide on what was last seen, and carry it out."""
        with self._lock:
            r = self.replica
            serving, info = r.serving, r.stage_info
            seen = Snapshot(serving.version if serving else None, serving.digest if serving else None,
                            info.version if info else None, r.staged_plan_version(), r.committed_version)
            self.memory, actions = agent.decide(self.rules, self.memory, seen, self.clock.time())
            for action in actions:
                self._carry(action)
            return actions

    def _carry(self, action: Action) -> None:
        r = self.replica
        match action:
            case agent.Stage() | agent.CatchUp() | agent.FlipAt() | agent.MarkBehindAt():
                log.info("%s: %s", self.name, action)
                run = self._load if isinstance(action, agent.Load) else self._at
                threading.Thread(target=run, args=(action,), name=f"{type(action).__name__}-v{action.version}",
                                 daemon=True).start()
            case agent.RefuseStage():
                r.refuse_stage(action.version, action.model, action.reason)
            case agent.Abort():
                if r.abort(action.version):
                    log.info("%s dropped staged v%d (%s)", self.name, action.version, action.reason)
                    self._beat()
            case agent.SetCommitted(reason=None):
                r.set_committed(action.version, action.digest)
            case agent.SetCommitted(reason=str(reason)):
                r.refuse_commit(action.version, action.digest, reason)
            case agent.Beat():
                self._beat()

    def _load(self, load: agent.Load) -> None:
        ok = False
        try:
            if isinstance(load, agent.Stage):
                ok = self.replica.stage(load.model, load.version, load.digest).state is StageState.STAGED
            else:
                self.replica.boot(load.model, load.version, load.digest)
                ok = True
        except Exception as exc:
            log.error("%s could not load v%d (%s): %s", self.name, load.version, load.model, exc)
        finally:
            self._report(lambda mem: agent.loaded(mem, load, ok, self.clock.time()))

    def _at(self, timer: agent.Timer) -> None:
        r = self.replica
        if (late := self.clock.time() - timer.at) > 0 and isinstance(timer, agent.FlipAt):
            # Seen after activate_at means a late flip: the commit margin is too short for this replica's polls.
            log.warning("%s saw the commit of v%d %.0f ms after activate_at", self.name, timer.version, late * 1000)
        try:
            sleep_until(self.clock, timer.at)
            if isinstance(timer, agent.FlipAt):
                r.flip(timer.version)
            elif (serving := r.serving) is None or serving.version != timer.version:
                r.set_committed(timer.version, timer.digest)
                log.warning("%s is behind: v%d committed but not loaded yet; unready until it is", self.name,
                            timer.version)
        except Exception as exc:  # never ready on the old version while the cluster serves the new one
            folder = self.rules.transport is Transport.FOLDER
            r.refuse_commit(timer.version, timer.digest, (f"could not flip to v{timer.version}: {exc}; unready until "
                            "it catches up") if folder else (f"commit of v{timer.version} failed: {exc}; unready "
                                                             "until the trainer catches this replica up"))
        finally:
            self._report(lambda mem: agent.fired(mem, timer))

    def _report(self, change: Callable[[Memory], Memory]) -> None:
        with self._lock:
            self.memory = change(self.memory)
        self._beat()
        self._wake()


class SyncWatcher:
    """Drives one replica from the shared folder through its agent; owns its heartbeat."""

    def __init__(self, replica: Replica, settings: Settings, *, store: ModelStore | None, clock: Clock,
                 replica_id: str, url: str | None, token_rate: TokenRate | None = None) -> None:
        assert settings.shared_dir is not None and settings.sync_state_path is not None
        self.replica, self.settings, self.store, self.clock = replica, settings, store, clock
        self.replica_id, self.url, self.token_rate = replica_id, url, token_rate
        self.path, self.shared_dir = settings.sync_state_path, settings.shared_dir
        self._wake = Doorbell()
        self.agent = ReplicaAgent(replica, Rules(Transport.FOLDER, settings.initial_model_repo_id), clock,
                                  replica_id, beat=self._beat_soon, wake=self._wake.set)
        self._last_problem: str | None = None
        self._last_bytes: bytes | None = None  # the file as last read
        self._legacy_seen: str | None = None
        self._naive: threading.Thread | None = None
        self._publish_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat_due = 0.0

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
        if self.settings.sync_mode != "naive" or self.replica.serving is None:
            self.agent.step()  # naive mode (benchmark baseline) only boots through it
        if self.clock.time() >= self._beat_due:
            self.beat()

    def _problem(self, message: str) -> None:
        if message != self._last_problem:  # say it once, not ten times a second
            log.warning("%s: %s; keeping the last good state (generation %s)", self.replica_id, message,
                        self.last_good.generation if self.last_good else None)
            self._last_problem = message

    def _read(self) -> SyncState | None:
        try:
            data = shared_files.read_sync_state_bytes(self.path)
            if data is None or data == self._last_bytes:
                return self.last_good  # unchanged since the last poll: already handled (parsing costs CPU)
            self._last_bytes = data
            state = shared_files.decode_sync_state(data, self.path)
        except ValueError as exc:
            self._problem(str(exc))
            return self.last_good
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
    def beat(self) -> None:
        r = self.replica
        queued, running = r.engine_load()
        poll = self.agent.memory.poll
        try:
            beat = protocol.Heartbeat(
                replica_id=self.replica_id, url=self.url, pid=os.getpid(), state=r.state, ready=r.ready,
                serving=r.serving_info(), staged=r.stage_info, last_error=r.last_error,
                generation_seen=self.last_good.generation if self.last_good else None,
                update_mode=self.settings.update_mode.value, queue_depth=queued, running=running,
                tokens_per_s=self.token_rate.rate() if self.token_rate else 0.0, time=self.clock.time(),
                started_at=r.started_at, commit_poll_until=poll[1] if poll else None,
                commit_poll_s=None if poll is None else min(self.settings.commit_poll_interval_s,
                                                            self.settings.poll_interval_s),
            )
            shared_files.write_heartbeat(self.shared_dir, beat)
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
