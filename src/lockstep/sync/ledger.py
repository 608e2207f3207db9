"""The coordinator's record of its decisions: committed and pending versions, the lease, the history.

``FileLedger`` keeps them in a folder (docs/protocol.md §2): the shared folder, where replicas also read
``sync_state.json``, or the trainer's data folder, read by nobody else. ``MemoryLedger`` keeps them for one
process: ``lockstep publish --urls`` without a trainer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

from lockstep.core.atomic import atomic_write_json
from lockstep.core.clock import Clock
from lockstep.core.errors import BadRequest, LeaseHeld
from lockstep.store import Lease
from lockstep.sync.protocol import LegacyRequest, SyncState
from lockstep.sync.shared_files import read_sync_state, write_sync_state

log = logging.getLogger(__name__)

LEASE_WAIT_S = 60.0  # seconds a publish waits while another coordinator holds the lease
T = TypeVar("T")


class CoordinatorLease(Protocol):
    """One coordinator at a time: held for a publish, renewed while it waits."""

    @property
    def held(self) -> bool: ...

    @property
    def token(self) -> str | None:
        """What marks the lease as ours in ``holder()`` (None: not taken, or a lease nobody else reads)."""
        ...

    def acquire(self) -> None: ...

    def release(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def renew(self) -> None: ...

    def holder(self) -> dict[str, Any] | None: ...


class Ledger(Protocol):
    """Where the committed and pending versions are decided and recorded."""

    folder: Path | None  # versions/, history/, runs/ and uploads/ live here; None: nowhere
    lease: CoordinatorLease

    def read(self) -> SyncState | LegacyRequest | None:
        """The recorded state; None when there is none; ``ValueError`` when it is unreadable."""
        ...

    def write(self, state: SyncState) -> None: ...

    def record(self, result: dict[str, Any], started_at: float, version: int) -> None:
        """Keep one publish's outcome for the history the UI draws."""
        ...


class FileLedger:
    """``sync_state.json``, ``locks/`` and ``history/`` in one folder."""

    def __init__(self, folder: Path, *, owner: str, lease_ttl_s: float, clock: Clock,
                 state_file: Path | None = None) -> None:
        self.folder: Path | None = folder
        self.path = state_file or folder / "sync_state.json"
        self.lease: CoordinatorLease = Lease(folder / "locks", owner=owner, ttl_s=lease_ttl_s, clock=clock)

    def read(self) -> SyncState | LegacyRequest | None:
        return read_sync_state(self.path)

    def write(self, state: SyncState) -> None:
        write_sync_state(self.path, state)

    def record(self, result: dict[str, Any], started_at: float, version: int) -> None:
        assert self.folder is not None
        path = self.folder / "history" / f"{int(started_at * 1000):015d}-v{version}.json"
        try:
            atomic_write_json(path, result)
        except OSError as exc:
            log.warning("could not record publish history: %s", exc)


class ProcessLease:
    """A lease that only this process can hold (a lock): for a ledger nobody else reads."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._lock.locked()

    @property
    def token(self) -> str | None:
        return None

    def acquire(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise LeaseHeld(f"{self.owner} is already publishing; wait for it to finish")

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def renew(self) -> None:
        pass

    def holder(self) -> dict[str, Any] | None:
        return None  # only this process publishes through it, and it never waits for itself


class MemoryLedger:
    """The state of one process's publishes; it starts from what the replicas serve."""

    def __init__(self, owner: str) -> None:
        self.folder: Path | None = None
        self.lease: CoordinatorLease = ProcessLease(owner)
        self._state: SyncState | None = None

    def read(self) -> SyncState | None:
        return self._state

    def write(self, state: SyncState) -> None:
        self._state = state

    def record(self, result: dict[str, Any], started_at: float, version: int) -> None:
        pass  # the caller prints the result; there is no history without a folder


def check_writable(folder: Path) -> None:
    """``BadRequest`` naming the setting when the trainer's data folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (probe := folder / ".write-test").write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BadRequest(f"the trainer's data folder {folder} is not writable ({exc}); set LOCKSTEP_TRAINER_DATA_DIR "
                         "to a writable folder (a volume, to keep versions and runs across restarts)") from exc


def with_lease_wait(attempt: Callable[[], T], clock: Clock, wait_s: float = LEASE_WAIT_S) -> T:
    """``attempt()``, tried again every 0.5 s for up to ``wait_s`` while another coordinator holds the lease."""
    deadline = clock.monotonic() + wait_s
    while True:
        try:
            return attempt()
        except LeaseHeld as exc:
            if clock.monotonic() >= deadline:
                raise
            log.info("waiting for the coordinator lease: %s", exc)
            clock.sleep(0.5)
