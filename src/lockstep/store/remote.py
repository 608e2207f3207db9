"""The trainer's model store seen over HTTP, for replicas without a shared volume.

``TrainerOrigin`` asks the trainer for a version's MANIFEST.json (``GET /store/versions/<N>/manifest``), its
chunks (``GET /store/versions/<N>/chunks/<sha256>``), or, for a version stored as files, each file
(``GET /store/versions/<N>/files/<path>``, checked for size and sha256 while it streams).
``RemoteStore`` is the replica's ``VersionCache`` in front of it: a version is assembled from the chunks the
replica holds, its peers and the trainer, every chunk verified (``lockstep.store.version_cache``).

The trainer is the authority: a cached copy whose MANIFEST digest differs from the trainer's (a trainer whose
data folder was reset numbers its versions again) is replaced, never loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from lockstep.core.errors import LoadError, NotFound, Unauthorized, VerificationError
from lockstep.core.http import bearer_headers
from lockstep.store.chunks import ChunkEntry
from lockstep.store.manifest import CHUNK_BYTES, Manifest
from lockstep.store.version_cache import VersionCache

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0  # seconds between progress lines of a long download
TIMEOUT = httpx.Timeout(30.0, connect=10.0)  # per read: a stalled transfer fails instead of hanging a stage


class TrainerOrigin:
    """The trainer's store over HTTP: MANIFESTs, chunks and (format 1) files."""

    def __init__(self, base_url: str, *, token: str | None = None, client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.where = f"the trainer at {self.base_url}"
        self.client = client or httpx.Client(timeout=TIMEOUT, headers=bearer_headers(token), follow_redirects=False)

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

    def read_chunk(self, manifest: Manifest, chunk: ChunkEntry) -> bytes:
        return self._get(f"/store/versions/{manifest.version}/chunks/{chunk.sha256}").content

    def files_folder(self, manifest: Manifest) -> Path | None:
        return None

    def download_files(self, manifest: Manifest, folder: Path) -> None:
        """Stream every file of a version stored as files into ``folder``, checking size and sha256."""
        n = manifest.version
        total = manifest.total_size
        done = 0
        started = last = time.monotonic()
        log.info("downloading version %d from %s: %d files, %.1f MiB", n, self.base_url, len(manifest.files),
                 total / 2**20)
        for entry in sorted(manifest.files, key=lambda f: f.path):
            path = folder / entry.path
            path.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            size = 0
            response = self._get(f"/store/versions/{n}/files/{quote(entry.path)}", stream=True)
            try:
                with open(path, "xb") as out:
                    for data in response.iter_bytes(CHUNK_BYTES):
                        out.write(data)
                        digest.update(data)
                        size += len(data)
                        done += len(data)
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
        seconds = time.monotonic() - started
        log.info("downloaded version %d: %.1f MiB in %.1fs (%.1f MiB/s), every file verified", n, total / 2**20,
                 seconds, total / 2**20 / max(seconds, 1e-6))


class RemoteStore(VersionCache):
    """A replica's versions from the trainer (and its peers), assembled and verified into ``cache_dir``."""

    def __init__(self, base_url: str, cache_dir: Path, *, token: str | None = None, keep: int = 5,
                 client: httpx.Client | None = None, **options: Any) -> None:
        self.trainer = TrainerOrigin(base_url, token=token, client=client)
        super().__init__(self.trainer, cache_dir, keep=keep, token=token, **options)

    @property
    def base_url(self) -> str:
        return self.trainer.base_url

    def close(self) -> None:
        self.trainer.client.close()
        super().close()


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase
