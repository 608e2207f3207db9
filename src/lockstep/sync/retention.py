"""Which versions the store keeps: garbage collection after every publish, at trainer start and by ``lockstep gc``.

Kept: the ``LOCKSTEP_KEEP_VERSIONS`` newest committed versions, plus the pinned ones: the committed and the
pending version, every version a live replica serves or stages, the version committed before the current one
and the one ``lockstep rollback`` would pick (so a rollback always finds its version), and the newest (its
number is never reused). Aborted versions and a crashed publisher's leftovers go once older than
``LOCKSTEP_GC_GRACE_S``. Committed or aborted is read from the publish history (``history/``, one file per
publish, written by every coordinator).

Deleting runs under the coordinator lease, so never while a publish is between prepare and commit: after a
publish the publishing coordinator still holds it; otherwise garbage collection takes it, or gives up with
``LeaseHeld`` naming the holder.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lockstep.core.atomic import read_json
from lockstep.core.errors import BadRequest, LeaseHeld
from lockstep.store.model_store import GcPlan, ModelStore
from lockstep.sync.protocol import Heartbeat, Phase, StageState, SyncState

if TYPE_CHECKING:
    from lockstep.sync.coordinator import Coordinator

log = logging.getLogger(__name__)

_HISTORY_NAME = re.compile(r"^\d+-v(\d{1,12})\.json$")  # what Coordinator._record writes


@dataclass(frozen=True)
class Outcomes:
    """What the publish history says of the versions still in the store."""

    by_version: dict[int, str]  # version → "committed" (at least once) | "aborted" (never: aborted or rolled back)
    previous: int | None  # the version committed before the current one (a rollback's natural target)


def read_outcomes(history_dir: Path, published: Iterable[int], committed: int | None) -> Outcomes:
    """Outcomes of ``published`` versions from ``history_dir``, newest record first; unreadable records skipped.

    Only records of versions still in the store are opened, and none once a version is known committed.
    """
    wanted = set(published)
    try:
        names = sorted((p.name for p in history_dir.iterdir()), reverse=True)
    except OSError:
        names = []
    by_version: dict[int, str] = {}
    previous = None
    for name in names:
        match = _HISTORY_NAME.match(name)
        if match is None or int(match.group(1)) not in wanted:
            continue
        version = int(match.group(1))
        if by_version.get(version) == "committed":
            continue  # known; and it was taken as the previous version already if it could be
        try:
            record = read_json(history_dir / name)
        except (OSError, ValueError):
            continue  # being written, or torn by a crash
        if not isinstance(record, dict) or record.get("version") != version:
            continue
        if record.get("outcome") in ("committed", "unchanged"):
            by_version[version] = "committed"
            if previous is None and version != committed:
                previous = version
        elif record.get("outcome") in ("aborted", "rolled back"):  # a rollout that ended without promoting it
            by_version.setdefault(version, "aborted")
    return Outcomes(by_version, previous)


def pinned_versions(state: SyncState, beats: list[Heartbeat], *, previous: int | None,
                    rollback_target: int | None) -> dict[int, str]:
    """Version → why it must stay, whatever its age: committed, pending, served or staged, a rollback's."""
    reasons: dict[int, list[str]] = {}

    def pin(version: int | None, why: str) -> None:
        if version:  # 0 is the initial model, never in the store
            reasons.setdefault(version, []).append(why)

    if state.committed is not None:
        pin(state.committed.version, "the committed version")
    if state.pending is not None and state.pending.phase is Phase.PREPARE:  # a committed one is the committed
        pin(state.pending.version, "the pending version (prepare)")
    for beat in beats:
        if beat.serving is not None:
            pin(beat.serving.version, f"served by {beat.replica_id}")
        if beat.staged is not None and beat.staged.state in (StageState.STAGING, StageState.STAGED):
            pin(beat.staged.version, f"{beat.staged.state.value} by {beat.replica_id}")
    pin(previous, "committed before the current version (rollback)")
    pin(rollback_target, "what `lockstep rollback` would commit")
    return {v: "; ".join(dict.fromkeys(why)) for v, why in reasons.items()}


def default_rollback(published: Iterable[int], outcomes: Outcomes, committed: int) -> int:
    """What a rollback commits when not told: the newest version below ``committed`` that the fleet committed
    once; 0, the initial model, when there is none. Never one that only aborted (it failed to stage), was rolled
    back (a canary that failed its gates) or has no outcome at all (copied by a publish that never ran)."""
    older = [v for v in published if v < committed and outcomes.by_version.get(v) == "committed"]
    return max(older, default=0)


def store_of(coordinator: Coordinator) -> ModelStore:
    """The coordinator's store; ``BadRequest`` for one that drives replica URLs without a store."""
    if coordinator.store is None:
        raise BadRequest("this coordinator has no store (it drives replica URLs without a trainer): publish and "
                         "roll back through the trainer (--trainer URL) to use published versions")
    return coordinator.store


def rollback_target(coordinator: Coordinator, committed: int) -> int:
    """``default_rollback`` for the coordinator's store and publish history."""
    published = [m.version for m in store_of(coordinator).list()]
    outcomes = read_outcomes(coordinator.data_dir / "history", published, committed)
    return default_rollback(published, outcomes, committed)


def plan(coordinator: Coordinator) -> GcPlan:
    """What garbage collection would do now, with a reason for every entry of the store."""
    store = store_of(coordinator)
    state = coordinator.read_state()
    published = [m.version for m in store.list()]
    committed = state.committed.version if state.committed else None
    outcomes = read_outcomes(coordinator.data_dir / "history", published, committed)
    target = default_rollback(published, outcomes, committed) if committed else None
    pins = pinned_versions(state, coordinator.live_replicas(), previous=outcomes.previous, rollback_target=target)
    settings = coordinator.settings
    return store.plan_gc(settings.keep_versions, pins, outcomes.by_version, grace_s=settings.gc_grace_s)


def collect(coordinator: Coordinator, *, dry_run: bool = False) -> GcPlan:
    """Plan and (unless ``dry_run``) delete, under the coordinator lease; ``LeaseHeld`` while a publish runs."""
    if dry_run:
        return plan(coordinator)
    if coordinator.lease.held:  # the publish that just ended still holds it: nobody is mid-prepare
        coordinator.lease.renew()  # a full ttl for the deletions; LeaseHeld if it was lost meanwhile
        return _apply(coordinator)
    try:
        coordinator.lease.acquire()
    except LeaseHeld as exc:
        raise LeaseHeld(f"garbage collection needs the coordinator lease, which a publish holds: {exc}. Run it "
                        "again when the publish has ended (every publish also collects when it ends)") from exc
    try:
        return _apply(coordinator)
    finally:
        coordinator.lease.release()


def collect_quietly(coordinator: Coordinator, when: str) -> None:
    """``collect``, logging instead of raising: garbage collection must never fail a publish or a start."""
    try:
        result = collect(coordinator)
    except LeaseHeld as exc:
        log.info("garbage collection %s skipped: %s", when, exc)
    except Exception:  # a full or flaky volume: the next publish tries again
        log.exception("garbage collection %s failed; the next publish tries again", when)
    else:
        if result.removals:
            log.info("garbage collection %s: removed %d entries (%.1f MiB), kept versions %s", when,
                     len(result.removals), result.freed_bytes / 2**20, result.kept_versions)


def _apply(coordinator: Coordinator) -> GcPlan:
    result = plan(coordinator)
    store_of(coordinator).apply_gc(result)
    return result
