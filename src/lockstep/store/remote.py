"""The trainer's model store seen over HTTP, for replicas without a shared volume.

``get`` fetches a version's MANIFEST.json from the trainer (``GET /store/versions/<N>/manifest``);
``path_of`` downloads the version's files once into a local cache (``<cache>/<NNNNNN>/``), checking each
file's size and sha256 against the MANIFEST while it streams, and renames the folder into place only when
every file matched. A corrupted or truncated download is refused (VerificationError naming the file), so
the replica reports a failed stage and loads nothing. ``verify`` re-checks a cached copy before it is loaded.

The trainer is the authority: a cached copy whose MANIFEST digest differs from the trainer's (a trainer whose
data folder was reset numbers its versions again) is replaced, never loaded.

The cache is bounded: after each download it keeps the ``keep`` (LOCKSTEP_KEEP_VERSIONS) versions used most
recently (a cache hit or a download marks a version used by touching its folder, so the order survives a
restart), which include the one being staged and the one served, and removes the rest, the partial downloads
of a crash and unfinished deletions.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
from filelock import FileLock

from lockstep.core.atomic import fsync_dir
from lockstep.core.errors import LoadError, NotFound, Unauthorized, VerificationError
from lockstep.core.http import bearer_headers
from lockstep.store.manifest import CHUNK_BYTES, MANIFEST_NAME, Manifest, content_digest, verify_dir
from lockstep.store.model_store import version_name

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0  # seconds between progress lines of a long download
TIMEOUT = httpx.Timeout(30.0, connect=10.0)  # per read: a stalled transfer fails instead of hanging a stage
_PARTIAL = ".partial-"
_TRASH = ".trash-"


class RemoteStore:
    """Read-only store: MANIFESTs and files from the trainer, cached under ``cache_dir``."""

    def __init__(self, base_url: str, cache_dir: Path, *, token: str | None = None, keep: int = 5,
                 client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.keep = max(1, keep)
        self.client = client or httpx.Client(timeout=TIMEOUT, headers=bearer_headers(token), follow_redirects=False)
        self._lock = threading.Lock()  # one download at a time (loads are serialized anyway)
        self._file_lock = FileLock(str(self.cache_dir.parent / f".{self.cache_dir.name}.lock"))  # and per host
        self._fresh: set[int] = set()  # verified while downloading in this process: verify() need not rehash

    @property
    def root(self) -> str:
        return self.base_url

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ the trainer's answers
    def _get(self, path: str, *, stream: bool = False) -> httpx.Response:
        url = f"{self.base_url}{path}"
        try:
            request = self.client.build_request("GET", url)
            response = self.client.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise LoadError(f"cannot reach the trainer at {self.base_url} for {path} ({exc}); check "
                            "LOCKSTEP_COORDINATOR_URL and that the trainer is up") from exc
        if response.status_code == 200:
            return response
        if stream:
            response.read()
        message = _error_message(response)
        if response.status_code == 401:
            raise Unauthorized(f"the trainer refused {path} (401: {message}); give the replica the trainer's "
                               "LOCKSTEP_API_TOKEN")
        if response.status_code == 404:
            raise NotFound(f"the trainer at {self.base_url} has no {path}: {message}")
        raise LoadError(f"the trainer answered {response.status_code} for {path}: {message}")

    def get(self, n: int) -> Manifest:
        """The MANIFEST of version ``n``, from the trainer."""
        response = self._get(f"/store/versions/{n}/manifest")
        try:
            manifest = Manifest.from_json(response.content)
        except ValueError as exc:
            raise VerificationError(f"the trainer's MANIFEST.json of version {n} is not valid: {exc}") from exc
        if manifest.version != n:
            raise VerificationError(f"the trainer answered the MANIFEST of version {manifest.version} for {n}")
        return manifest

    # ------------------------------------------------------------------ the local copy
    def _cached(self, n: int) -> Manifest | None:
        try:
            return Manifest.from_json((self.cache_dir / version_name(n) / MANIFEST_NAME).read_bytes())
        except (OSError, ValueError):
            return None

    def path_of(self, n: int) -> Path:
        """The local folder of version ``n``, downloaded and verified first unless a matching copy is cached."""
        manifest = self.get(n)
        if manifest.kind == "repo":
            raise NotFound(f"version {n} records repo {manifest.repo_id}@{manifest.revision}; its files come from "
                           "the Hugging Face Hub, not from the trainer")
        target = self.cache_dir / version_name(n)
        with self._locked():
            cached = self._cached(n)
            if cached is not None and cached.digest == manifest.digest:
                _touch(target)  # used now: the last one pruning removes
                return target
            if cached is not None or target.exists():
                log.warning("cached version %d (digest %s) differs from the trainer's (%s); downloading again",
                            n, cached.digest[:12] if cached else "unreadable", manifest.digest[:12])
                _remove(target, self.cache_dir)
            self._download(manifest, target)
            self._fresh.add(n)
            self._prune(keep_also=n)
        return target

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's lock, then the host's: replicas sharing a cache folder never download into each other."""
        self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, self._file_lock:
            yield

    def verify(self, n: int, files_dir: Path | None = None) -> Manifest:
        """Hash-check a local copy of version ``n`` (the cached download by default) against its MANIFEST."""
        cached_path = self.cache_dir / version_name(n)
        folder = Path(files_dir) if files_dir is not None else cached_path
        manifest = (self._cached(n) if folder == cached_path else None) or self.get(n)
        with self._lock:
            fresh = n in self._fresh
            self._fresh.discard(n)
        if not fresh:  # a copy verified while it streamed in is not hashed a second time
            verify_dir(folder, manifest)
        return manifest

    def _download(self, manifest: Manifest, target: Path) -> None:
        """Stream every file into a temporary folder, checking size and sha256; rename into place at the end."""
        n = manifest.version
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = self.cache_dir / f"{_PARTIAL}{version_name(n)}-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        total = manifest.total_size
        done = 0
        started = last = time.monotonic()
        log.info("downloading version %d from %s: %d files, %.1f MiB", n, self.base_url, len(manifest.files),
                 total / 2**20)
        try:
            for entry in sorted(manifest.files, key=lambda f: f.path):
                path = partial / entry.path
                path.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                size = 0
                response = self._get(f"/store/versions/{n}/files/{quote(entry.path)}", stream=True)
                try:
                    with open(path, "xb") as out:
                        for chunk in response.iter_bytes(CHUNK_BYTES):
                            out.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                            done += len(chunk)
                            if size > entry.size:
                                break  # longer than the MANIFEST says: no need to read the rest
                            now = time.monotonic()
                            if now - last >= PROGRESS_EVERY_S:
                                last = now
                                log.info("downloading version %d: %.1f/%.1f MiB (%.0f%%), %.1f MiB/s", n,
                                         done / 2**20, total / 2**20, 100 * done / max(total, 1),
                                         done / 2**20 / max(now - started, 1e-6))
                        out.flush()
                        os.fsync(out.fileno())
                except httpx.HTTPError as exc:
                    raise VerificationError(f"version {n}: the download of {entry.path} broke off after {size} "
                                            f"of {entry.size} bytes ({exc})") from exc
                finally:
                    response.close()
                if size != entry.size:
                    raise VerificationError(f"version {n}: downloaded {entry.path} has size "
                                            f"{size if size <= entry.size else f'over {entry.size}'} bytes, "
                                            f"MANIFEST.json says {entry.size}; the download is refused")
                if digest.hexdigest() != entry.sha256:
                    raise VerificationError(f"version {n}: downloaded {entry.path} has sha256 {digest.hexdigest()}, "
                                            f"MANIFEST.json says {entry.sha256}; the download is refused")
            (partial / MANIFEST_NAME).write_bytes(manifest.to_json())
            if content_digest(manifest.files) != manifest.digest:
                raise VerificationError(f"version {n}: MANIFEST.json digest {manifest.digest} does not match its "
                                        "own file list; the manifest was altered")
            fsync_dir(partial)
            os.rename(partial, target)
            fsync_dir(self.cache_dir)
        except BaseException:
            _remove(partial, self.cache_dir)
            raise
        seconds = time.monotonic() - started
        log.info("downloaded version %d: %.1f MiB in %.1fs (%.1f MiB/s), every file verified", n, total / 2**20,
                 seconds, total / 2**20 / max(seconds, 1e-6))

    def _prune(self, keep_also: int) -> None:
        """Keep the ``keep`` versions used most recently (and ``keep_also``); remove the others, the partials of
        downloads that died and unfinished deletions (the caller holds the locks: no download is running)."""
        try:
            names = sorted(p.name for p in self.cache_dir.iterdir())
        except OSError:
            return
        used: list[tuple[float, int]] = []  # (last use, version)
        for name in names:
            if name.isdigit() and name == version_name(int(name)):
                with contextlib.suppress(OSError):
                    used.append((os.lstat(self.cache_dir / name).st_mtime, int(name)))
        keep = {v for _, v in sorted(used)[-self.keep:]} | {keep_also}
        for _, v in sorted(used, key=lambda u: u[1]):
            if v not in keep:
                log.info("removing cached version %d (keeping the %d used last: LOCKSTEP_KEEP_VERSIONS)", v,
                         self.keep)
                _remove(self.cache_dir / version_name(v), self.cache_dir)
        for name in names:
            if name.startswith(_PARTIAL):
                _remove(self.cache_dir / name, self.cache_dir)
            elif name.startswith(_TRASH):
                shutil.rmtree(self.cache_dir / name, ignore_errors=True)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


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
