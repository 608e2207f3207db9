"""The files replicas and coordinators share: ``sync_state.json`` and heartbeats (DESIGN.md §2–§3).

Readers are tolerant (unknown fields ignored; a torn or unparsable file keeps the last good state);
writers are strict (always the full schema, replaced atomically).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lockstep.core.atomic import atomic_write_json, read_json

log = logging.getLogger(__name__)

FORMAT = 1


class Phase(str, Enum):
    """Where a pending version is in the two phases."""

    PREPARE = "prepare"
    COMMIT = "commit"
    ABORT = "abort"


class ReplicaState(str, Enum):
    """A replica's serving lifecycle; only ``Replica`` moves it."""

    STARTING = "starting"  # booting, nothing served yet
    SERVING = "serving"  # serving the committed version (ready)
    BEHIND = "behind"  # serving something, but not the committed version (unready, catching up)
    FAILED = "failed"  # nothing can be served (unready)


class StageState(str, Enum):
    """A replica's staging lifecycle."""

    IDLE = "idle"
    STAGING = "staging"
    STAGED = "staged"
    FAILED = "failed"


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore")


class VersionRef(_Tolerant):
    """A version as the cluster names it: its number, the model reference and the content digest."""

    version: int = Field(ge=0)
    model: str
    digest: str | None = None


class Committed(VersionRef):
    """The version every ready replica serves; ``activate_at`` is when replicas flip to it (wall clock)."""

    activate_at: float | None = None
    committed_at: float | None = None
    rollback: bool = False  # committed through a rollback: may be lower than the version before it


class Pending(VersionRef):
    """A version on its way: staged by replicas (prepare), then committed or aborted."""

    phase: Phase
    coordinator: str | None = None
    started_at: float | None = None
    deadline: float | None = None  # wall-clock; a prepare past it is dropped by replicas
    activate_at: float | None = None
    rollback: bool = False  # a rollback may commit a lower version than the one served
    reason: str | None = None  # why it was aborted


class SyncState(_Tolerant):
    """The whole of ``sync_state.json``."""

    format: int = FORMAT
    generation: int = Field(0, ge=0)  # +1 on every write
    committed: Committed | None = None
    pending: Pending | None = None
    updated_at: float | None = None
    writer: str | None = None


class LegacyRequest(_Tolerant):
    """The seed's single-line format: prepare and commit this model as the next version."""

    desired_model_repo_id: str


class StagedInfo(_Tolerant):
    """What a replica has staged, and whether it worked."""

    version: int
    model: str
    state: StageState
    digest: str | None = None  # MANIFEST content digest verified before loading
    weights_digest: str | None = None  # sha256 of the weights actually in memory
    error: str | None = None
    seconds: float | None = None


class ServingInfo(_Tolerant):
    version: int
    model: str
    digest: str | None = None
    weights_digest: str | None = None
    since: float | None = None


class Heartbeat(_Tolerant):
    """``replicas/<replica>.json``: what a replica serves and stages, written every heartbeat interval."""

    replica_id: str
    url: str | None = None
    pid: int | None = None
    state: ReplicaState
    ready: bool
    serving: ServingInfo | None = None
    staged: StagedInfo | None = None
    last_error: str | None = None
    generation_seen: int | None = None
    update_mode: str | None = None
    queue_depth: int = 0
    running: int = 0
    tokens_per_s: float = 0.0
    time: float
    started_at: float | None = None
    # A replica that staged the pending version polls every ``commit_poll_s`` until ``commit_poll_until``
    # (wall clock) while it waits for the commit; the coordinator sizes the commit margin from these.
    commit_poll_s: float | None = None
    commit_poll_until: float | None = None


def parse_sync_state(raw: Any) -> SyncState | LegacyRequest:
    """Validate parsed JSON as either format; raises ``ValueError`` naming what is wrong."""
    if isinstance(raw, dict) and "desired_model_repo_id" in raw and "generation" not in raw:
        try:
            return LegacyRequest.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"legacy sync_state is malformed: {exc.errors()[0]['msg']}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"sync_state must be a JSON object, got {type(raw).__name__}")
    try:
        return SyncState.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"sync_state field {where!r}: {first['msg']}") from exc


def read_sync_state_bytes(path: Path) -> bytes | None:
    """Open and read (never stat() alone: NFS caches attributes). None if the file does not exist.

    Plain os.open/os.read: replicas call this ten times a second, and the buffered file object costs more
    system calls and allocations than the read itself.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{path} is unreadable or not JSON: {exc}") from exc
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ValueError(f"{path} is unreadable or not JSON: {exc}") from exc
    finally:
        os.close(fd)


def decode_sync_state(data: bytes, path: Path) -> SyncState | LegacyRequest:
    """Parse the bytes of ``sync_state.json``; ``ValueError`` names what is wrong."""
    if not data.strip():
        raise ValueError(f"{path} is unreadable or not JSON: it is empty")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{path} is unreadable or not JSON: {exc}") from exc
    return parse_sync_state(raw)


def read_sync_state(path: Path) -> SyncState | LegacyRequest | None:
    """The parsed file, or None if it does not exist; ``ValueError`` when it is unreadable or invalid."""
    data = read_sync_state_bytes(path)
    return None if data is None else decode_sync_state(data, path)


def write_sync_state(path: Path, state: SyncState) -> None:
    atomic_write_json(path, state.model_dump(mode="json"))


def heartbeat_path(shared_dir: Path, replica_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in replica_id)
    return shared_dir / "replicas" / f"{safe}.json"


def write_heartbeat(shared_dir: Path, beat: Heartbeat) -> None:
    """Replace the replica's heartbeat (write a temporary file, rename); OSError while the shared folder is gone.

    No fsync: a heartbeat only matters while it is fresh, and readers skip a torn one. Two fsyncs per beat
    doubled an idle replica's wake-ups and CPU in the sync thread (and can stall for a busy disk or NFS).
    """
    path = heartbeat_path(shared_dir, beat.replica_id)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    data = beat.model_dump_json().encode()
    try:
        _write_replace(tmp, path, data)
    except FileNotFoundError:
        # replicas/ only, never the shared folder: an unmounted volume must stay missing, not be shadowed by a
        # local folder that would hide the outage and keep heartbeats on the wrong disk.
        path.parent.mkdir(exist_ok=True)
        _write_replace(tmp, path, data)


def _write_replace(tmp: Path, path: Path, data: bytes) -> None:
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_heartbeats(shared_dir: Path) -> list[Heartbeat]:
    """Every readable heartbeat; torn or foreign files are skipped (logged at debug)."""
    beats: list[Heartbeat] = []
    folder = shared_dir / "replicas"
    if not folder.is_dir():
        return beats
    for path in sorted(folder.glob("*.json")):
        try:
            beats.append(Heartbeat.model_validate(read_json(path)))
        except (OSError, ValueError, ValidationError) as exc:
            log.debug("skipping heartbeat %s: %s", path, exc)
    return beats


def live_heartbeats(shared_dir: Path, ttl_s: float, now: float) -> list[Heartbeat]:
    """The heartbeats written within ``ttl_s`` seconds of ``now``: the replicas that are alive."""
    return [b for b in read_heartbeats(shared_dir) if now - b.time <= ttl_s]
