"""The readers of the shared volume under random, truncated and type-confused files (property-based).

``sync_state.json`` (``read_sync_state``: the state, None, or ``ValueError``), the heartbeats
(``read_heartbeats``: the readable ones, never an exception) and MANIFEST.json (``ModelStore.get``: the
manifest or ``NotFound``; ``list``/``latest`` skip what they cannot read). Whatever they return has finite
times and no negative version.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lockstep.core.errors import NotFound
from lockstep.store.manifest import MANIFEST_NAME, FileEntry, Manifest, content_digest
from lockstep.store.model_store import ModelStore, version_name
from lockstep.sync import protocol
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
from lockstep.sync.shared_files import read_heartbeats, read_sync_state
from tests.security.strategies import BOUNDED, EDGE_NUMBERS, json_values, shaped_like

EXAMPLES = 80
DEEP = [b"[" * 100_000, b'{"a":' * 100_000, b'{"generation": 1, "committed": ' + b"[" * 50_000]


def _dump(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # NaN and Infinity as Python writes them: what a careless writer makes


def files_like(valid: bytes, schema: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Random bytes, the valid file cut anywhere, JSON shaped like the schema with hostile values, any JSON."""
    return st.one_of(
        st.binary(max_size=300),
        st.integers(min_value=0, max_value=len(valid)).map(lambda i: valid[:i]),
        shaped_like(schema).map(_dump),
        shaped_like(schema).map(_dump),
        json_values.map(_dump),
    )


def finite(value: float | None) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


# ------------------------------------------------------------------------------------------ sync_state.json
VALID_STATE = SyncState(
    generation=7, updated_at=1.7e9, writer="trainer@host",
    committed=Committed(version=3, model="versions/000003", digest="a" * 64, activate_at=1.7e9 + 1,
                        committed_at=1.7e9),
    pending=Pending(version=4, model="versions/000004", digest="b" * 64, phase=Phase.PREPARE,
                    coordinator="trainer@host", started_at=1.7e9, deadline=1.7e9 + 600),
)
STATE_BYTES = json.dumps(VALID_STATE.model_dump(mode="json"), indent=2).encode()


def flagged(committed: Committed) -> bool:
    """A committed ``activate_at`` the reader passes on must be one the replica's check refuses (it then goes
    unready saying why, instead of flipping at "NaN")."""
    check = getattr(protocol, "activate_at_problem", None)
    return check is not None and bool(check(committed))


def state_problems(state: SyncState | LegacyRequest | None) -> list[str]:
    if not isinstance(state, SyncState):
        return []
    problems = []
    if state.generation < 0:
        problems.append(f"generation {state.generation}")
    for part in (state.committed, state.pending):
        if part is None:
            continue
        if part.version < 0:
            problems.append(f"{type(part).__name__}.version {part.version}")
        for name in ("activate_at", "committed_at", "started_at", "deadline"):
            if not finite(getattr(part, name, None)):
                if name == "activate_at" and isinstance(part, Committed) and flagged(part):
                    continue  # passed on so the replica learns of the commit, and refused where it flips
                problems.append(f"{type(part).__name__}.{name} {getattr(part, name)!r}")
    if not finite(state.updated_at):
        problems.append(f"updated_at {state.updated_at!r}")
    return problems


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-files")


def test_sync_state_reader_returns_a_sane_state_or_raises_value_error(folder: Path) -> None:
    path = folder / "sync_state.json"

    @settings(BOUNDED, max_examples=EXAMPLES)
    @given(data=files_like(STATE_BYTES, SyncState.model_json_schema()))
    @example(data=STATE_BYTES)
    @example(data=_dump({**VALID_STATE.model_dump(mode="json"),
                         "committed": {"version": 3, "model": "m", "activate_at": math.nan}}))
    @example(data=_dump({**VALID_STATE.model_dump(mode="json"),
                         "committed": {"version": 3, "model": "m", "activate_at": math.inf}}))
    @example(data=_dump({"generation": 2, "committed": {"version": -1, "model": "m"}}))
    @example(data=DEEP[0])
    @example(data=DEEP[1])
    @example(data=DEEP[2])
    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            state = read_sync_state(path)
        except ValueError:
            return  # documented: unreadable or invalid, the caller keeps its last good state
        problems = state_problems(state)
        assert not problems, f"read_sync_state accepted {data[:300]!r}: {problems}"

    check()


# ------------------------------------------------------------------------------------------------ heartbeats
VALID_BEAT = Heartbeat(
    replica_id="r1", url="http://10.0.0.5:8000", pid=12, state=ReplicaState.SERVING, ready=True,
    serving=ServingInfo(version=3, model="versions/000003", digest="a" * 64, since=1.7e9),
    staged=StagedInfo(version=4, model="versions/000004", state=StageState.STAGED, seconds=1.5),
    generation_seen=7, time=1.7e9, started_at=1.7e9 - 60, commit_poll_s=0.01, commit_poll_until=1.7e9 + 5,
)
BEAT_BYTES = VALID_BEAT.model_dump_json().encode()


