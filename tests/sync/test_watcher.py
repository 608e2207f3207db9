"""The replica side of the protocol in-process: a real replica driven tick by tick from sync_state.json."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lockstep.core.clock import FakeClock
from lockstep.core.settings import Settings, UpdateMode
from lockstep.inference.replica import Replica
from lockstep.store import ModelStore
from lockstep.sync.protocol import Committed, Pending, Phase, StageState, SyncState
from lockstep.sync.shared_files import write_sync_state
from lockstep.sync.watcher import COMMIT_POLL_WINDOW_S, Doorbell, SyncWatcher
from tests.support.cluster import wait_for


class Booted:
    """A replica and its watcher over a shared folder that holds two published versions."""

    def __init__(self, shared: Path, builtin_dir: Path, tiny_dirs: dict[int, Path]) -> None:
        self.shared = shared
        self.settings = Settings(shared_dir=shared, builtin_dir=builtin_dir, sync_state_file=None,
                                 hf_home=None,
                                 hf_hub_offline=True, poll_interval_s=0.05, heartbeat_interval_s=0.2,
                                 initial_model_repo_id="builtin:tiny", device="cpu", dtype="float32")
        self.clock = FakeClock()
        self.store = ModelStore(shared, clock=self.clock)
        self.v1 = self.store.publish_dir(tiny_dirs[1])
        self.v2 = self.store.publish_dir(tiny_dirs[2])
        self.replica = Replica(self.settings, store=self.store, clock=self.clock)
        self.watcher = SyncWatcher(self.replica, self.settings, store=self.store, clock=self.clock,
                                   replica_id="replica-1", url=None)

    @property
    def path(self) -> Path:
        return self.shared / "sync_state.json"


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path, tiny_dirs: dict[int, Path]
           ) -> Iterator[Booted]:
    shared = tmp_path_factory.mktemp("watcher") / "shared"
    shared.mkdir()
    b = Booted(shared, builtin_dir, tiny_dirs)
    yield b
    b.replica.close()


def test_a_booting_replica_loads_the_committed_version_and_is_ready_only_then(booted: Booted) -> None:
    b = booted
    write_sync_state(b.path, SyncState(generation=5, committed=Committed(
        version=2, model="versions/000002", digest=b.v2.digest, activate_at=b.clock.time())))
    b.watcher.tick()
    assert not b.replica.ready  # loading, in the background
    wait_for(lambda: b.replica.serving is not None, 60, 0.02, "the boot load")
    b.watcher.tick()
    assert b.replica.ready and b.replica.serving is not None
    assert (b.replica.serving.version, b.replica.serving.model_ref) == (2, "versions/000002")
    beat = json.loads((b.shared / "replicas" / "replica-1.json").read_text())
    assert (beat["ready"], beat["serving"]["version"], beat["generation_seen"]) == (True, 2, 5)


@pytest.mark.parametrize(("change", "reason"), [
    ({"generation": 4}, "generation 4 is lower than 5"),
    ({"generation": 6, "committed": {"version": 1, "model": "versions/000001"}},
     "commits v1 below v2 without a rollback"),
    ({"generation": 6, "committed": None}, "has no committed version but v2 was committed"),
    ({"generation": 6, "committed": {"version": 1}}, "field 'committed.model'"),
    ({"generation": "six"}, "field 'generation'"),
    ({"generation": 6, "pending": {"version": 1, "model": "versions/000001", "phase": "later"}},
     "field 'pending.phase'"),
])
def test_a_hand_written_state_is_ignored_with_its_reason_in_the_log(
        booted: Booted, caplog: pytest.LogCaptureFixture, change: dict[str, Any], reason: str) -> None:
    b = booted
    good = json.loads(b.path.read_text())
    assert good["generation"] == 5
    b.path.write_text(json.dumps({**good, **change}))
    try:
        with caplog.at_level(logging.WARNING, logger="lockstep.sync.watcher"):
            for _ in range(3):
                b.watcher.tick()
        assert reason in caplog.text and "keeping the last good state (generation 5)" in caplog.text
        assert caplog.text.count(reason) == 1  # said once, not every poll
        assert b.replica.ready and b.replica.serving is not None and b.replica.serving.version == 2
        assert b.replica.stage_info is None  # nothing started either
    finally:
        b.path.write_text(json.dumps(good))
        b.watcher.tick()


def test_a_replica_that_starts_on_a_torn_state_file_waits_rather_than_serve_the_initial_model(
        tmp_path: Path, builtin_dir: Path, tiny_dirs: dict[int, Path], caplog: pytest.LogCaptureFixture) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    b = Booted(shared, builtin_dir, tiny_dirs)
    try:
        b.path.write_text('{"generation": 4, "comm')  # a cluster's state, damaged: not "no cluster yet"
        with caplog.at_level(logging.WARNING, logger="lockstep.sync.watcher"):
            for _ in range(3):
                b.watcher.tick()
        assert "not booting until a coordinator writes it again" in caplog.text
        assert b.replica.serving is None and b.replica.stage_info is None and not b.replica.ready
        write_sync_state(b.path, SyncState(generation=5, committed=Committed(
            version=2, model="versions/000002", digest=b.v2.digest, activate_at=b.clock.time())))
        b.watcher.tick()
        wait_for(lambda: b.replica.serving is not None, 60, 0.02, "the boot load")
        b.watcher.tick()
        assert b.replica.ready and b.replica.serving is not None and b.replica.serving.version == 2
    finally:
        b.replica.close()


def test_a_load_that_ends_after_a_newer_commit_leaves_the_replica_unready(
        booted: Booted, builtin_dir: Path) -> None:
    # A catch-up of v1 is still loading when v2 is committed: when it ends, the replica serves v1 but must
    # not call itself ready, nor count v1 as committed (only a commit changes what it counts as committed).
    from lockstep.inference.replica import default_engine_factory

    release = threading.Event()

    def slow_engine(loaded: Any, settings: Settings) -> Any:
        release.wait(60)
        return default_engine_factory(loaded, settings)

    b = booted
    replica = Replica(b.settings, store=b.store, clock=b.clock, engine_factory=slow_engine)
    try:
        replica.set_committed(1, b.v1.digest)
        loading = threading.Thread(target=replica.boot, args=("versions/000001", 1, b.v1.digest))
        loading.start()
        replica.set_committed(2, b.v2.digest)  # the cluster moved on meanwhile
        release.set()
        loading.join(60)
        assert replica.serving is not None and replica.serving.version == 1
        assert replica.committed_version == 2 and not replica.ready
    finally:
        release.set()
        replica.close()


def test_an_in_place_flip_is_unready_while_it_drains_the_old_version(booted: Booted) -> None:
    b = booted
    settings = b.settings.model_copy(update={"update_mode": UpdateMode.INPLACE})
    replica = Replica(settings, store=b.store, clock=b.clock)
    try:
        replica.set_committed(1, b.v1.digest)
        replica.boot("versions/000001", 1, b.v1.digest)
        assert replica.stage("versions/000002", 2, b.v2.digest).state is StageState.STAGED
        assert replica.ready
        with replica.pinned():  # a request admitted on v1 is still running at activate_at
            flipping = threading.Thread(target=replica.flip, args=(2,))
            flipping.start()
            wait_for(lambda: not replica.admission_open(), 30, 0.005, "the in-place pause")
            assert not replica.ready  # admits nothing, and what runs is v1, no longer committed
        flipping.join(60)
        assert replica.ready and replica.serving is not None and replica.serving.version == 2
    finally:
        replica.close()


def test_a_rung_doorbell_wakes_one_wait_and_many_rings_make_one_wake() -> None:
    bell = Doorbell()
    assert not bell.wait(0)  # nothing rang: a plain poll interval
    bell.set()
    bell.set()  # a second ring before the thread answered the first
    assert bell.wait(0)
    assert not bell.wait(0)


def test_a_replica_that_staged_polls_fast_until_the_prepare_ends_and_says_so_in_its_heartbeat(
        booted: Booted) -> None:
    b = booted
    good = json.loads(b.path.read_text())
    committed = Committed.model_validate(good["committed"])
    heartbeat = b.shared / "replicas" / "replica-1.json"

    def beat_after_tick() -> dict[str, Any]:
        b.watcher.tick()
        return json.loads(heartbeat.read_text())  # type: ignore[no-any-return]

    assert b.watcher._poll_interval() == b.settings.poll_interval_s
    assert beat_after_tick()["commit_poll_s"] is None
    prepare = Pending(version=1, model="versions/000001", digest=b.v1.digest, phase=Phase.PREPARE,
                      deadline=b.clock.time() + 60, rollback=True)
    write_sync_state(b.path, SyncState(generation=good["generation"] + 1, committed=committed, pending=prepare))
    try:
        beat = wait_for(lambda: (lambda hb: hb if hb["commit_poll_s"] is not None else None)(beat_after_tick()),
                        60, 0.02, "the staged heartbeat")
        assert beat["staged"]["state"] == "staged" and beat["staged"]["version"] == 1
        assert beat["commit_poll_s"] == b.settings.commit_poll_interval_s < b.settings.poll_interval_s
        assert beat["commit_poll_until"] == b.clock.time() + COMMIT_POLL_WINDOW_S
        assert b.watcher._poll_interval() == b.settings.commit_poll_interval_s

        aborted = prepare.model_copy(update={"phase": Phase.ABORT, "reason": "test"})
        write_sync_state(b.path, SyncState(generation=good["generation"] + 2, committed=committed, pending=aborted))
        beat = wait_for(lambda: (lambda hb: hb if hb["staged"] is None else None)(beat_after_tick()),
                        60, 0.02, "the abort")
        assert (beat["commit_poll_s"], beat["commit_poll_until"]) == (None, None)
        assert b.watcher._poll_interval() == b.settings.poll_interval_s
        assert b.replica.serving is not None and b.replica.serving.version == 2 and b.replica.ready
    finally:
        write_sync_state(b.path, SyncState(generation=good["generation"] + 3, committed=committed))
        b.watcher.tick()


# ------------------------------------------------------------------ commits a replica cannot apply
def _settled(b: Booted) -> dict[str, Any]:
    """The module's state (v2 committed and served, ready), booted first when this test runs alone."""
    if not b.path.exists():
        write_sync_state(b.path, SyncState(generation=5, committed=Committed(
            version=2, model="versions/000002", digest=b.v2.digest, activate_at=b.clock.time())))
        b.watcher.tick()
        wait_for(lambda: b.replica.serving is not None, 60, 0.02, "the boot load")
        b.watcher.tick()
    assert b.replica.ready
    return json.loads(b.path.read_text())  # type: ignore[no-any-return]


