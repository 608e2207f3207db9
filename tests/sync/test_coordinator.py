"""The coordinator in virtual time, against heartbeats written as replicas write them (docs/protocol.md §3)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from lockstep.core.clock import FakeClock
from lockstep.core.errors import BadModelRef, LeaseHeld, NotFound, UnsafeModel, VerificationError
from lockstep.core.settings import CommitPolicy, Settings
from lockstep.sync.coordinator import Coordinator
from lockstep.sync.ledger import FileLedger
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
from lockstep.sync.shared_files import read_sync_state, write_heartbeat, write_sync_state
from tests.support.stores import damage_stored_file

WEIGHTS = "a" * 64  # the weights digest every healthy replica reports


class ReplicaClock(FakeClock):
    """Virtual time in which the simulated replicas act whenever the coordinator waits."""

    def __init__(self) -> None:
        super().__init__(start=time.time())  # near real time: the lease also judges files by their mtime
        self.replicas: Replicas | None = None

    def sleep(self, seconds: float) -> None:
        if self.replicas is not None:
            self.replicas.tick()
        super().sleep(seconds)


class Replicas:
    """Replicas as a coordinator sees them: heartbeats, written with real ``Heartbeat`` models.

    Like real replicas they accept a sync_state only at or above the generation they hold, and answer a
    prepare with ``replies[name]``: "staged", "failed", or None (never done before the deadline). Once
    staged, a replica in ``fast_poll`` says it polls every 20 ms for that many more seconds.
    """

    def __init__(self, shared: Path, clock: ReplicaClock, replies: dict[str, str | None], *,
                 generation: int = 0, serving: int = 0, weights: dict[str, str] | None = None,
                 fast_poll: dict[str, float] | None = None) -> None:
        self.shared, self.clock, self.replies = shared, clock, replies
        self.generation, self.serving = generation, serving
        self.weights = weights or {}
        self.fast_poll = fast_poll or {}
        self.pending: Pending | None = None
        clock.replicas = self
        self.tick()

    def tick(self) -> None:
        try:
            state = read_sync_state(self.shared / "sync_state.json")
        except ValueError:
            state = None
        if isinstance(state, SyncState) and state.generation >= self.generation:
            self.generation = state.generation
            self.pending = state.pending if state.pending and state.pending.phase is Phase.PREPARE else None
            if state.committed is not None and state.pending and state.pending.phase is Phase.COMMIT:
                self.serving = state.committed.version  # flips (activate_at is in virtual time too)
        for name, reply in self.replies.items():
            staged = None
            fast = self.fast_poll.get(name) if self.pending is not None and reply == "staged" else None
            if self.pending is not None and reply is not None:
                staged = StagedInfo(version=self.pending.version, model=self.pending.model,
                                    state=StageState(reply),
                                    weights_digest=self.weights.get(name, WEIGHTS) if reply == "staged"
                                    else None,
                                    error="could not load it" if reply == "failed" else None, seconds=1.0)
            write_heartbeat(self.shared, Heartbeat(
                replica_id=name, url=f"http://{name}:8000", pid=1, state=ReplicaState.SERVING, ready=True,
                serving=ServingInfo(version=self.serving, model="builtin:tiny" if self.serving == 0 else
                                    f"versions/{self.serving:06d}", weights_digest=WEIGHTS),
                staged=staged, generation_seen=self.generation, time=self.clock.time(),
                commit_poll_s=None if fast is None else 0.02,
                commit_poll_until=None if fast is None else self.clock.time() + fast))


@pytest.fixture
def clock() -> ReplicaClock:
    return ReplicaClock()


def make_settings(shared: Path, builtin_dir: Path, **changes: Any) -> Settings:
    base: dict[str, Any] = {"shared_dir": shared, "builtin_dir": builtin_dir, "sync_state_file": None,
                            "hf_home": None, "hf_hub_offline": True, "poll_interval_s": 0.1,
                            "heartbeat_ttl_s": 5.0, "stage_timeout_s": 2.0, "lease_ttl_s": 10.0,
                            "commit_margin_s": 0.5, "commit_policy": CommitPolicy.STRICT,
                            "allow_pickle": False, "trust_remote_code": False}
    return Settings(**{**base, **changes})


def coordinator(shared: Path, builtin_dir: Path, clock: FakeClock, owner: str = "test", **changes: Any
                ) -> Coordinator:
    return Coordinator(make_settings(shared, builtin_dir, **changes), clock=clock, owner=owner)


def state_of(shared: Path) -> SyncState:
    state = read_sync_state(shared / "sync_state.json")
    assert isinstance(state, SyncState)
    return state


@pytest.mark.parametrize(("replies", "policy", "outcome"), [
    (["staged", "staged", "staged"], CommitPolicy.STRICT, "committed"),
    (["staged", "staged", "failed"], CommitPolicy.STRICT, "aborted"),
    (["staged", "staged", "failed"], CommitPolicy.QUORUM, "committed"),
    (["staged", "staged", None], CommitPolicy.STRICT, "aborted"),  # None: never staged before the deadline
    (["staged", "staged", None], CommitPolicy.QUORUM, "committed"),
    (["staged", "failed"], CommitPolicy.QUORUM, "aborted"),  # half is not a quorum
    (["staged", "staged", "failed", None], CommitPolicy.QUORUM, "aborted"),
    (["staged", "staged", "staged", "failed", "failed"], CommitPolicy.QUORUM, "committed"),
])
def test_strict_needs_every_live_replica_and_quorum_more_than_half(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: FakeClock,
        replies: list[str | None], policy: CommitPolicy, outcome: str) -> None:
    c = coordinator(shared, builtin_dir, clock, commit_policy=policy)
    version = c.store.next_version_hint()
    Replicas(shared, clock, {f"replica-{i}": reply for i, reply in enumerate(replies)})
    result = c.publish(str(tiny_dirs[1]))
    assert (result.version, result.outcome) == (version, outcome), result.summary()
    state = state_of(shared)
    assert state.generation == 2 and state.pending is not None
    if outcome == "committed":
        assert state.committed is not None and state.committed.version == version
        assert state.pending.phase is Phase.COMMIT
        assert state.committed.activate_at == state.pending.activate_at
    else:
        assert state.committed is None and state.pending.phase is Phase.ABORT and state.pending.reason


@pytest.mark.parametrize(("fast_poll", "setting", "margin"), [
    ({"replica-1": 15.0, "replica-2": 15.0}, 0.1, 0.1),  # both read every 20 ms: 2 polls + 50 ms fit in 0.1 s
    ({"replica-1": 15.0, "replica-2": 15.0}, 0.5, 0.5),  # the setting is the least margin
    ({"replica-1": 15.0}, 0.1, 0.25),  # replica-2 polls every 100 ms: 2 polls + 50 ms
    ({"replica-1": 15.0, "replica-2": 0.3}, 0.1, 0.25),  # replica-2 slows down before activate_at
])
def test_the_commit_margin_covers_two_polls_of_the_slowest_staged_replica(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: FakeClock,
        fast_poll: dict[str, float], setting: float, margin: float) -> None:
    c = coordinator(shared, builtin_dir, clock, commit_margin_s=setting, commit_poll_interval_s=0.02)
    Replicas(shared, clock, {"replica-1": "staged", "replica-2": "staged"}, fast_poll=fast_poll)
    result = c.publish(str(tiny_dirs[1]))
    committed = state_of(shared).committed
    assert result.outcome == "committed" and committed is not None and result.activate_at is not None
    assert committed.committed_at is not None
    assert result.activate_at - committed.committed_at == pytest.approx(margin)


def test_a_slow_write_of_sync_state_lengthens_the_commit_margin_by_as_much(
        shared: Path, builtin_dir: Path, clock: FakeClock) -> None:
    c = coordinator(shared, builtin_dir, clock, commit_margin_s=0.1, commit_poll_interval_s=0.02)
    beat = Heartbeat(replica_id="replica-1", state=ReplicaState.SERVING, ready=True, time=clock.time(),
                     commit_poll_s=0.02, commit_poll_until=clock.time() + 15)
    assert c.commit_margin([beat]) == pytest.approx(0.1)
    c.last_write_s = 0.2  # an fsync that waited for a busy disk or an NFS server: the commit shows up late
    assert c.commit_margin([beat]) == pytest.approx(2 * 0.02 + 0.05 + 0.2)


class SilentWhileStaging(Replicas):
    """Replicas whose heartbeats stop for ``silent_s`` once they see the prepare (a fleet too loaded to report)."""

    def __init__(self, *args: Any, silent_s: float, **kwargs: Any) -> None:
        self.silent_s = silent_s
        self.silent_until: float | None = None
        super().__init__(*args, **kwargs)

    def tick(self) -> None:
        try:
            state = read_sync_state(self.shared / "sync_state.json")
        except ValueError:
            state = None
        if isinstance(state, SyncState) and state.pending is not None and state.pending.phase is Phase.PREPARE:
            if self.silent_until is None:
                self.silent_until = self.clock.time() + self.silent_s
            if self.clock.time() < self.silent_until:
                return  # no heartbeat, and the prepare not even read
        super().tick()


@pytest.mark.parametrize("policy", [CommitPolicy.STRICT, CommitPolicy.QUORUM])
def test_a_fleet_whose_heartbeats_all_lapse_while_staging_is_waited_for_not_committed_to_nobody(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: FakeClock, policy: CommitPolicy) -> None:
    """With every replica's heartbeat expired for a moment there is nobody left to wait for; that must not read
    as "every replica staged" (a commit no replica staged), nor end the prepare before its deadline."""
    c = coordinator(shared, builtin_dir, clock, commit_policy=policy, heartbeat_ttl_s=1.0, stage_timeout_s=10.0)
    SilentWhileStaging(shared, clock, {"replica-1": "staged", "replica-2": "staged"}, silent_s=3.0)
    result = c.publish(str(tiny_dirs[1]))
    assert result.outcome == "committed", result.summary()
    assert [(r.replica_id, r.outcome) for r in result.replicas] == [("replica-1", "serving"), ("replica-2", "serving")]


def test_a_fleet_that_never_reports_again_aborts_the_prepare_at_its_deadline(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: FakeClock) -> None:
    c = coordinator(shared, builtin_dir, clock, commit_policy=CommitPolicy.QUORUM, heartbeat_ttl_s=1.0,
                    stage_timeout_s=5.0)
    SilentWhileStaging(shared, clock, {"replica-1": "staged", "replica-2": "staged"}, silent_s=float("inf"))
    result = c.publish(str(tiny_dirs[1]))
    assert result.outcome == "aborted" and result.reason is not None and "no heartbeat" in result.reason
    assert {r.replica_id for r in result.replicas} == {"replica-1", "replica-2"}
    assert state_of(shared).committed is None


def test_replicas_that_loaded_different_weights_block_the_commit_even_with_a_quorum(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: FakeClock) -> None:
    c = coordinator(shared, builtin_dir, clock, commit_policy=CommitPolicy.QUORUM)
    Replicas(shared, clock, {"replica-1": "staged", "replica-2": "staged", "replica-3": "staged"},
             weights={"replica-3": "b" * 64})
    result = c.publish(str(tiny_dirs[1]))
    assert result.outcome == "aborted"
    assert result.reason is not None and "different weights" in result.reason
    assert "replica-3=bbbbbbbbbbbb" in result.reason
    state = state_of(shared)
    assert state.committed is None and state.pending is not None and state.pending.phase is Phase.ABORT


def test_a_crashed_coordinators_lease_is_taken_over_after_it_expires_and_its_prepare_completed(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    crashed = coordinator(shared, builtin_dir, clock, owner="crashed")
    crashed.lease.acquire()
    source = crashed.prepare_source(str(tiny_dirs[1]))
    write_sync_state(shared / "sync_state.json", SyncState(generation=4, pending=Pending(
        version=source.version, model=source.model, digest=source.digest, phase=Phase.PREPARE,
        coordinator="crashed", started_at=clock.time(), deadline=clock.time() + 600)))
    # ... and it dies here, holding the lease.

    following = coordinator(shared, builtin_dir, clock, owner="following")
    with pytest.raises(LeaseHeld, match="held by crashed"):
        following.publish(f"versions/{source.version}")
    assert state_of(shared).generation == 4

    clock.advance(10.0 + 0.1)  # the lease's TTL
    Replicas(shared, clock, {"replica-1": "staged", "replica-2": "staged"})
    with caplog.at_level(logging.INFO):
        result = following.publish(f"versions/{source.version}")
    assert (result.outcome, result.version, result.generation) == ("committed", source.version, 6)
    assert "takes over stale lease 'coordinator' from crashed" in caplog.text
    assert f"superseding the unfinished prepare of v{source.version} left by crashed" in caplog.text
    assert state_of(shared).committed == Committed(version=source.version, model=source.model,
                                                   digest=source.digest, activate_at=result.activate_at,
                                                   committed_at=state_of(shared).committed.committed_at)
    assert not (shared / "locks" / "coordinator.lease").exists()  # released


def test_the_next_write_is_above_every_generation_the_replicas_have_seen(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: FakeClock) -> None:
    # Someone wrote a lower generation by hand; replicas ignore it and still hold generation 9.
    Replicas(shared, clock, {"replica-1": "staged", "replica-2": "staged"}, generation=9)
    write_sync_state(shared / "sync_state.json", SyncState(generation=3))
    c = coordinator(shared, builtin_dir, clock)
    assert c.read_state().generation == 9
    result = c.publish(str(tiny_dirs[1]))
    assert (result.outcome, result.generation) == ("committed", 11), result.summary()  # prepare 10, commit 11


def test_a_hand_written_commit_below_what_replicas_serve_is_not_built_upon(
        shared: Path, builtin_dir: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    write_sync_state(shared / "sync_state.json", SyncState(
        generation=12, committed=Committed(version=1, model="versions/000001")))  # no rollback: ignored
    Replicas(shared, clock, {"replica-1": None, "replica-2": None}, generation=9, serving=2)
    with caplog.at_level(logging.WARNING):
        state = coordinator(shared, builtin_dir, clock).read_state()
    assert state.committed is not None and state.committed.version == 2 and state.generation >= 12
    assert "v1" in caplog.text and "v2" in caplog.text


def test_references_that_are_missing_unsafe_corrupt_or_not_models_are_refused_before_any_write(
        shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], clock: FakeClock, tmp_path: Path
) -> None:
    c = coordinator(shared, builtin_dir, clock)
    corrupt = c.store.publish_dir(tiny_dirs[2])
    damage_stored_file(shared, corrupt.version, "model.safetensors")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text("{}")
    (notes / "README.md").write_text("no weights here")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    remote = tmp_path / "remote-code"
    shutil.copytree(tiny_dirs[1], remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "x.Model"}
    (remote / "config.json").write_text(json.dumps(config))
    Replicas(shared, clock, {"replica-1": "staged"}, generation=7)
    write_sync_state(shared / "sync_state.json", SyncState(generation=7))
    before = (shared / "sync_state.json").read_bytes()

    for ref, error, message in [
        (str(tmp_path / "missing"), BadModelRef, "does not exist"),
        (str(notes), BadModelRef, "no model weights"),
        (str(pickled), UnsafeModel, "LOCKSTEP_ALLOW_PICKLE"),
        (str(remote), UnsafeModel, "LOCKSTEP_TRUST_REMOTE_CODE"),
        ("versions/99", NotFound, "version 99 is not in the store"),
        ("versions/../../etc", BadModelRef, "not a published version"),
        (f"versions/{corrupt.version}", VerificationError, "of model.safetensors cannot be used"),
        ("nobody/nothing-cached", NotFound, "offline"),
    ]:
        with pytest.raises(error, match=message):
            c.publish(ref)
    assert (shared / "sync_state.json").read_bytes() == before
    assert [m.version for m in c.store.list()] == [corrupt.version]  # nothing new copied in
    assert not (shared / "locks" / "coordinator.lease").exists()


@pytest.mark.parametrize("transport", ["http", "shared folder"])
def test_a_trainer_restarted_mid_rollout_starts_and_rolls_it_back_once_the_dead_ones_lease_runs_out(
        tmp_path: Path, builtin_dir: Path, transport: str) -> None:
    """Before, startup raised LeaseHeld (the trainer exited and crash-looped) with the split left in force; and on
    a shared folder nothing ever ended the rollout (its steps have no deadline for replicas to drop it by)."""
    from lockstep.sync.http_fleet import HttpFleet
    from lockstep.sync.protocol import Split

    clock = FakeClock(time.time())
    dead = FileLedger(tmp_path, owner="trainer-that-died", lease_ttl_s=30.0, clock=clock)
    dead.lease.acquire()
    dead.write(SyncState(generation=3, committed=Committed(version=1, model="versions/000001"),
                         pending=Pending(version=2, model="versions/000002", phase=Phase.CANARY, rollout="r1"),
                         split=Split(rollout="r1", version=2, share=20, step=0)))
    if transport == "http":
        settings = Settings(shared_dir=None, lease_ttl_s=30.0, poll_interval_s=0.05)
        restarted = Coordinator.over_http(settings, HttpFleet(settings, lambda: [], clock=clock), clock=clock,
                                          owner="trainer-restarted", data_dir=tmp_path)
    else:
        restarted = coordinator(tmp_path, builtin_dir, clock, owner="trainer-restarted", lease_ttl_s=30.0,
                                poll_interval_s=0.05)
    restarted.recover()  # returns at once: the lease is held for another 30 s
    wait_for_state = time.monotonic() + 60
    while time.monotonic() < wait_for_state:
        state = restarted.ledger.read()
        if isinstance(state, SyncState) and state.pending is not None and state.pending.phase is Phase.ABORT:
            break
        time.sleep(0.02)
    assert isinstance(state, SyncState) and state.pending is not None and state.pending.phase is Phase.ABORT
    assert state.split is None and state.committed is not None and state.committed.version == 1
    assert "restarted during the rollout" in (state.pending.reason or "")
    restarted.close()


def test_a_prepare_left_by_a_dead_trainer_is_aborted_at_the_restart_and_the_history_says_so(
        tmp_path: Path) -> None:
    """Before, the abort was written to the state but not to the history: gc then took the version's missing
    outcome for a commit once its grace period ran out, and the UI's timeline left it out."""
    from lockstep.sync import retention
    from lockstep.sync.http_fleet import HttpFleet

    clock = FakeClock(time.time())
    settings = Settings(shared_dir=None, lease_ttl_s=30.0)
    FileLedger(tmp_path, owner="trainer-that-died", lease_ttl_s=30.0, clock=clock).write(SyncState(
        generation=3, committed=Committed(version=1, model="versions/000001"),
        pending=Pending(version=2, model="versions/000002", phase=Phase.PREPARE, started_at=clock.time() - 5)))
    restarted = Coordinator.over_http(settings, HttpFleet(settings, lambda: [], clock=clock), clock=clock,
                                      owner="trainer-restarted", data_dir=tmp_path)
    restarted.recover()
    state = restarted.ledger.read()
    assert isinstance(state, SyncState) and state.pending is not None and state.pending.phase is Phase.ABORT
    outcomes = retention.read_outcomes(tmp_path / "history", [2], None)
    assert outcomes.by_version == {2: "aborted"}
    restarted.close()


