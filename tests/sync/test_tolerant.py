"""Readers of shared state: heartbeats from the future, malformed URLs, out-of-range numbers, the problem log."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from lockstep.core.clock import FakeClock
from lockstep.core.settings import Settings
from lockstep.sync.coordinator import Coordinator
from lockstep.sync.http_fleet import beat_from_status
from lockstep.sync.protocol import (
    Committed,
    Heartbeat,
    ReplicaState,
    ServingInfo,
    SyncState,
    activate_at_problem,
    parse_sync_state,
    reference_problem,
)
from lockstep.sync.replica_agent import sleep_until
from lockstep.sync.shared_files import live_heartbeats, read_heartbeats, write_heartbeat
from lockstep.sync.tolerant import ProblemLog, url_host, url_problem, wall_time_problem

NOW = 1_700_000_000.0
log = logging.getLogger("tests.sync.tolerant")


def beat(replica_id: str, *, time: float = NOW, url: str | None = "http://10.0.0.1:8000") -> Heartbeat:
    return Heartbeat(replica_id=replica_id, url=url, state=ReplicaState.SERVING, ready=True,
                     serving=ServingInfo(version=1, model="versions/000001"), time=time)


def write_raw(shared: Path, name: str, content: dict[str, Any] | str) -> None:
    folder = shared / "replicas"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(content if isinstance(content, str) else json.dumps(content))


# ---------------------------------------------------------------------------------------------- heartbeats
def test_a_heartbeat_from_beyond_the_clock_skew_is_not_live_and_is_logged_once_a_minute(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(NOW)
    problems = ProblemLog(log, clock=clock)
    write_heartbeat(tmp_path, beat("now"))
    write_heartbeat(tmp_path, beat("skewed", time=NOW + 1.5))  # within the 2 s allowed
    write_heartbeat(tmp_path, beat("future", time=NOW + 3600))  # would never expire
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(3):
            live = live_heartbeats(tmp_path, 5.0, clock.time(), 2.0, problems)
            assert sorted(b.replica_id for b in live) == ["now", "skewed"]
        assert caplog.text.count("in the future") == 1 and "LOCKSTEP_CLOCK_SKEW_S" in caplog.text
        clock.advance(61)
        live_heartbeats(tmp_path, 5.0, clock.time(), 2.0, problems)
    assert caplog.text.count("in the future") == 2  # said again after a minute, not ten times a second
    # Without a "now" (a plain listing) the beat is still readable: only liveness judges its time.
    assert "future" in {b.replica_id for b in read_heartbeats(tmp_path)}


def test_a_coordinator_does_not_wait_for_a_replica_whose_heartbeat_is_from_the_future(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    settings = Settings(shared_dir=tmp_path, sync_state_file=None, hf_home=None, clock_skew_s=2.0)
    write_heartbeat(tmp_path, beat("alive"))
    write_heartbeat(tmp_path, beat("ghost", time=NOW + 86_400))
    coordinator = Coordinator(settings, clock=clock, owner="test")
    assert [b.replica_id for b in coordinator.live_replicas()] == ["alive"]
    clock.advance(10)  # the live one's beat ages out; the ghost's never counted
    assert coordinator.live_replicas() == []


@pytest.mark.parametrize("url", [
    "http://user:secret@10.0.0.1:8000", "http://10.0.0.1:8000/?next=x", "http://10.0.0.1:8000/#frag",
    "file:///etc/passwd", "gopher://10.0.0.1", "http://", "http://:8000", "http://10.0.0.1:99999",
    "http://10.0.0.1:0", "http://exa mple:8000", "http://example\n:8000", "http://exa_mple:8000",
    "javascript:alert(1)", "http://-bad-.example", "//10.0.0.1:8000", "http://" + "a" * 3000, "",
])
def test_a_malformed_url_is_dropped_from_the_heartbeat_and_the_beat_kept(tmp_path: Path, url: str) -> None:
    assert url_problem(url) is not None
    write_raw(tmp_path, "r1", {**beat("r1").model_dump(mode="json"), "url": url})
    beats = read_heartbeats(tmp_path, NOW, problems=ProblemLog(log))
    assert [(b.replica_id, b.url) for b in beats] == [("r1", None)]


@pytest.mark.parametrize(("url", "host"), [
    ("http://10.0.0.1:8000", "10.0.0.1"),
    ("https://Replica-0.Inference-Headless:8443/", "replica-0.inference-headless"),
    ("http://[FD00:0::7]:8000", "fd00::7"), ("http://127.0.0.1:8001", "127.0.0.1"),
    ("http://localhost", "localhost"),
])
def test_a_well_formed_url_is_kept_and_its_host_compares_canonically(url: str, host: str) -> None:
    assert url_problem(url) is None and url_host(url) == host


@pytest.mark.parametrize(("field", "value"), [
    ("time", math.nan), ("time", math.inf), ("time", -1.0), ("time", 1e300), ("time", "soon"),
    ("serving", {"version": -1, "model": "m"}), ("serving", {"version": 10**30, "model": "m"}),
    ("queue_depth", -5), ("tokens_per_s", math.inf), ("generation_seen", 2**64), ("commit_poll_s", 3600.0),
    ("replica_id", ""), ("state", "dancing"),
])
def test_a_heartbeat_with_a_value_out_of_range_is_skipped_with_its_reason(
        tmp_path: Path, field: str, value: Any, caplog: pytest.LogCaptureFixture) -> None:
    write_raw(tmp_path, "bad", {**beat("bad").model_dump(mode="json"), field: value})
    write_heartbeat(tmp_path, beat("good"))
    with caplog.at_level(logging.WARNING, logger=log.name):
        beats = read_heartbeats(tmp_path, NOW, problems=ProblemLog(log))
    assert [b.replica_id for b in beats] == ["good"]
    assert f"field '{field}" in caplog.text and "bad.json" in caplog.text


def test_an_oversized_heartbeat_file_is_skipped_without_being_parsed(tmp_path: Path) -> None:
    write_raw(tmp_path, "huge", '{"replica_id": "huge", "pad": "' + "x" * (2 << 20) + '"}')
    write_heartbeat(tmp_path, beat("good"))
    assert [b.replica_id for b in read_heartbeats(tmp_path, NOW, problems=ProblemLog(log))] == ["good"]


# ---------------------------------------------------------------------------------------------- sync_state
@pytest.mark.parametrize(("change", "field"), [
    ({"generation": 2**60}, "generation"), ({"updated_at": math.nan}, "updated_at"),
    ({"committed": {"version": 10**12, "model": "versions/1"}}, "committed.version"),
    ({"committed": {"version": 1, "model": "versions/000001", "committed_at": -5.0}}, "committed.committed_at"),
    ({"pending": {"version": 2, "model": "versions/000002", "phase": "prepare", "deadline": math.inf}},
     "pending.deadline"),
])
def test_a_state_with_a_number_out_of_range_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"field '{field}'"):
        parse_sync_state({"generation": 3, **change})


@pytest.mark.parametrize("activate_at", [math.nan, math.inf, -math.inf, -1.0, 1e300])
def test_a_commit_whose_activate_at_is_no_time_parses_so_that_replicas_can_refuse_it_by_name(
        activate_at: float) -> None:
    state = parse_sync_state({"generation": 3, "committed": {"version": 2, "model": "versions/000002",
                                                             "activate_at": activate_at}})
    assert isinstance(state, SyncState) and state.committed is not None
    problem = activate_at_problem(state.committed)
    assert problem is not None and "v2" in problem and "activate_at" in problem
    assert activate_at_problem(Committed(version=2, model="versions/000002", activate_at=NOW)) is None


def test_sleep_until_refuses_a_time_that_never_comes_instead_of_dying_or_returning_at_once() -> None:
    clock = FakeClock(NOW)
    for never in (math.nan, math.inf):
        with pytest.raises(ValueError, match="not a finite"):
            sleep_until(clock, never)
    sleep_until(clock, NOW + 3600.25)  # far, finite: waited in bounded sleeps, to within a microsecond
    assert abs(clock.time() - (NOW + 3600.25)) <= 1e-6


@pytest.mark.parametrize(("version", "model", "refused"), [
    (3, "versions/000003", None), (3, "versions/3", None),
    (3, "/srv/models/anything", "published version"), (3, "./here", "published version"),
    (3, "versions/000004", "instead of the published version versions/000003"),
    (3, "builtin:tiny-s1", "instead of the published version"), (3, "org/model", "instead of the published"),
    (0, "builtin:tiny", None), (0, "org/model", None), (0, "/srv/initial", None),  # its own initial model
    (0, "/tmp/elsewhere", "not a published version"), (0, "versions/000002", "version 0 is the initial model"),
])
def test_the_shared_folder_may_only_name_published_versions_or_the_initial_model(
        version: int, model: str, refused: str | None) -> None:
    problem = reference_problem(version, model, initial_model="/srv/initial")
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and refused in problem


# ---------------------------------------------------------------------------------------------- small parts
def test_wall_times_are_finite_seconds_between_1970_and_2100() -> None:
    assert wall_time_problem(NOW, "t") is None and wall_time_problem(0, "t") is None
    for bad in (math.nan, math.inf, -1, 5e9, "1", True, None):
        assert wall_time_problem(bad, "t") is not None


def test_a_replica_status_whose_version_is_no_version_is_not_read_as_a_replica() -> None:
    good = {"replica_id": "r1", "state": "serving", "ready": True, "serving_version": 3, "model": "versions/000003"}
    assert beat_from_status("http://10.0.0.1:8000", good, NOW, 2).serving == ServingInfo(version=3,
                                                                                         model="versions/000003")
    for bad in (-1, 10**12, "three", 3.5, [3], {"v": 3}):
        with pytest.raises(ValueError):
            beat_from_status("http://10.0.0.1:8000", {**good, "serving_version": bad}, NOW, None)


def test_the_problem_log_forgets_old_keys_rather_than_grow_without_bound() -> None:
    problems = ProblemLog(log, clock=FakeClock(NOW))
    for i in range(ProblemLog.MAX_KEYS * 3):
        problems.report(f"file-{i}", "bad")
    assert len(problems._last) <= ProblemLog.MAX_KEYS


# ------------------------------------------------------------------------------------------ not regular files
def test_a_fifo_where_a_shared_file_belongs_is_refused_without_blocking_the_reader(tmp_path: Path) -> None:
    """``open`` of a FIFO waits for a writer: a FIFO put in place of a heartbeat, the sync state, the lease or a
    MANIFEST held the trainer's threads for good (removing it did not wake them). Each reader must refuse it
    at once, as any other file that is not ours. Every read runs in a thread with a bound, so a hang fails."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from lockstep.store.lease import Lease
    from lockstep.store.model_store import ModelStore
    from lockstep.sync.shared_files import read_sync_state_bytes

    write_heartbeat(tmp_path, beat("good"))
    os.mkfifo(tmp_path / "replicas" / "evil.json")
    os.mkfifo(tmp_path / "sync_state.json")
    (tmp_path / "locks").mkdir()
    os.mkfifo(tmp_path / "locks" / "coordinator.lease")
    store = ModelStore(tmp_path)
    (store.versions_dir / "000001").mkdir(parents=True)
    os.mkfifo(store.versions_dir / "000001" / "MANIFEST.json")

    def sync_state() -> str:
        try:
            read_sync_state_bytes(tmp_path / "sync_state.json")
        except ValueError as exc:
            return str(exc)
        return "read"

    pool = ThreadPoolExecutor(4)
    try:
        beats = pool.submit(read_heartbeats, tmp_path, NOW, problems=ProblemLog(log))
        state = pool.submit(sync_state)
        holder = pool.submit(lambda: Lease(tmp_path / "locks", owner="t", ttl_s=5).holder())
        listed = pool.submit(store.list)
        assert [b.replica_id for b in beats.result(timeout=30)] == ["good"]
        assert "not a regular file" in state.result(timeout=30)
        assert holder.result(timeout=30) is not None  # a torn lease to its readers: it expires like one
        assert listed.result(timeout=30) == []
    finally:
        _wake_readers_and_end(pool, [tmp_path / "replicas" / "evil.json", tmp_path / "sync_state.json",
                                     tmp_path / "locks" / "coordinator.lease",
                                     store.versions_dir / "000001" / "MANIFEST.json"])


