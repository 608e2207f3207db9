"""The replica agent in virtual time: its rules one by one, then a cluster of agents under any interleaving.

Nothing is loaded: the agent is pure, and a simulated executor stands in for the replica (loads end when a
rule says so, ok or failed; timers fire at their wall time as the virtual clock passes it).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lockstep.sync.agent import (
    CATCH_UP_RETRY_S,
    Abort,
    Action,
    Beat,
    CatchUp,
    EndSplit,
    FlipAt,
    Load,
    MarkBehindAt,
    Memory,
    RefuseStage,
    Rules,
    SetCommitted,
    Snapshot,
    SplitAt,
    Stage,
    Timer,
    Transport,
    decide,
    fired,
    loaded,
    observe,
)
from lockstep.sync.protocol import Committed, Pending, Phase, Split, SyncState

INITIAL = "builtin:tiny"
FOLDER = Rules(Transport.FOLDER, INITIAL)
HTTP = Rules(Transport.HTTP, INITIAL)
T0 = 1_700_000_000.0


def model(version: int) -> str:
    return INITIAL if version == 0 else f"versions/{version:06d}"


def digest(version: int) -> str | None:
    return None if version == 0 else f"d{version}"


def commit(version: int, at: float, *, rollback: bool = False, **extra: object) -> Committed:
    return Committed.model_validate({"version": version, "model": model(version), "digest": digest(version),
                                     "activate_at": at, "rollback": rollback, **extra})


def prepare(version: int, *, deadline: float = T0 + 60, phase: Phase = Phase.PREPARE, **extra: object) -> Pending:
    return Pending.model_validate({"version": version, "model": model(version), "digest": digest(version),
                                   "phase": phase, "deadline": deadline, **extra})


def seen(mem: Memory, state: SyncState, rules: Rules = FOLDER) -> Memory:
    mem, problem = observe(rules, mem, state)
    assert problem is None, problem
    return mem


def serving(version: int, staging: int | None = None, staged: int | None = None) -> Snapshot:
    return Snapshot(version, digest(version), staging, staged, committed=version)


# ---------------------------------------------------------------------------------------------- rules
def test_a_booting_replica_loads_the_committed_version_first_and_stages_only_then() -> None:
    mem = seen(Memory(), SyncState(generation=3, committed=commit(2, T0), pending=prepare(3)))
    mem, acts = decide(FOLDER, mem, Snapshot(), T0)
    assert acts == [SetCommitted(2, "d2"), CatchUp(2, model(2), "d2"), Beat()]  # unready, then loading
    mem = loaded(mem, CatchUp(2, model(2), "d2"), True, T0 + 1)
    mem, acts = decide(FOLDER, mem, serving(2), T0 + 1)
    assert acts == [Stage(3, model(3), "d3")]
    assert decide(FOLDER, mem, serving(2, staging=3), T0 + 1)[1] == []  # tried once per prepare


def test_nothing_committed_means_the_initial_model_as_version_zero() -> None:
    mem, acts = decide(FOLDER, Memory(), Snapshot(), T0)
    assert acts == [SetCommitted(0, None), CatchUp(0, INITIAL, None), Beat()]


@pytest.mark.parametrize(("state", "why"), [
    (SyncState(generation=4, committed=commit(2, T0)), "generation 4 is lower than 5"),
    (SyncState(generation=6, committed=commit(1, T0)), "commits v1 below v2 without a rollback"),
    (SyncState(generation=6), "has no committed version but v2 was committed"),
])
def test_a_state_that_goes_back_is_ignored_and_a_rollback_is_not(state: SyncState, why: str) -> None:
    mem = seen(Memory(), SyncState(generation=5, committed=commit(2, T0)))
    after, problem = observe(FOLDER, mem, state)
    assert after is mem and problem is not None and why in problem
    rolled = seen(mem, SyncState(generation=6, committed=commit(1, T0 + 1, rollback=True)))
    assert rolled.applicable is not None and rolled.applicable.version == 1


def test_a_refused_commit_is_not_what_going_back_is_measured_from() -> None:
    mem = seen(Memory(), SyncState(generation=5, committed=commit(2, T0)))
    mem = seen(mem, SyncState(generation=6, committed=commit(3, math.inf)))  # seen, but it cannot apply it
    assert mem.applicable is not None and mem.applicable.version == 2
    assert seen(mem, SyncState(generation=7, committed=commit(2, T0))).view is not None


def test_one_load_at_a_time_and_a_prepare_waits_for_the_running_one() -> None:
    mem = seen(Memory(), SyncState(generation=5, committed=commit(2, T0), pending=prepare(3)))
    mem = replace(mem, load=CatchUp(2, model(2), "d2"))
    mem, acts = decide(FOLDER, mem, Snapshot(serving=1, committed=2), T0)
    assert acts == []  # behind, loading v2: the prepare is tried once that ends
    mem = loaded(mem, CatchUp(2, model(2), "d2"), True, T0)
    assert decide(FOLDER, mem, serving(2), T0)[1] == [Stage(3, model(3), "d3")]


def test_a_staged_version_flips_at_the_committed_activate_at_once_and_polls_fast_until_then() -> None:
    mem = seen(Memory(), SyncState(generation=5, committed=commit(2, T0), pending=prepare(3)))
    mem, _ = decide(FOLDER, mem, serving(2), T0)
    mem = loaded(mem, Stage(3, model(3), "d3"), True, T0 + 1)
    assert mem.poll is not None and mem.poll[0] == 3
    mem = seen(mem, SyncState(generation=6, committed=commit(3, T0 + 2), pending=prepare(3, phase=Phase.COMMIT)))
    mem, acts = decide(FOLDER, mem, serving(2, staging=3, staged=3), T0 + 1.5)
    assert acts == [Beat(), FlipAt(3, "d3", T0 + 2)] and mem.poll is None  # the commit came: normal polling
    assert decide(FOLDER, mem, serving(2, staging=3, staged=3), T0 + 1.6)[1] == []
    mem = fired(mem, FlipAt(3, "d3", T0 + 2))
    assert decide(FOLDER, mem, serving(3), T0 + 2)[1] == []


def rollout_step(share: float, step: int, at: float, *, pins_step: int | None = None) -> Split:
    return Split(rollout="r1", version=3, share=share, step=step, activate_at=at, pins_step=pins_step)


def in_canary(split: Split, generation: int) -> SyncState:
    return SyncState(generation=generation, committed=commit(2, T0), split=split,
                     pending=prepare(3, phase=Phase.CANARY, rollout="r1", deadline=None))


def test_a_rollout_step_is_put_in_force_at_its_activate_at_once_per_change() -> None:
    step = rollout_step(5, 0, T0 + 1)
    mem = seen(Memory(), in_canary(step, 6))
    mem, acts = decide(FOLDER, mem, serving(2, staging=3, staged=3), T0)
    assert acts == [SplitAt(3, None, T0 + 1, step)]
    assert decide(FOLDER, mem, serving(2, staging=3, staged=3), T0 + 0.5)[1] == []  # its timer is set
    mem = fired(mem, SplitAt(3, None, T0 + 1, step))
    applied = replace(serving(2, staging=3, staged=3), split=("r1", 3, 0, 5.0, None))
    assert decide(FOLDER, mem, applied, T0 + 1)[1] == []
    pins = rollout_step(5, 0, T0 + 1, pins_step=0)  # the same step with its session pins
    mem = seen(mem, in_canary(pins, 7))
    assert decide(FOLDER, mem, applied, T0 + 1.2)[1] == [SplitAt(3, None, T0 + 1, pins)]


def test_a_replica_that_joins_mid_rollout_stages_the_candidate_and_applies_the_split_once_staged() -> None:
    step = rollout_step(25, 1, T0)
    mem = seen(Memory(), in_canary(step, 9))
    mem, acts = decide(FOLDER, mem, serving(2), T0 + 1)
    assert Stage(3, model(3), "d3", resident=True) in acts
    assert SplitAt(3, None, T0, step) in acts  # in force at once: unready while the candidate is missing
    mem = fired(mem, SplitAt(3, None, T0, step))
    missing = replace(serving(2, staging=3), split=("r1", 3, 1, 25.0, None), split_missing=True)
    assert decide(FOLDER, mem, missing, T0 + 2)[1] == []  # loading; not applied again every poll
    mem = loaded(mem, Stage(3, model(3), "d3", resident=True), True, T0 + 3)
    staged = replace(missing, staged=3)
    assert SplitAt(3, None, T0 + 4, step) in decide(FOLDER, mem, staged, T0 + 4)[1]


def test_a_promotion_ends_the_split_with_the_flip_and_an_abort_ends_it_at_once() -> None:
    applied = replace(serving(2, staging=3, staged=3), split=("r1", 3, 1, 25.0, 1))
    mem = seen(Memory(), in_canary(rollout_step(25, 1, T0, pins_step=1), 6))
    mem = fired(decide(FOLDER, mem, applied, T0)[0], SplitAt(3, None, T0, rollout_step(25, 1, T0, pins_step=1)))
    promoted = seen(mem, SyncState(generation=7, committed=commit(3, T0 + 2), pending=prepare(3, phase=Phase.COMMIT)))
    _, acts = decide(FOLDER, promoted, applied, T0 + 1)
    assert FlipAt(3, "d3", T0 + 2) in acts and EndSplit() not in acts  # sessions keep v3 until the flip
    aborted = seen(mem, SyncState(generation=7, committed=commit(2, T0), pending=prepare(3, phase=Phase.ABORT)))
    _, acts = decide(FOLDER, aborted, applied, T0 + 1)
    assert EndSplit() in acts and Abort(3, "prepare expired") in acts


def test_a_commit_not_staged_is_staged_early_then_unready_at_activate_at_then_caught_up_with_retries() -> None:
    mem = seen(Memory(), SyncState(generation=6, committed=commit(3, T0 + 2)))
    mem, acts = decide(FOLDER, mem, serving(2), T0)
    assert acts == [Stage(3, model(3), "d3"), MarkBehindAt(3, "d3", T0 + 2)]
    mem = loaded(mem, Stage(3, model(3), "d3"), False, T0 + 1)  # the early stage failed
    assert decide(FOLDER, mem, serving(2, staging=3), T0 + 1)[1] == []  # tried once; behind is scheduled
    mem = fired(mem, MarkBehindAt(3, "d3", T0 + 2))
    mem, acts = decide(FOLDER, mem, Snapshot(serving=2, serving_digest="d2", staging=3, committed=3), T0 + 2)
    assert acts == [CatchUp(3, model(3), "d3"), Beat()]
    mem = loaded(mem, CatchUp(3, model(3), "d3"), False, T0 + 3)
    assert decide(FOLDER, mem, Snapshot(serving=2, committed=3), T0 + 3 + CATCH_UP_RETRY_S - 0.1)[1] == []
    assert decide(FOLDER, mem, Snapshot(serving=2, committed=3), T0 + 3 + CATCH_UP_RETRY_S)[1][0] == CatchUp(
        3, model(3), "d3")


def test_a_commit_of_the_version_still_staging_marks_behind_at_activate_at() -> None:
    mem = seen(Memory(), SyncState(generation=5, committed=commit(2, T0), pending=prepare(3)))
    mem, _ = decide(FOLDER, mem, serving(2), T0)
    mem = seen(mem, SyncState(generation=6, committed=commit(3, T0 + 2), pending=prepare(3, phase=Phase.COMMIT)))
    assert decide(FOLDER, mem, serving(2, staging=3), T0 + 1)[1] == [MarkBehindAt(3, "d3", T0 + 2)]
    assert decide(FOLDER, mem, serving(2, staging=3), T0 + 3)[1] == [SetCommitted(3, "d3")]  # past: at once


@pytest.mark.parametrize("phase", [Phase.ABORT, Phase.PREPARE])
def test_an_aborted_or_expired_prepare_is_dropped(phase: Phase) -> None:
    mem = seen(Memory(), SyncState(generation=5, committed=commit(2, T0), pending=prepare(3, deadline=T0 + 5,
                                                                                          phase=phase)))
    mem, acts = decide(FOLDER, mem, serving(2, staging=3, staged=3), T0 + 6)
    assert acts == [Abort(3, "prepare expired")]
    assert decide(FOLDER, mem, serving(2), T0 + 7)[1] == []


def test_a_commit_or_prepare_naming_a_raw_path_or_no_time_is_refused_once() -> None:
    bad = Committed(version=3, model="/etc/models/x", activate_at=T0)
    mem = seen(Memory(), SyncState(generation=6, committed=bad, pending=Pending(version=3, model="/etc/models/x",
                                                                               phase=Phase.PREPARE)))
    mem, acts = decide(FOLDER, mem, serving(2), T0)
    assert [type(a) for a in acts] == [RefuseStage, Beat, SetCommitted, Beat]
    assert isinstance(acts[2], SetCommitted) and "refusing the commit of v3" in (acts[2].reason or "")
    assert decide(FOLDER, mem, Snapshot(serving=2, staging=3, committed=3), T0)[1] == []  # said once
    mem = seen(mem, SyncState(generation=7, committed=commit(3, math.nan)))
    reason = decide(FOLDER, mem, Snapshot(serving=2, committed=3), T0)[1][0]
    assert isinstance(reason, SetCommitted) and "activate_at nan" in (reason.reason or "")


def test_over_http_a_commit_acts_once_and_the_trainer_catches_the_replica_up() -> None:
    view = SyncState(generation=1, pending=Pending(version=3, model="/data/ckpt", phase=Phase.PREPARE))
    mem = seen(Memory(), view, HTTP)
    mem, acts = decide(HTTP, mem, Snapshot(), T0)  # any model the trainer names; even a replica not serving
    assert acts == [Stage(3, "/data/ckpt", None)]
    committed = Committed(version=3, model="/data/ckpt", activate_at=T0 + 1, rollback=True)
    told = Pending(version=3, model="/data/ckpt", phase=Phase.COMMIT)
    mem = seen(mem, view.model_copy(update={"generation": 2, "committed": committed, "pending": told}), HTTP)
    mem, acts = decide(HTTP, mem, Snapshot(serving=2, staging=3), T0)
    assert acts == [SetCommitted(3, None)]  # not staged when told: unready at once (and 409)
    mem = loaded(mem, Stage(3, "/data/ckpt", None), True, T0)
    mem, acts = decide(HTTP, mem, Snapshot(serving=2, staging=3, staged=3, committed=3), T0)
    assert acts == [Beat()]  # no flip later (the fast polling window ends: it beats)
    again = committed.model_copy(update={"committed_at": T0})
    mem = seen(mem, view.model_copy(update={"generation": 3, "committed": again, "pending": told}), HTTP)
    assert decide(HTTP, mem, Snapshot(serving=2, staging=3, staged=3, committed=3), T0)[1] == [
        FlipAt(3, None, T0 + 1)]


# ---------------------------------------------------------------------------------------------- a cluster
REPLICAS = 3
MARGINS = st.sampled_from([0.05, 0.3, 1.0])  # commit margins: every replica polls before activate_at


@dataclass
class Node:
    """One replica: its agent's memory and what a ``Replica`` would hold, moved by a simulated executor."""

    epoch: int = 0  # a restart drops the loads and timers of the process before
    mem: Memory = field(default_factory=Memory)
    serving: int | None = None
    staged: int | None = None
    stage: tuple[int, str, int] | None = None  # (version, staging|staged|failed, token)
    committed: int | None = None
    loads: list[tuple[Load, int, int]] = field(default_factory=list)  # (load, stage token, latest at start)

    @property
    def ready(self) -> bool:
        return self.serving is not None and self.committed in (None, self.serving)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.serving, None if self.serving is None else digest(self.serving),
                        self.stage[0] if self.stage else None, self.staged, self.committed)


