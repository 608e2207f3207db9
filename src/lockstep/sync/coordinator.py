"""Coordinator side of the sync protocol over the shared folder: prepare → wait → commit or abort.

One coordinator at a time holds the lease in ``locks/``. A crashed coordinator's lease expires; the next one
reads ``sync_state.json`` and goes on from there (a dangling prepare is superseded by the new one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lockstep.core.atomic import atomic_write_json
from lockstep.core.clock import Clock
from lockstep.core.errors import BadModelRef, Conflict, LeaseHeld, NotFound
from lockstep.core.settings import CommitPolicy, Settings
from lockstep.models import loader
from lockstep.models.refs import RefKind, parse_ref
from lockstep.store import Lease, Manifest, ModelStore, content_digest, scan_dir
from lockstep.sync import retention
from lockstep.sync.protocol import (
    Committed,
    Heartbeat,
    LegacyRequest,
    Pending,
    Phase,
    StageState,
    SyncState,
    activate_at_problem,
    live_heartbeats,
    read_sync_state,
    reference_problem,
    write_sync_state,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, dict[str, Any]], None]  # (event, details) for progress bars and the trainer


@dataclass(frozen=True)
class Source:
    """A publish request made concrete: the version it will commit and what identifies its content."""

    version: int
    model: str  # what goes into sync_state.json: versions/NNNNNN, or the initial model for v0
    digest: str | None
    rollback: bool = False
    unchanged: bool = False  # same content as the committed version: nothing to do


@dataclass
class ReplicaReport:
    replica_id: str
    outcome: str  # staged | failed | timeout | serving | behind
    error: str | None = None
    stage_seconds: float | None = None
    weights_digest: str | None = None


@dataclass
class PublishResult:
    """What a publish did, per replica."""

    version: int
    model: str
    outcome: str  # committed | aborted | unchanged
    reason: str | None = None
    activate_at: float | None = None
    started_at: float = 0.0
    prepare_s: float = 0.0
    total_s: float = 0.0
    generation: int = 0
    rollback: bool = False
    replicas: list[ReplicaReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome in ("committed", "unchanged")

    def summary(self) -> str:
        per = ", ".join(f"{r.replica_id}={r.outcome}" for r in self.replicas) or "no live replicas"
        why = f" ({self.reason})" if self.reason else ""
        return f"v{self.version} {self.outcome}{why}: {per}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "model": self.model, "outcome": self.outcome, "reason": self.reason,
            "activate_at": self.activate_at, "started_at": self.started_at, "prepare_s": self.prepare_s,
            "total_s": self.total_s, "generation": self.generation, "rollback": self.rollback,
            "replicas": [r.__dict__ for r in self.replicas],
        }


def _short(digest: str | None) -> str:
    return (digest or "none")[:12]


def commit_refusal(reports: list[ReplicaReport], policy: CommitPolicy) -> str | None:
    """Why a staged version must not be committed (different weights, or too few staged), or None."""
    staged = [r for r in reports if r.outcome == "staged"]
    bad = [r for r in reports if r.outcome != "staged"]
    digests = {r.weights_digest for r in staged if r.weights_digest}
    if len(digests) > 1:
        detail = ", ".join(f"{r.replica_id}={_short(r.weights_digest)}" for r in staged)
        return f"replicas loaded different weights ({detail}); refusing to commit"
    if not bad:
        return None
    detail = "; ".join(f"{r.replica_id}: {r.outcome}{' — ' + r.error if r.error else ''}" for r in bad)
    if policy is CommitPolicy.STRICT:
        return f"{len(bad)} of {len(reports)} replicas did not stage ({detail})"
    if len(staged) * 2 <= len(reports):
        return f"quorum not reached: {len(staged)} of {len(reports)} staged ({detail})"
    return None


class Coordinator:
    """Publishes versions to every replica sharing the folder."""

    def __init__(self, settings: Settings, *, store: ModelStore | None = None, clock: Clock, owner: str) -> None:
        if settings.shared_dir is None or settings.sync_state_path is None:
            raise BadModelRef("publishing needs a shared folder: set LOCKSTEP_SHARED_DIR or pass --shared DIR")
        self.settings = settings
        self.shared_dir = settings.shared_dir
        self.path = settings.sync_state_path
        self.store = store or ModelStore(settings.shared_dir, clock=clock)
        self.clock = clock
        self.owner = owner
        self.lease = Lease(self.shared_dir / "locks", owner=owner, ttl_s=settings.lease_ttl_s, clock=clock)
        self.last_write_s = 0.0  # how long the last write of sync_state.json took (fsync included)

    # ------------------------------------------------------------------ reading the cluster
    def read_state(self) -> SyncState:
        """The state to go on from: the file, unless replicas ignore it; then rebuilt from heartbeats (logged)."""
        try:
            state = read_sync_state(self.path)
        except ValueError as exc:
            log.warning("sync_state unreadable (%s); rebuilding from heartbeats", exc)
            return self._state_from_heartbeats()
        if isinstance(state, LegacyRequest):
            return self._state_from_heartbeats()
        # Replicas keep their last good state and ignore a file that goes backwards (written by hand, say).
        # Building on such a file would make them ignore this coordinator's writes too.
        held = self._state_from_heartbeats()
        if state is None:
            if held.generation > 0:
                log.warning("sync_state is missing but replicas hold generation %d; rebuilding from heartbeats",
                            held.generation)
                return held
            return SyncState()
        if state.generation < held.generation:
            log.warning("sync_state generation %d is below the %d replicas hold, so they ignore it; rebuilding "
                        "from heartbeats", state.generation, held.generation)
            return held
        refused = state.committed and (activate_at_problem(state.committed) or reference_problem(
            state.committed.version, state.committed.model, self.settings.initial_model_repo_id))
        if refused:
            log.warning("sync_state commits something replicas refuse (%s); going on from what they serve", refused)
            return held.model_copy(update={"generation": state.generation, "pending": state.pending})
        if (state.committed and held.committed and state.committed.version < held.committed.version
                and not state.committed.rollback):
            log.warning("sync_state commits v%d below the v%d replicas serve without a rollback, so they ignore "
                        "it; rebuilding from heartbeats", state.committed.version, held.committed.version)
            return held.model_copy(update={"generation": state.generation})
        return state

    def _state_from_heartbeats(self) -> SyncState:
        beats = self.live_replicas()
        generation = max((b.generation_seen or 0 for b in beats), default=0)
        serving = [b.serving for b in beats if b.serving is not None and b.ready]
        committed = None
        if serving:
            best = max(serving, key=lambda s: s.version)
            committed = Committed(version=best.version, model=best.model, digest=best.digest)
        return SyncState(generation=generation, committed=committed)

    def live_replicas(self) -> list[Heartbeat]:
        """Replicas whose heartbeat is fresh."""
        now = self.clock.time()
        return live_heartbeats(self.shared_dir, self.settings.heartbeat_ttl_s, now, self.settings.clock_skew_s)

    def check_free(self) -> None:
        """Raise ``LeaseHeld`` when another coordinator is publishing right now."""
        holder = self.lease.holder()
        if holder and holder.get("expires_at", 0) > self.clock.time() and holder.get("owner") != self.owner:
            raise LeaseHeld(f"{holder.get('owner')} is publishing (lease until {holder.get('expires_at'):.0f}); "
                            "wait for it to finish")

    # ------------------------------------------------------------------ sources
    def check_ref(self, ref_text: str) -> None:
        """Cheap checks of a reference (no download, no copy); ``prepare_source`` does the full ones."""
        ref = parse_ref(ref_text)
        if ref.kind is RefKind.VERSION:
            assert ref.version is not None
            if ref.version != 0:
                self.store.get(ref.version)
        elif ref.kind is RefKind.DIRECTORY:
            assert ref.path is not None
            loader.check_safe_files(ref.path, self.settings)

    def prepare_source(self, ref_text: str, *, metadata: dict[str, Any] | None = None, label: str | None = None,
                       progress: ProgressFn | None = None) -> Source:
        """Check the reference and put its files in the store; refuse bad ones before any replica stages.

        ``label`` is the MANIFEST ``source`` of a copied folder (default: the reference as given)."""
        ref = parse_ref(ref_text)
        state = self.read_state()
        committed = state.committed
        if ref.kind is RefKind.VERSION:
            assert ref.version is not None
            if ref.version == 0:
                return Source(0, self.settings.initial_model_repo_id, None,
                              rollback=bool(committed and committed.version > 0))
            manifest = self.store.get(ref.version)
            self._verify(manifest)
            return Source(manifest.version, self._model_name(manifest.version), manifest.digest,
                          rollback=bool(committed and manifest.version < committed.version))
        if progress:
            progress("resolve", {"model": ref.raw})
        resolved = loader.resolve(ref, self.settings, self.store)
        loader.check_safe_files(resolved.path, self.settings)
        digest = content_digest(scan_dir(resolved.path))
        if committed is not None and committed.digest == digest:
            return Source(committed.version, committed.model, digest, unchanged=True)
        parent = committed.version if committed else None
        meta = dict(metadata or {})
        if progress:
            progress("copy", {"model": ref.raw})
        if ref.kind is RefKind.REPO:
            assert ref.repo_id is not None
            manifest = self.store.publish_repo(resolved.path, repo_id=ref.repo_id,
                                               revision=resolved.revision or "", parent=parent, metadata=meta,
                                               allow_pickle=self.settings.allow_pickle)
        else:
            manifest = self.store.publish_dir(resolved.path, source=label or ref.raw, parent=parent, metadata=meta,
                                              allow_pickle=self.settings.allow_pickle)
        return Source(manifest.version, self._model_name(manifest.version), manifest.digest)

    def _verify(self, manifest: Manifest) -> None:
        if manifest.kind == "repo":
            loader.resolve(f"versions/{manifest.version}", self.settings, self.store)  # downloads + verifies
        else:
            self.store.verify(manifest.version)

    @staticmethod
    def _model_name(version: int) -> str:
        return f"versions/{version:06d}"

    # ------------------------------------------------------------------ publishing
    def publish(self, ref_text: str, *, source: Source | None = None, policy: CommitPolicy | None = None,
                timeout_s: float | None = None, metadata: dict[str, Any] | None = None,
                progress: ProgressFn | None = None) -> PublishResult:
        """Stage ``ref_text`` on every live replica, then commit it (or abort); returns what happened."""
        source = source or self.prepare_source(ref_text, metadata=metadata, progress=progress)
        started = self.clock.time()
        if source.unchanged:
            return PublishResult(source.version, source.model, "unchanged", started_at=started,
                                 reason="the committed version already has this content (same digest)")
        with self.lease:
            result = self._two_phases(source, policy or self.settings.commit_policy,
                                      timeout_s or self.settings.stage_timeout_s, started, progress)
            retention.collect_quietly(self, f"after the publish of v{result.version}")  # still under the lease
            return result

    def publish_legacy(self, model: str, *, source: Source | None = None) -> PublishResult | None:
        """The seed's ``{"desired_model_repo_id": ...}``: publish it unless someone already did."""
        with self.lease:
            try:
                current = read_sync_state(self.path)
            except ValueError:
                current = None
            if not (isinstance(current, LegacyRequest) and current.desired_model_repo_id == model):
                return None  # another coordinator took care of it
            source = source or self.prepare_source(model)
            if source.unchanged:
                state = self._state_from_heartbeats()
                self._write(state, pending=None)
                return PublishResult(source.version, source.model, "unchanged")
            result = self._two_phases(source, self.settings.commit_policy, self.settings.stage_timeout_s,
                                      self.clock.time(), None)
            retention.collect_quietly(self, f"after the publish of v{result.version}")
            return result

    def rollback(self, to: int | None = None, **kwargs: Any) -> PublishResult:
        """Commit an earlier version again (default: the one before the committed version)."""
        if to is None:
            state = self.read_state()
            if state.committed is None or state.committed.version == 0:
                raise NotFound("nothing to roll back to: no version was committed after the initial model")
            to = retention.rollback_target(self, state.committed.version)  # never a version that only aborted
        return self.publish(f"versions/{to}", **kwargs)

    def _write(self, state: SyncState, **changes: Any) -> SyncState:
        new = state.model_copy(update={"generation": state.generation + 1, "updated_at": self.clock.time(),
                                       "writer": self.owner, "format": 1, **changes})
        began = self.clock.monotonic()
        write_sync_state(self.path, new)
        self.last_write_s = self.clock.monotonic() - began
        return new

    def _two_phases(self, source: Source, policy: CommitPolicy, timeout_s: float, started: float,
                    progress: ProgressFn | None) -> PublishResult:
        state = self.read_state()
        if state.pending is not None and state.pending.phase is Phase.PREPARE:
            log.warning("superseding the unfinished prepare of v%d left by %s", state.pending.version,
                        state.pending.coordinator)
        now = self.clock.time()
        pending = Pending(version=source.version, model=source.model, digest=source.digest, phase=Phase.PREPARE,
                          coordinator=self.owner, started_at=now, deadline=now + timeout_s, rollback=source.rollback)
        state = self._write(state, pending=pending)
        log.info("prepare v%d (%s), generation %d", source.version, source.model, state.generation)
        if progress:
            progress("prepare", {"version": source.version, "generation": state.generation})
        reports, beats = self._wait_staged(source, state.generation, now + timeout_s, policy, progress)
        result = PublishResult(source.version, source.model, "aborted", started_at=started,
                               prepare_s=self.clock.time() - now, generation=state.generation,
                               rollback=source.rollback, replicas=reports)
        reason = commit_refusal(reports, policy)
        if reason is not None:
            state = self._write(state, pending=pending.model_copy(update={"phase": Phase.ABORT, "reason": reason}))
            result.reason, result.generation = reason, state.generation
            log.warning("abort v%d: %s", source.version, reason)
        else:
            staged = {r.replica_id for r in reports if r.outcome == "staged"}
            margin = self.commit_margin([b for b in beats if b.replica_id in staged])
            activate_at = self.clock.time() + margin
            committed = Committed(version=source.version, model=source.model, digest=source.digest,
                                  activate_at=activate_at, committed_at=self.clock.time(), rollback=source.rollback)
            state = self._write(state, committed=committed,
                                pending=pending.model_copy(update={"phase": Phase.COMMIT, "activate_at": activate_at}))
            result.outcome, result.activate_at, result.generation = "committed", activate_at, state.generation
            log.info("commit v%d, activate_at %.3f", source.version, activate_at)
            if progress:
                progress("commit", {"version": source.version, "activate_at": activate_at})
            self._wait_serving(result)
        result.total_s = self.clock.time() - started
        self._record(result)
        return result

    def commit_margin(self, staged: list[Heartbeat]) -> float:
        """Seconds from the commit to ``activate_at``: enough for every staged replica to read the commit first.

        The commit is visible once written (about as long as the prepare's write took: fsync, NFS), and a
        replica reads it within one of its polls; two polls and 50 ms leave room for a slow tick. A replica that
        staged polls fast while it waits (its heartbeat says until when); otherwise, or when its heartbeat does
        not say, it polls every ``poll_interval_s``.
        """
        base = self.settings.commit_margin_s
        write = self.last_write_s
        slow = max(base, 2 * self.settings.poll_interval_s + 0.05 + write)
        fast = [(b.commit_poll_s, b.commit_poll_until) for b in staged
                if b.commit_poll_s is not None and b.commit_poll_until is not None]
        if not staged or len(fast) < len(staged):
            return slow
        margin = max(base, 2 * max(poll for poll, _ in fast) + 0.05 + write)
        # Each must still poll fast at activate_at, with slack for its clock and for this decision.
        if min(until for _, until in fast) < self.clock.time() + margin + 0.5:
            return slow
        return margin

    def _wait_staged(self, source: Source, generation: int, deadline: float, policy: CommitPolicy,
                     progress: ProgressFn | None) -> tuple[list[ReplicaReport], list[Heartbeat]]:
        """Poll heartbeats until every live replica staged the version, failed, or the deadline passed.

        Polls every ``commit_poll_interval_s``: the commit follows the last report, and every poll of delay
        here is propagation time.
        """
        renew_at = self.clock.time() + self.settings.lease_ttl_s / 3
        while True:
            live = self.live_replicas()
            reports = []
            for beat in live:
                staged = beat.staged
                mine = (staged is not None and staged.version == source.version and staged.model == source.model
                        and (beat.generation_seen or 0) >= generation)
                serving_it = (beat.serving is not None and beat.serving.version == source.version
                              and beat.serving.model == source.model)
                if mine and staged is not None and staged.state is StageState.STAGED:
                    reports.append(ReplicaReport(beat.replica_id, "staged", None, staged.seconds,
                                                 staged.weights_digest))
                elif mine and staged is not None and staged.state is StageState.FAILED:
                    reports.append(ReplicaReport(beat.replica_id, "failed", staged.error, staged.seconds))
                elif serving_it and (beat.generation_seen or 0) >= generation:
                    reports.append(ReplicaReport(beat.replica_id, "staged", None, 0.0,
                                                 beat.serving.weights_digest if beat.serving else None))
                else:
                    reports.append(ReplicaReport(beat.replica_id, "timeout", "did not stage before the deadline"))
            waiting = [r for r in reports if r.outcome == "timeout"]
            failed = [r for r in reports if r.outcome == "failed"]
            if progress:
                progress("staging", {"staged": len(reports) - len(waiting) - len(failed), "failed": len(failed),
                                     "live": len(reports)})
            if not waiting or (failed and policy is CommitPolicy.STRICT) or self.clock.time() >= deadline:
                return reports, live
            if self.clock.time() >= renew_at:
                self.lease.renew()
                renew_at = self.clock.time() + self.settings.lease_ttl_s / 3
            self.clock.sleep(min(self.settings.commit_poll_interval_s, self.settings.poll_interval_s))

    def _wait_serving(self, result: PublishResult) -> None:
        """After a commit, note which replicas serve it (for the report); never blocks past a few seconds."""
        assert result.activate_at is not None
        until = result.activate_at + 5.0
        while True:
            beats = {b.replica_id: b for b in self.live_replicas()}
            pending = []
            for report in result.replicas:
                beat = beats.get(report.replica_id)
                if beat and beat.serving and beat.serving.version == result.version and beat.ready:
                    if report.outcome == "staged":
                        report.outcome = "serving"
                elif report.outcome == "staged":
                    pending.append(report)
            if not pending or self.clock.time() >= until:
                for report in result.replicas:
                    if report.outcome != "serving":
                        report.outcome = "behind" if report.outcome == "staged" else report.outcome
                return
            self.clock.sleep(self.settings.poll_interval_s)

    def _record(self, result: PublishResult) -> None:
        """Append the publish to the history the UI draws (one small JSON file per publish)."""
        path = self.shared_dir / "history" / f"{int(result.started_at * 1000):015d}-v{result.version}.json"
        try:
            atomic_write_json(path, result.as_dict())
        except OSError as exc:
            log.warning("could not record publish history: %s", exc)


