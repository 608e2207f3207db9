"""VersionCache: a replica's local copies of versions, assembled from the chunks it holds, its peers and the origin.

A version stored as chunks (``Manifest.stored == "chunks"``) is assembled into ``<cache>/<NNNNNN>/``:

* each chunk it already holds, in a version it serves or keeps, is copied from there (source ``local``);
* each other chunk comes from the first of the peers the coordinator named for this version that holds it
  (``peer``), else from the origin: the shared folder's chunk store or the trainer (``origin``);
* every chunk is checked against its sha256 before it is written; a peer that sends wrong, truncated or no
  bytes is counted and not asked again during this transfer;
* the folder is renamed into place, MANIFEST.json last, only when every chunk is there. The served version's
  folder is never written to, so a stage that fails leaves nothing to undo.

While it assembles, the cache serves the chunks it has verified to its own peers (``wait_chunk``): a peer
asking for a chunk that is on its way waits for it, so a chain of replicas streams a version like a pipeline.

A version stored as files (format 1 MANIFESTs, repo records) is read in place from a shared folder, or
downloaded file by file from the trainer, as before. The cache keeps the ``keep`` versions used most recently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import httpx
from filelock import FileLock

from lockstep.core.atomic import fsync_dir, open_regular, read_regular
from lockstep.core.errors import LoadError, NotFound, VerificationError
from lockstep.core.numbers import parse_decimal
from lockstep.store.chunks import ChunkEntry
from lockstep.store.manifest import MANIFEST_NAME, FileEntry, Manifest, verify_dir
from lockstep.store.model_store import ModelStore, version_name

log = logging.getLogger(__name__)

Source = Literal["local", "peer", "origin"]
SOURCES: tuple[Source, ...] = ("local", "peer", "origin")
PEER_TIMEOUT = httpx.Timeout(20.0, connect=2.0)  # a peer waits for a chunk still on its way to it
# A chunk's whole answer: the peer's wait for a chunk on its way to it (30 s at most), then its bytes at no less
# than this rate. A peer slower than that is passed over for the next one, or the origin.
PEER_WAIT_S = 30.0
PEER_MIN_BYTES_PER_S = 1 << 20
PEER_PATH = "/peer/chunks/"
FETCH_WINDOW = 4  # chunks in flight per transfer: keeps the link busy across each request's round trip
SPACE_MARGIN_BYTES = 64 << 20  # left free beside a new version, for logs and temporaries
_PARTIAL = ".partial-"
PARTIAL_MANIFEST = ".MANIFEST.json"  # what an assembly in progress is making, for the process after a crash
_TRASH = ".trash-"


class Origin(Protocol):
    """Where versions come from when no peer has them: the shared folder's store or the trainer."""

    where: str

    def get(self, n: int) -> Manifest: ...

    def read_chunk(self, manifest: Manifest, chunk: ChunkEntry) -> bytes: ...

    def files_folder(self, manifest: Manifest) -> Path | None: ...

    def download_files(self, manifest: Manifest, folder: Path) -> None: ...


class PeerRefused(Exception):
    """A peer did not give a chunk: ``reason`` is ``missing`` (404), ``down`` (unreachable), ``refused`` (another
    status), ``slow`` (not whole in time) or ``digest`` (more bytes than the chunk has)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Transfer:
    """One version being assembled: what the fleet view shows while it stages."""

    version: int
    total_bytes: int
    started: float
    done_bytes: int = 0
    by_source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    avoided: dict[str, str] = field(default_factory=dict)  # peer URL → why it is not asked again
    finished: bool = False
    failed: str | None = None  # why the assembly stopped short (out of space, no source had a chunk...)

    def report(self) -> dict[str, object]:
        return {"version": self.version, "total_bytes": self.total_bytes, "done_bytes": self.done_bytes,
                "bytes_by_source": dict(self.by_source), "avoided_peers": len(self.avoided),
                "finished": self.finished, "failed": self.failed}


@dataclass(frozen=True)
class _Held:
    """Where a verified chunk lies on this replica's disk."""

    path: Path
    offset: int
    size: int


