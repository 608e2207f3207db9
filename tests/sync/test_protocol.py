"""The shared files of the sync protocol: tolerant readers, strict atomic writers (docs/protocol.md §2–§3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lockstep.sync.protocol import (
    Committed,
    Heartbeat,
    LegacyRequest,
    Pending,
    Phase,
    ReplicaState,
    ServingInfo,
    StagedInfo,
    StageState,
    SyncState,
    parse_sync_state,
)
from lockstep.sync.shared_files import (
    heartbeat_path,
    read_heartbeats,
    read_sync_state,
    write_heartbeat,
    write_sync_state,
)

STATE = {
    "format": 1, "generation": 7, "updated_at": 1.5, "writer": "trainer",
    "committed": {"version": 3, "model": "versions/000003", "digest": "ab" * 32, "activate_at": 2.5},
    "pending": {"version": 4, "model": "versions/000004", "digest": "cd" * 32, "phase": "prepare",
                "deadline": 9.0},
}


def test_unknown_fields_anywhere_are_ignored_so_an_older_reader_reads_a_newer_writer() -> None:
    newer = {**STATE, "format": 2, "shard_plan": [1, 2],
             "committed": {**STATE["committed"], "signature": "x"},
             "pending": {**STATE["pending"], "priority": "high"}}
    state = parse_sync_state(newer)
    assert isinstance(state, SyncState)
    assert (state.generation, state.committed, state.pending) == (
        7, Committed(version=3, model="versions/000003", digest="ab" * 32, activate_at=2.5),
        Pending(version=4, model="versions/000004", digest="cd" * 32, phase=Phase.PREPARE, deadline=9.0))


def test_the_seeds_single_line_is_a_legacy_request() -> None:
    assert parse_sync_state({"desired_model_repo_id": "builtin:tiny-s1"}) == LegacyRequest(
        desired_model_repo_id="builtin:tiny-s1")
    assert parse_sync_state({"desired_model_repo_id": "org/model", "note": "hi"}) == LegacyRequest(
        desired_model_repo_id="org/model")
    # A full state that also carries the old key is a full state (the key is an unknown field).
    assert isinstance(parse_sync_state({**STATE, "desired_model_repo_id": "org/model"}), SyncState)


@pytest.mark.parametrize(("raw", "message"), [
    ([1, 2], "must be a JSON object, got list"),
    ("generation", "must be a JSON object, got str"),
    ({**STATE, "generation": "seven"}, "field 'generation'"),
    ({**STATE, "generation": -1}, "field 'generation'"),
    ({**STATE, "committed": {"version": 3}}, "field 'committed.model'"),
    ({**STATE, "committed": {"version": "three", "model": "m"}}, "field 'committed.version'"),
    ({**STATE, "pending": {**STATE["pending"], "phase": "maybe"}}, "field 'pending.phase'"),
    ({"desired_model_repo_id": 12}, "legacy sync_state is malformed"),
])
def test_a_wrong_type_or_missing_field_is_refused_naming_the_field(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sync_state(raw)


@pytest.mark.parametrize("content", [b"", b"  \n", b'{"generation": 3, "comm', b"\x00\xff garbage"])
def test_a_torn_empty_or_garbage_file_is_an_error_for_the_reader_to_survive(
        tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "sync_state.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="unreadable or not JSON"):
        read_sync_state(path)


def test_a_missing_file_reads_as_none_and_a_written_one_round_trips_with_the_full_schema(
        tmp_path: Path) -> None:
    path = tmp_path / "sync_state.json"
    assert read_sync_state(path) is None
    state = SyncState.model_validate(STATE)
    write_sync_state(path, state)
    assert read_sync_state(path) == state
    written = json.loads(path.read_text())
    assert set(written) >= {"format", "generation", "committed", "pending", "updated_at", "writer"}
    assert written["committed"]["rollback"] is False and written["pending"]["reason"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["sync_state.json"]  # no temporary file left behind


def _beat(replica_id: str, **changes: object) -> Heartbeat:
    beat = Heartbeat(replica_id=replica_id, url="http://127.0.0.1:1", pid=1, state=ReplicaState.SERVING,
                     ready=True,
                     serving=ServingInfo(version=2, model="versions/000002", weights_digest="w" * 64),
                     staged=StagedInfo(version=3, model="versions/000003", state=StageState.STAGED),
                     generation_seen=5, time=100.0)
    return beat.model_copy(update=changes)


def test_heartbeats_round_trip_and_unreadable_ones_are_skipped(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, _beat("replica-1"))
    write_heartbeat(tmp_path, _beat("replica-2", ready=False, state=ReplicaState.BEHIND))
    folder = tmp_path / "replicas"
    (folder / "torn.json").write_text('{"replica_id": "x", "sta')
    (folder / "foreign.json").write_text('{"hello": "world"}')
    newer = {**_beat("replica-3").model_dump(mode="json"), "gpu": "H100"}  # a field this reader does not know
    (folder / "newer.json").write_text(json.dumps(newer))
    beats = {b.replica_id: b for b in read_heartbeats(tmp_path)}
    assert sorted(beats) == ["replica-1", "replica-2", "replica-3"]
    assert beats["replica-1"] == _beat("replica-1")
    assert beats["replica-2"].state is ReplicaState.BEHIND and not beats["replica-2"].ready


def test_a_heartbeat_is_replaced_whole_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, _beat("replica-1"))
    fast = _beat("replica-1", time=101.0, commit_poll_s=0.02, commit_poll_until=115.0)
    write_heartbeat(tmp_path, fast)
    assert [p.name for p in (tmp_path / "replicas").iterdir()] == ["replica-1.json"]
    assert read_heartbeats(tmp_path) == [fast]


def test_a_replica_name_cannot_put_its_heartbeat_outside_the_replicas_folder(tmp_path: Path) -> None:
    path = heartbeat_path(tmp_path, "../../etc/passwd")
    assert path.parent == tmp_path / "replicas" and "/" not in path.name


def test_no_heartbeat_is_written_while_the_shared_folder_is_gone(tmp_path: Path) -> None:
    # An unmounted volume must stay visibly missing: a writer that recreated it would hide the outage and
    # leave its files on the local disk.
    shared = tmp_path / "shared"
    with pytest.raises(OSError):
        write_heartbeat(shared, _beat("replica-1"))
    assert not shared.exists()
