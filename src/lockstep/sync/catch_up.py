"""Bringing replicas that missed a commit to the committed version, where decisions are pushed (over HTTP).

Replicas on a shared folder catch up on their own: they read the committed version and load it. Over HTTP
nobody would tell them, so the trainer does, about once a second: each replica that is behind is told the
committed version (it goes unready at once), then staged and committed on its own, and refused if it loaded
other weights than the replicas that serve the version. One that fails is retried with a growing wait.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from lockstep.core.settings import CommitPolicy
from lockstep.sync.protocol import Committed, Heartbeat, Pending, Phase, ReplicaState, StageState, SyncState
from lockstep.sync.reports import PublishOutcome, PublishResult, ReplicaOutcome, ReplicaReport, commit_refusal
from lockstep.sync.sources import Source

if TYPE_CHECKING:
    from lockstep.sync.coordinator import Coordinator

log = logging.getLogger(__name__)

BACKOFF_S = (5.0, 120.0)  # first and longest wait before catching up a replica that failed to


def is_behind(beat: Heartbeat, committed: Committed) -> bool:
    """Not serving the committed version ready, and neither booting nor loading something already."""
    if beat.state is ReplicaState.STARTING:
        return False  # booting: it asked the trainer for the committed version, or will be told
    if beat.staged is not None and beat.staged.state is StageState.STAGING:
        return False  # loading something already; looked at again when it is done
    return not (beat.serving is not None and beat.serving.version == committed.version and beat.ready)


class CatchUp:
    """One coordinator's catching up, with each replica's next try."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self._retry: dict[str, tuple[float, float]] = {}  # replica → (monotonic time of the next try, backoff)

    def run(self) -> list[ReplicaReport]:
        """Catch up every live replica that is behind; nothing during a publish, or where replicas catch up alone."""
        c = self.coordinator
        if not c.fleet.pushes or not c.drive_lock.acquire(blocking=False):
            return []
        try:
            state = c.read_state()  # under the lock: a publish that just ended is not undone with the one before
            if state.committed is None:
                return []
            committed = state.committed
            beats = c.fleet.live()
            weights = {b.serving.weights_digest for b in beats if b.ready and b.serving is not None
                       and b.serving.version == committed.version and b.serving.weights_digest}
            now = c.clock.monotonic()
            behind = [b for b in beats if is_behind(b, committed) and self._retry.get(b.replica_id, (0, 0))[0] <= now]
            if not behind:
                return []
            with ThreadPoolExecutor(max_workers=min(8, len(behind)), thread_name_prefix="catch-up") as pool:
                return list(pool.map(lambda b: self._one(b, state, weights), behind))
        finally:
            c.drive_lock.release()

    def _one(self, beat: Heartbeat, state: SyncState, weights: set[str]) -> ReplicaReport:
        c, committed = self.coordinator, state.committed
        assert committed is not None
        log.info("replica %s serves v%s but v%d is committed: catching it up", beat.replica_id,
                 beat.serving.version if beat.serving else None, committed.version)
        commit = Pending(version=committed.version, model=committed.model, digest=committed.digest,
                         phase=Phase.COMMIT)
        # Told first, so it stops taking traffic at once. It answers 409 unless it serves the version or has it
        # staged; then the commit alone brings it there (a stage now would load a second copy of what it serves).
        refused = c.fleet.deliver(commit, state.generation, [beat])
        result = PublishResult(committed.version, committed.model, PublishOutcome.COMMITTED,
                               replicas=[ReplicaReport(beat.replica_id, ReplicaOutcome.STAGED)])
        if beat.replica_id in refused and (beat.serving is None or beat.serving.version != committed.version):
            failed = c.fleet.deliver(commit.model_copy(update={"phase": Phase.PREPARE}), state.generation, [beat])
            source = Source(committed.version, committed.model, committed.digest)
            reports, _ = c.wait_staged(source, state.generation, c.clock.time() + c.settings.stage_timeout_s,
                                       CommitPolicy.STRICT, None, [beat], failed, expected=[beat.replica_id])
            result.replicas = reports
            loaded = {r.weights_digest for r in reports if r.weights_digest}
            result.reason = commit_refusal(result.replicas, CommitPolicy.STRICT)
            if result.reason is None and weights and loaded and not loaded <= weights:
                result.reason = (f"{beat.replica_id} loaded weights {next(iter(loaded))[:12]} but the replicas "
                                 f"serving v{committed.version} hold {next(iter(weights))[:12]}; refusing to commit")
        if result.reason is None:
            result.activate_at = c.clock.time()
            c.fleet.deliver(commit.model_copy(update={"activate_at": result.activate_at}), state.generation, [beat])
            c.wait_serving(result)
        else:
            c.fleet.deliver(commit.model_copy(update={"phase": Phase.ABORT}), state.generation, [beat])
        report = result.replicas[0]
        if report.outcome is ReplicaOutcome.SERVING:
            self._retry.pop(beat.replica_id, None)
            log.info("replica %s caught up: serving v%d", beat.replica_id, committed.version)
        else:
            report.error = report.error or result.reason
            wait = min(BACKOFF_S[1], max(BACKOFF_S[0], 2 * self._retry.get(beat.replica_id, (0, 0))[1]))
            self._retry[beat.replica_id] = (c.clock.monotonic() + wait, wait)
            log.warning("replica %s could not catch up to v%d (%s: %s); retrying in %.0fs", beat.replica_id,
                        committed.version, report.outcome, report.error, wait)
        return report