class VersionCache:
    """The replica's versions on local disk (a ``VersionSource``), and the chunks it re-serves to peers."""

    def __init__(self, origin: Origin, cache_dir: Path, *, keep: int = 5, token: str | None = None,
                 peer_client: httpx.Client | None = None, window: int = FETCH_WINDOW,
                 on_fetched: Callable[[Source, int], None] | None = None,
                 on_bad_chunk: Callable[[str], None] | None = None,
                 on_transfer: Callable[[float], None] | None = None) -> None:
        self.origin = origin
        self.cache_dir = Path(cache_dir)
        self.keep = max(2, keep)  # the version served and the one staged, at least
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.peer_client = peer_client or httpx.Client(timeout=PEER_TIMEOUT, headers=headers, follow_redirects=False)
        self.window = max(1, window)
        self.on_fetched, self.on_bad_chunk, self.on_transfer = on_fetched, on_bad_chunk, on_transfer
        self._lock = threading.Lock()  # one assembly at a time in this process
        self._file_lock = FileLock(str(_beside(self.cache_dir, ".lock")))  # and on this host
        self._index = threading.Condition()  # guards everything below; notified when a chunk lands
        self._held: dict[str, _Held] = {}
        self._indexed = False
        self._planned: set[str] = set()  # chunks of the assembly in progress
        self._assembling = False
        self._peers: dict[int, list[str]] = {}  # version → peers to ask first, nearest first
        self._fresh: set[int] = set()  # assembled in this process: verify() need not rehash
        self.transfer: Transfer | None = None
        # The versions the replica serves, has staged or still finishes requests on: never pruned (their copies
        # are what a diff is assembled from, and what the coordinator tells peers this replica holds).
        self.in_use: Callable[[], Collection[int]] = tuple

    @property
    def root(self) -> str:
        return self.origin.where

    def close(self) -> None:
        self.peer_client.close()

    # ------------------------------------------------------------------ VersionSource
    def get(self, n: int) -> Manifest:
        return self.origin.get(n)

    def suggest_peers(self, n: int, urls: list[str]) -> None:
        """Ask these peers first (nearest first) for version ``n``'s chunks; the origin stays the fallback."""
        with self._index:
            self._peers[n] = list(dict.fromkeys(u.rstrip("/") for u in urls))
            for old in sorted(self._peers)[:-4]:  # a few versions' hints at most
                del self._peers[old]

    def path_of(self, n: int) -> Path:
        """A local folder with version ``n``'s files, assembled (and verified) first unless one is cached."""
        manifest = self.origin.get(n)
        if manifest.kind == "repo":
            raise NotFound(f"version {n} records repo {manifest.repo_id}@{manifest.revision}; its files come from "
                           "the Hugging Face Hub, not from the store")
        in_place = self.origin.files_folder(manifest)
        if in_place is not None:
            return in_place
        target = self.cache_dir / version_name(n)
        with self._locked():
            cached = self._cached(n)
            if cached is not None and cached.digest == manifest.digest:
                _touch(target)
                return target
            if cached is not None or target.exists():
                log.warning("cached version %d (digest %s) differs from %s's (%s); assembling it again", n,
                            cached.digest[:12] if cached else "unreadable", self.origin.where, manifest.digest[:12])
                self._forget(target)
                _remove(target, self.cache_dir)
            if not self._has_room(manifest):
                self._prune(keep_also=None, room_for=1)  # the least recently used copies make room
                try:
                    self._check_space(manifest)
                except LoadError as exc:  # the fleet view and GET /status say why this version did not arrive
                    with self._index:
                        self.transfer = Transfer(n, manifest.total_size, time.monotonic(), finished=True,
                                                 failed=str(exc)[:500])
                    raise
            if manifest.stored == "chunks":
                self._assemble(manifest, target)
            else:
                self._download(manifest, target)
            with self._index:
                self._fresh.add(n)
            self._prune(keep_also=n)
        return target

    def verify(self, n: int, files_dir: Path | None = None) -> Manifest:
        """Hash-check a local copy of version ``n`` (a copy assembled by this process was checked chunk by chunk)."""
        cached_path = self.cache_dir / version_name(n)
        folder = Path(files_dir) if files_dir is not None else cached_path
        manifest = (self._cached(n) if folder == cached_path else None) or self.origin.get(n)
        with self._index:
            fresh = n in self._fresh and folder == cached_path
            self._fresh.discard(n)
        if not fresh:
            verify_dir(folder, manifest)
        return manifest

    # ------------------------------------------------------------------ serving peers
    @property
    def assembling(self) -> bool:
        """Whether a version is being assembled here now (its chunks may be asked for before they arrive)."""
        return self._assembling

    def wait_chunk(self, sha256: str, timeout_s: float) -> _Held | None:
        """Where chunk ``sha256`` lies here, waiting while it is on its way (an assembly in progress lists it)."""
        deadline = time.monotonic() + timeout_s
        with self._index:
            self._build_index()
            while True:
                held = self._held.get(sha256)
                if held is not None:
                    return held
                left = deadline - time.monotonic()
                if left <= 0 or (self._assembling and sha256 not in self._planned):
                    return None
                if not self._assembling:
                    left = min(left, 2.0)  # a stage may be about to start here (the coordinator posts to all at once)
                    if not self._index.wait(left) and not self._assembling:
                        return None
                    continue
                self._index.wait(left)

    def read_held(self, sha256: str, timeout_s: float) -> bytes | None:
        """The bytes of a chunk held here (waiting while it is on its way), or None; read from disk, unchecked."""
        for _ in range(3):  # a rename into place between lookup and read moves the file: look again
            held = self.wait_chunk(sha256, timeout_s)
            if held is None:
                return None
            try:
                with open_regular(held.path) as f:
                    return os.pread(f.fileno(), held.size, held.offset)
            except FileNotFoundError:
                continue
            except OSError:
                return None  # not a regular file any more: not served from here
        return None

    # ------------------------------------------------------------------ assembling
    def _assemble(self, manifest: Manifest, target: Path) -> None:
        n = manifest.version
        chunks = manifest.chunk_list()
        partial = self.cache_dir / f"{_PARTIAL}{version_name(n)}-{uuid.uuid4().hex[:8]}"
        partial.mkdir(parents=True)
        transfer = Transfer(n, manifest.total_size, time.monotonic())
        with self._index:
            self._build_index()
            peers = list(self._peers.get(n, []))
            self._planned = {c.sha256 for _, c in chunks}
            self._assembling = True
            self.transfer = transfer
            self._index.notify_all()
        log.info("assembling version %d: %d files, %d chunks, %.1f MiB (peers: %s)", n, len(manifest.files),
                 len(chunks), manifest.total_size / 2**20, ", ".join(peers) or "none")
        fds: dict[str, int] = {}
        try:
            # Written first: after a crash, the chunks that made it here are found again (each is checked when read).
            (partial / PARTIAL_MANIFEST).write_bytes(manifest.to_json())
            for entry in manifest.files:
                path = partial / entry.path
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                fds[entry.path] = fd
                os.ftruncate(fd, entry.size)
            first: dict[str, tuple[FileEntry, ChunkEntry]] = {}
            repeats: list[tuple[FileEntry, ChunkEntry, str]] = []
            for entry, chunk in chunks:
                if chunk.sha256 in first:
                    repeats.append((entry, chunk, chunk.sha256))  # the same bytes twice in one version
                else:
                    first[chunk.sha256] = (entry, chunk)
            pool = ThreadPoolExecutor(self.window, thread_name_prefix=f"assemble-{n}")
            try:
                futures = [pool.submit(self._place, manifest, partial, fds, entry, chunk, peers, transfer)
                           for entry, chunk in first.values()]  # in manifest order: a chain streams in order
                for future in futures:
                    future.result()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # after a failure, nothing more is fetched
            for entry, chunk, sha in repeats:
                source_entry, source_chunk = first[sha]
                data = os.pread(fds[source_entry.path], source_chunk.size, source_chunk.offset)
                os.pwrite(fds[entry.path], data, chunk.offset)
            for fd in fds.values():
                os.fsync(fd)
            (partial / MANIFEST_NAME).write_bytes(manifest.to_json())
            (partial / PARTIAL_MANIFEST).unlink()
            fsync_dir(partial)
            with self._index:
                os.rename(partial, target)
                self._repoint(partial, target)
            fsync_dir(self.cache_dir)
        except BaseException as exc:
            with self._index:
                self._forget(partial)
                transfer.failed = str(exc)[:500] or type(exc).__name__
            _remove(partial, self.cache_dir)
            raise
        finally:
            for fd in fds.values():
                os.close(fd)
            with self._index:
                self._assembling = False
                self._planned = set()
                transfer.finished = True
                self._index.notify_all()
        seconds = time.monotonic() - transfer.started
        if self.on_transfer is not None:
            self.on_transfer(seconds)
        log.info("assembled version %d in %.2fs: %s, every chunk verified", n, seconds,
                 ", ".join(f"{transfer.by_source[s] / 2**20:.1f} MiB {s}" for s in SOURCES))

    def _place(self, manifest: Manifest, partial: Path, fds: dict[str, int], entry: FileEntry, chunk: ChunkEntry,
               peers: list[str], transfer: Transfer) -> None:
        """Get one chunk's verified bytes from the nearest place that has them and write them into the new copy."""
        data, source = self._obtain(manifest, chunk, peers, transfer)
        os.pwrite(fds[entry.path], data, chunk.offset)
        with self._index:
            # A chunk held already keeps its place: the new copy may yet fail and be removed.
            self._held.setdefault(chunk.sha256, _Held(partial / entry.path, chunk.offset, chunk.size))
            transfer.done_bytes += chunk.size
            transfer.by_source[source] += chunk.size
            self._index.notify_all()
        if self.on_fetched is not None:
            self.on_fetched(source, chunk.size)

    def _obtain(self, manifest: Manifest, chunk: ChunkEntry, peers: list[str],
                transfer: Transfer) -> tuple[bytes, Source]:
        with self._index:
            local = self._held.get(chunk.sha256)
        if local is not None:
            with contextlib.suppress(OSError):
                with open_regular(local.path) as f:
                    data = os.pread(f.fileno(), local.size, local.offset)
                if chunk.matches(data):
                    return data, "local"
            log.warning("version %d: local copy of chunk %s no longer matches; fetching it", manifest.version,
                        chunk.sha256[:12])
            with self._index:  # neither this replica nor its peers take that copy again; the fetched one replaces it
                if self._held.get(chunk.sha256) == local:
                    del self._held[chunk.sha256]
        for peer in peers:
            if peer in transfer.avoided:
                continue
            try:
                data = self._from_peer(peer, manifest.version, chunk)
            except PeerRefused as refused:
                self._avoid(transfer, peer, refused.reason, str(refused))
                continue
            if chunk.matches(data):
                return data, "peer"
            reason = "truncated" if len(data) < chunk.size else "digest"
            self._avoid(transfer, peer, reason, f"sent {len(data)} bytes that do not match chunk {chunk.sha256[:12]}")
        try:
            data = self.origin.read_chunk(manifest, chunk)
        except OSError as exc:
            raise LoadError(f"version {manifest.version}: cannot read chunk {chunk.sha256[:12]} from "
                            f"{self.origin.where} ({exc})") from exc
        if not chunk.matches(data):
            raise VerificationError(f"version {manifest.version}: chunk {chunk.sha256[:12]} from "
                                    f"{self.origin.where} does not match its sha256; the stage is refused")
        return data, "origin"

    def _from_peer(self, peer: str, version: int, chunk: ChunkEntry) -> bytes:
        """The bytes a peer sends for ``chunk``: never more than the chunk has, and whole within the time its size
        allows (httpx's timeout bounds each read only, so a peer dripping a byte a second would hold the stage)."""
        url = f"{peer}{PEER_PATH}{chunk.sha256}"
        allowed_s = PEER_WAIT_S + chunk.size / PEER_MIN_BYTES_PER_S
        deadline = time.monotonic() + allowed_s
        data = bytearray()
        receiving = False
        try:
            with self.peer_client.stream("GET", url, params={"version": version}) as response:
                if response.status_code == 404:
                    raise PeerRefused("missing", "does not hold it")
                if response.status_code != 200:
                    raise PeerRefused("refused", f"answered {response.status_code}")
                receiving = True
                for part in response.iter_bytes():
                    data += part
                    if len(data) > chunk.size:
                        raise PeerRefused("digest", f"sent more than the {chunk.size} bytes of chunk "
                                                    f"{chunk.sha256[:12]}")
                    if time.monotonic() > deadline:
                        raise PeerRefused("slow", f"sent {len(data)} of the {chunk.size} bytes of chunk "
                                                  f"{chunk.sha256[:12]} within {allowed_s:.0f} s")
        except httpx.HTTPError as exc:
            if receiving:  # it said 200, then the body stopped short of what it announced
                raise PeerRefused("truncated", f"cut chunk {chunk.sha256[:12]} off after {len(data)} of its "
                                               f"{chunk.size} bytes ({type(exc).__name__})") from exc
            raise PeerRefused("down", f"unreachable ({type(exc).__name__})") from exc
        return bytes(data)

    def _avoid(self, transfer: Transfer, peer: str, reason: str, detail: str) -> None:
        with self._index:
            if peer in transfer.avoided:
                return
            transfer.avoided[peer] = reason
        log.warning("version %d: peer %s %s; not asking it again for this version", transfer.version, peer, detail)
        if self.on_bad_chunk is not None:
            self.on_bad_chunk(reason)

    def _download(self, manifest: Manifest, target: Path) -> None:
        """A version stored as files: the origin's file-by-file download into a partial folder, renamed at the end."""
        partial = self.cache_dir / f"{_PARTIAL}{version_name(manifest.version)}-{uuid.uuid4().hex[:8]}"
        partial.mkdir(parents=True)
        try:
            self.origin.download_files(manifest, partial)
            (partial / MANIFEST_NAME).write_bytes(manifest.to_json())
            fsync_dir(partial)
            os.rename(partial, target)
            fsync_dir(self.cache_dir)
        except BaseException:
            _remove(partial, self.cache_dir)
            raise
        with self._index:
            self._add_version(target, manifest)

    # ------------------------------------------------------------------ the index of held chunks
    def _build_index(self) -> None:
        """Read the cached versions' MANIFESTs once (the caller holds ``_index``)."""
        if self._indexed:
            return
        self._indexed = True
        with contextlib.suppress(OSError):
            for folder in sorted(self.cache_dir.iterdir()):
                if (n := parse_decimal(folder.name)) is not None:
                    manifest = self._cached(n)
                    if manifest is not None and manifest.stored == "chunks":
                        self._add_version(folder, manifest)
            for folder in sorted(self.cache_dir.glob(f"{_PARTIAL}*")):
                # A stage a crash cut off: what it wrote is used again (checked when read), then the folder goes.
                with contextlib.suppress(OSError, ValueError):
                    self._add_version(folder, Manifest.from_json((folder / PARTIAL_MANIFEST).read_bytes()))

    def _add_version(self, folder: Path, manifest: Manifest) -> None:
        for entry, chunk in manifest.chunk_list():
            self._held.setdefault(chunk.sha256, _Held(folder / entry.path, chunk.offset, chunk.size))

    def _repoint(self, old: Path, new: Path) -> None:
        for sha, held in list(self._held.items()):
            if held.path.is_relative_to(old):
                self._held[sha] = _Held(new / held.path.relative_to(old), held.offset, held.size)

    def _forget(self, folder: Path) -> None:
        """Drop the chunks that lay in ``folder`` (removed), then find again those another kept version holds."""
        gone = [sha for sha, held in self._held.items() if held.path.is_relative_to(folder)]
        for sha in gone:
            del self._held[sha]
        if gone:
            with contextlib.suppress(OSError):
                for other in sorted(self.cache_dir.iterdir()):
                    n = parse_decimal(other.name) if other != folder else None
                    manifest = self._cached(n) if n is not None else None
                    if manifest is not None and manifest.stored == "chunks":
                        self._add_version(other, manifest)

    # ------------------------------------------------------------------ the cache folder
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with self._lock, self._file_lock:
            yield

    def _cached(self, n: int) -> Manifest | None:
        try:
            return Manifest.from_json((self.cache_dir / version_name(n) / MANIFEST_NAME).read_bytes())
        except (OSError, ValueError):
            return None

    def _has_room(self, manifest: Manifest) -> bool:
        return shutil.disk_usage(self.cache_dir).free >= manifest.total_size + SPACE_MARGIN_BYTES

    def _check_space(self, manifest: Manifest) -> None:
        if not self._has_room(manifest):
            free = shutil.disk_usage(self.cache_dir).free
            raise LoadError(f"no room for version {manifest.version} in {self.cache_dir}: it needs "
                            f"{manifest.total_size / 2**20:.1f} MiB (+{SPACE_MARGIN_BYTES >> 20} MiB margin), "
                            f"{free / 2**20:.1f} MiB are free; give the volume more space or keep fewer versions "
                            "(LOCKSTEP_KEEP_VERSIONS). The served version keeps serving")

    def _prune(self, keep_also: int | None, room_for: int = 0) -> None:
        """Keep the versions used most recently (``keep`` less ``room_for``), ``keep_also`` and those ``in_use``;
        remove the rest."""
        try:
            names = sorted(p.name for p in self.cache_dir.iterdir())
        except OSError:
            return
        used: list[tuple[float, int]] = []
        for name in names:
            if (n := parse_decimal(name)) is not None and name == version_name(n):
                with contextlib.suppress(OSError):
                    used.append((os.lstat(self.cache_dir / name).st_mtime, n))
        kept = max(1, self.keep - room_for)
        keep = ({v for _, v in sorted(used)[-kept:]} | ({keep_also} if keep_also is not None else set())
                | set(self.in_use()))
        for _, v in sorted(used, key=lambda u: u[1]):
            if v not in keep:
                log.info("removing cached version %d (keeping the %d used last: LOCKSTEP_KEEP_VERSIONS)", v, kept)
                with self._index:
                    self._forget(self.cache_dir / version_name(v))
                _remove(self.cache_dir / version_name(v), self.cache_dir)
        for name in names:
            if name.startswith(_PARTIAL):
                _remove(self.cache_dir / name, self.cache_dir)
            elif name.startswith(_TRASH):
                shutil.rmtree(self.cache_dir / name, ignore_errors=True)