def _restore(b: Booted, good: dict[str, Any], generation: int) -> None:
    """Back to the module's committed v2, with any prepare aborted; the replica ready on it again."""
    committed = Committed.model_validate(good["committed"])
    staged = b.replica.stage_info.version if b.replica.stage_info else 1
    abort = Pending(version=staged, model=f"versions/{staged:06d}", phase=Phase.ABORT, reason="test over")
    write_sync_state(b.path, SyncState(generation=generation, committed=committed, pending=abort))
    b.watcher.tick()
    wait_for(lambda: b.replica.stage_info is None, 30, 0.02, "the abort")
    assert b.replica.ready and b.replica.serving is not None and b.replica.serving.version == 2


@pytest.mark.parametrize("activate_at", [math.nan, math.inf, 1e300], ids=["nan", "inf", "far"])
def test_a_commit_whose_activate_at_is_no_time_is_refused_by_name_and_the_replica_goes_unready(
        booted: Booted, caplog: pytest.LogCaptureFixture, activate_at: float) -> None:
    b = booted
    good = _settled(b)
    bad = Committed(version=1, model="versions/000001", digest=b.v1.digest, activate_at=activate_at, rollback=True)
    write_sync_state(b.path, SyncState(generation=good["generation"] + 1, committed=bad))
    try:
        with caplog.at_level(logging.ERROR, logger="lockstep.inference.replica"):
            for _ in range(3):
                b.watcher.tick()
        assert not b.replica.ready and b.replica.committed_version == 1
        error = b.replica.last_error or ""
        assert "refusing the commit of v1" in error and "activate_at" in error and "unready" in error
        assert caplog.text.count("refusing the commit of v1") == 1  # said once, not every poll
        assert b.replica.serving is not None and b.replica.serving.version == 2 and b.replica.stage_info is None
        beat = json.loads((b.shared / "replicas" / "replica-1.json").read_text())
        assert beat["ready"] is False and "activate_at" in beat["last_error"]
    finally:
        _restore(b, good, good["generation"] + 2)