def test_a_coordinator_paused_past_its_lease_cannot_write_over_the_one_that_took_it(tmp_path: Path) -> None:
    """Before, a coordinator stopped mid-publish (SIGSTOP) wrote its abort over the newer commit when it woke."""
    from lockstep.sync.http_fleet import HttpFleet

    clock = FakeClock(time.time())
    settings = Settings(shared_dir=None, lease_ttl_s=6.0)

    def coordinator(owner: str) -> Coordinator:
        return Coordinator.over_http(settings, HttpFleet(settings, lambda: [], clock=clock), clock=clock,
                                     owner=owner, data_dir=tmp_path)

    paused, other = coordinator("paused"), coordinator("other")
    paused.lease.acquire()
    before = paused.write_state(SyncState(), committed=Committed(version=1, model="versions/000001"))
    clock.advance(10)  # paused past its lease: the other takes it over and commits v3
    with other.lease:
        other.write_state(before, committed=Committed(version=3, model="versions/000003"))
    with pytest.raises(LeaseHeld):
        paused.write_state(before, pending=Pending(version=2, model="versions/000002", phase=Phase.ABORT))
    state = other.ledger.read()
    assert isinstance(state, SyncState) and state.committed is not None and state.committed.version == 3
    assert state.pending is None and state.writer == "other"


def test_a_publish_while_another_process_of_the_same_name_holds_the_lease_is_refused_before_the_copy(
        shared: Path, builtin_dir: Path, clock: ReplicaClock, tiny_dirs: dict[int, Path]) -> None:
    """Every `lockstep publish` on one host is "cli@<host>": the name alone said the lease was ours, so the second
    of two publishes copied its whole model into the store before the lease refused it."""
    first = coordinator(shared, builtin_dir, clock, owner="cli@host")
    first.lease.acquire()
    second = coordinator(shared, builtin_dir, clock, owner="cli@host")
    before = sorted(p.name for p in (shared / "versions").iterdir()) if (shared / "versions").is_dir() else []
    with pytest.raises(LeaseHeld, match="held by cli@host"):
        second.publish(str(tiny_dirs[1]))
    after = sorted(p.name for p in (shared / "versions").iterdir()) if (shared / "versions").is_dir() else []
    assert after == before  # nothing copied, no version number taken
    first.check_free()  # the holder itself goes on