class Cluster(RuleBasedStateMachine):
    """Replicas and a coordinator over one shared file, in virtual time, checked after every step.

    One version is committed at a time: a ready replica serves it (or, until its activate_at, the one before);
    a flip goes to the committed version at its activate_at (later only on a replica that was unready); a load
    serves the version committed when it began, so a rolled-back version never comes back on its own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now, self.generation, self.top, self.token = T0, 0, 0, 0
        self.file: SyncState | None = None
        self.written: list[SyncState] = []
        self.commits = [Committed(version=0, model=INITIAL, activate_at=T0)]  # valid commits, in order
        self.timers: list[tuple[float, int, int, int, Timer]] = []  # (at, seq, node, epoch, timer)
        self.nodes = [Node() for _ in range(REPLICAS)]
        self.broken: list[str] = []
        for i in range(REPLICAS):
            self._tick(i)
            self._finish(i, True)

    # -------------------------------------------------------------- the simulated executor
    def _tick(self, i: int, state: SyncState | None = None) -> None:
        node = self.nodes[i]
        for view in (self.file, state):
            if view is not None:
                node.mem = observe(FOLDER, node.mem, view)[0]
        node.mem, acts = decide(FOLDER, node.mem, node.snapshot(), self.now)
        for act in acts:
            self._carry(i, act)

    def _carry(self, i: int, act: Action) -> None:
        node = self.nodes[i]
        self.token += 1
        if isinstance(act, Stage):
            node.staged, node.stage = None, (act.version, "staging", self.token)
        if isinstance(act, Load):
            node.loads.append((act, self.token, self.commits[-1].version))
        elif isinstance(act, RefuseStage):
            node.staged, node.stage = None, (act.version, "failed", self.token)
        elif isinstance(act, Abort) and (node.stage is None or node.stage[0] == act.version):
            node.staged = node.stage = None
        elif isinstance(act, SetCommitted):
            node.committed = act.version
        elif isinstance(act, Timer):
            heapq.heappush(self.timers, (act.at, self.token, i, node.epoch, act))

    def _finish(self, i: int, ok: bool) -> None:
        node = self.nodes[i]
        load, token, latest = node.loads.pop(0)
        if isinstance(load, CatchUp) and ok:
            node.serving = load.version
            if load.version != latest:
                self.broken.append(f"r{i} loaded v{load.version} but v{latest} was committed when it began")
        elif isinstance(load, Stage) and node.stage is not None and node.stage[2] == token:
            node.stage = (load.version, "staged" if ok else "failed", token)
            node.staged = load.version if ok else None
        node.mem = loaded(node.mem, load, ok, self.now)
        self._tick(i)
        self._fire(self.now)  # a flip due now happens now, not at the next rule

    def _fire(self, until: float) -> None:
        while self.timers and self.timers[0][0] <= until:
            at, _, i, epoch, timer = heapq.heappop(self.timers)
            node = self.nodes[i]
            if epoch != node.epoch:
                continue  # the process that scheduled it is gone
            self.now = max(self.now, at)
            if isinstance(timer, FlipAt) and node.staged == timer.version:
                latest, was_ready = self.commits[-1], node.ready
                node.serving, node.staged, node.stage = timer.version, None, None
                node.committed = timer.version if node.committed is not None else None
                if timer.version != latest.version:
                    self.broken.append(f"r{i} flipped to v{timer.version}, not the committed v{latest.version}")
                elif self.now != latest.activate_at and (self.now < (latest.activate_at or 0) or was_ready):
                    self.broken.append(f"r{i} flipped to v{timer.version} at {self.now - T0:.3f}, not at "
                                       f"activate_at {(latest.activate_at or 0) - T0:.3f}")
            elif isinstance(timer, FlipAt) or node.serving != timer.version:  # refused flip, or behind
                node.committed = timer.version
            node.mem = fired(node.mem, timer)
            self._tick(i)

    def _write(self, committed: Committed | None, pending: Pending | None) -> None:
        self.generation += 1
        self.file = SyncState(generation=self.generation, committed=committed, pending=pending)
        self.written.append(self.file)

    def _poll_all(self) -> None:
        for i in range(REPLICAS):
            self._tick(i)

    # -------------------------------------------------------------- the coordinator
    @property
    def pending(self) -> Pending | None:
        return self.file.pending if self.file else None

    def _idle(self) -> bool:
        """No prepare open, and the last commit active: a coordinator publishes one version at a time."""
        p = self.pending
        open_ = p is not None and p.phase is Phase.PREPARE and self.now <= (p.deadline or 0)
        return not open_ and self.now >= (self.commits[-1].activate_at or 0)

    @precondition(lambda self: self._idle())
    @rule(rollback=st.booleans(), pick=st.integers(0, 9))
    def prepare(self, rollback: bool, pick: int) -> None:
        latest = self.commits[-1].version
        lower = sorted({c.version for c in self.commits if c.version < latest})
        if rollback and not lower:
            return
        if rollback:
            version = lower[pick % len(lower)]
        else:
            self.top = version = self.top + 1
        self._write(self.file.committed if self.file else None, Pending(
            version=version, model=model(version), digest=digest(version), phase=Phase.PREPARE,
            deadline=self.now + 3.0, rollback=rollback))
        self._fire(self.now)

    @precondition(lambda self: (p := self.pending) is not None and p.phase is Phase.PREPARE
                  and self.now <= (p.deadline or 0))
    @rule(margin=MARGINS)
    def commit(self, margin: float) -> None:
        p = self.pending
        assert p is not None
        committed = commit(p.version, self.now + margin, rollback=p.rollback)
        self.commits.append(committed)
        self._write(committed, p.model_copy(update={"phase": Phase.COMMIT, "activate_at": committed.activate_at}))
        self._fire(self.now)

    @precondition(lambda self: (p := self.pending) is not None and p.phase is Phase.PREPARE)
    @rule()
    def abort(self) -> None:
        assert self.file is not None and self.file.pending is not None
        self._write(self.file.committed, self.file.pending.model_copy(update={"phase": Phase.ABORT}))

    @precondition(lambda self: self._idle())
    @rule(margin=MARGINS, rollback=st.booleans(), pick=st.integers(0, 9))
    def publish(self, margin: float, rollback: bool, pick: int) -> None:
        """A whole publish that goes well: prepare, every replica stages, commit, activate."""
        self.prepare(rollback, pick)
        if self.pending is None or self.pending.phase is not Phase.PREPARE:
            return
        self._poll_all()
        for i, node in enumerate(self.nodes):
            while node.loads:
                self._finish(i, True)
        self.commit(margin)
        self.advance(margin + 0.01)

    # -------------------------------------------------------------- replicas and time
    @rule(i=st.integers(0, REPLICAS - 1))
    def poll(self, i: int) -> None:
        self._tick(i)
        self._fire(self.now)

    @precondition(lambda self: any(n.loads for n in self.nodes))
    @rule(i=st.integers(0, REPLICAS - 1), ok=st.booleans())
    def finish_load(self, i: int, ok: bool) -> None:
        if self.nodes[i].loads:
            self._finish(i, ok)

    @rule(i=st.integers(0, REPLICAS - 1))
    def restart(self, i: int) -> None:
        """A crash and a restart: memory and models lost; it boots again from the file."""
        self.nodes[i] = Node(epoch=self.nodes[i].epoch + 1)
        self._tick(i)
        self._fire(self.now)

    @precondition(lambda self: len(self.written) > 1)
    @rule(i=st.integers(0, REPLICAS - 1), back=st.integers(1, 8))
    def stale_read(self, i: int, back: int) -> None:
        """A replica reads an older file (an NFS cache, a writer that was slow) after the current one."""
        self._tick(i, self.written[-1 - min(back, len(self.written) - 1)])
        self._fire(self.now)

    @precondition(lambda self: self.file is not None and self.file.committed is not None)
    @rule(i=st.integers(0, REPLICAS - 1), lower=st.booleans())
    def hand_written(self, i: int, lower: bool) -> None:
        """A replica reads a hand-written state: a lower commit without rollback, or no commit at all."""
        assert self.file is not None and self.file.committed is not None
        odd = None if not lower or self.file.committed.version == 0 else commit(self.file.committed.version - 1, 0)
        self._tick(i, self.file.model_copy(update={"generation": self.generation + 1, "committed": odd}))
        self._fire(self.now)

    @rule(dt=st.sampled_from([0.01, 0.2, 1.0, 4.0, 6.0]))
    def advance(self, dt: float) -> None:
        """Time passes: timers fire at their time; every replica polls before activate_at and at the end."""
        end, at = self.now + dt, self.commits[-1].activate_at or 0
        if self.now < at - 0.001 <= end:
            self._fire(at - 0.001)
            self.now = at - 0.001
            self._poll_all()
        self._fire(end)
        self.now = end
        self._poll_all()
        self._fire(end)

    # -------------------------------------------------------------- invariants
    @invariant()
    def ready_only_on_the_committed_version_and_flips_only_at_activate_at(self) -> None:
        latest = self.commits[-1]
        # Before activate_at the previous version is still right, and a replica that booted meanwhile loaded
        # the new one directly; after it, only the new one.
        allowed = {latest.version} | ({self.commits[-2].version} if self.now < (latest.activate_at or 0) else set())
        for i, node in enumerate(self.nodes):
            if node.ready and node.serving not in allowed:
                self.broken.append(f"r{i} is ready on v{node.serving} at {self.now - T0:.3f}; committed: "
                                   f"v{latest.version} from {(latest.activate_at or 0) - T0:.3f}")
        assert not self.broken, self.broken


TestCluster = Cluster.TestCase
TestCluster.settings = settings(max_examples=2000, stateful_step_count=30, deadline=None, database=None,
                                derandomize=True, suppress_health_check=[HealthCheck.too_slow])