def test_a_staged_version_committed_with_an_activate_at_that_is_no_time_is_refused_not_flipped(
        booted: Booted) -> None:
    # Before: the flip thread died waiting for a time that never comes, and the replica stayed ready on v2.
    b = booted
    good = _settled(b)
    committed = Committed.model_validate(good["committed"])
    prepare = Pending(version=1, model="versions/000001", digest=b.v1.digest, phase=Phase.PREPARE,
                      deadline=b.clock.time() + 60, rollback=True)
    write_sync_state(b.path, SyncState(generation=good["generation"] + 1, committed=committed, pending=prepare))
    try:
        b.watcher.tick()
        wait_for(lambda: b.replica.staged_plan_version() == 1, 60, 0.02, "v1 staged")
        bad = Committed(version=1, model="versions/000001", digest=b.v1.digest, activate_at=math.inf, rollback=True)
        write_sync_state(b.path, SyncState(generation=good["generation"] + 2, committed=bad,
                                           pending=prepare.model_copy(update={"phase": Phase.COMMIT})))
        b.watcher.tick()
        assert b.watcher._flip_scheduled is None  # no flip thread waiting for ever
        assert not b.replica.ready and "activate_at" in (b.replica.last_error or "")
        assert b.replica.serving is not None and b.replica.serving.version == 2
    finally:
        _restore(b, good, good["generation"] + 3)


