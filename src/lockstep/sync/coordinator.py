"""One coordinator for both transports: prepare → wait for stage reports → commit or abort → wait until serving.

It decides in a ``Ledger`` (``lockstep.sync.ledger``) and reaches the replicas through a ``Fleet``
(``lockstep.sync.fleet``): with a shared folder the state file and heartbeats, without one the trainer's data
folder and the replicas' admin endpoints. A decision is recorded before any replica hears of it, so a crash
never leaves replicas ahead of the ledger; one coordinator at a time holds the ledger's lease, and the next
one goes on from the ledger (a dangling prepare is superseded or aborted). docs/protocol.md §3 and §5.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lockstep.core.clock import Clock
from lockstep.core.errors import BadModelRef, BadRequest, Conflict, LeaseHeld, NotFound
from lockstep.core.settings import CommitPolicy, Settings
from lockstep.store import ModelStore
from lockstep.sync import retention
from lockstep.sync.catch_up import CatchUp
from lockstep.sync.fleet import Fleet, FolderFleet
from lockstep.sync.ledger import FileLedger, Ledger, MemoryLedger, check_writable, with_lease_wait
from lockstep.sync.protocol import Committed, Heartbeat, LegacyRequest, Pending, Phase, Split, StageState, SyncState
from lockstep.sync.reconcile import state_to_go_on_from
from lockstep.sync.reports import PublishOutcome, PublishResult, ReplicaOutcome, ReplicaReport, commit_refusal
from lockstep.sync.rollout import RolloutControl, RolloutPlan, RolloutRun, rollout_in_progress
from lockstep.sync.sources import ProgressFn, Source, Sources

log = logging.getLogger(__name__)

NOTHING_TO_ROLL_BACK_TO = ("nothing to roll back to: the committed version is the initial model (v0), or none is "
                           "committed; roll forward with --to N (rollback to a published version) or publish one")

__all__ = ["Coordinator", "ProgressFn", "PublishResult", "ReplicaReport", "Source", "commit_refusal",
           "with_lease_wait"]

SERVING_GRACE_S = 5.0  # seconds after activate_at to see every committed replica serve the version
REBUILD_EVERY_S = 2.0  # seconds a state rebuilt from replicas over HTTP is reused (each rebuild asks them all)
RESTARTED_MID_ROLLOUT = "the trainer restarted during the rollout; rolled back"  # the reason a recovery gives


class Coordinator:
    """Publishes, rolls back and catches up versions on the fleet; by default over the shared folder."""

    def __init__(self, settings: Settings, *, clock: Clock, owner: str, store: ModelStore | None = None,
                 ledger: Ledger | None = None, fleet: Fleet | None = None) -> None:
        if ledger is None or fleet is None:
            if settings.shared_dir is None or settings.sync_state_path is None:
                raise BadModelRef("publishing needs a shared folder: set LOCKSTEP_SHARED_DIR or pass --shared DIR")
            ledger = ledger or FileLedger(settings.shared_dir, owner=owner, lease_ttl_s=settings.lease_ttl_s,
                                          clock=clock, state_file=settings.sync_state_path)
            fleet = fleet or FolderFleet(settings.shared_dir, settings, clock=clock)
            store = store or ModelStore(settings.shared_dir, clock=clock)
        self.settings, self.clock, self.owner = settings, clock, owner
        self.ledger, self.fleet, self.store = ledger, fleet, store
        self.lease = ledger.lease
        self.sources = Sources(settings, store, sizes_only=fleet.replicas_verify, ask_replicas=fleet.check)
        self.last_write_s = 0.0  # how long the last ledger write took (fsync, NFS): the commit shows up that late
        self.drive_lock = threading.Lock()  # one publish or catch-up at a time drives the replicas
        self._rebuilt: tuple[float, SyncState] | None = None
        self._catch_up = CatchUp(self)
        self._closed = threading.Event()

    @classmethod
    def over_http(cls, settings: Settings, fleet: Fleet, *, clock: Clock, owner: str,
                  data_dir: Path | None) -> Coordinator:
        """Without a shared folder: the ledger and store in ``data_dir`` (None: in memory, no store)."""
        if data_dir is None:
            return cls(settings, clock=clock, owner=owner, ledger=MemoryLedger(owner), fleet=fleet)
        check_writable(data_dir)
        return cls(settings, clock=clock, owner=owner, fleet=fleet, store=ModelStore(data_dir, clock=clock),
                   ledger=FileLedger(data_dir, owner=owner, lease_ttl_s=settings.lease_ttl_s, clock=clock))

    def close(self) -> None:
        self._closed.set()
        self.fleet.close()

    @property
    def data_dir(self) -> Path:
        """The folder that holds versions/, history/, runs/ and uploads/ (the shared or the trainer's)."""
        if self.ledger.folder is None:
            raise BadRequest("this coordinator keeps no folder: it drives replica URLs without a trainer")
        return self.ledger.folder

    # ------------------------------------------------------------------ the state to go on from
    def read_state(self) -> SyncState:
        """The ledger's state, unless the replicas must not be taken back to it; then what they hold (logged)."""
        state = state_to_go_on_from(self.ledger.read, self._held, replicas_read_ledger=not self.fleet.pushes,
                                    initial_model=self.settings.initial_model_repo_id)
        if state.committed is not None and self.store is not None:  # never reuse a number the replicas know
            self.store.min_next = max(self.store.min_next, state.committed.version + 1)
        return state

    def _held(self) -> SyncState:
        """What the live replicas hold: the highest generation seen and the highest version served ready.

        When no replica is ready, the highest version any of them still serves: a fleet made unready by a commit
        it refuses (a hand-written ``sync_state.json``) still holds its last version, and a state without a
        committed version is one every replica ignores, so no publish or rollback could bring the fleet back.
        """
        now = self.clock.monotonic()
        if self.fleet.pushes and self._rebuilt is not None and now - self._rebuilt[0] < REBUILD_EVERY_S:
            return self._rebuilt[1]
        beats = self.fleet.live()
        serving = ([b.serving for b in beats if b.serving is not None and b.ready]
                   or [b.serving for b in beats if b.serving is not None])
        best = max(serving, key=lambda s: s.version) if serving else None
        held = SyncState(generation=max((b.generation_seen or 0 for b in beats), default=0),
                         committed=Committed(version=best.version, model=best.model, digest=best.digest)
                         if best else None)
        self._rebuilt = (now, held)
        return held

    def live_replicas(self) -> list[Heartbeat]:
        return self.fleet.live()

    def check_free(self) -> None:
        """Raise ``LeaseHeld`` when another coordinator is publishing right now."""
        holder = self.lease.holder()
        # Ours only when it holds our token: every `lockstep publish` on one host has the same owner name, and a
        # restarted trainer the name of its previous life.
        mine = self.lease.token is not None and holder is not None and holder.get("token") == self.lease.token
        if holder and holder.get("expires_at", 0) > self.clock.time() and not mine:
            until = datetime.fromtimestamp(holder["expires_at"], UTC).isoformat(timespec="seconds")
            raise LeaseHeld(f"lease 'coordinator' is held by {holder.get('owner')} (until {until} unless "
                            "renewed): another publish or rollout is running; wait for it to finish")

    def check_ref(self, ref_text: str) -> None:
        self.sources.check(ref_text)

    def prepare_source(self, ref_text: str, *, metadata: dict[str, Any] | None = None, label: str | None = None,
                       progress: ProgressFn | None = None) -> Source:
        return self.sources.prepare(ref_text, self.read_state().committed, metadata=metadata, label=label,
                                    progress=progress)

    # ------------------------------------------------------------------ publishing
    def publish(self, ref_text: str, *, source: Source | None = None, policy: CommitPolicy | None = None,
                timeout_s: float | None = None, metadata: dict[str, Any] | None = None,
                progress: ProgressFn | None = None) -> PublishResult:
        """Stage ``ref_text`` on every live replica, then commit it (or abort); returns what happened."""
        if source is None:
            self.check_free()  # before the copy: a publish refused the lease left a version nothing ever tried
        source = source or self.prepare_source(ref_text, metadata=metadata, progress=progress)
        started = self.clock.time()
        if source.unchanged:
            repaired = self._recommit_if_refused()
            return PublishResult(source.version, source.model, PublishOutcome.UNCHANGED, started_at=started,
                                 generation=self.read_state().generation,
                                 reason="the committed version already has this content (same digest)"
                                 + ("; sync_state.json, which committed what the replicas refuse, commits it "
                                    "again" if repaired else ""))
        with self.lease, self.drive_lock:
            result = self._two_phases(source, policy or self.settings.commit_policy,
                                      timeout_s or self.settings.stage_timeout_s, started, progress)
            if self.store is not None:
                retention.collect_quietly(self, f"after the publish of v{result.version}")  # still under the lease
            return result

    def _recommit_if_refused(self) -> bool:
        """Write the version the replicas hold as committed again, when the shared folder's ledger commits
        something else (a hand-written or broken ``sync_state.json`` they refuse, and stay unready under).
        The lease is taken only then: an unchanged publish of a healthy fleet writes nothing."""
        if self.fleet.pushes or not self._ledger_refused(self.read_state()):
            return False  # pushed fleets never read this ledger: what they refuse never came from it
        with self.lease, self.drive_lock:
            state = self.read_state()
            if state.committed is None or not self._ledger_refused(state):
                return False  # another coordinator repaired it meanwhile
            log.warning("sync_state.json commits what the replicas refuse; committing v%d, which they hold, again",
                        state.committed.version)
            self.write_state(state, pending=None, split=None)
            return True

    def _ledger_refused(self, state: SyncState) -> bool:
        """Whether ``state``, the one to go on from, commits something other than the ledger (which replicas
        ignore)."""
        try:
            ledger = self.ledger.read()
        except ValueError:
            ledger = None
        return state.committed is not None and not (isinstance(ledger, SyncState)
                                                    and ledger.committed == state.committed)

    def rollout(self, ref_text: str, plan: RolloutPlan, *, control: RolloutControl | None = None,
                source: Source | None = None, timeout_s: float | None = None, metadata: dict[str, Any] | None = None,
                progress: ProgressFn | None = None) -> PublishResult:
        """Stage ``ref_text`` everywhere, then give it the plan's shares step by step (``lockstep.sync.rollout``)."""
        if (busy := rollout_in_progress(self.read_state())) is not None:
            raise Conflict(busy)  # before anything is copied or staged
        if source is None:
            self.check_free()
        source = source or self.prepare_source(ref_text, metadata=metadata, progress=progress)
        started = self.clock.time()
        committed = self.read_state().committed
        if source.unchanged or (committed is not None and source.version == committed.version):
            # Nothing to split traffic with: every replica already answers with this version (publish
            # versions/N to commit it again).
            return PublishResult(source.version, source.model, PublishOutcome.UNCHANGED, started_at=started,
                                 generation=self.read_state().generation,
                                 reason="the committed version already has this content (same digest)")
        control = control or RolloutControl(plan)
        with self.lease, self.drive_lock:
            result = RolloutRun(self, source, control, timeout_s or self.settings.stage_timeout_s, progress).run()
            if self.store is not None:
                retention.collect_quietly(self, f"after the rollout of v{result.version}")
            return result

    def end_rollout(self, reason: str) -> PublishResult | None:
        """Roll back a rollout nobody drives any more (its coordinator died): share 0 at one activate_at, then abort."""
        with self.lease, self.drive_lock:
            state = self.read_state()
            pending = state.pending
            if pending is None or pending.phase is not Phase.CANARY:
                return None
            told = self.fleet.live()
            activate_at = self.clock.time() + self.commit_margin(told)
            step = state.split.step + 1 if state.split is not None else 0
            back = Split(rollout=pending.rollout or "unknown", version=pending.version, share=0, step=step,
                         activate_at=activate_at)
            state = self.write_state(state, split=back)
            self.fleet.deliver_split(back, pending.model, state.generation, told)
            self.clock.sleep(max(0.0, activate_at - self.clock.time()) + self.settings.poll_interval_s)
            abort = pending.model_copy(update={"phase": Phase.ABORT, "reason": reason})
            state = self.write_state(state, pending=abort, split=None)
            self.fleet.deliver(abort, state.generation, told)
            log.warning("rollout of v%d ended: %s", pending.version, reason)
            result = PublishResult(pending.version, pending.model, PublishOutcome.ROLLED_BACK, reason=reason,
                                   started_at=self.clock.time(), activate_at=activate_at, generation=state.generation)
            # What is known of the rollout without its coordinator: enough for its readers and its counters.
            result.rollout = {"id": pending.rollout, "version": pending.version, "model": pending.model,
                              "phase": "rolled back", "step": step, "share": 0.0, "human": "abort",
                              "automatic_rollback": False, "reason": reason}
            return self.record_result(result)

    def publish_legacy(self, model: str, *, source: Source | None = None) -> PublishResult | None:
        """The seed's ``{"desired_model_repo_id": ...}`` in the shared folder: publish it unless someone did."""
        with self.lease, self.drive_lock:
            try:
                current = self.ledger.read()
            except ValueError:
                current = None
            if not (isinstance(current, LegacyRequest) and current.desired_model_repo_id == model):
                return None  # another coordinator took care of it
            source = source or self.prepare_source(model)
            if source.unchanged:
                written = self.write_state(self._held(), pending=None)
                return PublishResult(source.version, source.model, PublishOutcome.UNCHANGED,
                                     generation=written.generation)
            result = self._two_phases(source, self.settings.commit_policy, self.settings.stage_timeout_s,
                                      self.clock.time(), None)
            retention.collect_quietly(self, f"after the publish of v{result.version}")
            return result

    def rollback(self, to: int | None = None, **kwargs: Any) -> PublishResult:
        """Commit an earlier version again (default: the one before the committed version)."""
        if to is None:
            state = self.read_state()
            if state.committed is None or state.committed.version == 0:
                raise NotFound(NOTHING_TO_ROLL_BACK_TO)
            to = retention.rollback_target(self, state.committed.version)  # never a version that only aborted
        else:
            self.check_rollback_target(to)
        return self.publish(f"versions/{to}", **kwargs)

    def check_rollback_target(self, to: int) -> None:
        """``Conflict`` when the history says version ``to`` only ever aborted: a rollback goes back to what
        the fleet served, and that one failed to stage (or is corrupt). A version with no record is let through."""
        if to == 0 or self.store is None:
            return
        outcomes = retention.read_outcomes(self.data_dir / "history", [to], None)
        if outcomes.by_version.get(to) == "aborted":
            raise Conflict(f"v{to} was never committed (its publish aborted, or its rollout was rolled back), so "
                           "there is nothing to go back to; "
                           f"to try it again, publish it: lockstep publish versions/{to}")

    def write_state(self, state: SyncState, **changes: Any) -> SyncState:
        """Write ``state`` with ``changes`` as the next generation: a decision exists once the ledger has it."""
        new = state.model_copy(update={"generation": state.generation + 1, "updated_at": self.clock.time(),
                                       "writer": self.owner, "format": 1, **changes})
        began = self.clock.monotonic()
        # Still ours? A coordinator paused past its lease (a stopped process, a long GC, a partition) must not
        # write over what the one that took the lease over decided since: LeaseHeld, and nothing written.
        self.lease.renew()
        self.ledger.write(new)
        self.last_write_s = self.clock.monotonic() - began
        return new

    def _two_phases(self, source: Source, policy: CommitPolicy, timeout_s: float, started: float,
                    progress: ProgressFn | None) -> PublishResult:
        state = self.read_state()
        told = self.fleet.live()
        result = PublishResult(source.version, source.model, PublishOutcome.ABORTED, started_at=started,
                               rollback=source.rollback, generation=state.generation)
        if not told and self.fleet.pushes:  # nobody would hear of the commit until the next catch-up
            result.reason = (f"no live replicas to publish to: none of {self.fleet.describe()} answers GET /status "
                             "(see GET /cluster)")
            return self.record_result(result)
        if (busy := rollout_in_progress(state)) is not None:
            raise Conflict(busy)
        if state.pending is not None and state.pending.phase is Phase.PREPARE:
            log.warning("superseding the unfinished prepare of v%d left by %s", state.pending.version,
                        state.pending.coordinator)
        now = self.clock.time()
        pending = Pending(version=source.version, model=source.model, digest=source.digest, phase=Phase.PREPARE,
                          coordinator=self.owner, started_at=now, deadline=now + timeout_s, rollback=source.rollback)
        state = self.write_state(state, pending=pending)
        log.info("prepare v%d (%s), generation %d", source.version, source.model, state.generation)
        if progress:
            progress("prepare", {"version": source.version, "generation": state.generation, "replicas": len(told)})
        failed = self.fleet.deliver(pending, state.generation, told)
        result.replicas, beats = self.wait_staged(source, state.generation, now + timeout_s, policy, progress,
                                                   told if self.fleet.pushes else None, failed,
                                                   expected=[b.replica_id for b in told], prepare=pending)
        result.prepare_s, result.generation = self.clock.time() - now, state.generation
        if (reason := commit_refusal(result.replicas, policy)) is not None:
            abort = pending.model_copy(update={"phase": Phase.ABORT, "reason": reason})
            state = self.write_state(state, pending=abort)
            result.reason, result.generation = reason, state.generation
            self.keep_decision(result)
            self.fleet.deliver(abort, state.generation, told)
            log.warning("abort v%d: %s", source.version, reason)
            return self.record_result(result)
        staged = {r.replica_id for r in result.replicas if r.outcome is ReplicaOutcome.STAGED}
        activate_at = self.clock.time() + self.commit_margin([b for b in beats if b.replica_id in staged])
        commit = pending.model_copy(update={"phase": Phase.COMMIT, "activate_at": activate_at})
        state = self.write_state(state, pending=commit, committed=Committed(
            version=source.version, model=source.model, digest=source.digest, activate_at=activate_at,
            committed_at=self.clock.time(), rollback=source.rollback))
        result.outcome, result.activate_at, result.generation = PublishOutcome.COMMITTED, activate_at, state.generation
        self.keep_decision(result)
        # Replicas that did not stage (quorum) are told as well: they go unready until they catch up.
        for replica_id, why in self.fleet.deliver(commit, state.generation, told).items():
            for report in result.replicas:
                if report.replica_id == replica_id and report.outcome is ReplicaOutcome.STAGED:
                    report.outcome, report.error = ReplicaOutcome.BEHIND, f"commit failed: {why}"
        log.info("commit v%d, activate_at %.3f", source.version, activate_at)
        if progress:
            progress("commit", {"version": source.version, "activate_at": activate_at})
        self.wait_serving(result)
        return self.record_result(result)

    def keep_decision(self, result: PublishResult) -> None:
        """Record ``result`` in the history as soon as its decision is written, before the replicas are told: a
        coordinator that dies then still leaves the outcome (rollbacks and gc read it). ``record_result`` adds the
        rest at the end, in the same record."""
        self.ledger.record(result.as_dict(), result.started_at, result.version)

    def record_result(self, result: PublishResult) -> PublishResult:
        """Time ``result`` and keep it in the ledger's history (the timeline the UI draws)."""
        result.total_s = self.clock.time() - result.started_at
        self.ledger.record(result.as_dict(), result.started_at, result.version)
        log.info("publish %s", result.summary())
        return result

    def commit_margin(self, staged: list[Heartbeat]) -> float:
        """Seconds from the commit to ``activate_at``: the setting, or more so that every staged replica hears first.

        One rule for both transports: two reaches of the slowest staged replica, 50 ms for a slow tick, and the
        ledger write (the commit exists only once written). A reach is one poll of the state file (the fast
        commit poll while the replica says it keeps it up), or the slowest recent round trip of an HTTP POST.
        """
        slack = self.settings.commit_margin_s + self.last_write_s + 0.5
        reach = self.fleet.reach_s(staged, slack)
        return max(self.settings.commit_margin_s, 2 * reach + 0.05 + self.last_write_s)

    def wait_staged(self, source: Source, generation: int, deadline: float, policy: CommitPolicy,
                     progress: ProgressFn | None, told: list[Heartbeat] | None, failed: dict[str, str], *,
                     expected: list[str], prepare: Pending | None = None) -> tuple[list[ReplicaReport],
                                                                                 list[Heartbeat]]:
        """Poll the live replicas (those ``told``, if given) until each staged the version, failed, or time is up.

        ``expected``: the replicas live when the prepare went out. One that stops reporting is not waited for, but
        while none of them reports the wait goes on: a loaded fleet can miss its heartbeats for a moment, and an
        empty report must not read as "every replica staged". At the deadline each of them is timed out.
        ``prepare``: where decisions are pushed, told again to a replica that restarted since and so lost it
        (else the wait would last until the deadline, holding every other publish).

        Polls every ``commit_poll_interval_s``: the commit follows the last report, and every poll of delay here
        is propagation time.
        """
        renew_at = self.clock.time() + self.settings.lease_ttl_s / 3
        names = None if told is None else {b.replica_id for b in told}
        while True:
            live = [b for b in self.fleet.live() if names is None or b.replica_id in names]
            if prepare is not None and self.fleet.pushes:
                restarted = [b for b in live if (b.generation_seen or 0) < generation and b.replica_id not in failed]
                if restarted:
                    log.warning("prepare v%d again to %s: restarted since it was told", source.version,
                                ", ".join(b.replica_id for b in restarted))
                    failed.update(self.fleet.deliver(prepare, generation, restarted))
            reports = [self._report(b, source, generation, failed.get(b.replica_id)) for b in live]
            waiting = [r for r in reports if r.outcome is ReplicaOutcome.TIMEOUT]
            bad = [r for r in reports if r.outcome is ReplicaOutcome.FAILED]
            if progress:
                progress("staging", {"staged": len(reports) - len(waiting) - len(bad), "failed": len(bad),
                                     "live": len(reports)})
            out_of_time = self.clock.time() >= deadline
            if not reports and expected:
                if out_of_time:
                    return [ReplicaReport(r, ReplicaOutcome.TIMEOUT, "stopped reporting (no heartbeat) before it "
                                          "staged") for r in expected], live
            elif not waiting or (bad and policy is CommitPolicy.STRICT) or out_of_time:
                for r in waiting:
                    r.error = "did not stage before the deadline" if out_of_time else "still staging when another " \
                        "replica failed"
                reporting = {r.replica_id for r in reports}
                lost = [ReplicaReport(name, ReplicaOutcome.LOST, "stopped reporting before it staged; it catches "
                                      "up to the committed version when it comes back")
                        for name in expected if name not in reporting]
                return reports + lost, live
            if self.clock.time() >= renew_at:
                self.lease.renew()
                renew_at = self.clock.time() + self.settings.lease_ttl_s / 3
            self.clock.sleep(min(self.settings.commit_poll_interval_s, self.settings.poll_interval_s))

    @staticmethod
    def _report(beat: Heartbeat, source: Source, generation: int, failed: str | None) -> ReplicaReport:
        """What one replica's report says of the prepare of ``generation``."""
        if failed is not None:
            return ReplicaReport(beat.replica_id, ReplicaOutcome.FAILED, failed)
        seen = (beat.generation_seen or 0) >= generation
        staged = beat.staged
        if seen and staged is not None and staged.version == source.version and staged.model == source.model:
            if staged.state is StageState.STAGED:
                return ReplicaReport(beat.replica_id, ReplicaOutcome.STAGED, None, staged.seconds,
                                     staged.weights_digest)
            if staged.state is StageState.FAILED:
                return ReplicaReport(beat.replica_id, ReplicaOutcome.FAILED, staged.error, staged.seconds)
        serving = beat.serving
        if seen and serving is not None and serving.version == source.version and serving.model == source.model:
            return ReplicaReport(beat.replica_id, ReplicaOutcome.STAGED, None, 0.0, serving.weights_digest)
        return ReplicaReport(beat.replica_id, ReplicaOutcome.TIMEOUT)

    def wait_serving(self, result: PublishResult) -> None:
        """After a commit, note which replicas serve it and are ready; bounded by activate_at + a few seconds."""
        assert result.activate_at is not None
        until = result.activate_at + SERVING_GRACE_S
        while True:
            beats = {b.replica_id: b for b in self.fleet.live()}
            for report in result.replicas:
                beat = beats.get(report.replica_id)
                if report.outcome is ReplicaOutcome.STAGED and beat and beat.ready and beat.serving \
                        and beat.serving.version == result.version:
                    report.outcome = ReplicaOutcome.SERVING
            waiting = [r for r in result.replicas if r.outcome is ReplicaOutcome.STAGED]
            if not waiting or self.clock.time() >= until:
                for report in waiting:
                    report.outcome = ReplicaOutcome.BEHIND
                return
            self.clock.sleep(self.settings.poll_interval_s)

    def wait_until_serving(self, version: int, *, timeout_s: float = 60.0, min_replicas: int = 1) -> list[Heartbeat]:
        """Block until every live replica (at least ``min_replicas``) serves ``version`` and is ready."""
        deadline = self.clock.monotonic() + timeout_s
        while True:
            live = self.fleet.live()
            if len(live) >= min_replicas and all(b.ready and b.serving and b.serving.version == version
                                                 for b in live):
                return live
            if self.clock.monotonic() >= deadline:
                have = ", ".join(f"{b.replica_id}=v{b.serving.version if b.serving else '-'}" for b in live)
                raise Conflict(f"replicas did not all serve v{version} within {timeout_s:.0f}s (live: "
                               f"{have or 'none'})")
            self.clock.sleep(min(0.1, self.settings.poll_interval_s))

    # ------------------------------------------------------------------ recovery and catch-up (pushed decisions)
    def recover(self) -> None:
        """At startup: a prepare or a rollout left by a coordinator that crashed is ended, so replicas free what
        they staged, once its lease runs out (a live coordinator renews its lease: what it drives is left alone).

        A prepare only where decisions are pushed: replicas on a shared folder drop a prepare past its deadline
        themselves. A rollout on either transport: its steps have no deadline, so nothing else would end it.
        """
        pending = self.read_state().pending
        if pending is None or pending.phase not in (Phase.CANARY, Phase.PREPARE):
            return
        if pending.phase is Phase.PREPARE and not self.fleet.pushes:
            return
        try:
            self._end_left_decision()
        except LeaseHeld as exc:
            # The lease of the coordinator that died runs out within its TTL; startup must not wait for it
            # (the trainer would miss its probes), nor fail (it would crash-loop with a split in force).
            log.warning("%s: the %s of v%d it left is ended once the lease is free", exc, pending.phase.value,
                        pending.version)
            threading.Thread(target=self._end_left_decision_once_free, name="end-left-decision",
                             daemon=True).start()

    def _end_left_decision(self) -> None:
        """Roll back a rollout, or abort a prepare, that the last coordinator left (under the lease)."""
        if (pending := self.read_state().pending) is not None and pending.phase is Phase.CANARY:
            self.end_rollout(RESTARTED_MID_ROLLOUT)
            return
        with self.lease, self.drive_lock:
            state = self.read_state()
            pending = state.pending
            if pending is None or pending.phase is not Phase.PREPARE:
                return
            log.warning("aborting the unfinished prepare of v%d left by %s", pending.version, pending.coordinator)
            abort = pending.model_copy(update={"phase": Phase.ABORT,
                                               "reason": "the trainer restarted during prepare"})
            state = self.write_state(state, pending=abort)
            self.record_result(PublishResult(pending.version, pending.model, PublishOutcome.ABORTED,
                                             reason=abort.reason, started_at=pending.started_at or self.clock.time(),
                                             generation=state.generation, rollback=pending.rollback))
            self.fleet.deliver(abort, state.generation)

    def _end_left_decision_once_free(self) -> None:
        """``_end_left_decision`` as soon as the lease is free (until this coordinator closes)."""
        while not self._closed.is_set():
            try:
                with_lease_wait(self._end_left_decision, self.clock, self.settings.lease_ttl_s)
                return
            except LeaseHeld:
                continue  # still held (a live coordinator may be driving it: end_rollout then finds it ended)
            except Exception:
                log.exception("could not end the rollout or prepare left by the last trainer; use lockstep "
                              "rollout abort, or publish again")
                return

    def catch_up(self) -> list[ReplicaReport]:
        """Bring live replicas that missed a commit to the committed version (``lockstep.sync.catch_up``)."""
        return self._catch_up.run()
