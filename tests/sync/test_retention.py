"""Garbage collection of the store by a real Coordinator on a shared folder, in virtual time: what stays, what
goes, and that every version it keeps can still be rolled back to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lockstep.core.errors import Conflict, LeaseHeld
from lockstep.core.settings import CommitPolicy
from lockstep.store.model_store import version_name
from lockstep.sync import retention
from lockstep.sync.coordinator import Coordinator
from lockstep.sync.protocol import (
    Committed,
    Heartbeat,
    Pending,
    Phase,
    ReplicaState,
    ServingInfo,
    StagedInfo,
    StageState,
    SyncState,
)
from lockstep.sync.shared_files import write_heartbeat
from tests.sync.test_coordinator import WEIGHTS, ReplicaClock, Replicas, coordinator, state_of

KEEP = 3
GRACE_S = 600.0
LAGGARD_SERVES = 2  # the version one replica never moves off


class FleetWithLaggard(Replicas):
    """Two replicas that follow every publish (or fail it, on demand), and one that fails every stage and so
    keeps serving the version it had (``LAGGARD_SERVES`` once that was committed)."""

    def __init__(self, shared: Path, clock: ReplicaClock) -> None:
        self.laggard_version = 0
        super().__init__(shared, clock, {"replica-1": "staged", "replica-2": "staged"})

    def tick(self) -> None:
        super().tick()
        if self.laggard_version == 0 and self.serving >= LAGGARD_SERVES:
            self.laggard_version = LAGGARD_SERVES
        failed = None
        if self.pending is not None:
            failed = StagedInfo(version=self.pending.version, model=self.pending.model, state=StageState.FAILED,
                                error="out of memory", seconds=1.0)
        write_heartbeat(self.shared, Heartbeat(
            replica_id="laggard", url="http://laggard:8000", state=ReplicaState.BEHIND, ready=False,
            serving=ServingInfo(version=self.laggard_version, model=f"versions/{self.laggard_version:06d}",
                                weights_digest=WEIGHTS),
            staged=failed, generation_seen=self.generation, time=self.clock.time()))


@pytest.fixture
def clock() -> ReplicaClock:
    return ReplicaClock()


def versions_in(c: Coordinator) -> set[int]:
    return {int(p.name) for p in c.store.versions_dir.iterdir() if p.name.isdigit()}


def test_a_store_that_published_50_versions_keeps_the_newest_and_the_pinned_and_rolls_back_to_each(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: ReplicaClock) -> None:
    c = coordinator(shared, builtin_dir, clock, keep_versions=KEEP, gc_grace_s=GRACE_S,
                    commit_policy=CommitPolicy.QUORUM)
    fleet = FleetWithLaggard(shared, clock)
    committed: list[int] = []
    aborted: list[int] = []
    for i in range(50):
        if i % 10 == 5:  # every tenth publish fails on the followers too: aborted
            fleet.replies = {"replica-1": "failed", "replica-2": "failed"}
        result = c.publish(str(tiny_dirs[i % 3]))
        fleet.replies = {"replica-1": "staged", "replica-2": "staged"}
        (committed if result.outcome == "committed" else aborted).append(result.version)
        # An aborted version stays for its grace period (two more publishes here), and while it is the newest.
        young_aborted = {v for v in aborted if result.version - v <= 2}
        pinned = {fleet.laggard_version} - {0}
        assert versions_in(c) == set(committed[-KEEP:]) | pinned | young_aborted, (i, sorted(versions_in(c)))
        clock.advance(GRACE_S * 0.4)
        fleet.tick()  # fresh heartbeats: the replicas are alive at the new time
    assert len(committed) == 45 and len(aborted) == 5
    kept = versions_in(c)
    assert kept == set(committed[-KEEP:]) | {LAGGARD_SERVES}, sorted(kept)

    for version in sorted(kept, reverse=True):  # every version it kept can be committed again
        result = c.rollback(to=version)
        assert (result.outcome, result.version) == ("committed", version), result.summary()
        c.store.verify(version)
        assert state_of(shared).committed.version == version
        assert versions_in(c) == kept  # a rollback commits a kept version; nothing else goes
    assert c.rollback().outcome == "committed"  # and the default target is there too


def test_a_publish_refused_the_lease_copies_nothing_and_rollback_only_goes_to_a_version_committed_once(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: ReplicaClock) -> None:
    c = coordinator(shared, builtin_dir, clock)
    Replicas(shared, clock, {"replica-1": "staged"})
    first = c.publish(str(tiny_dirs[0]))
    other = coordinator(shared, builtin_dir, clock, owner="rollout-in-progress")
    other.lease.acquire()
    with pytest.raises(LeaseHeld, match="rollout-in-progress"):
        c.publish(str(tiny_dirs[1]))
    assert versions_in(c) == {first.version}, "the refused publish left a copy behind"
    other.lease.release()
    # A copy nothing ever tried (a publish that crashed between its copy and its prepare) is no way back either.
    orphan = c.store.publish_dir(tiny_dirs[1]).version
    last = c.publish(str(tiny_dirs[2]))
    assert (first.outcome, last.outcome) == ("committed", "committed")
    assert retention.rollback_target(c, last.version) == first.version, f"v{orphan} was never committed"


def test_aborted_versions_and_crashed_leftovers_go_after_the_grace_period_with_their_reasons(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: ReplicaClock) -> None:
    c = coordinator(shared, builtin_dir, clock, keep_versions=1, gc_grace_s=GRACE_S)
    fleet = Replicas(shared, clock, {"replica-1": "staged"})
    first = c.publish(str(tiny_dirs[0]))
    fleet.replies = {"replica-1": "failed"}
    failed = c.publish(str(tiny_dirs[1]))
    fleet.replies = {"replica-1": "staged"}
    last = c.publish(str(tiny_dirs[2]))
    assert [r.outcome for r in (first, failed, last)] == ["committed", "aborted", "committed"]
    assert retention.rollback_target(c, last.version) == first.version  # never back to one that failed
    with pytest.raises(Conflict, match=f"v{failed.version} was never committed"):  # nor when asked by name
        c.rollback(to=failed.version)
    partial = c.store.versions_dir / f".partial-{version_name(last.version + 1)}" / "content"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half a model")
    trash = c.store.versions_dir / ".trash-000001-deadbeef"
    trash.mkdir()

    plan = retention.collect(c, dry_run=True)
    entries = {e.name: (e.remove, e.reason) for e in plan.entries}
    assert entries[version_name(last.version)] == (False, (
        "the committed version; served by replica-1; the newest version (its number is never reused); "
        "one of the 1 newest committed versions (LOCKSTEP_KEEP_VERSIONS)"))
    assert entries[version_name(first.version)] == (False, (
        "committed before the current version (rollback); what `lockstep rollback` would commit"))
    assert entries[version_name(failed.version)][0] is False
    assert "aborted, never committed" in entries[version_name(failed.version)][1]
    assert "(LOCKSTEP_GC_GRACE_S)" in entries[version_name(failed.version)][1]
    assert entries[partial.parent.name][0] is False and "in progress" in entries[partial.parent.name][1]
    assert entries[trash.name] == (True, "an unfinished deletion")
    assert trash.exists()  # a dry run removes nothing

    clock.advance(GRACE_S + 1)
    fleet.tick()
    old = clock.time() - GRACE_S - 1
    for path in (partial / "model.safetensors", partial, partial.parent):
        os.utime(path, (old, old))
    plan = retention.collect(c)
    gone = {e.name: e.reason for e in plan.removals}
    assert gone[version_name(failed.version)] == "aborted, never committed"
    assert "crashed publisher" in gone[partial.parent.name] and trash.name in gone
    assert plan.freed_bytes > 15_000_000  # the aborted model's weights
    assert sorted(p.name for p in c.store.versions_dir.iterdir()) == [version_name(first.version),
                                                                      version_name(last.version)]
    assert c.publish(str(tiny_dirs[0])).version == last.version + 1  # the crashed claim was never visible


def test_nothing_is_deleted_while_another_coordinator_holds_the_lease(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: ReplicaClock) -> None:
    publisher = coordinator(shared, builtin_dir, clock)  # keeps 5: nothing goes while it publishes
    Replicas(shared, clock, {"replica-1": "staged"})
    for seed in (0, 1, 2, 0):
        publisher.publish(str(tiny_dirs[seed]))
    collector = coordinator(shared, builtin_dir, clock, keep_versions=1, owner="gc")
    other = coordinator(shared, builtin_dir, clock, owner="publisher-mid-prepare")
    other.lease.acquire()
    with pytest.raises(LeaseHeld, match="publisher-mid-prepare"):
        retention.collect(collector)
    assert versions_in(collector) == {1, 2, 3, 4}
    # A dry run needs no lease and says what would go: neither committed (4), nor the way back (3).
    assert [e.version for e in retention.collect(collector, dry_run=True).removals] == [1, 2]
    other.lease.release()
    assert [e.version for e in retention.collect(collector).removals] == [1, 2]
    assert versions_in(collector) == {3, 4}


def test_versions_served_staged_pending_or_needed_by_a_rollback_are_pinned(clock: ReplicaClock) -> None:
    now = clock.time()
    state = SyncState(generation=9, committed=Committed(version=7, model="versions/000007"),
                      pending=Pending(version=3, model="versions/000003", phase=Phase.PREPARE))
    beats = [
        Heartbeat(replica_id="a", state=ReplicaState.SERVING, ready=True, time=now,
                  serving=ServingInfo(version=7, model="versions/000007"),
                  staged=StagedInfo(version=3, model="versions/000003", state=StageState.STAGING)),
        Heartbeat(replica_id="b", state=ReplicaState.BEHIND, ready=False, time=now,
                  serving=ServingInfo(version=4, model="versions/000004"),
                  staged=StagedInfo(version=5, model="versions/000005", state=StageState.FAILED)),
    ]
    pins = retention.pinned_versions(state, beats, previous=6, rollback_target=6)
    assert pins == {
        7: "the committed version; served by a",
        3: "the pending version (prepare); staging by a",
        4: "served by b",
        6: "committed before the current version (rollback); what `lockstep rollback` would commit",
    }
    aborted = state.model_copy(update={"pending": state.pending.model_copy(update={"phase": Phase.ABORT})})
    assert 3 not in retention.pinned_versions(aborted, [], previous=None, rollback_target=None)


def test_outcomes_come_from_the_publish_history_newest_first(tmp_path: Path) -> None:
    history = tmp_path / "history"
    history.mkdir()
    records = [(1, "committed"), (2, "aborted"), (3, "committed"), (4, "aborted"), (4, "committed"),
               (5, "committed"), (3, "committed"),  # a rollback to 3
               (7, "rolled back")]  # a canary whose gates failed: never committed, like an aborted publish
    for i, (version, outcome) in enumerate(records):
        (history / f"{1000 + i:015d}-v{version}.json").write_text(
            f'{{"version": {version}, "outcome": "{outcome}"}}')
    (history / f"{2000:015d}-v6.json").write_text("{torn")
    outcomes = retention.read_outcomes(history, [1, 2, 3, 4, 5, 6, 7], committed=3)
    assert outcomes.by_version == {1: "committed", 2: "aborted", 3: "committed", 4: "committed", 5: "committed",
                                   7: "aborted"}
    assert outcomes.previous == 5


def test_lockstep_gc_shows_what_would_go_and_why_then_removes_it(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: ReplicaClock,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from lockstep import cli

    c = coordinator(shared, builtin_dir, clock)
    Replicas(shared, clock, {"replica-1": "staged"})
    for seed in (0, 1, 2):
        c.publish(str(tiny_dirs[seed]))
    monkeypatch.setenv("LOCKSTEP_KEEP_VERSIONS", "1")
    assert cli.main(["gc", "--dry-run", "--shared", str(shared)]) == 0
    out = capsys.readouterr().out
    assert "would remove  000001" in out and "older than the 1 newest committed versions" in out
    assert "keep          000002" in out and "what `lockstep rollback` would commit" in out
    assert "would remove 1 entries" in out and "versions kept: 2, 3" in out
    assert versions_in(c) == {1, 2, 3}
    assert cli.main(["gc", "--shared", str(shared)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert versions_in(c) == {2, 3}
    monkeypatch.delenv("LOCKSTEP_SHARED_DIR", raising=False)
    assert cli.main(["gc"]) == 2
    assert "--shared DIR" in capsys.readouterr().err


class _Died(BaseException):
    """The coordinator's process ends here (kill -9): nothing after this point runs."""


def test_a_commit_whose_coordinator_dies_right_after_writing_it_is_in_the_history_and_a_rollback_target(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: ReplicaClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the outcome was recorded only after every replica served it: a coordinator killed between the commit
    and that moment left a version the whole fleet served out of the history, and `rollback` skipped it."""
    c = coordinator(shared, builtin_dir, clock)
    Replicas(shared, clock, {"replica-1": "staged"})
    first = c.publish(str(tiny_dirs[0]))

    def dies(*_: object, **__: object) -> None:
        raise _Died

    monkeypatch.setattr(c, "wait_serving", dies)
    with pytest.raises(_Died):
        c.publish(str(tiny_dirs[1]))
    monkeypatch.undo()
    served = state_of(shared).committed
    assert served is not None and served.version == first.version + 1
    after = coordinator(shared, builtin_dir, clock, owner="after")  # the next coordinator, once the lease expired
    clock.advance(10.0 + 0.1)
    last = after.publish(str(tiny_dirs[2]))
    assert last.outcome == "committed"
    assert retention.rollback_target(after, last.version) == served.version
