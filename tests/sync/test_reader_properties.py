"""Property tests of the shared-state readers: random, truncated and hostile ``sync_state.json`` and heartbeats
are either read into values within bounds or refused with ``ValueError``; a reader never dies of them."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockstep.core.clock import FakeClock
from lockstep.core.settings import Settings
from lockstep.store.manifest import MAX_VERSION, MAX_WALL_TIME
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
)
from lockstep.sync.shared_files import decode_sync_state, parse_heartbeat, read_heartbeats, write_sync_state
from lockstep.sync.tolerant import ProblemLog, url_problem
from lockstep.sync.watcher import SyncWatcher

NOW = 1_700_000_000.0
# Deterministic, no example database, no deadline on a shared 2-core machine.
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

FILES = settings(PROPERTY, max_examples=100)  # each example writes files: fewer of them

GOOD_STATE = SyncState(
    generation=7, updated_at=NOW, writer="trainer",
    committed=Committed(version=3, model="versions/000003", digest="ab" * 32, activate_at=NOW, committed_at=NOW),
    pending=Pending(version=4, model="versions/000004", digest="cd" * 32, phase=Phase.PREPARE, deadline=NOW + 60))
GOOD_BEAT = Heartbeat(
    replica_id="replica-1", url="http://10.0.0.1:8000", pid=12, state=ReplicaState.SERVING, ready=True,
    serving=ServingInfo(version=3, model="versions/000003", since=NOW),
    staged=StagedInfo(version=4, model="versions/000004", state=StageState.STAGED, seconds=1.5),
    generation_seen=7, queue_depth=2, running=1, tokens_per_s=12.5, time=NOW, commit_poll_s=0.02,
    commit_poll_until=NOW + 15)

hostile_numbers = st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63, 10**30, -(10**30), 0.5, -0.0, 1e308, -1e308,
                                   5e-324, math.nan, math.inf, -math.inf, True, False, NOW, NOW * 10, MAX_VERSION,
                                   MAX_VERSION + 1])
hostile_text = st.sampled_from(["", " ", "\x00", "../../etc/passwd", "versions/1", "versions/../x", "NaN",
                                "http://user:pw@evil.example", "javascript:alert(1)", "a" * 5000, "\u202e"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), hostile_numbers,
                    hostile_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=16)


_DROP = object()


def _paths(doc: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a JSON document (objects only), parents before children."""
    if not isinstance(doc, dict):
        return []
    out = []
    for key, value in doc.items():
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


def _changed(doc: Any, changes: list[tuple[tuple[str, ...], Any]]) -> Any:
    doc = json.loads(json.dumps(doc))
    for path, value in changes:
        parent = doc
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            if value is _DROP:
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = value
    return doc


def mutated(base: dict[str, Any]) -> st.SearchStrategy[Any]:
    """``base`` with one to three fields, at any depth, replaced by hostile values or dropped: the rest stays
    valid, so each bad value is what the reader has to judge."""
    value = st.one_of(hostile_numbers, hostile_numbers, hostile_text, json_values, st.just(_DROP))
    change = st.tuples(st.sampled_from(_paths(base)), value)
    return st.lists(change, min_size=1, max_size=3).map(lambda changes: _changed(base, changes))


