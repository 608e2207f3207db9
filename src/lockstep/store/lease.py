"""Lease: the coordinator lease file in ``locks/`` (docs/protocol.md §2): exclusive, expiring, taken over when stale.

The file ``locks/<name>.lease`` holds ``{owner, acquired_at, expires_at, token}`` (wall-clock seconds).

* Acquire creates it with O_CREAT|O_EXCL: exactly one creator wins, also on NFS.
* A stale lease (``expires_at`` passed; a torn file: no write for ``ttl_s``) is taken over, never ignored.
  Removing lease X is reserved to whoever holds X's *claim*: a hard link ``.<name>.takeover-<hash of X>``
  to the lease file, made with ``link`` (atomic, fails when the name exists: one taker per X). The claim
  holder reads the claim: if it is not X, the lease was replaced meanwhile and is left alone; if it is,
  nobody else can have replaced it, so it renames X away (a unique name), logs the takeover with the old
  holder, and creates its own lease with O_EXCL. A plain "rename the stale file away" is not enough: a slow
  taker that judged X stale would move the fresh lease of a faster one (measured: 1 round in 200 with six
  processes had two winners).
* The holder releases (and renews a lease that has expired) through the same claim; it renews a live
  lease in place. Renew and release act only while the file carries our token, else LeaseHeld("lost the
  lease"). Clocks of the machines must agree to well within ``ttl_s``; renew every ``ttl_s / 3`` or so.
* A claim left by a taker that crashed mid-takeover is removed after ``ttl_s``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

from lockstep.core.atomic import atomic_write_json, fsync_dir, read_regular_with_stat
from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import BadRequest, LeaseHeld, LockstepError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ATTEMPTS = 20  # create / take-over rounds before reporting a contended lease as held
_CONTENDED_WAIT_S = 0.005  # seconds to let another taker finish before looking again


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


# seconds; a lease file claiming to last longer than this after its write is treated as torn
MAX_LEASE_AHEAD_S = 86_400.0
MAX_LEASE_BYTES = 64 << 10  # ours are under 300 bytes; a larger file is torn or foreign


@dataclass(frozen=True)
class _Seen:
    """One read of a lease file; ``record`` is None when the file was torn or unparsable."""

    record: dict[str, Any] | None
    mtime: float  # wall-clock seconds, from the file system
    fingerprint: str  # inode, mtime and size: identifies a torn file, which has no token

    @classmethod
    def read(cls, path: Path) -> _Seen | None:
        try:
            data, st = read_regular_with_stat(path, MAX_LEASE_BYTES)  # open+read, not stat(): NFS caches attributes
        except FileNotFoundError:
            return None
        except OSError:  # not a regular file: a torn lease to its readers, which then expires like one
            try:
                data, st = b"", os.lstat(path)
            except FileNotFoundError:
                return None
        try:
            record = json.loads(data)
            if not (isinstance(record, dict) and isinstance(record.get("owner"), str)
                    and isinstance(record.get("token"), str)
                    and isinstance(record.get("expires_at"), (int, float))
                    and not isinstance(record.get("expires_at"), bool)
                    # a lease that never expires (inf, NaN, years ahead) would lock every coordinator out
                    and math.isfinite(record["expires_at"])
                    and record["expires_at"] <= st.st_mtime + MAX_LEASE_AHEAD_S):
                record = None
        except ValueError:
            record = None
        return cls(record, st.st_mtime, f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}")

    @property
    def owner(self) -> str:
        return self.record["owner"] if self.record else "<unreadable lease file>"

    @property
    def token(self) -> str | None:
        return self.record["token"] if self.record else None

    @property
    def identity(self) -> str:
        """What makes this lease this one: its token (unique per grant), or a torn file's fingerprint."""
        return f"token:{self.token}" if self.token else f"torn:{self.fingerprint}"

    def expires_at(self, ttl_s: float) -> float:
        # A torn file (its writer died between create and write) expires ttl_s after its last write.
        return float(self.record["expires_at"]) if self.record else self.mtime + ttl_s

    def as_dict(self, ttl_s: float) -> dict[str, Any]:
        if self.record is not None:
            return dict(self.record)
        return {"owner": None, "acquired_at": None, "expires_at": self.expires_at(ttl_s), "token": None,
                "unreadable": True}


