"""Atomic file replacement and tolerant JSON reading (docs/protocol.md §2)."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Persist a rename: fsync the directory that holds it (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """A shared file's bytes: at most ``limit`` + 1 of them, and only from a regular file.

    Open and read, never stat() alone (close-to-open consistency on NFS). Opened non-blocking and checked before
    the read: a FIFO someone put where a heartbeat or the sync state belongs would block the reader's thread
    forever (removing it afterwards does not wake an ``open`` that waits for a writer). ``OSError`` otherwise.
    """
    return read_regular_with_stat(path, limit)[0]


def read_regular_with_stat(path: Path, limit: int | None = None) -> tuple[bytes, os.stat_result]:
    """``read_regular``, with the file's status as it was opened."""
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        data = f.read() if limit is None else f.read(limit + 1)
        return data, st


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading in binary, only when it is a regular file (``OSError`` otherwise): a FIFO,
    device or socket where a file belongs (or a symlink to one) would block or never end the reader."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json(path: Path) -> Any:
    """Open and read (close-to-open consistency on NFS), never stat() alone. Raises on any problem."""
    data = read_regular(path)
    if not data.strip():
        raise ValueError(f"{path} is empty")
    return json.loads(data)