def state_bytes() -> st.SearchStrategy[bytes]:
    good = json.dumps(GOOD_STATE.model_dump(mode="json")).encode()
    return st.one_of(
        st.binary(max_size=300),
        st.integers(min_value=0, max_value=len(good)).map(lambda n: good[:n]),  # torn at any byte
        *[mutated(GOOD_STATE.model_dump(mode="json")).map(lambda doc: json.dumps(doc).encode())] * 4,  # mostly
        st.integers(min_value=1, max_value=5000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(min_value=1, max_value=5000).map(lambda d: b'{"generation": 1, "x": ' + b"[" * d + b"]" * d
                                                     + b"}"),
    )


def beat_bytes() -> st.SearchStrategy[bytes]:
    good = GOOD_BEAT.model_dump_json().encode()
    return st.one_of(
        st.binary(max_size=300),
        st.integers(min_value=0, max_value=len(good)).map(lambda n: good[:n]),
        *[mutated(GOOD_BEAT.model_dump(mode="json")).map(lambda doc: json.dumps(doc).encode())] * 4,  # mostly
    )


def within_bounds(state: SyncState) -> None:
    """What a parsed state promises its readers (``activate_at`` is judged by the replica, not the parser)."""
    assert 0 <= state.generation <= 2**53
    for ref in (state.committed, state.pending):
        if ref is not None:
            assert isinstance(ref.version, int) and 0 <= ref.version <= MAX_VERSION
    times = [state.updated_at, state.committed.committed_at if state.committed else None,
             state.pending.deadline if state.pending else None, state.pending.started_at if state.pending else None]
    assert all(t is None or (math.isfinite(t) and 0 <= t <= MAX_WALL_TIME) for t in times)


@PROPERTY
@given(state_bytes())
def test_any_sync_state_bytes_read_as_a_bounded_state_or_a_value_error(data: bytes) -> None:
    try:
        state = decode_sync_state(data, Path("sync_state.json"))
    except ValueError:
        return
    if isinstance(state, SyncState):
        within_bounds(state)
    else:
        assert isinstance(state, LegacyRequest) and isinstance(state.desired_model_repo_id, str)


@PROPERTY
@given(beat_bytes())
def test_any_heartbeat_bytes_read_as_a_bounded_heartbeat_or_a_value_error(data: bytes) -> None:
    try:
        beat = parse_heartbeat(data)
    except ValueError:
        return
    assert math.isfinite(beat.time) and 0 <= beat.time <= MAX_WALL_TIME
    assert beat.replica_id and beat.queue_depth >= 0 and beat.running >= 0 and math.isfinite(beat.tokens_per_s)
    for info in (beat.serving, beat.staged):
        assert info is None or 0 <= info.version <= MAX_VERSION


@FILES
@given(st.lists(beat_bytes(), min_size=1, max_size=5))
def test_a_folder_of_random_heartbeats_never_fails_the_reader_and_yields_only_usable_urls(
        files: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "replicas"
        folder.mkdir()
        for i, data in enumerate(files):
            (folder / f"r{i}.json").write_bytes(data)
        beats = read_heartbeats(Path(tmp), NOW, 2.0, ProblemLog(logging.getLogger("tests.properties")))
    assert len(beats) <= len(files)
    for beat in beats:
        assert beat.time <= NOW + 2.0
        assert beat.url is None or url_problem(beat.url) is None


@PROPERTY
@given(st.text(max_size=80) | st.from_regex(r"https?://[a-z0-9.\-\[\]:@%/?#_ ]{0,40}", fullmatch=True))
def test_an_accepted_url_is_http_or_https_with_a_host_and_no_userinfo_query_or_fragment(url: str) -> None:
    if url_problem(url) is None:
        assert url.lower().startswith(("http://", "https://"))
        assert not any(c in url for c in "@?# \t\n")


class _NoReplica:
    """The watcher's ``_read`` never touches the replica; anything else it did would fail here."""


@FILES
@given(st.lists(state_bytes(), min_size=1, max_size=6))
def test_the_watcher_survives_any_sequence_of_files_and_keeps_a_state_no_older_than_its_last_good(
        contents: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp)
        config = Settings(shared_dir=shared, sync_state_file=None, hf_home=None)
        watcher = SyncWatcher(_NoReplica(), config, store=None, clock=FakeClock(NOW), replica_id="r1", url=None)
        watcher._on_legacy = lambda model: None  # type: ignore[method-assign]  # a publish is not this test's
        write_sync_state(shared / "sync_state.json", GOOD_STATE)
        assert watcher._read() == GOOD_STATE
        for data in contents:
            (shared / "sync_state.json").write_bytes(data)
            before = watcher.last_good
            assert before is not None
            state = watcher._read()
            assert state is watcher.last_good and state is not None
            assert state.generation >= before.generation
            within_bounds(state)