def test_a_commit_or_prepare_of_a_raw_path_is_refused_without_loading_it(
        booted: Booted, tiny_dirs: dict[int, Path]) -> None:
    b = booted
    good = _settled(b)
    committed = Committed.model_validate(good["committed"])
    raw = str(tiny_dirs[1])  # a real model folder: only the reference is wrong
    prepare = Pending(version=3, model=raw, phase=Phase.PREPARE, deadline=b.clock.time() + 60)
    write_sync_state(b.path, SyncState(generation=good["generation"] + 1, committed=committed, pending=prepare))
    try:
        b.watcher.tick()
        info = b.replica.stage_info
        assert info is not None and info.version == 3 and info.state is StageState.FAILED  # at once: nothing loads
        assert "published version" in (info.error or "") and info.seconds == 0.0
        assert b.replica.ready  # v2 is still what the cluster committed
        beat = json.loads((b.shared / "replicas" / "replica-1.json").read_text())
        assert beat["staged"]["state"] == "failed"  # the coordinator sees the refusal and aborts

        write_sync_state(b.path, SyncState(generation=good["generation"] + 2,
                                           committed=Committed(version=3, model=raw, activate_at=b.clock.time())))
        b.watcher.tick()
        assert not b.replica.ready and b.replica.committed_version == 3
        assert "published version" in (b.replica.last_error or "")
        assert b.replica.serving is not None and b.replica.serving.version == 2
        assert b.watcher._work_key is None or b.watcher._work_key[1] != 3  # no load of it was started
    finally:
        _restore(b, good, good["generation"] + 3)


