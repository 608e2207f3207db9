"""Model folders uploaded to the trainer file by file, to be published from where training ran.

Without a shared folder a training script on another machine cannot hand the trainer a path: it uploads
the model's files (``PUT /store/uploads/{id}/files/{path}``, each checked against the sha256 the client
sends), then asks the trainer to publish the upload, which copies it in as the next version and deletes it.
Uploads live in ``<data dir>/uploads``; one left unpublished for ``UPLOAD_TTL_S`` is removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from lockstep.core.clock import Clock
from lockstep.core.errors import BadRequest, Conflict, NotFound

log = logging.getLogger(__name__)

UPLOAD_TTL_S = 24 * 3600.0  # an upload nobody published is removed after this long
_ID = re.compile(r"up-[0-9a-f]{16}")
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # one path component: no hidden files, no ".."
_MAX_DEPTH = 4
_PARTIAL = ".partial"


class UploadStore:
    """Upload folders under ``root``: created, filled, then handed to a publish (or discarded)."""

    def __init__(self, root: Path, clock: Clock) -> None:
        self.root = root
        self.clock = clock
        self._lock = threading.Lock()
        self._sealed: set[str] = set()  # handed to a publish: no more files, not discarded by the caller
        self._arriving: dict[str, int] = {}  # files being written, per upload

    def create(self) -> str:
        """A new empty upload; removes the ones left unpublished for longer than ``UPLOAD_TTL_S``."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_expired()
        upload_id = f"up-{secrets.token_hex(8)}"
        (self.root / upload_id).mkdir()
        return upload_id

    def folder(self, upload_id: str) -> Path:
        """The folder of an upload that exists (404 otherwise, with what to do)."""
        folder = self.root / upload_id if _ID.fullmatch(upload_id) else None
        if folder is None or not folder.is_dir():
            raise NotFound(f"no upload {upload_id!r}: start one with POST /store/uploads (uploads not published "
                           f"within {UPLOAD_TTL_S / 3600:.0f} h are removed)")
        return folder

    def _target(self, upload_id: str, rel_path: str) -> Path:
        """Where ``rel_path`` of an upload goes; 400 for a path that is not a plain relative file name."""
        folder = self.folder(upload_id)
        parts = rel_path.split("/")
        if len(parts) > _MAX_DEPTH or not all(_PART.fullmatch(p) and not p.endswith(_PARTIAL) for p in parts):
            raise BadRequest(f"bad upload path {rel_path!r}: use up to {_MAX_DEPTH} components of letters, digits, "
                             "'.', '_' and '-', not starting with '.' (e.g. model.safetensors)")
        return folder.joinpath(*parts)

    async def receive(self, upload_id: str, rel_path: str, chunks: AsyncIterator[bytes],
                      expected_sha256: str | None) -> dict[str, object]:
        """Write one file of an open upload (a partial file, then a rename) and check its sha256."""
        if expected_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", expected_sha256):
            raise BadRequest("X-Content-SHA256 must be the file's sha256 as 64 lowercase hex digits")
        target = self._target(upload_id, rel_path)
        with self._lock:
            if upload_id in self._sealed:
                raise Conflict(f"upload {upload_id} is being published; start a new upload to send more files")
            self._arriving[upload_id] = self._arriving.get(upload_id, 0) + 1
        partial = target.with_name(target.name + _PARTIAL)
        digest, size = hashlib.sha256(), 0
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("wb") as out:
                async for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
                raise BadRequest(f"{rel_path}: the upload's sha256 is {digest.hexdigest()}, not the "
                                 f"{expected_sha256} the client sent (corrupted in transit); send it again")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
            with self._lock:
                self._arriving[upload_id] -= 1
                if not self._arriving[upload_id]:
                    del self._arriving[upload_id]
        return {"path": rel_path, "size": size, "sha256": digest.hexdigest()}

    def seal(self, upload_id: str) -> Path:
        """Hand an upload to its publish: no more files, and only ``release`` removes it."""
        folder = self.folder(upload_id)
        with self._lock:
            if upload_id in self._sealed:
                raise Conflict(f"upload {upload_id} is already being published; follow it on GET /publishes")
            if self._arriving.get(upload_id):
                raise Conflict(f"upload {upload_id} still has a file arriving; publish it once every PUT has "
                               "answered")
            self._sealed.add(upload_id)
        return folder

    def unseal(self, upload_id: str) -> None:
        """Give an upload back to its client (the publish was refused before it started)."""
        with self._lock:
            self._sealed.discard(upload_id)

    def release(self, upload_id: str) -> None:
        """Remove an upload once its publish ended (its files are in the store now, or were refused)."""
        shutil.rmtree(self.root / upload_id, ignore_errors=True)
        self.unseal(upload_id)

    def discard(self, upload_id: str) -> None:
        """``DELETE /store/uploads/{id}``: drop an upload that is not being published."""
        self.folder(upload_id)
        with self._lock:
            if upload_id in self._sealed:
                raise Conflict(f"upload {upload_id} is being published; it is removed when the publish ends")
        shutil.rmtree(self.root / upload_id, ignore_errors=True)

    def _remove_expired(self) -> None:
        now = self.clock.time()
        for folder in self.root.iterdir():
            with self._lock:
                busy = folder.name in self._sealed or folder.name in self._arriving
            if busy or not _ID.fullmatch(folder.name):
                continue
            try:
                age = now - folder.stat().st_mtime
            except OSError:
                continue
            if age > UPLOAD_TTL_S:
                log.info("removing upload %s, left unpublished for %.0f h", folder.name, age / 3600)
                shutil.rmtree(folder, ignore_errors=True)
