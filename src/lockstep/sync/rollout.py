"""Rollouts: a version staged everywhere, then given a growing share of traffic in fleet-wide steps, each held
until its gates pass, ending in the ordinary commit, or rolled back at one ``activate_at`` (docs/protocol.md,
Rollouts).

Every step is an atomic decision like a commit: written to the ledger, delivered to every replica, in force at one
``activate_at``. Both versions stay resident on every replica throughout, so a rollback is a pointer flip. The
gates read what the replicas report of each version's answers (``lockstep.sync.gates``); a human's promote or
abort (``RolloutControl``) always wins over them.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from lockstep.core.errors import BadRequest, Conflict
from lockstep.core.settings import CommitPolicy
from lockstep.sync import gates
from lockstep.sync.protocol import MAX_PINS, Committed, Heartbeat, Pending, Phase, Split, SyncState, VersionStats
from lockstep.sync.reports import PublishOutcome, PublishResult, ReplicaOutcome, commit_refusal

if TYPE_CHECKING:
    from lockstep.sync.coordinator import Coordinator
    from lockstep.sync.sources import ProgressFn, Source

log = logging.getLogger(__name__)

MAX_STEPS = 20
PINS_WAIT_S = 5.0  # seconds to collect a step's session pins from every replica
GATE_POLL_S = 0.5  # seconds between two readings of the replicas' reports while a step holds
ENDED = frozenset({"promoted", "rolled back", "aborted", "unchanged"})  # a rollout's phases once it is over
RETELL_S = 2.0  # seconds between two sends of the step in force to a replica that restarted and has not taken it


@dataclass(frozen=True)
class TaskScore:
    """A task's score on the candidate before the first step, and on the committed version as the baseline."""

    score: float
    baseline: float | None
    samples: int


@dataclass(frozen=True)
class RolloutPlan:
    """How a rollout goes: the shares of its steps, how long each holds, its gates and its shadow sample."""

    shares: tuple[float, ...]  # strictly increasing, the last 100 (the ordinary commit)
    step_seconds: float = 60.0
    min_requests: int = 100
    shadow: float = 0.0  # percent of the committed version's prompts also run on the candidate
    gates: dict[str, gates.GateSpec] = field(default_factory=lambda: gates.parse_gates(None))
    task_score: Callable[[int], TaskScore | None] | None = None  # the trainer's evaluation, given the candidate

    @property
    def steps(self) -> tuple[float, ...]:
        """The shares in order, a shadow-only step (share 0) first when shadowing."""
        return ((0.0,) if self.shadow > 0 else ()) + self.shares


def parse_shares(raw: str | Sequence[Any] | None) -> tuple[float, ...]:
    """``"5,25,100"`` or ``[5, 25, 100]`` as the steps' shares; ``BadRequest`` naming what is allowed."""
    if raw is None or raw == "":
        return (100.0,)
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    if not items or len(items) > MAX_STEPS:
        raise BadRequest(f"canary takes 1 to {MAX_STEPS} shares (percent), like 5,25,100; got {len(items)}")
    shares: list[float] = []
    for item in items:
        if isinstance(item, bool):
            raise BadRequest(f"canary share {item!r} is not a number; shares are percents in (0, 100], like 5,25,100")
        try:
            share = float(str(item).strip().rstrip("%"))
        except ValueError:
            raise BadRequest(f"canary share {str(item)[:40]!r} is not a number; shares are percents in (0, 100], "
                             "like 5,25,100") from None
        if not 0 < share <= 100:
            raise BadRequest(f"canary share {share:g} is outside (0, 100]; shares are percents, like 5,25,100")
        if shares and share <= shares[-1]:
            raise BadRequest(f"canary shares must increase: {share:g} follows {shares[-1]:g} (like 5,25,100)")
        shares.append(share)
    if shares[-1] != 100:
        shares.append(100.0)  # a rollout ends in the ordinary commit
    return tuple(shares)


