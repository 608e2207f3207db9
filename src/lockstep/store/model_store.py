"""ModelStore: versions published atomically as ``versions/<NNNNNN>/``, unique numbers, verify, gc.

Layout of ``versions/`` (only the first kind of entry is ever visible to readers):

* ``000012/``                 a published version: MANIFEST.json alone, its files as chunks in ``chunks/``
                              (format 2), or model files + MANIFEST.json (format 1), or MANIFEST.json alone
                              for a repo record; immutable once visible;
* ``.partial-000012/``        a publish in progress. Creating it with ``mkdir`` *is* the claim on number 12
                              (mkdir is atomic on local file systems and NFS: exactly one creator wins).
                              The new version is written in ``.partial-000012/content/``, MANIFEST.json last,
                              fsynced, then renamed to ``000012``;
* ``.trash-*``                a version or leftover being deleted: renamed out of sight first, then removed,
                              so no half-deleted version is ever visible.

Beside ``versions/``, ``chunks/<aa>/<sha256>`` holds every chunk of every version once
(``lockstep.store.chunks``): a publish writes only the chunks the store lacks, and garbage collection removes
the chunks no kept version lists once they are older than its grace period (a publish in progress writes or
touches the chunks it counts on, so they are always younger).

Numbering: N = 1 + the highest published or claimed number. After claiming, the publisher lists again (on
NFS its own mkdir normally revalidates the cached directory, so this listing is fresh) and gives the
claim up when a version >= N is already published, so a publish that starts after another finished gets a
higher number. Before renaming into place it refuses a target that exists (never replacing anything, not
even an empty folder) and then claims a higher number. ``gc`` never deletes the newest version, so the
highest number is never reused.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lockstep.core.atomic import fsync_dir, read_regular
from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import BadModelRef, BadRequest, Conflict, LockstepError, NotFound, VerificationError
from lockstep.store.chunks import CHUNK_MAX_BYTES, CHUNK_MIN_BYTES, ChunkEntry, ChunkStore, cut_file
from lockstep.store.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    Progress,
    check_model_dir,
    content_digest,
    scan_dir,
    verify_dir,
)

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
CHUNKS_DIR = "chunks"
LOCKS_DIR = "locks"
STALE_AFTER_S = 3600.0  # seconds without any write before a crashed publisher's leftovers are removed
# Least idle time before a publish in progress counts as crashed, whatever the grace period: a live publisher
# writes every chunk, so this only guards against a grace period of zero deleting it under its feet.
PARTIAL_MIN_IDLE_S = 60.0
ALLOWED_REFS = "versions/<N> (e.g. versions/000012 or versions/12), v<N> (e.g. v12) or <N> (e.g. 12)"

_PUBLISHED = re.compile(r"^\d{6,}$", re.ASCII)
_PARTIAL = re.compile(r"^\.partial-(\d{6,})$", re.ASCII)
_TRASH_PREFIX = ".trash-"
_CONTENT = "content"  # inside a partial: the folder that becomes the version
_REF = re.compile(r"^(?:versions/(\d{1,12})|v(\d{1,12})|(\d{1,12}))$", re.ASCII)  # '٣' is a \d too
_MAX_CLAIM_TRIES = 10_000  # each try is one mkdir; only a storm of publishers gets near it


def version_name(n: int) -> str:
    """Folder name of version ``n``: six digits, zero-padded (more digits past 999999)."""
    return f"{n:06d}"


@dataclass
class _Listing:
    """One read of ``versions/``."""

    published: list[int] = field(default_factory=list)
    partials: dict[int, Path] = field(default_factory=dict)
    trash: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _Verdict:
    """What garbage collection knows of one published version."""

    age_s: float  # since it was published (MANIFEST created_at), or since its last write when unreadable
    size: int | None  # bytes of its files, when its MANIFEST says
    leftover: str | None  # why it may go once older than the grace period (aborted, unusable), or None
    unrecorded: bool = False  # no publish outcome recorded for it


@dataclass(frozen=True)
class GcEntry:
    """One entry of ``versions/`` and what garbage collection does with it, and why."""

    name: str  # the folder name in versions/
    version: int | None  # None for an unfinished deletion
    remove: bool
    reason: str
    size: int | None = None  # bytes freed by removing it, when known


@dataclass
class GcPlan:
    """What one garbage collection keeps and removes, entry by entry."""

    entries: builtins.list[GcEntry] = field(default_factory=builtins.list)
    grace_s: float = STALE_AFTER_S  # unreferenced chunks younger than this stay (a publish may count on them)

    @property
    def removals(self) -> builtins.list[GcEntry]:
        return [e for e in self.entries if e.remove]

    @property
    def kept_versions(self) -> builtins.list[int]:
        """Published versions that stay (not partials or trash)."""
        return [e.version for e in self.entries
                if not e.remove and e.version is not None and e.name == version_name(e.version)]

    @property
    def freed_bytes(self) -> int:
        return sum(e.size or 0 for e in self.removals)


class VersionSource(Protocol):
    """Where a replica finds ``versions/N``: the shared folder's ``ModelStore`` or the trainer's (``RemoteStore``)."""

    def get(self, n: int) -> Manifest: ...

    def path_of(self, n: int) -> Path: ...

    def verify(self, n: int, files_dir: Path | None = None) -> Manifest: ...


class ModelStore:
    """The versioned model store in a (shared) folder: publish, list, get, verify, resolve, gc."""

    def __init__(self, root: Path, clock: Clock = SYSTEM_CLOCK, *, assemble_dir: Path | None = None) -> None:
        self.root = Path(root)
        self.clock = clock
        self.chunks = ChunkStore(self.root / CHUNKS_DIR)
        # Where this process assembles a chunked version it loads itself (path_of): local disk, not the store.
        self.assemble_dir = assemble_dir or (Path(tempfile.gettempdir()) / "lockstep-assembled" /
                                             hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:12])
        self._assembler: Any = None
        self._chunk_index: dict[int, tuple[tuple[int, int], dict[str, ChunkEntry]]] = {}
        self._warned: set[str] = set()  # log an unreadable version once per store object, not per poll
        # Lowest number the next publish may take: a trainer whose data folder was lost sets it above what the
        # replicas still serve, so a new version never reuses a number they know with other content.
        self.min_next = 0

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    @property
    def locks_dir(self) -> Path:
        """Where the coordinator lease lives (see ``lockstep.store.lease``)."""
        return self.root / LOCKS_DIR

    @staticmethod
    def ref(n: int) -> str:
        """The canonical reference of version ``n``: ``versions/<NNNNNN>``."""
        return f"{VERSIONS_DIR}/{version_name(n)}"

    # --- publishing ------------------------------------------------------------------------------------
    def publish_dir(self, src: Path, *, source: str | None = None, parent: int | None = None,
                    metadata: dict[str, Any] | None = None, progress: Progress | None = None,
                    allow_pickle: bool = False, chunk_bytes: int = CHUNK_MAX_BYTES) -> Manifest:
        """Copy the model folder ``src`` in as the next version; ``progress(done_bytes, total_bytes)``.

        ``chunk_bytes``: the largest chunk (lockstep.store.chunks); smaller only to model a large version at
        a small scale (benchmarks/distribution_bench.py)."""
        src = Path(src)
        rels = check_model_dir(src, allow_pickle)
        meta = _checked_metadata(metadata)
        origin = source or str(src.resolve())

        def fill(content: Path, n: int) -> Manifest:
            files, new_bytes = self._store_chunks(src, rels, progress, chunk_bytes)
            return Manifest(format=2, version=n, created_at=self.clock.time(), source=origin, kind="directory",
                            parent=parent, digest=content_digest(files), files=files, metadata=meta,
                            stored="chunks", new_bytes=new_bytes)

        manifest = self._publish(fill)
        log.info("published version %d from %s: %d files, %.1f MiB, %.1f MiB of it new to the store, digest %s",
                 manifest.version, origin, len(manifest.files), manifest.total_size / 2**20,
                 (manifest.new_bytes or 0) / 2**20, manifest.digest[:12])
        return manifest

    def _store_chunks(self, src: Path, rels: builtins.list[str], progress: Progress | None,
                      chunk_bytes: int) -> tuple[builtins.list[FileEntry], int]:
        """Cut each file into chunks and keep the ones the store lacks; the entries, and the bytes of chunks no
        published version lists (what this version adds, however its chunks reached the store)."""
        try:
            listed = self._listed_chunks()
        except (OSError, ValueError):
            listed = set()  # an unreadable MANIFEST: new_bytes counts all (an overstatement, never a failure)
        total = sum((src / rel).stat().st_size for rel in rels)
        done = new_bytes = 0
        entries = []
        for rel in rels:
            digest = hashlib.sha256()
            chunks: builtins.list[ChunkEntry] = []
            for chunk, data in cut_file(src / rel, max_bytes=chunk_bytes,
                                        min_bytes=min(CHUNK_MIN_BYTES, chunk_bytes)):
                digest.update(data)
                self.chunks.put(chunk, data)
                if chunk.sha256 not in listed:
                    listed.add(chunk.sha256)
                    new_bytes += chunk.size
                chunks.append(chunk)
                done += chunk.size
                if progress is not None:
                    progress(done, max(total, done))
            entries.append(FileEntry(path=rel, size=sum(c.size for c in chunks), sha256=digest.hexdigest(),
                                     chunks=chunks))
        return entries, new_bytes

    def publish_repo(self, snapshot_dir: Path, *, repo_id: str, revision: str, parent: int | None = None,
                     metadata: dict[str, Any] | None = None, progress: Progress | None = None,
                     allow_pickle: bool = False) -> Manifest:
        """Record ``repo_id`` at ``revision`` as the next version, without copying (weights stay in hf_home).

        MANIFEST.json lists the snapshot's files and hashes, so the snapshot can be verified later.
        """
        snapshot_dir = Path(snapshot_dir)
        if not repo_id or not revision:
            raise BadRequest(f"publish_repo needs a repo id and the revision it resolved to; got "
                             f"repo_id={repo_id!r}, revision={revision!r}")
        check_model_dir(snapshot_dir, allow_pickle)
        meta = _checked_metadata(metadata)
        files = scan_dir(snapshot_dir, progress)  # hashed before claiming, so the claim is short-lived

        def fill(content: Path, n: int) -> Manifest:
            return Manifest(version=n, created_at=self.clock.time(), source=repo_id, kind="repo",
                            repo_id=repo_id, revision=revision, parent=parent, digest=content_digest(files),
                            files=files, metadata=meta)

        manifest = self._publish(fill)
        log.info("published version %d: repo %s@%s, %d files, digest %s", manifest.version, repo_id, revision,
                 len(files), manifest.digest[:12])
        return manifest

    def _publish(self, fill: Callable[[Path, int], Manifest]) -> Manifest:
        """Claim N, let ``fill`` write the content, write MANIFEST.json last, rename into place."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        partial = self._partial_path(self._claim())
        try:
            content = partial / _CONTENT
            content.mkdir()
            manifest = fill(content, _partial_number(partial))
            _write_manifest(content, manifest)
            while not self._rename_into_place(partial, manifest.version):
                # The number was taken although we held its claim: our listing was stale. Move up.
                newer = self._partial_path(self._claim(start=manifest.version + 1))
                log.warning("version %d already exists; publishing as %d instead", manifest.version,
                            _partial_number(newer))
                os.rename(content, newer / _CONTENT)  # inside our own fresh claim: nothing to overwrite
                _rmdir_quiet(partial)
                partial, content = newer, newer / _CONTENT
                manifest = manifest.model_copy(update={"version": _partial_number(newer)})
                _write_manifest(content, manifest)
        except BaseException:
            self._discard(partial)
            raise
        fsync_dir(self.versions_dir)  # persist the rename before anyone is told about N
        _rmdir_quiet(partial)
        return manifest

    def _claim(self, start: int = 1) -> int:
        """Reserve the next version number by creating ``.partial-<N>`` (atomic: one creator wins)."""
        listing = self._scan()
        n = max([start, self.min_next, *(m + 1 for m in listing.published), *(m + 1 for m in listing.partials)])
        for _ in range(_MAX_CLAIM_TRIES):
            try:
                os.mkdir(self._partial_path(n))
            except FileExistsError:
                n += 1
                continue
            top = max(self._scan().published, default=0)  # our mkdir revalidates an NFS directory cache
            if top >= n:
                _rmdir_quiet(self._partial_path(n))
                n = top + 1
                continue
            return n
        raise Conflict(f"could not reserve a version number in {self.versions_dir} after "
                       f"{_MAX_CLAIM_TRIES} tries; too many publishers at once")

    def _rename_into_place(self, partial: Path, n: int) -> bool:
        """Rename the content to ``versions/<N>``; False when that name is taken (nothing is replaced)."""
        target = self._version_path(n)
        if os.path.lexists(target):
            return False
        try:
            os.rename(partial / _CONTENT, target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return False
            if e.errno == errno.ENOENT and not os.path.lexists(partial / _CONTENT):
                raise LockstepError(f"publish of version {n} was abandoned: its temporary folder "
                                    f"{partial} was removed (gc judged it stale); publish again") from e
            raise
        return True

    def _discard(self, path: Path) -> None:
        """Best-effort removal of an unfinished publish (out of sight first)."""
        self._trash(path)

    # --- reading ---------------------------------------------------------------------------------------
    def list(self) -> builtins.list[Manifest]:
        """Every readable published version, sorted by number; unreadable ones are skipped with a warning."""
        out = []
        for n in self._scan().published:
            try:
                out.append(self._read_manifest(n))
            except (OSError, ValueError) as e:
                self._warn_once(n, e)
        return out

    def get(self, n: int) -> Manifest:
        """The manifest of version ``n``; NotFound when it is not published."""
        try:
            return self._read_manifest(n)
        except FileNotFoundError:
            raise NotFound(f"version {n} is not in the store at {self.root}; "
                           f"published: {self._published_summary()}") from None
        except (OSError, ValueError) as e:
            raise NotFound(f"version {n} at {self._version_path(n)} has an unreadable MANIFEST.json "
                           f"({_short(e)}); it cannot be used") from e

    def latest(self) -> Manifest | None:
        """The highest readable version, or None when nothing was published."""
        for n in reversed(self._scan().published):
            try:
                return self._read_manifest(n)
            except (OSError, ValueError) as e:
                self._warn_once(n, e)
        return None

    def folder_of(self, n: int) -> Path:
        """The folder of published version ``n`` (MANIFEST.json alone for a chunked version or a repo record)."""
        path = self._version_path(n)
        if not (path / MANIFEST_NAME).is_file():
            raise NotFound(f"version {n} is not in the store at {self.root}; "
                           f"published: {self._published_summary()}")
        return path

    def path_of(self, n: int) -> Path:
        """A folder with version ``n``'s files: its own, or for a chunked version a copy assembled on local disk."""
        if self.get(n).stored == "files":
            return self.folder_of(n)
        if self._assembler is None:
            from lockstep.store.version_cache import (  # it builds on this module
                FolderOrigin,
                VersionCache,
                mark_origin,
                prune_orphans,
            )

            self._assembler = VersionCache(FolderOrigin(self), self.assemble_dir, keep=2)
            # Tests and benchmarks make a store per run: without this their copies outlived the store.
            mark_origin(self.assemble_dir, self.root)
            prune_orphans(self.assemble_dir.parent)
        path: Path = self._assembler.path_of(n)
        return path

    def chunk_bytes(self, n: int, sha256: str) -> bytes:
        """The bytes of a chunk that version ``n`` lists, checked; NotFound for any chunk it does not list."""
        chunk = self._chunks_of(n).get(sha256)
        if chunk is None:
            raise NotFound(f"version {n} lists no chunk {sha256[:64]!r}")
        try:
            return self.chunks.read(chunk)
        except FileNotFoundError:
            raise NotFound(f"version {n}: chunk {sha256[:12]} is missing from {self.chunks.root}; publish the "
                           "version again") from None
        except ValueError as exc:
            self.chunks.discard_damaged(chunk)  # so that publishing the version again stores it anew
            raise NotFound(f"version {n}: {exc}; publish the version again") from exc

    def _chunks_of(self, n: int) -> dict[str, ChunkEntry]:
        """Version ``n``'s chunks by id (none for a version stored as files), parsed once per MANIFEST: every chunk
        request of every replica asks, and a 16 GB version's MANIFEST lists thousands."""
        try:
            info = (self._version_path(n) / MANIFEST_NAME).stat()
        except OSError:
            self.get(n)  # NotFound, naming what is published
            raise
        key = (info.st_mtime_ns, info.st_size)  # a version replaced under its number (a reset store) reads anew
        cached = self._chunk_index.get(n)
        if cached is None or cached[0] != key:
            manifest = self.get(n)
            chunks = {c.sha256: c for _, c in manifest.chunk_list()} if manifest.stored == "chunks" else {}
            self._chunk_index = {**dict(list(self._chunk_index.items())[-7:]), n: (key, chunks)}  # a few versions
            cached = self._chunk_index[n]
        return cached[1]

    def file_chunks(self, n: int, rel_path: str) -> Iterator[bytes]:
        """The bytes of file ``rel_path`` of chunked version ``n``, chunk by chunk, each checked."""
        manifest = self.get(n)
        entry = next((f for f in manifest.files if f.path == rel_path), None)
        if entry is None:
            raise NotFound(f"version {n} has no file {rel_path!r} in its MANIFEST.json")
        return (self.chunks.read(chunk) for chunk in entry.chunks or [])

    def file_path(self, n: int, rel_path: str) -> Path:
        """The real path of file ``rel_path`` of version ``n``, to serve it; never outside the version's folder.

        NotFound for a file the MANIFEST does not list, one that is not a regular file, or one that a symlink
        leads out of the folder (our writers never make symlinks; one there was put by hand)."""
        manifest = self.get(n)
        if rel_path not in {f.path for f in manifest.files}:  # only listed files, never a path of the caller's making
            raise NotFound(f"version {n} has no file {rel_path!r} in its MANIFEST.json")
        folder = self.folder_of(n).resolve()
        real = (folder / rel_path).resolve()
        if not real.is_relative_to(folder):
            log.warning("refusing to serve %s of version %d: a symlink leads out of its folder to %s", rel_path, n,
                        real)
            raise NotFound(f"version {n}: {rel_path} leads outside the version's folder; it is not served "
                           "(publish the version again)")
        if not real.is_file():
            raise NotFound(f"version {n}: {rel_path} is missing from {folder}; publish the version again")
        return real

    def verify(self, n: int, files_dir: Path | None = None) -> Manifest:
        """Hash-check every file of version ``n`` (in ``files_dir``: required for a repo record)."""
        manifest = self.get(n)
        if files_dir is None:
            if manifest.kind == "repo":
                raise BadRequest(f"version {n} records repo {manifest.repo_id}@{manifest.revision}, whose "
                                 "files live in the Hugging Face cache: pass its snapshot folder as "
                                 "files_dir")
            if manifest.stored == "chunks":
                self.check_chunks(manifest, hash_them=True)
                return manifest
            files_dir = self.folder_of(n)
        verify_dir(Path(files_dir), manifest)
        return manifest

    def check_chunks(self, manifest: Manifest, *, hash_them: bool) -> None:
        """Every chunk of a chunked version is in the store (with its size; and its digest when ``hash_them``)."""
        for entry, chunk in manifest.chunk_list():
            problem = None
            if not self.chunks.has(chunk):
                problem = "is missing or has the wrong size"
            elif hash_them:
                try:
                    self.chunks.read(chunk)
                except (OSError, ValueError) as exc:
                    problem = f"cannot be used ({exc})"
            if problem is not None:
                raise VerificationError(f"version {manifest.version}: chunk {chunk.sha256[:12]} of {entry.path} "
                                        f"{problem} in {self.chunks.root}; publish the version again")

    def next_version_hint(self) -> int:
        """The number the next publish would probably get (not reserved)."""
        listing = self._scan()
        return max([*listing.published, *listing.partials], default=0) + 1

    def resolve_ref(self, ref: str) -> int:
        """Parse a store reference into a published version number.

        Accepted: ``versions/<N>`` (any zero padding: ``versions/000012``, ``versions/12``), ``v<N>`` and
        ``<N>``. Anything else, and anything that could escape the store (``..``, absolute paths,
        backslashes, a version folder that is a symlink leading outside), is a BadModelRef; an
        unpublished N is NotFound.
        """
        def bad(why: str) -> BadModelRef:
            return BadModelRef(f"bad store reference {ref!r}: {why}; allowed: {ALLOWED_REFS}")

        if not isinstance(ref, str) or not ref:
            raise bad("it is empty")
        if "\\" in ref:
            raise bad("backslashes are not allowed")
        if ref.startswith("/") or re.match(r"^[A-Za-z]:", ref):
            raise bad("absolute paths are not allowed")
        if ".." in ref.split("/"):
            raise bad("'..' would leave the store")
        match = _REF.match(ref)
        if match is None:
            raise bad("it is not a version number")
        n = int(next(g for g in match.groups() if g is not None))
        if self._leads_outside(self._version_path(n)):
            raise bad(f"{self._version_path(n)} is a symlink leading outside the store")
        self.get(n)  # NotFound names what is published
        return n

    # --- garbage collection ----------------------------------------------------------------------------
    def plan_gc(self, keep_newest: int, pins: Mapping[int, str] | None = None,
                outcomes: Mapping[int, str] | None = None, *, grace_s: float = STALE_AFTER_S) -> GcPlan:
        """Decide, with a reason for each entry of ``versions/``, what garbage collection keeps and removes.

        Kept: every pinned version (``pins``: version → why: committed, served by a replica...), the newest
        version (its number must never be reused) and the ``keep_newest`` newest committed versions.
        ``outcomes`` (version → "committed" | "aborted", from the publish history) tells committed versions
        from aborted ones: an aborted version goes once older than ``grace_s``; one with no recorded outcome is
        kept while younger (its publish may still be running), then counts as committed (the safe side).
        Without ``outcomes`` every version counts as committed. A version whose MANIFEST.json is missing or
        invalid goes after ``grace_s``, a publish in progress (``.partial-*``) after ``grace_s`` without a
        write, an unfinished deletion (``.trash-*``) always.
        """
        if keep_newest < 1:
            raise BadRequest(f"keep_newest must be at least 1, got {keep_newest}: the newest version is "
                             "never deleted (its number must not be reused)")
        listing = self._scan()
        now = self.clock.time()
        pins = dict(pins or {})
        plan = GcPlan(grace_s=grace_s)
        verdicts = {n: self._judge(n, outcomes, now) for n in listing.published}
        counted = [n for n, v in verdicts.items()
                   if v.leftover is None and not (v.unrecorded and v.age_s <= grace_s)]
        window = set(counted[-keep_newest:])  # the keep_newest newest committed (or counted so)
        for n, verdict in verdicts.items():
            reasons = [pins[n]] if n in pins else []
            if n == listing.published[-1]:
                reasons.append("the newest version (its number is never reused)")
            if n in window:
                reasons.append(f"one of the {keep_newest} newest committed versions (LOCKSTEP_KEEP_VERSIONS)")
            if verdict.unrecorded and verdict.age_s <= grace_s:
                reasons.append(f"published {_age(verdict.age_s)} ago with no outcome recorded yet (its publish "
                               "may still be running)")
            if verdict.leftover is not None and verdict.age_s <= grace_s:
                reasons.append(f"{verdict.leftover}, {_age(verdict.age_s)} old: kept for "
                               f"{_age(grace_s - verdict.age_s)} more (LOCKSTEP_GC_GRACE_S)")
            if reasons:
                plan.entries.append(GcEntry(version_name(n), n, False, "; ".join(reasons)))
            else:
                why = verdict.leftover or (f"older than the {keep_newest} newest committed versions "
                                           "(LOCKSTEP_KEEP_VERSIONS) and not pinned")
                plan.entries.append(GcEntry(version_name(n), n, True, why, verdict.size))
        for n, path in sorted(listing.partials.items()):
            idle = now - _newest_mtime(path)
            if idle > max(grace_s, PARTIAL_MIN_IDLE_S):
                plan.entries.append(GcEntry(path.name, n, True, f"a publish of version {n} that stopped writing "
                                            f"{_age(idle)} ago (crashed publisher)", _tree_size(path)))
            else:
                plan.entries.append(GcEntry(path.name, n, False, f"a publish of version {n} in progress "
                                            f"(last write {_age(idle)} ago)"))
        for path in listing.trash:
            plan.entries.append(GcEntry(path.name, None, True, "an unfinished deletion", _tree_size(path)))
        plan.entries.sort(key=lambda e: (-1 if e.version is None else e.version, e.name))
        return plan

    def apply_gc(self, plan: GcPlan) -> builtins.list[int]:
        """Remove what ``plan`` says goes (each renamed out of sight first); return the version numbers deleted."""
        deleted = []
        for entry in plan.removals:
            path = self.versions_dir / entry.name
            if entry.name.startswith(_TRASH_PREFIX):
                _rmtree_quiet(path)
            elif _PARTIAL.match(entry.name):
                log.warning("removing %s: %s", entry.name, entry.reason)
                self._trash(path)
            elif entry.version is not None and self._trash(path):
                log.info("removed version %d: %s", entry.version, entry.reason)
                deleted.append(entry.version)
        if deleted:
            log.info("gc deleted versions %s (kept %s)", deleted, plan.kept_versions)
        self._remove_unreferenced_chunks(plan.grace_s)
        return deleted

    def _listed_chunks(self) -> set[str]:
        """The chunks the published versions list; OSError/ValueError when a MANIFEST cannot be read."""
        listed: set[str] = set()
        for n in self._scan().published:
            try:
                listed.update(c.sha256 for _, c in self._read_manifest(n).chunk_list())
            except NotFound:
                continue  # a symlink out of the store: not a version
        return listed

    def _remove_unreferenced_chunks(self, grace_s: float) -> None:
        """Delete the chunks no published version lists, once older than ``grace_s`` (none when any is unreadable)."""
        try:
            listed = self._listed_chunks()
        except (OSError, ValueError) as exc:
            log.info("keeping every chunk: a version's MANIFEST.json is unreadable (%s)", _short(exc))
            return
        now, removed, freed = self.clock.time(), 0, 0
        for path in self.chunks.names():
            if path.name in listed:
                continue
            try:
                info = path.stat()
                if now - info.st_mtime <= grace_s:
                    continue
                path.unlink()
            except OSError:
                continue
            removed, freed = removed + 1, freed + info.st_size
        if removed:
            log.info("gc removed %d chunks no version lists (%.1f MiB)", removed, freed / 2**20)

    def gc(self, keep_newest: int, protect: set[int], *,
           stale_after_s: float = STALE_AFTER_S) -> builtins.list[int]:
        """Delete versions neither protected nor among the ``keep_newest`` newest; return their numbers.

        Also removes leftovers of crashed publishers (``.partial-*`` with no write for ``stale_after_s``
        seconds, judged by file mtimes against the clock) and unfinished deletions (``.trash-*``).
        The newest version is always kept, so its number is never reused. ``plan_gc`` says why.
        """
        pins = {n: "protected" for n in protect}
        return self.apply_gc(self.plan_gc(keep_newest, pins, None, grace_s=stale_after_s))

    def _judge(self, n: int, outcomes: Mapping[int, str] | None, now: float) -> _Verdict:
        """What garbage collection needs to know of published version ``n``."""
        try:
            manifest = self._read_manifest(n)
        except (FileNotFoundError, ValueError) as e:
            age = now - _newest_mtime(self._version_path(n))
            return _Verdict(age, None, f"unusable: MANIFEST.json is missing or invalid ({_short(e)})")
        except (OSError, NotFound) as e:
            # An I/O error may pass (NFS): such a version counts as committed, never deleted for it.
            self._warn_once(n, e)
            return _Verdict(0.0, None, None)
        status = "committed" if outcomes is None else outcomes.get(n, "unrecorded")
        age = now - manifest.created_at
        if status == "aborted":
            return _Verdict(age, manifest.total_size, "aborted, never committed")
        return _Verdict(age, manifest.total_size, None, unrecorded=status == "unrecorded")

    def _trash(self, path: Path) -> bool:
        """Rename ``path`` out of sight, then delete it; False when it was already gone."""
        trash = self.versions_dir / f"{_TRASH_PREFIX}{path.name.lstrip('.')}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        _rmtree_quiet(trash)
        return True

    # --- internals -------------------------------------------------------------------------------------
    def _version_path(self, n: int) -> Path:
        return self.versions_dir / version_name(n)

    def _partial_path(self, n: int) -> Path:
        return self.versions_dir / f".partial-{version_name(n)}"

    def _scan(self) -> _Listing:
        listing = _Listing()
        try:
            entries = list(os.scandir(self.versions_dir))
        except FileNotFoundError:
            return listing
        for entry in entries:
            name = entry.name
            if _PUBLISHED.match(name) and name == version_name(int(name)):
                if entry.is_dir(follow_symlinks=True) and not self._leads_outside(Path(entry.path)):
                    listing.published.append(int(name))
            elif m := _PARTIAL.match(name):
                listing.partials[int(m.group(1))] = Path(entry.path)
            elif name.startswith(_TRASH_PREFIX):
                listing.trash.append(Path(entry.path))
        listing.published.sort()
        return listing

    def _leads_outside(self, path: Path) -> bool:
        """A symlink whose target is not inside ``versions/`` (our writers never make symlinks)."""
        return path.is_symlink() and not path.resolve().is_relative_to(self.versions_dir.resolve())

    def _read_manifest(self, n: int) -> Manifest:
        # open+read, not stat(): NFS caches attributes, close-to-open consistency covers the content
        if self._leads_outside(self._version_path(n)):
            raise NotFound(f"version {n} is a symlink leading outside the store; it is ignored")
        manifest = Manifest.from_json(read_regular(self._version_path(n) / MANIFEST_NAME, MAX_MANIFEST_BYTES))
        if manifest.version != n:
            raise ValueError(f"MANIFEST.json says version {manifest.version}")
        return manifest

    def _published_summary(self) -> str:
        published = self._scan().published
        if not published:
            return "none"
        shown = ", ".join(str(n) for n in published[-10:])
        return shown if len(published) <= 10 else f"... {shown}"

    def _warn_once(self, n: int, error: BaseException) -> None:
        key = f"{n}:{type(error).__name__}"
        if key not in self._warned:
            self._warned.add(key)
            log.warning("skipping version %d in %s: unreadable MANIFEST.json (%s)", n, self.versions_dir,
                        _short(error))


def _checked_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    meta = dict(metadata or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise BadRequest("version metadata must be JSON-serialisable (numbers, strings, lists, dicts): "
                         f"{e}") from e
    return meta


def _write_manifest(content: Path, manifest: Manifest) -> None:
    with open(content / MANIFEST_NAME, "wb") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(content)


def _partial_number(partial: Path) -> int:
    match = _PARTIAL.match(partial.name)
    assert match is not None, partial  # only ever called on paths made by _partial_path
    return int(match.group(1))


def _newest_mtime(path: Path) -> float:
    """Latest mtime in a tree (a live publisher's writes keep it recent); missing entries are skipped."""
    newest = 0.0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [".", *dirnames, *filenames]:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _tree_size(path: Path) -> int:
    """Bytes of the files in a tree (not following symlinks); missing entries are skipped."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _age(seconds: float) -> str:
    """A duration for a reason a person reads: 42 s, 12 min, 3.5 h, 2.0 d."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


def _rmdir_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _rmtree_quiet(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        # NFS keeps ".nfsXXXX" files for files still open elsewhere; the next gc finishes the job.
        log.debug("could not remove all of %s yet; the next gc retries", path)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