def _wake_readers_and_end(pool: Any, fifos: list[Path]) -> None:
    """Open each FIFO for writing, waking any reader still blocked in open(), so that the pool can end."""
    import os

    for fifo in fifos:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass
    pool.shutdown(wait=True)


def test_a_fifo_or_device_where_a_run_log_chunk_or_model_file_belongs_is_refused_without_blocking(
        tmp_path: Path) -> None:
    """The same for the files a request reaches: a run's metrics (GET /runs, which the UI polls) and pod logs, a
    stored chunk (GET /store/.../chunks), and a model folder to publish, where a FIFO held the publish (and every
    publish after it, 409) for good, and a link to /dev/zero would be hashed forever."""
    import hashlib
    import os
    from concurrent.futures import ThreadPoolExecutor

    from lockstep.core.errors import BadModelRef
    from lockstep.store.chunks import ChunkEntry, ChunkStore
    from lockstep.store.manifest import scan_dir
    from lockstep.trainer.runs.store import RunFiles

    run = RunFiles(tmp_path / "run")
    run.logs_dir.mkdir(parents=True)
    (run.logs_dir / "good.log").write_text("ok\n")
    fifos = [run.metrics_path, run.logs_dir / "evil.log"]
    chunks = ChunkStore(tmp_path / "chunks")
    data = b"chunk bytes"
    chunk = ChunkEntry(offset=0, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    chunks.path(chunk.sha256).parent.mkdir(parents=True)
    fifos.append(chunks.path(chunk.sha256))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    fifos.append(model / "notes.txt")
    for fifo in fifos:
        os.mkfifo(fifo)
    device = tmp_path / "model-with-a-device"
    device.mkdir()
    (device / "weights.bin").symlink_to("/dev/zero")

    def refused(call: Any) -> str:
        try:
            call()
        except (OSError, BadModelRef) as exc:
            return str(exc)
        return "read"

    pool = ThreadPoolExecutor(6)
    try:
        metrics = pool.submit(run.metrics)
        logs = pool.submit(run.logs)
        chunk_read = pool.submit(refused, lambda: chunks.read(chunk))
        scanned = pool.submit(refused, lambda: scan_dir(model))
        scanned_device = pool.submit(refused, lambda: scan_dir(device))
        assert metrics.result(timeout=30) == []
        assert logs.result(timeout=30) == {"good": "ok\n"}
        assert "not a regular file" in chunk_read.result(timeout=30)
        assert "notes.txt is not a regular file" in scanned.result(timeout=30)
        assert "weights.bin is not a regular file" in scanned_device.result(timeout=30)
        # The trainer removes it, as any damaged chunk: the next publish of those bytes stores them again.
        assert pool.submit(chunks.discard_damaged, chunk).result(timeout=30)
        assert not chunks.path(chunk.sha256).exists()
    finally:
        _wake_readers_and_end(pool, fifos)