class Lease:
    """An expiring, exclusive lease held by ``owner`` in ``locks_dir``; a context manager."""

    def __init__(self, locks_dir: Path, name: str = "coordinator", *, owner: str, ttl_s: float,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        if not _NAME.match(name):
            raise BadRequest(f"lease name {name!r} must be letters, digits, '_', '.', '-' "
                             "and not start with '.'")
        if not ttl_s > 0:
            raise BadRequest(f"lease ttl_s must be positive seconds, got {ttl_s}")
        self.locks_dir = Path(locks_dir)
        self.name = name
        self.owner = owner
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self.path = self.locks_dir / f"{name}.lease"
        self._token: str | None = None
        self._acquired_at = 0.0
        self._expires_at = 0.0

    @property
    def held(self) -> bool:
        """True while we hold it by our own account (not re-read from the file)."""
        return self._token is not None and self.clock.time() < self._expires_at

    @property
    def expires_at(self) -> float:
        return self._expires_at

    @property
    def token(self) -> str | None:
        """The token of the lease we took (None before): the file names us only while it holds this token."""
        return self._token

    def holder(self) -> dict[str, Any] | None:
        """The lease file's content, or None when nobody holds the lease."""
        seen = _Seen.read(self.path)
        return seen.as_dict(self.ttl_s) if seen else None

    def acquire(self) -> None:
        """Take the lease; LeaseHeld names the holder and when it expires."""
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            now = self.clock.time()
            token = uuid.uuid4().hex
            if self._create(now, now + self.ttl_s, token):
                self._token, self._acquired_at, self._expires_at = token, now, now + self.ttl_s
                log.info("%s acquired lease %r until %s", self.owner, self.name, _iso(self._expires_at))
                return
            seen = _Seen.read(self.path)
            if seen is None:
                continue  # released between our create and our read
            if self._token is not None and seen.token == self._token:
                self.renew()
                return
            expires = seen.expires_at(self.ttl_s)
            if now < expires:
                raise LeaseHeld(f"lease {self.name!r} is held by {seen.owner} until {_iso(expires)} "
                                f"({expires - now:.1f} s from now); it can be taken once it expires")
            self._remove(seen, now)
        raise LeaseHeld(f"lease {self.name!r} is contended: other processes kept taking it over; "
                        f"holder now: {self._describe(_Seen.read(self.path))}")

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` from now; LeaseHeld("lost the lease") when it is not ours."""
        if self._token is None:
            raise LeaseHeld(f"lost the lease {self.name!r}: {self.owner} does not hold it (acquire first)")
        now = self.clock.time()
        seen = _Seen.read(self.path)
        if seen is None or seen.token != self._token:
            self._lost(seen)
        expires = now + self.ttl_s
        margin = min(1.0, self.ttl_s / 10)  # seconds: near expiry a taker may be removing the file already
        if now < self._expires_at - margin:
            atomic_write_json(self.path, self._record(self._acquired_at, expires, self._token))
        else:
            # Expired (or about to) but still ours: remove it the way a taker would, then create it anew.
            self._remove(seen, now, quiet=True)
            if not self._create(self._acquired_at, expires, self._token):
                self._lost(_Seen.read(self.path))
        self._expires_at = expires

    def release(self) -> None:
        """Give the lease up (a no-op when not held); LeaseHeld("lost the lease") when it is not ours."""
        if self._token is None:
            return
        token, self._token = self._token, None
        seen = _Seen.read(self.path)
        if seen is None or seen.token != token:
            self._lost(seen)
        if not self._remove(seen, self.clock.time(), quiet=True):
            self._lost(_Seen.read(self.path))
        fsync_dir(self.locks_dir)
        log.info("%s released lease %r", self.owner, self.name)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.release()
        except LeaseHeld:
            if exc_type is None:
                raise
            log.warning("%s: lease %r was lost while handling %s", self.owner, self.name, exc_type.__name__)

    # --- internals -------------------------------------------------------------------------------------
    def _record(self, acquired_at: float, expires_at: float, token: str) -> dict[str, Any]:
        return {"owner": self.owner, "acquired_at": acquired_at, "expires_at": expires_at, "token": token}

    def _create(self, acquired_at: float, expires_at: float, token: str) -> bool:
        """O_CREAT|O_EXCL the lease file with our record; False when it exists."""
        data = (json.dumps(self._record(acquired_at, expires_at, token), sort_keys=True) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        fsync_dir(self.locks_dir)
        return True

    def _remove(self, seen: _Seen, now: float, *, quiet: bool = False) -> bool:
        """Remove lease ``seen`` if the file still is that lease; True when this call removed it."""
        digest = hashlib.sha256(seen.identity.encode()).hexdigest()[:32]
        claim = self.locks_dir / f".{self.name}.takeover-{digest}"
        try:
            os.link(self.path, claim)  # the claim on removing this lease: one process at a time
        except FileNotFoundError:
            return False  # already gone
        except FileExistsError:
            self._drop_abandoned(claim, now)
            self.clock.sleep(_CONTENDED_WAIT_S)  # another process is removing it; look again soon
            return False
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise LockstepError(f"the lease in {self.locks_dir} needs hard links, which this file system "
                                    f"refuses ({e.strerror}); put locks/ on a POSIX or NFS volume") from e
            raise
        try:
            linked = _Seen.read(claim)
            if linked is None or linked.identity != seen.identity:
                return False  # replaced by a newer lease since we read it: not ours to remove
            aside = self.locks_dir / f".{self.name}.removed-{uuid.uuid4().hex}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            moved = _Seen.read(aside)
            if moved is None or moved.identity != seen.identity:
                self._put_back(aside)  # only after an abandoned claim was dropped by two processes at once
                return False
            if not quiet:
                log.warning("%s takes over stale lease %r from %s (expired %s, %.1f s ago)", self.owner,
                            self.name, seen.owner, _iso(seen.expires_at(self.ttl_s)),
                            now - seen.expires_at(self.ttl_s))
            aside.unlink(missing_ok=True)
            return True
        finally:
            claim.unlink(missing_ok=True)

    def _drop_abandoned(self, claim: Path, now: float) -> None:
        """Remove a claim whose taker died mid-takeover (a takeover takes milliseconds; this waited ttl_s)."""
        try:
            made = os.lstat(claim).st_ctime  # link() sets the ctime: when the claim was made
        except FileNotFoundError:
            return
        if now - made > self.ttl_s:
            log.warning("lease %r: dropping a takeover claim abandoned %.0f s ago", self.name, now - made)
            claim.unlink(missing_ok=True)

    def _put_back(self, aside: Path) -> None:
        """Restore a lease file moved by mistake, never overwriting one created meanwhile."""
        try:
            os.link(aside, self.path)
        except FileExistsError:
            log.error("lease %r: could not restore %s's lease, another was created meanwhile",
                      self.name, self._describe(_Seen.read(aside)))
        aside.unlink(missing_ok=True)

    def _describe(self, seen: _Seen | None) -> str:
        if seen is None:
            return "nobody"
        return f"{seen.owner} (until {_iso(seen.expires_at(self.ttl_s))})"

    def _lost(self, seen: _Seen | None) -> NoReturn:
        self._token = None
        raise LeaseHeld(f"lost the lease {self.name!r}: {self.owner} no longer holds it; "
                        f"held now by {self._describe(seen)}")