class FolderOrigin:
    """The shared folder's store as an origin: chunks from its ``chunks/``, format-1 versions read in place."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.where = f"the store at {store.root}"

    def get(self, n: int) -> Manifest:
        return self.store.get(n)

    def read_chunk(self, manifest: Manifest, chunk: ChunkEntry) -> bytes:
        return read_regular(self.store.chunks.path(chunk.sha256))

    def files_folder(self, manifest: Manifest) -> Path | None:
        return self.store.path_of(manifest.version) if manifest.stored == "files" else None

    def download_files(self, manifest: Manifest, folder: Path) -> None:
        raise AssertionError("a shared folder's versions stored as files are read in place")


def _beside(cache_dir: Path, suffix: str) -> Path:
    """``.<cache folder><suffix>`` in the cache folder's parent: its host lock, its origin mark."""
    return cache_dir.parent / f".{cache_dir.name}{suffix}"


def mark_origin(cache_dir: Path, origin_root: Path) -> None:
    """Record beside ``cache_dir`` the store folder its versions come from (``prune_orphans`` reads it)."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    _beside(cache_dir, ".store").write_text(str(origin_root.resolve()))


def prune_orphans(parent: Path) -> None:
    """Remove the cache folders in ``parent`` whose marked store folder is gone; unmarked ones are left alone."""
    for mark in parent.glob(".*.store"):
        try:
            root = Path(mark.read_text().strip())
        except OSError:
            continue
        if root.exists():
            continue
        cache_dir = parent / mark.name[1:-len(".store")]
        shutil.rmtree(cache_dir, ignore_errors=True)
        _beside(cache_dir, ".lock").unlink(missing_ok=True)
        mark.unlink(missing_ok=True)


def _touch(path: Path) -> None:
    """Mark a cached version used now (its folder's mtime orders pruning)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _remove(path: Path, cache_dir: Path) -> None:
    """Rename out of sight, then delete: no half-removed version is ever seen as cached."""
    trash = cache_dir / f"{_TRASH}{uuid.uuid4().hex[:8]}"
    with contextlib.suppress(OSError):
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