LEASE_WAIT_S = 60.0  # seconds a publish waits while another coordinator holds the lease


def with_lease_wait(attempt: Callable[[], PublishResult], clock: Clock,
                    wait_s: float = LEASE_WAIT_S) -> PublishResult:
    """``attempt()``, tried again every 0.5 s for up to ``wait_s`` while another coordinator holds the lease."""
    deadline = clock.monotonic() + wait_s
    while True:
        try:
            return attempt()
        except LeaseHeld as exc:
            if clock.monotonic() >= deadline:
                raise
            log.info("waiting for the coordinator lease: %s", exc)
            clock.sleep(0.5)


def wait_until_serving(settings: Settings, version: int, *, clock: Clock, timeout_s: float = 60.0,
                       min_replicas: int = 1) -> list[Heartbeat]:
    """Block until every live replica (at least ``min_replicas``) serves ``version`` and is ready."""
    assert settings.shared_dir is not None
    deadline = time.monotonic() + timeout_s
    while True:
        now = clock.time()
        live = live_heartbeats(settings.shared_dir, settings.heartbeat_ttl_s, now, settings.clock_skew_s)
        if len(live) >= min_replicas and all(b.ready and b.serving and b.serving.version == version for b in live):
            return live
        if time.monotonic() >= deadline:
            have = ", ".join(f"{b.replica_id}=v{b.serving.version if b.serving else '-'}" for b in live) or "none"
            raise Conflict(f"replicas did not all serve v{version} within {timeout_s:.0f}s (live: {have})")
        clock.sleep(min(0.1, settings.poll_interval_s))