def make_plan(canary: str | Sequence[Any] | None, *, step_seconds: float = 60.0, min_requests: int = 100,
              shadow: float = 0.0, gate_specs: dict[str, Any] | None = None,
              task_score: Callable[[int], TaskScore | None] | None = None) -> RolloutPlan:
    """A checked plan from what a user typed or sent; ``BadRequest`` naming what is allowed."""
    shares = parse_shares(canary)
    if isinstance(step_seconds, bool) or not isinstance(step_seconds, int | float) or not 0 <= step_seconds <= 86400:
        raise BadRequest(f"step_seconds must be a number of seconds in [0, 86400], got {step_seconds!r}")
    if isinstance(min_requests, bool) or not isinstance(min_requests, int) or not 0 <= min_requests <= 10**9:
        raise BadRequest(f"min_requests must be an integer in [0, 1e9], got {min_requests!r}")
    if isinstance(shadow, bool) or not isinstance(shadow, int | float) or not 0 <= shadow <= 100:
        raise BadRequest(f"shadow must be a percent in [0, 100], got {shadow!r}")
    if shares == (100.0,) and shadow == 0:
        raise BadRequest("a rollout needs canary shares below 100 (like 5,25,100) or a shadow percent; without "
                         "them publish commits at once")
    return RolloutPlan(shares, float(step_seconds), min_requests, float(shadow), gates.parse_gates(gate_specs),
                       task_score)


class Human(StrEnum):
    """What a person asked of a running rollout."""

    PROMOTE = "promote"
    ABORT = "abort"


@dataclass
class StepRecord:
    share: float
    started_at: float
    activate_at: float
    ended_at: float | None = None
    outcome: str | None = None  # passed | promoted | rolled back


class RolloutControl:
    """One rollout's live view (for the API, the UI and ``lockstep status``) and a person's promote or abort."""

    def __init__(self, plan: RolloutPlan, *, rollout_id: str | None = None) -> None:
        self.id = rollout_id or uuid.uuid4().hex[:12]
        self.plan = plan
        self._lock = threading.Lock()
        self.version: int | None = None
        self.model: str | None = None
        # staging | evaluating | step | promoting | rolling back, then promoted | rolled back | aborted
        self.phase = "staging"
        self.step = -1
        self.steps: list[StepRecord] = []
        self.results: list[gates.GateResult] = []
        self.candidate: VersionStats | None = None
        self.committed: VersionStats | None = None
        self.task: TaskScore | None = None
        self.human: Human | None = None
        self.human_at: float | None = None
        self.reason: str | None = None
        self.automatic_rollback = False

    def promote(self) -> None:
        """Promote now: the next decision is the commit, whatever the gates say."""
        self._ask(Human.PROMOTE)

    def abort(self) -> None:
        """Roll back now, whatever the gates say."""
        self._ask(Human.ABORT)

    def _ask(self, what: Human) -> None:
        with self._lock:
            if self.done:
                raise Conflict(f"rollout {self.id} already ended ({self.phase}); nothing to {what.value}")
            if self.phase == "promoting" and what is Human.ABORT:
                raise Conflict(f"rollout {self.id} is being promoted (the commit is written); use lockstep "
                               "rollback to go back")
            if self.human is not None and self.human is not what:  # the first call of a person stands
                then = ("use lockstep rollback to go back once it commits" if self.human is Human.PROMOTE
                        else "publish the version again to try it once more")
                raise Conflict(f"rollout {self.id}: a {self.human.value} was asked first and is being carried "
                               f"out; {then}")
            if self.phase in ("rolling back", "aborting") and self.human is None:
                raise Conflict(f"rollout {self.id} is {self.phase}: {self.reason}; publish the version again "
                               "to try it once more")
            self.human = what  # the same call twice is the same request

    def decide(self, phase: str, reason: str, *, automatic: bool) -> bool:
        """Enter ``phase`` ("rolling back" or "aborting") for ``reason``; False when a person's promote came first.

        Atomic with ``promote``/``abort``: a person's promote either wins here or is refused with 409, never
        accepted and then overruled by the gates.
        """
        with self._lock:
            if automatic and self.human is Human.PROMOTE:
                return False
            self.phase, self.reason, self.automatic_rollback = phase, reason, automatic and self.human is None
            return True

    @property
    def done(self) -> bool:
        """Ended: promoted, rolled back, aborted, or unchanged (the committed version had its content)."""
        return self.phase in ENDED

    def view(self) -> dict[str, Any]:
        """The rollout as JSON: steps, shares, gates with values and thresholds, what a person asked."""
        with self._lock:
            return {
                "id": self.id, "version": self.version, "model": self.model, "phase": self.phase,
                "step": self.step, "share": self.steps[-1].share if self.steps else 0.0,
                "plan": {"shares": list(self.plan.shares), "steps": list(self.plan.steps),
                         "step_seconds": self.plan.step_seconds, "min_requests": self.plan.min_requests,
                         "shadow": self.plan.shadow,
                         "gates": {n: g.model_dump() for n, g in self.plan.gates.items()}},
                "steps": [s.__dict__ for s in self.steps],
                "gates": [r.model_dump() for r in self.results],
                "candidate": self.candidate.model_dump() if self.candidate else None,
                "committed": self.committed.model_dump() if self.committed else None,
                "task_score": self.task.__dict__ if self.task else None,
                "human": self.human.value if self.human else None, "reason": self.reason,
                "automatic_rollback": self.automatic_rollback,
            }


