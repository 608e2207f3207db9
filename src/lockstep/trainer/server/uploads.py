"""Model folders uploaded to the trainer file by file, to be published from where training ran.

Without a shared folder a training script on another machine cannot hand the trainer a path: it uploads
the model's files (``PUT /store/uploads/{id}/files/{path}``, each checked against the sha256 the client
sends), then asks the trainer to publish the upload, which copies it in as the next version and deletes it.
Uploads live in ``<data dir>/uploads``; one left unpublished for ``UPLOAD_TTL_S`` is removed.

Bounds: all files of one upload together at most ``max_bytes`` (413, counted while the bytes arrive; a
Content-Length over what is left is refused before reading), and the chunks it adds to the store at most
``max_bytes`` too; at most ``max_files`` files (413), at most ``max_open`` uploads at once (429). Uploads
write and hash on ``UPLOAD_WORKERS`` threads of their own (``UploadStore.run``), so however many arrive at
once the trainer's other routes (the store that replicas stage from) keep their threads. One writer per path:
a second PUT of a path still arriving gets 409. Each
file is written to a temporary file of its own and renamed over the path only once its sha256 matched, so
the bytes under a path are always those of a PUT that was acknowledged. Uploads never create symlinks.

A client that cuts its files into chunks as the store does (``lockstep.store.chunks``) sends each file's chunk
list instead (``PUT /store/uploads/{id}/chunked/{path}``); the trainer answers with the chunks its store lacks,
the client sends only those (``PUT /store/uploads/{id}/chunks/{sha256}``, each checked against its name) and
asks again, and the trainer writes the file from its chunks. A fine-tuned checkpoint whose tensors are mostly
unchanged then crosses the network as its changed chunks.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

from lockstep.core.atomic import fsync_dir
from lockstep.core.clock import Clock
from lockstep.core.errors import BadRequest, Conflict, LockstepError, NotFound, Overloaded
from lockstep.store.chunks import ChunkEntry, ChunkStore
from lockstep.store.manifest import FileEntry

log = logging.getLogger(__name__)

UPLOAD_TTL_S = 24 * 3600.0  # an upload nobody published is removed after this long
MAX_UPLOAD_BYTES = 64 << 30  # defaults of LOCKSTEP_MAX_UPLOAD_BYTES, _FILES and LOCKSTEP_MAX_OPEN_UPLOADS
MAX_UPLOAD_FILES = 10_000
MAX_OPEN_UPLOADS = 8
WRITE_BYTES = 1 << 20  # bytes gathered before one write (and hash) in a worker thread, off the event loop
UPLOAD_WORKERS = 2  # threads that write and hash uploads: more would only share the same disk and cores
T = TypeVar("T")
_ID = re.compile(r"up-[0-9a-f]{16}")
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # one path component: no hidden files, no ".."
_MAX_DEPTH = 4
_TMP_PREFIX = "."  # temporary files are hidden: no client path can name one
_OLD_TMP_SUFFIX = ".partial"  # what temporary files were called before; such names stay refused


class UploadTooLarge(LockstepError):
    """An upload over its byte or file budget."""

    status_code = 413
    code = "request_too_large"


@dataclass
class _Upload:
    """What this process knows of one upload: the files it holds and the ones arriving."""

    sizes: dict[str, int] = field(default_factory=dict)  # path → bytes, of files that arrived whole
    arriving: dict[str, int] = field(default_factory=dict)  # path → bytes so far; also the path's one writer
    chunk_bytes: int = 0  # bytes of the chunks this upload added to the store (or is adding)

    def others(self, path: str) -> int:
        """Bytes of every file but ``path`` (arrived or arriving)."""
        return (sum(s for p, s in self.sizes.items() if p != path)
                + sum(s for p, s in self.arriving.items() if p != path))


class UploadStore:
    """Upload folders under ``root``: created, filled, then handed to a publish (or discarded)."""

    def __init__(self, root: Path, clock: Clock, *, max_bytes: int = MAX_UPLOAD_BYTES,
                 max_files: int = MAX_UPLOAD_FILES, max_open: int = MAX_OPEN_UPLOADS) -> None:
        self.root = root
        self.clock = clock
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.max_open = max_open
        self._lock = threading.Lock()
        self._sealed: set[str] = set()  # handed to a publish: no more files, not discarded by the caller
        self._uploads: dict[str, _Upload] = {}  # read from disk on first use
        self._workers = ThreadPoolExecutor(max_workers=UPLOAD_WORKERS, thread_name_prefix="uploads")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the uploads' own threads (queued behind other uploads' work when they are busy)."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, functools.partial(fn, *args))

    def close(self) -> None:
        """Stop the upload threads (work already queued still runs)."""
        self._workers.shutdown(wait=False)

    def create(self) -> str:
        """A new empty upload (429 when ``max_open`` are open); removes the ones left unpublished too long."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_expired()
        with self._lock:
            open_now = [p.name for p in self.root.iterdir() if _ID.fullmatch(p.name)]
            if len(open_now) >= self.max_open:
                raise Overloaded(f"{len(open_now)} uploads are open, the most allowed (LOCKSTEP_MAX_OPEN_UPLOADS="
                                 f"{self.max_open}): publish or drop one (DELETE /store/uploads/{{id}}) first; "
                                 f"abandoned ones are removed after {UPLOAD_TTL_S / 3600:.0f} h", retry_after_s=30)
            upload_id = f"up-{secrets.token_hex(8)}"
            (self.root / upload_id).mkdir()
            self._uploads[upload_id] = _Upload()
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
        if len(parts) > _MAX_DEPTH or not all(_PART.fullmatch(p) and not p.endswith(_OLD_TMP_SUFFIX) for p in parts):
            raise BadRequest(f"bad upload path {rel_path!r}: use up to {_MAX_DEPTH} components of letters, digits, "
                             "'.', '_' and '-', not starting with '.' (e.g. model.safetensors)")
        return folder.joinpath(*parts)

    async def receive(self, upload_id: str, rel_path: str, chunks: AsyncIterator[bytes],
                      expected_sha256: str | None, content_length: int | None = None) -> dict[str, object]:
        """Write one file of an open upload (its own temporary file, renamed over the path once its sha256
        matched); 409 while another PUT of the path is arriving, 413 past the upload's budget."""
        if expected_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", expected_sha256):
            raise BadRequest("X-Content-SHA256 must be the file's sha256 as 64 lowercase hex digits")
        target = self._target(upload_id, rel_path)
        await self.run(self._load, upload_id)
        self._claim(upload_id, rel_path, content_length)
        tmp = target.parent / f"{_TMP_PREFIX}{target.name}.{secrets.token_hex(6)}.tmp"
        digest, size, buffered = hashlib.sha256(), 0, bytearray()
        out: BinaryIO | None = None
        try:
            out = await self.run(_open_new, self.folder(upload_id), target, tmp)
            async for chunk in chunks:
                size += len(chunk)
                self._count(upload_id, rel_path, size)
                buffered += chunk
                if len(buffered) >= WRITE_BYTES:
                    await self.run(_write, out, digest, bytes(buffered))
                    buffered.clear()
            await self.run(_write, out, digest, bytes(buffered))
            await self.run(_close, out)
            out = None
            if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
                raise BadRequest(f"{rel_path}: the upload's sha256 is {digest.hexdigest()}, not the "
                                 f"{expected_sha256} the client sent (corrupted in transit); send it again")
            await self.run(_rename, tmp, target)
            with self._lock:
                self._state(upload_id).sizes[rel_path] = size
        finally:
            if out is not None:
                out.close()
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._state(upload_id).arriving.pop(rel_path, None)
        return {"path": rel_path, "size": size, "sha256": digest.hexdigest()}

    def receive_chunk(self, upload_id: str, chunk: ChunkEntry, data: bytes, chunks: ChunkStore) -> dict[str, object]:
        """Keep one chunk of an upload in the store's chunk folder (400 when its bytes do not match its name)."""
        self.folder(upload_id)
        with self._lock:
            if upload_id in self._sealed:
                raise Conflict(f"upload {upload_id} is being published; start a new upload to send more chunks")
        if (sent := hashlib.sha256(data).hexdigest()) != chunk.sha256:
            raise BadRequest(f"chunk {chunk.sha256[:12]}: the bytes sent have sha256 {sent} (corrupted in transit); "
                             "send it again")
        if chunks.has(chunk):  # costs this upload nothing (put marks it used, so gc keeps it for the publish)
            return {"sha256": chunk.sha256, "size": chunk.size, "stored": chunks.put(chunk, data)}
        with self._lock:  # counted before it is written: parallel chunks cannot pass the budget together
            upload = self._state(upload_id)
            if upload.chunk_bytes + chunk.size > self.max_bytes:
                raise UploadTooLarge(f"upload {upload_id} has sent {upload.chunk_bytes} bytes of new chunks; "
                                     f"{chunk.size} more would pass its {self.max_bytes} bytes "
                                     "(LOCKSTEP_MAX_UPLOAD_BYTES)")
            upload.chunk_bytes += chunk.size
        written = False
        try:
            written = chunks.put(chunk, data)
        finally:
            if not written:  # failed, or another upload stored it meanwhile: it costs this one nothing
                with self._lock:
                    self._state(upload_id).chunk_bytes -= chunk.size
        return {"sha256": chunk.sha256, "size": chunk.size, "stored": written}

    def assemble(self, upload_id: str, entry: FileEntry, chunks: ChunkStore) -> dict[str, object]:
        """File ``entry.path`` of an upload from chunks the store holds; the chunks it lacks, when any.

        The client sends only those (``receive_chunk``), then asks again: unchanged tensors never cross the
        network. The file is written whole into the upload and checked against ``entry.sha256``."""
        target = self._target(upload_id, entry.path)
        self._load(upload_id)
        missing = sorted({c.sha256 for c in entry.chunks or [] if not chunks.has(c)})
        if missing:
            return {"path": entry.path, "missing": missing}
        self._claim(upload_id, entry.path, entry.size)
        tmp = target.parent / f"{_TMP_PREFIX}{target.name}.{secrets.token_hex(6)}.tmp"
        digest = hashlib.sha256()
        out: BinaryIO | None = None
        try:
            out = _open_new(self.folder(upload_id), target, tmp)
            for chunk in entry.chunks or []:
                try:
                    data = chunks.read(chunk)
                except OSError:  # removed since it was counted: the client sends it again
                    return {"path": entry.path, "missing": [chunk.sha256]}
                except ValueError:  # damaged on disk: removed, so that the bytes the client sends again are kept
                    chunks.discard_damaged(chunk)
                    return {"path": entry.path, "missing": [chunk.sha256]}
                _write(out, digest, data)
            self._count(upload_id, entry.path, entry.size)
            _close(out)
            out = None
            if digest.hexdigest() != entry.sha256:
                raise BadRequest(f"{entry.path}: its chunks make a file with sha256 {digest.hexdigest()}, not the "
                                 f"{entry.sha256} the client sent; check the file and send it again")
            _rename(tmp, target)
            with self._lock:
                self._state(upload_id).sizes[entry.path] = entry.size
        finally:
            if out is not None:
                out.close()
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._state(upload_id).arriving.pop(entry.path, None)
        return {"path": entry.path, "size": entry.size, "sha256": entry.sha256, "missing": []}

    def _claim(self, upload_id: str, rel_path: str, content_length: int | None) -> None:
        """Make this request the one writer of ``rel_path``, within the upload's file and byte budgets."""
        with self._lock:
            if upload_id in self._sealed:
                raise Conflict(f"upload {upload_id} is being published; start a new upload to send more files")
            upload = self._state(upload_id)
            if rel_path in upload.arriving:
                raise Conflict(f"{rel_path} of upload {upload_id} is already arriving in another request; wait "
                               "for that PUT to answer (send it again afterwards if it failed)")
            clash = _clash(rel_path, [*upload.sizes, *upload.arriving])
            if clash is not None:
                raise Conflict(f"{rel_path} of upload {upload_id} clashes with {clash} (a file cannot also be a "
                               "folder); rename one of them")
            if rel_path not in upload.sizes and len(upload.sizes) + len(upload.arriving) >= self.max_files:
                raise UploadTooLarge(f"upload {upload_id} already has {self.max_files} files, the most allowed "
                                     "(LOCKSTEP_MAX_UPLOAD_FILES)")
            left = self.max_bytes - upload.others(rel_path)
            if content_length is not None and content_length > left:
                raise UploadTooLarge(f"{rel_path} is {content_length} bytes but upload {upload_id} has {left} of "
                                     f"its {self.max_bytes} bytes left (LOCKSTEP_MAX_UPLOAD_BYTES)")
            upload.arriving[rel_path] = 0

    def _count(self, upload_id: str, rel_path: str, size: int) -> None:
        """Record ``size`` bytes of ``rel_path`` so far; 413 once the upload passes its byte budget."""
        with self._lock:
            upload = self._state(upload_id)
            upload.arriving[rel_path] = size
            if upload.others(rel_path) + size > self.max_bytes:
                raise UploadTooLarge(f"upload {upload_id} passed its {self.max_bytes} bytes while {rel_path} "
                                     "arrived (LOCKSTEP_MAX_UPLOAD_BYTES); that file was dropped")

    def _state(self, upload_id: str) -> _Upload:
        """The upload's record (the caller holds ``self._lock``)."""
        return self._uploads.setdefault(upload_id, _Upload())

    def _load(self, upload_id: str) -> None:
        """Read an upload's files from disk the first time this process sees it (made before a restart)."""
        with self._lock:
            if upload_id in self._uploads:
                return
        folder = self.folder(upload_id)
        sizes: dict[str, int] = {}
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                path = Path(dirpath) / name
                if name.startswith(_TMP_PREFIX):
                    path.unlink(missing_ok=True)  # left by a PUT that a restart cut off
                    continue
                info = path.lstat()
                if stat.S_ISREG(info.st_mode):
                    sizes[path.relative_to(folder).as_posix()] = info.st_size
        with self._lock:
            self._uploads.setdefault(upload_id, _Upload(sizes=sizes))

    def _arriving(self, upload_id: str) -> bool:
        """Whether a file of the upload is arriving (the caller holds ``self._lock``)."""
        upload = self._uploads.get(upload_id)
        return upload is not None and bool(upload.arriving)

    def seal(self, upload_id: str) -> Path:
        """Hand an upload to its publish: no more files, and only ``release`` removes it."""
        folder = self.folder(upload_id)
        self._load(upload_id)  # drops temporary files a restart left behind: they are not part of the model
        with self._lock:
            if upload_id in self._sealed:
                raise Conflict(f"upload {upload_id} is already being published; follow it on GET /publishes")
            if self._arriving(upload_id):
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
        with self._lock:
            self._sealed.discard(upload_id)
            self._uploads.pop(upload_id, None)

    def discard(self, upload_id: str) -> None:
        """``DELETE /store/uploads/{id}``: drop an upload that is not being published."""
        self.folder(upload_id)
        with self._lock:
            if upload_id in self._sealed:
                raise Conflict(f"upload {upload_id} is being published; it is removed when the publish ends")
            if self._arriving(upload_id):
                raise Conflict(f"upload {upload_id} has a file arriving; drop it once every PUT has answered")
            self._uploads.pop(upload_id, None)
        shutil.rmtree(self.root / upload_id, ignore_errors=True)

    def _remove_expired(self) -> None:
        now = self.clock.time()
        for folder in self.root.iterdir():
            with self._lock:
                busy = folder.name in self._sealed or self._arriving(folder.name)
            if busy or not _ID.fullmatch(folder.name):
                continue
            try:
                age = now - folder.stat().st_mtime
            except OSError:
                continue
            if age > UPLOAD_TTL_S:
                log.info("removing upload %s, left unpublished for %.0f h", folder.name, age / 3600)
                shutil.rmtree(folder, ignore_errors=True)
                with self._lock:
                    self._uploads.pop(folder.name, None)