def test_the_seeds_one_line_request_may_not_name_a_folder_on_the_replicas_disk(
        booted: Booted, tiny_dirs: dict[int, Path], caplog: pytest.LogCaptureFixture) -> None:
    b = booted
    good = _settled(b)
    b.path.write_text(json.dumps({"desired_model_repo_id": str(tiny_dirs[1])}))
    try:
        with caplog.at_level(logging.WARNING, logger="lockstep.sync.watcher"):
            for _ in range(3):
                b.watcher.tick()
        assert "does not publish from its disk" in caplog.text and "keeping the last good state" in caplog.text
        assert b.watcher._publish_thread is None  # no publish was started from it
        assert b.replica.ready and b.replica.serving is not None and b.replica.serving.version == 2
    finally:
        _restore(b, good, good["generation"] + 1)


def test_a_replica_keeps_the_copy_of_the_version_it_serves_whatever_else_its_cache_assembles(
        tmp_path: Path, builtin_dir: Path, tiny_dirs: dict[int, Path]) -> None:
    from lockstep.store.version_cache import FolderOrigin, VersionCache

    shared = tmp_path / "shared"
    b = Booted(shared, builtin_dir, tiny_dirs)  # v1 and v2 in the store
    cache = VersionCache(FolderOrigin(b.store), tmp_path / "versions", keep=2)
    replica = Replica(b.settings, store=cache, clock=b.clock)
    watcher = SyncWatcher(replica, b.settings, store=b.store, clock=b.clock, replica_id="replica-1", url=None)
    try:
        write_sync_state(b.path, SyncState(generation=1, committed=Committed(
            version=1, model="versions/000001", digest=b.v1.digest, activate_at=b.clock.time())))
        watcher.tick()
        wait_for(lambda: replica.serving is not None, 60, 0.02, "the boot load")
        assert replica.versions_in_use() == {1} and set(cache.in_use()) == {1}
        for src in (tiny_dirs[2], tiny_dirs[0], tiny_dirs[2]):
            cache.path_of(b.store.publish_dir(src).version)  # newer copies, none of them committed
        assert (tmp_path / "versions" / "000001").is_dir()
    finally:
        replica.close()


def test_an_update_model_that_finds_the_lease_taken_after_its_check_waits_for_it(
        tmp_path: Path, builtin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two /update-model calls sent at once to two replicas both pass the lease check; before, the one that
    lost the race failed in the background, after its 202, where only its log said so."""
    from lockstep.core.clock import SYSTEM_CLOCK
    from lockstep.store.lease import Lease
    from lockstep.sync import retention
    from lockstep.sync.coordinator import Coordinator

    shared = tmp_path / "shared"
    shared.mkdir()
    settings = Settings(shared_dir=shared, builtin_dir=builtin_dir, sync_state_file=None, hf_home=None,
                        hf_hub_offline=True, poll_interval_s=0.05, device="cpu", dtype="float32")
    store = ModelStore(shared)
    replica = Replica(settings, store=store, clock=SYSTEM_CLOCK)
    watcher = SyncWatcher(replica, settings, store=store, clock=SYSTEM_CLOCK, replica_id="replica-1", url=None)
    try:
        # The other replica's publish took the lease between this one's check (passed) and its own take of it.
        other = Lease(shared / "locks", owner="replica-2", ttl_s=600)
        other.acquire()
        monkeypatch.setattr(Coordinator, "check_free", lambda self: None)
        accepted = watcher.start_publish("builtin:tiny-s1", origin="test")
        assert accepted["status"] == "accepted"
        threading.Timer(1.0, other.release).start()  # the other publish ends
        assert watcher._publish_thread is not None
        watcher._publish_thread.join(timeout=120)
        published = [m.version for m in store.list()]
        outcomes = retention.read_outcomes(shared / "history", published, None)
        assert list(outcomes.by_version.values()) == ["committed"], (published, outcomes)
    finally:
        replica.close()