def beat_problems(beat: Heartbeat) -> list[str]:
    problems = []
    for name in ("time", "started_at", "commit_poll_s", "commit_poll_until", "tokens_per_s"):
        if not finite(getattr(beat, name)):
            problems.append(f"{name} {getattr(beat, name)!r}")
    if beat.serving is not None:
        if beat.serving.version < 0:
            problems.append(f"serving.version {beat.serving.version}")
        if not finite(beat.serving.since):
            problems.append(f"serving.since {beat.serving.since!r}")
    if beat.staged is not None:
        if beat.staged.version < 0:
            problems.append(f"staged.version {beat.staged.version}")
        if not finite(beat.staged.seconds):
            problems.append(f"staged.seconds {beat.staged.seconds!r}")
    return problems


def test_heartbeat_reader_never_raises_and_returns_only_sane_beats(folder: Path) -> None:
    shared = folder / "beats"
    (shared / "replicas").mkdir(parents=True, exist_ok=True)

    @settings(BOUNDED, max_examples=EXAMPLES)
    @given(files=st.lists(files_like(BEAT_BYTES, Heartbeat.model_json_schema()), min_size=1, max_size=4))
    @example(files=[BEAT_BYTES])
    @example(files=[_dump({**VALID_BEAT.model_dump(mode="json"), "time": math.nan})])
    @example(files=[_dump({**VALID_BEAT.model_dump(mode="json"), "time": math.inf})])
    @example(files=[_dump({**VALID_BEAT.model_dump(mode="json"),
                           "serving": {"version": -5, "model": "m"}})])
    @example(files=[DEEP[0], DEEP[1]])
    def check(files: list[bytes]) -> None:
        for old in (shared / "replicas").iterdir():
            old.unlink()
        for i, data in enumerate(files):
            (shared / "replicas" / f"r{i}.json").write_bytes(data)
        beats = read_heartbeats(shared)  # documented: never raises; torn or foreign files are skipped
        for beat in beats:
            problems = beat_problems(beat)
            assert not problems, f"read_heartbeats returned {beat!r}: {problems}"

    check()


# ------------------------------------------------------------------------------------------------ MANIFEST.json
def _valid_manifest() -> Manifest:
    files = [FileEntry(path="config.json", size=10, sha256="c" * 64),
             FileEntry(path="model.safetensors", size=1000, sha256="d" * 64)]
    return Manifest(version=1, created_at=1.7e9, source="/models/m", kind="directory", parent=None,
                    digest=content_digest(files), files=files, metadata={"step": 3})


MANIFEST_BYTES = _valid_manifest().to_json()


def manifest_problems(manifest: Manifest) -> list[str]:
    problems = []
    if manifest.version < 1:
        problems.append(f"version {manifest.version}")
    if not finite(manifest.created_at):
        problems.append(f"created_at {manifest.created_at!r}")
    if manifest.parent is not None and manifest.parent < 0:
        problems.append(f"parent {manifest.parent}")
    problems += [f"file {f.path} size {f.size}" for f in manifest.files if f.size < 0]
    return problems


def test_manifest_reader_returns_a_sane_manifest_or_not_found(folder: Path) -> None:
    root = folder / "store"
    version_dir = root / "versions" / version_name(1)
    version_dir.mkdir(parents=True, exist_ok=True)
    store = ModelStore(root)
    m = {**_valid_manifest().model_dump(mode="json")}

    @settings(BOUNDED, max_examples=EXAMPLES)
    @given(data=files_like(MANIFEST_BYTES, Manifest.model_json_schema()))
    @example(data=MANIFEST_BYTES)
    @example(data=_dump({**m, "created_at": math.nan}))
    @example(data=_dump({**m, "created_at": math.inf}))
    @example(data=_dump({**m, "parent": -3}))
    @example(data=_dump({**m, "files": [{"path": "model.safetensors", "size": -1, "sha256": "d" * 64}]}))
    @example(data=DEEP[0])
    @example(data=DEEP[1])
    def check(data: bytes) -> None:
        (version_dir / MANIFEST_NAME).write_bytes(data)
        found = []
        try:
            found.append(store.get(1))
        except NotFound:
            pass  # documented: an unreadable MANIFEST makes the version unusable, named in the message
        found += store.list()  # documented: unreadable versions are skipped
        latest = store.latest()
        found += [latest] if latest is not None else []
        for manifest in found:
            problems = manifest_problems(manifest)
            assert not problems, f"the store read {data[:300]!r} as {problems}"

    check()


@given(data=st.one_of(st.binary(max_size=300), st.sampled_from(DEEP),
                      st.integers(min_value=0, max_value=len(MANIFEST_BYTES)).map(lambda i: MANIFEST_BYTES[:i])))
@settings(BOUNDED, max_examples=EXAMPLES)
def test_manifest_from_json_raises_only_value_errors(data: bytes) -> None:
    try:
        Manifest.from_json(data)
    except ValueError:  # pydantic's ValidationError is one
        pass


def test_edge_numbers_are_in_the_hostile_values() -> None:
    """The strategies above draw NaN and infinities (a regression guard for the strategies themselves)."""
    assert {"nan", "inf", "-inf"} <= set(map(repr, EDGE_NUMBERS))