def _clash(rel_path: str, others: list[str]) -> str | None:
    """Another path of the upload that is a folder of ``rel_path``, or has it as a folder."""
    for other in others:
        if other != rel_path and (other.startswith(rel_path + "/") or rel_path.startswith(other + "/")):
            return other
    return None


def _open_new(folder: Path, target: Path, tmp: Path) -> BinaryIO:
    """Create the folders up to ``target`` (none may be a symlink) and open ``tmp`` new, never through a link."""
    here = folder
    for part in target.relative_to(folder).parts[:-1]:
        here = here / part
        try:
            here.mkdir()
        except FileExistsError:
            if here.is_symlink() or not here.is_dir():
                raise Conflict(f"{here.relative_to(folder)} in the upload is not a folder; it cannot hold "
                               f"{target.relative_to(folder)}") from None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "wb")


def _write(out: BinaryIO, digest: hashlib._Hash, data: bytes) -> None:
    digest.update(data)
    out.write(data)


def _close(out: BinaryIO) -> None:
    """Flush and fsync: a file acknowledged with its digest is on disk before it is renamed into place."""
    out.flush()
    os.fsync(out.fileno())
    out.close()


def _rename(tmp: Path, target: Path) -> None:
    if target.is_symlink() or target.is_dir():
        raise Conflict(f"{target.name} exists in the upload as a folder; it cannot be replaced by a file")
    os.replace(tmp, target)
    fsync_dir(target.parent)
