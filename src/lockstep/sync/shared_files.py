"""The shared folder's files on disk: ``sync_state.json``, the heartbeats and a rollout step's session pins
(docs/protocol.md §2–§3).

Readers are tolerant (a torn, unparsable or out-of-range file keeps the last good state; a heartbeat from the
future or with a malformed URL is ignored with a logged reason); writers are strict (always the full schema,
replaced atomically). The shapes are in ``lockstep.sync.protocol``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from pydantic import ValidationError

from lockstep.core.atomic import atomic_write_json, read_regular
from lockstep.sync.protocol import Heartbeat, LegacyRequest, SessionPins, SyncState, parse_sync_state
from lockstep.sync.tolerant import DEFAULT_CLOCK_SKEW_S, ProblemLog, url_problem

log = logging.getLogger(__name__)

MAX_STATE_BYTES = 2 << 20  # sync_state.json is a few hundred bytes, under 1 MB with a rollout's session pins
MAX_HEARTBEAT_BYTES = 1 << 20

_skipped = ProblemLog(log)  # heartbeats skipped, each reason once a minute per file


def read_sync_state_bytes(path: Path) -> bytes | None:
    """Open and read (never stat() alone: NFS caches attributes). None if the file does not exist.

    Plain os.open/os.read (``read_regular``): replicas call this ten times a second, and the buffered file object
    costs more system calls and allocations than the read itself.
    """
    try:
        data = read_regular(path, MAX_STATE_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{path} is unreadable or not JSON: {exc}") from exc
    if len(data) > MAX_STATE_BYTES:  # not ours: never parse (or hold) an arbitrarily large file
        raise ValueError(f"{path} is unreadable or not JSON: it is over {MAX_STATE_BYTES} bytes")
    return data


def decode_sync_state(data: bytes, path: Path) -> SyncState | LegacyRequest:
    """Parse the bytes of ``sync_state.json``; ``ValueError`` names what is wrong."""
    if not data.strip():
        raise ValueError(f"{path} is unreadable or not JSON: it is empty")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{path} is unreadable or not JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path} is unreadable or not JSON: nested too deeply") from None
    try:
        return parse_sync_state(raw)
    except RecursionError:  # deep free-form nesting in an ignored field
        raise ValueError(f"{path} is not a sync_state: nested too deeply") from None


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


def pins_path(shared_dir: Path, replica_id: str) -> Path:
    return shared_dir / "pins" / heartbeat_path(shared_dir, replica_id).name


def write_pins(shared_dir: Path, pins: SessionPins) -> None:
    """Replace the replica's session pins of the step in force (the coordinator collects them)."""
    path = pins_path(shared_dir, pins.replica_id)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    _write_replace(tmp, path, pins.model_dump_json().encode())


def read_pins(shared_dir: Path, replica_id: str) -> SessionPins | None:
    """One replica's session pins; None when missing, torn or not ours (the coordinator asks again)."""
    try:
        data = read_regular(pins_path(shared_dir, replica_id), MAX_STATE_BYTES)
        return None if len(data) > MAX_STATE_BYTES else SessionPins.model_validate_json(data)
    except (OSError, ValidationError, RecursionError):
        return None


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


def parse_heartbeat(data: bytes) -> Heartbeat:
    """One heartbeat file's bytes; ``ValueError`` naming what is wrong (torn, foreign, out of range)."""
    if len(data) > MAX_HEARTBEAT_BYTES:
        raise ValueError(f"it is over {MAX_HEARTBEAT_BYTES} bytes")
    if not data.strip():
        raise ValueError("it is empty")
    try:
        return Heartbeat.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the document"
        raise ValueError(f"field {where!r}: {first['msg']}") from None
    except RecursionError:
        raise ValueError("it is nested too deeply") from None


def read_heartbeats(shared_dir: Path, now: float | None = None, skew_s: float = DEFAULT_CLOCK_SKEW_S,
                    problems: ProblemLog | None = None) -> list[Heartbeat]:
    """Every usable heartbeat; the others are skipped with a logged reason (each once a minute).

    Skipped: torn, foreign or out-of-range files and, when ``now`` is given, beats stamped more than ``skew_s``
    in the future (they would never expire). A malformed URL is dropped and the rest of the beat kept.
    """
    problems = problems or _skipped
    beats: list[Heartbeat] = []
    folder = shared_dir / "replicas"
    if not folder.is_dir():
        return beats
    for path in sorted(folder.glob("*.json")):
        try:
            beat = parse_heartbeat(read_regular(path, MAX_HEARTBEAT_BYTES))
        except FileNotFoundError:
            continue  # removed between the listing and the read
        except (OSError, ValueError) as exc:
            problems.report(str(path), f"skipping heartbeat {path}: {exc}")
            continue
        if now is not None and beat.time > now + skew_s:
            problems.report(str(path), f"skipping heartbeat {path} of {beat.replica_id!r}: stamped "
                            f"{beat.time - now:.1f} s in the future, beyond the {skew_s:g} s clock skew allowed "
                            "(LOCKSTEP_CLOCK_SKEW_S); check the clocks, or remove the file")
            continue
        if beat.url is not None and (why := url_problem(beat.url)) is not None:
            problems.report(str(path), f"heartbeat {path} of {beat.replica_id!r}: ignoring its URL: {why}")
            beat = beat.model_copy(update={"url": None})
        beats.append(beat)
    return beats


def live_heartbeats(shared_dir: Path, ttl_s: float, now: float, skew_s: float = DEFAULT_CLOCK_SKEW_S,
                    problems: ProblemLog | None = None) -> list[Heartbeat]:
    """The heartbeats written within ``ttl_s`` seconds of ``now`` (and not from the future): live replicas."""
    return [b for b in read_heartbeats(shared_dir, now, skew_s, problems) if now - b.time <= ttl_s]