def rollout_in_progress(state: SyncState) -> str | None:
    """Why another rollout or publish may not start now (one runs), or None."""
    pending = state.pending
    if pending is not None and pending.phase is Phase.CANARY:
        share = f" at {state.split.share:g}%" if state.split is not None else ""
        return (f"a rollout of v{pending.version} is in progress{share} (by {pending.coordinator}); promote or "
                "abort it first (lockstep rollout promote|abort, or the UI)")
    return None


class RolloutRun:
    """Drives one rollout on a coordinator's ledger and fleet (the coordinator holds its lease throughout)."""

    def __init__(self, co: Coordinator, source: Source, control: RolloutControl, timeout_s: float,
                 progress: ProgressFn | None) -> None:
        self.co, self.source, self.control, self.timeout_s, self.progress = co, source, control, timeout_s, progress
        self.clock = co.clock
        self.result = PublishResult(source.version, source.model, PublishOutcome.ABORTED,
                                    started_at=self.clock.time(), rollback=source.rollback)
        self.state = SyncState()
        self.told: list[Heartbeat] = []  # the replicas that staged the candidate: each step must reach them
        self.joined: dict[str, Heartbeat] = {}  # live replicas that came after: told too, their refusals not fatal
        self._retold: dict[str, float] = {}  # replica id → when the step was last sent again to it (monotonic)
        self.pending: Pending | None = None
        self.split: Split | None = None
        self.pins: list[str] = []
        control.version, control.model = source.version, source.model

    def _say(self, what: str, detail: dict[str, Any]) -> None:
        if self.progress:
            self.progress(what, {"version": self.source.version, "rollout": self.control.id, **detail})

    def _write(self, **changes: Any) -> None:
        self.state = self.co.write_state(self.state, **changes)

    def _renew(self) -> None:
        self.co.lease.renew()

    def run(self) -> PublishResult:
        self.state = self.co.read_state()
        if (busy := rollout_in_progress(self.state)) is not None:
            raise Conflict(busy)
        try:
            if not self._stage():
                return self._finish("aborted")
            if (why := self._task_gate()) is not None and self.control.decide("aborting", why, automatic=True):
                self._abort_staged(why)
                return self._finish("aborted")
            for step, share in enumerate(self.control.plan.steps):
                if share >= 100 or self.control.human is Human.PROMOTE:
                    return self._promote()
                if self.control.human is Human.ABORT:
                    return self._rollback(f"aborted by a person at step {step}", automatic=False)
                if (why := self._take_step(step, share)) is not None:
                    return self._rollback(why, automatic=False)
                outcome = self._hold(step)
                if outcome is not None:
                    return outcome
            return self._promote()
        except BaseException as exc:
            if self.pending is not None and self.pending.phase is Phase.CANARY and not self.control.done:
                log.error("rollout %s of v%d failed; rolling back", self.control.id, self.source.version)
                self._rollback("the command driving the rollout was stopped; rolled back"
                               if isinstance(exc, KeyboardInterrupt) else
                               "the rollout failed in the coordinator; rolled back", automatic=False)
            raise

    # ------------------------------------------------------------------ phases
    def _stage(self) -> bool:
        """Stage the candidate everywhere as whole second models; False when any replica cannot (aborted)."""
        co, source = self.co, self.source
        self.told = co.fleet.live()
        if not self.told and co.fleet.pushes:
            self.result.reason = f"no live replicas to roll out to: none of {co.fleet.describe()} answers GET /status"
            return False
        now = self.clock.time()
        self.pending = Pending(version=source.version, model=source.model, digest=source.digest, phase=Phase.PREPARE,
                               coordinator=co.owner, started_at=now, deadline=now + self.timeout_s,
                               rollback=source.rollback, rollout=self.control.id)
        self._write(pending=self.pending, split=None)
        self._say("prepare", {"generation": self.state.generation, "replicas": len(self.told)})
        failed = co.fleet.deliver(self.pending, self.state.generation, self.told)
        reports, beats = co.wait_staged(source, self.state.generation, now + self.timeout_s, CommitPolicy.STRICT,
                                        self.progress, self.told if co.fleet.pushes else None, failed,
                                        expected=[b.replica_id for b in self.told], prepare=self.pending)
        self.result.replicas, self.result.prepare_s = reports, self.clock.time() - now
        self.told = [b for b in beats if any(r.replica_id == b.replica_id for r in reports)]
        if (reason := commit_refusal(reports, CommitPolicy.STRICT)) is not None:
            self._abort_staged(f"the rollout never started: {reason}")
            return False
        self.pending = self.pending.model_copy(update={"phase": Phase.CANARY, "deadline": None})
        return True

    def _abort_staged(self, reason: str) -> None:
        assert self.pending is not None
        abort = self.pending.model_copy(update={"phase": Phase.ABORT, "reason": reason})
        self._write(pending=abort, split=None)
        self.co.fleet.deliver(abort, self.state.generation, self._everyone())
        self.pending, self.result.reason = abort, reason
        log.warning("abort v%d: %s", self.source.version, reason)

    def _task_gate(self) -> str | None:
        """The trainer's evaluation of the candidate before any traffic; why it fails, or None."""
        plan, control = self.control.plan, self.control
        if plan.task_score is None or "task_score" not in plan.gates:
            return None
        control.phase = "evaluating"
        score = plan.task_score(self.source.version)
        control.task = score
        if score is None:
            return None
        committed = self.state.committed.version if self.state.committed is not None else 0
        results = gates.evaluate({"task_score": plan.gates["task_score"]}, VersionStats(version=committed),
                                 VersionStats(version=self.source.version), task_score=score.score,
                                 baseline_score=score.baseline, task_samples=score.samples)
        control.results = results
        failed = [r for r in results if r.verdict == "fail"]
        return f"task_score failed before the first step: {failed[0].reason}" if failed else None

    def _take_step(self, step: int, share: float) -> str | None:
        """Put ``share`` in force fleet-wide at one activate_at, then send the step's session pins; why not, or None."""
        assert self.pending is not None
        co, control = self.co, self.control
        started = self.clock.time()
        activate_at = started + co.commit_margin(self.told)
        self.split = Split(rollout=control.id, version=self.source.version, share=share, step=step,
                           activate_at=activate_at, shadow=control.plan.shadow, pins=self.pins[:MAX_PINS])
        self._write(pending=self.pending, split=self.split)
        failed = co.fleet.deliver_split(self.split, self.source.model, self.state.generation, self.told)
        self._tell_newcomers(fresh=True)
        control.step, control.phase = step, "step"
        control.steps.append(StepRecord(share=share, started_at=started, activate_at=activate_at))
        log.info("rollout %s step %d: v%d answers %g%% from %.3f", control.id, step, self.source.version, share,
                 activate_at)
        self._say("step", {"step": step, "share": share, "activate_at": activate_at})
        if failed:
            return "replicas refused the step: " + "; ".join(f"{r}: {why}" for r, why in failed.items())
        # After activate_at no replica adds a session to the committed version's list for this step: collect.
        self.clock.sleep(max(0.0, activate_at - self.clock.time()))
        found, missing = co.fleet.session_pins(control.id, step, self.told, self.clock.monotonic() + PINS_WAIT_S)
        if missing:
            log.warning("rollout %s step %d: no session pins from %s; their sessions go by their draw", control.id,
                        step, ", ".join(f"{r} ({why})" for r, why in missing.items()))
        pins = sorted(set(self.pins).union(*found.values()))
        if len(pins) > MAX_PINS:
            log.warning("rollout %s step %d: %d sessions to keep on the committed version; the %d kept are "
                        "the first by pin, the others may move", control.id, step, len(pins), MAX_PINS)
        self.pins = pins[:MAX_PINS]
        self.split = self.split.model_copy(update={"pins": self.pins, "pins_step": step})
        self._write(pending=self.pending, split=self.split)
        co.fleet.deliver_split(self.split, self.source.model, self.state.generation, self._everyone())
        return None

    def _everyone(self) -> list[Heartbeat]:
        return self.told + list(self.joined.values())

    def _tell_newcomers(self, beats: list[Heartbeat] | None = None, *, fresh: bool = False) -> None:
        """Send the step in force to live replicas that came after the stage (``fresh``: to every one of them).

        Over HTTP nobody else would: such a replica stages the candidate and stays unready until it has it, as
        it would reading the shared folder. Its refusal (409 while it stages) is expected, not a failed step."""
        if not self.co.fleet.pushes or self.split is None:
            return
        live = self.co.fleet.live() if beats is None else beats
        known = {b.replica_id for b in self.told} | (set() if fresh else set(self.joined))
        new = [b for b in live if b.replica_id not in known]
        # One that restarted lost the split with its process (it boots into the committed version alone): told
        # again, every RETELL_S until it takes it, or its sessions of the candidate would go back to the old one.
        now = self.clock.monotonic()
        lost = [b for b in live if b.replica_id in known and (b.generation_seen or 0) < self.state.generation
                and now - self._retold.get(b.replica_id, -RETELL_S) >= RETELL_S]
        if not new and not lost:
            return
        self.joined.update({b.replica_id: b for b in new})
        self._retold.update({b.replica_id: now for b in lost})
        for replica_id, why in self.co.fleet.deliver_split(self.split, self.source.model, self.state.generation,
                                                           new + lost).items():
            log.info("rollout %s: %s joined during step %d and is staging the candidate (%s)", self.control.id,
                     replica_id, self.split.step, why)

    def _reports(self, beats: list[Heartbeat]) -> tuple[VersionStats, VersionStats]:
        """The candidate's and the committed version's answers since the rollout began, summed over replicas."""
        stats = [s for b in beats if b.rollout is not None and b.rollout.rollout == self.control.id
                 for s in b.rollout.stats]
        committed = self.state.committed.version if self.state.committed is not None else 0
        return gates.merge(stats, self.source.version), gates.merge(stats, committed)

    def _hold(self, step: int) -> PublishResult | None:
        """Hold the step until it may advance (None), or end the rollout here (its result)."""
        control, plan = self.control, self.control.plan
        # The candidate's answers; in a shadow-only step, where it serves none, the prompts it was compared on.
        # (A canary answer is compared too: counting both would count it twice.)
        def answers(stats: VersionStats) -> int:
            return stats.compared if control.steps[-1].share == 0 else stats.requests

        candidate, _ = self._reports(self.co.fleet.live())
        answered_before = answers(candidate)
        started = self.clock.monotonic()
        renew_at = self.clock.time() + self.co.settings.lease_ttl_s / 3
        while True:
            beats = self.co.fleet.live()
            candidate, committed = self._reports(beats)
            task = control.task
            results = gates.evaluate(plan.gates, committed, candidate,
                                     task_score=task.score if task else None,
                                     baseline_score=task.baseline if task else None,
                                     task_samples=task.samples if task else 0)
            control.candidate, control.committed, control.results = candidate, committed, results
            share = control.steps[-1].share
            # A shadow-only step gives the traffic gates no answers: they wait for the first step with a share.
            verdict = gates.verdict([r for r in results if not (share == 0 and r.name in gates.TRAFFIC_GATES
                                                               and r.verdict == "waiting")])
            if control.human is Human.PROMOTE:
                return self._promote()
            if control.human is Human.ABORT:
                return self._rollback(f"aborted by a person at step {step}", automatic=False)
            if verdict == "fail":
                failed = "; ".join(f"{r.name}: {r.reason}" for r in results if r.verdict == "fail")
                return self._rollback(f"gate failed at step {step} ({control.steps[-1].share:g}%): {failed}",
                                      automatic=True)
            answered = answers(candidate) - answered_before
            if (verdict == "pass" and self.clock.monotonic() - started >= plan.step_seconds
                    and answered >= plan.min_requests):
                control.steps[-1].ended_at, control.steps[-1].outcome = self.clock.time(), "passed"
                return None
            self._tell_newcomers(beats)
            if self.clock.time() >= renew_at:
                self._renew()
                renew_at = self.clock.time() + self.co.settings.lease_ttl_s / 3
            self.clock.sleep(GATE_POLL_S)

    def _promote(self) -> PublishResult:
        """The final step: the ordinary commit of the candidate; the committed version drains and is freed."""
        assert self.pending is not None
        co, control, source = self.co, self.control, self.source
        control.phase = "promoting"
        activate_at = self.clock.time() + co.commit_margin(self.told)
        commit = self.pending.model_copy(update={"phase": Phase.COMMIT, "activate_at": activate_at})
        self._write(pending=commit, split=None, committed=Committed(
            version=source.version, model=source.model, digest=source.digest, activate_at=activate_at,
            committed_at=self.clock.time(), rollback=source.rollback))
        self.pending = commit
        self.result.outcome, self.result.activate_at = PublishOutcome.COMMITTED, activate_at
        self.result.generation = self.state.generation
        co.keep_decision(self.result)
        for replica_id, why in co.fleet.deliver(commit, self.state.generation, self._everyone()).items():
            for report in self.result.replicas:
                if report.replica_id == replica_id and report.outcome is ReplicaOutcome.STAGED:
                    report.outcome, report.error = ReplicaOutcome.BEHIND, f"commit failed: {why}"
        control.steps.append(StepRecord(share=100.0, started_at=self.clock.time(), activate_at=activate_at,
                                        ended_at=activate_at, outcome="promoted"))
        if len(control.steps) > 1 and control.steps[-2].outcome is None:
            control.steps[-2].ended_at, control.steps[-2].outcome = activate_at, "promoted"
        log.info("rollout %s: commit v%d, activate_at %.3f", control.id, source.version, activate_at)
        self._say("commit", {"activate_at": activate_at})
        co.wait_serving(self.result)
        return self._finish("promoted")

    def _rollback(self, reason: str, *, automatic: bool) -> PublishResult:
        """Every replica back to the committed version at one activate_at; then the candidate is dropped."""
        assert self.pending is not None
        co, control = self.co, self.control
        if not control.decide("rolling back", reason, automatic=automatic):
            return self._promote()  # a person promoted while the gates were failing: the person wins
        activate_at = self.clock.time() + co.commit_margin(self.told)
        step = (self.split.step + 1) if self.split is not None else 0
        back = Split(rollout=control.id, version=self.source.version, share=0, step=step, activate_at=activate_at)
        self._write(pending=self.pending, split=back)
        co.fleet.deliver_split(back, self.source.model, self.state.generation, self._everyone())
        if control.steps and control.steps[-1].outcome is None:
            control.steps[-1].ended_at, control.steps[-1].outcome = activate_at, "rolled back"
        log.warning("rollout %s: v%d rolled back at %.3f: %s", control.id, self.source.version, activate_at, reason)
        self._say("rollback", {"activate_at": activate_at, "reason": reason, "automatic": automatic})
        self.clock.sleep(max(0.0, activate_at - self.clock.time()) + co.settings.poll_interval_s)
        self._abort_staged(reason)  # the candidate's admitted requests finish before it is freed
        self.result.outcome, self.result.activate_at = PublishOutcome.ROLLED_BACK, activate_at
        return self._finish("rolled back")

    def _finish(self, phase: str) -> PublishResult:
        self.control.phase = phase
        self.result.generation = self.state.generation  # the last decision written: a commit, a rollback, an abort
        self.result.reason = self.result.reason or self.control.reason
        self.result.rollout = self.control.view()
        return self.co.record_result(self.result)
