"""``ReplicaAgent``: a replica's agent (``lockstep.sync.agent``) with its memory behind one lock, its actions
carried out: the loads and the timed flips run in threads, and each reports its outcome back.

The shared-folder watcher (``lockstep.sync.watcher``) and the admin endpoints (``ReplicaRuntime``) feed it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any, Protocol

from lockstep.core.clock import Clock
from lockstep.sync import agent
from lockstep.sync.agent import Action, Memory, Rules, Snapshot, Transport
from lockstep.sync.protocol import Split, StagedInfo, StageState, SyncState

log = logging.getLogger(__name__)

MAX_SLEEP_S = 60.0  # one sleep of sleep_until at most: time.sleep refuses very long waits


class ServedVersion(Protocol):
    """The version a replica serves, as the agent sees it (``lockstep.inference.slot.ModelSlot``)."""

    @property
    def version(self) -> int: ...

    @property
    def digest(self) -> str | None: ...


class Driven(Protocol):
    """What ``ReplicaAgent`` uses of a replica (``lockstep.inference.replica.Replica``)."""

    @property
    def serving(self) -> ServedVersion | None: ...

    @property
    def stage_info(self) -> StagedInfo | None: ...

    @property
    def committed_version(self) -> int | None: ...

    def staged_plan_version(self) -> int | None: ...
    def split_applied(self) -> tuple[Split | None, bool]: ...
    def stage(self, model_ref: str, version: int, digest: str | None = None, *, resident: bool = False
              ) -> StagedInfo: ...
    def apply_split(self, split: Split | None) -> None: ...
    def boot(self, model_ref: str, version: int, digest: str | None = None) -> None: ...
    def flip(self, version: int) -> None: ...
    def abort(self, version: int | None = None) -> bool: ...
    def refuse_stage(self, version: int, model_ref: str, reason: str) -> StagedInfo: ...
    def refuse_commit(self, version: int, digest: str | None, reason: str) -> None: ...
    def set_committed(self, version: int | None, digest: str | None = None) -> None: ...


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
            split, missing = r.split_applied()
            seen = Snapshot(serving.version if serving else None, serving.digest if serving else None,
                            info.version if info else None, r.staged_plan_version(), r.committed_version,
                            agent.split_key(split), missing)
            self.memory, actions = agent.decide(self.rules, self.memory, seen, self.clock.time())
            for action in actions:
                self._carry(action)
            return actions

    def _carry(self, action: Action) -> None:
        r = self.replica
        match action:
            case agent.EndSplit():
                r.apply_split(None)
            case agent.Stage() | agent.CatchUp() | agent.FlipAt() | agent.MarkBehindAt() | agent.SplitAt():
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
                info = self.replica.stage(load.model, load.version, load.digest, resident=load.resident)
                ok = info.state is StageState.STAGED
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
            if isinstance(timer, agent.SplitAt):
                r.apply_split(timer.split)
            elif isinstance(timer, agent.FlipAt):
                r.flip(timer.version)
                r.set_committed(timer.version, timer.digest)  # over HTTP too: what /metrics and /status say
            elif (serving := r.serving) is None or serving.version != timer.version:
                r.set_committed(timer.version, timer.digest)
                log.warning("%s is behind: v%d committed but not loaded yet; unready until it is", self.name,
                            timer.version)
        except Exception as exc:  # never ready on the old version while the cluster serves the new one
            if isinstance(timer, agent.SplitAt):
                log.error("%s could not apply the split of v%d: %s", self.name, timer.version, exc)
                return
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
