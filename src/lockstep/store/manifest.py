"""MANIFEST.json: the size and sha256 of every file of a version, and the digest of its model content.

Also the file-level helpers behind it: scan, hash, copy-and-hash, verify, and what counts as a model folder.

Readers are tolerant (unknown fields are ignored, so an older reader reads a newer manifest; a truncated,
random or out-of-range file is a ``ValueError`` naming the field, never another exception); writers are
strict (``Manifest.to_json`` always writes the full schema).

The content digest
------------------
``digest`` identifies what a model *is*, independently of its version number, publish time or source:

* the digest files are ``config.json`` at the top level, and every top-level file whose name ends in a
  weight suffix (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``.ckpt``) or is a weight index
  (``*.safetensors.index.json``, ``*.bin.index.json``); tokenizer files, READMEs and subfolders are not
  part of it (they do not change the weights a replica loads);
* ``digest = sha256(json.dumps(sorted([[path, size, sha256], ...]), separators=(",", ":"),
  ensure_ascii=False).encode("utf-8")).hexdigest()`` where ``path`` is the relative POSIX path,
  ``size`` the byte count and ``sha256`` the lowercase hex digest of the file, sorted by ``path``.

Same digest files (same names, bytes) give the same digest, whoever computes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lockstep.core.atomic import open_regular
from lockstep.core.errors import BadModelRef, UnsafeModel, VerificationError
from lockstep.store.chunks import ChunkEntry, Sha256Hex, tiling_problem

MANIFEST_NAME = "MANIFEST.json"
CONFIG_NAME = "config.json"
SAFE_WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = SAFE_WEIGHT_SUFFIXES + PICKLE_WEIGHT_SUFFIXES
CHUNK_BYTES = 1 << 20  # 1 MiB: large enough for throughput, small enough to stream multi-GB shards


# Bounds of what shared files may say (MANIFESTs here; sync_state.json and heartbeats in lockstep.sync).
# A value outside them is written by hand or by a broken writer, and its reader ignores it.
MAX_VERSION = 999_999_999  # ``versions/N`` references take up to 9 digits (lockstep.models.refs)
MAX_WALL_TIME = 4_102_444_800.0  # 2100-01-01 UTC: a later "wall-clock time" is garbage, not a schedule
MAX_FILE_BYTES = 1 << 50  # 1 PiB: far beyond any checkpoint file
MAX_MANIFEST_FILES = 100_000
MAX_PATH_CHARS = 4096
MAX_MANIFEST_BYTES = 64 << 20  # 100,000 entries take about 15 MB; nothing larger is a real MANIFEST
MAX_MANIFEST_CHUNKS = 1 << 20  # 4 PiB of 4 MiB chunks; a chunk entry takes about 130 bytes of JSON

WallTime = Annotated[float, Field(ge=0, le=MAX_WALL_TIME, allow_inf_nan=False)]
"""Seconds since the epoch, finite, between 1970 and 2100."""
VersionNumber = Annotated[int, Field(ge=0, le=MAX_VERSION)]

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``, called after each chunk."""


class FileEntry(BaseModel):
    """One file of a version: relative POSIX path, size in bytes, sha256 hex."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    path: str = Field(max_length=MAX_PATH_CHARS)
    size: int = Field(ge=0, le=MAX_FILE_BYTES)
    sha256: Sha256Hex
    chunks: list[ChunkEntry] | None = Field(None, max_length=MAX_MANIFEST_CHUNKS)  # in file order (format 2)

    @model_validator(mode="after")
    def _chunks_tile_the_file(self) -> FileEntry:
        # A MANIFEST whose chunks do not add up to its file would assemble something else than it lists.
        if self.chunks is not None and (problem := tiling_problem(self.size, self.chunks)) is not None:
            raise ValueError(f"file {self.path!r}: {problem}")
        return self

    @field_validator("path")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        # A manifest names files to open during verify: it must never point outside its folder, and a
        # control character in a name is a hand-made file, not a model's.
        pure = PurePosixPath(value)
        if (not value or "\\" in value or any(ord(c) < 0x20 or c == "\x7f" for c in value) or pure.is_absolute()
                or any(part in ("", ".", "..") for part in value.split("/"))):
            raise ValueError(f"file path {value!r} must be a relative POSIX path inside the version "
                             "(no '..', '.', empty parts, backslashes, control characters or leading '/')")
        return value


class Manifest(BaseModel):
    """What a published version holds; ``versions/<NNNNNN>/MANIFEST.json``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    format: int = 1
    version: int = Field(ge=1, le=MAX_VERSION)
    created_at: WallTime  # wall-clock seconds since the epoch
    source: str = Field(max_length=MAX_PATH_CHARS)  # the reference that was published: a directory path or a repo id
    kind: Literal["directory", "repo"]
    repo_id: str | None = Field(None, max_length=MAX_PATH_CHARS)
    revision: str | None = Field(None, max_length=MAX_PATH_CHARS)
    parent: VersionNumber | None = None
    digest: Sha256Hex
    files: list[FileEntry] = Field(max_length=MAX_MANIFEST_FILES)
    metadata: dict[str, Any] = Field(default_factory=dict)  # training: step, loss, reward...
    # "files": the version's folder holds its files (format 1, and repo records); "chunks": its folder holds
    # this MANIFEST alone and the bytes are in the store's chunks/ (format 2, lockstep.store.chunks).
    stored: Literal["files", "chunks"] = "files"
    new_bytes: int | None = Field(None, ge=0, le=MAX_FILE_BYTES)  # chunk bytes this version added to the store

    @model_validator(mode="after")
    def _chunked_when_stored_as_chunks(self) -> Manifest:
        if self.stored == "chunks":
            missing = next((f.path for f in self.files if f.chunks is None), None)
            if missing is not None:
                raise ValueError(f"files: {missing!r} lists no chunks, but the version is stored as chunks")
            if sum(len(f.chunks or ()) for f in self.files) > MAX_MANIFEST_CHUNKS:
                raise ValueError(f"files: over {MAX_MANIFEST_CHUNKS} chunks in all")
        return self

    @property
    def total_size(self) -> int:
        """Bytes of all listed files."""
        return sum(f.size for f in self.files)

    def chunk_list(self) -> list[tuple[FileEntry, ChunkEntry]]:
        """Every chunk with its file, in manifest order; a file without a chunk list counts as one chunk."""
        out: list[tuple[FileEntry, ChunkEntry]] = []
        for entry in self.files:
            if entry.chunks is not None:
                out.extend((entry, chunk) for chunk in entry.chunks)
            elif entry.size:
                out.append((entry, ChunkEntry.model_construct(offset=0, size=entry.size, sha256=entry.sha256)))
        return out

    def to_json(self) -> bytes:
        """The full schema, stable key order."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse a MANIFEST; ``ValueError`` naming the first bad field for anything torn, random or out of range."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"MANIFEST.json is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} a reader accepts")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the document"
            raise ValueError(f"MANIFEST.json field {where!r}: {first['msg']}") from None
        except RecursionError:  # nesting deeper than any parser should follow (metadata is free-form)
            raise ValueError("MANIFEST.json is nested too deeply to be a manifest") from None


def is_weight_file(path: str) -> bool:
    """A file whose name says it holds tensors (safetensors or pickle)."""
    return path.endswith(WEIGHT_SUFFIXES)


def is_pickle_file(path: str) -> bool:
    return path.endswith(PICKLE_WEIGHT_SUFFIXES)


def is_digest_file(path: str) -> bool:
    """Part of the content digest: top-level config.json, weight files and weight indexes."""
    if "/" in path:
        return False
    if path == CONFIG_NAME or is_weight_file(path):
        return True
    return path.endswith(".index.json") and is_weight_file(path[: -len(".index.json")])


def content_digest(files: Iterable[FileEntry]) -> str:
    """The model content digest (see the module docstring for the exact definition)."""
    triples = sorted([f.path, f.size, f.sha256] for f in files if is_digest_file(f.path))
    text = json.dumps(triples, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """sha256 hex of a file, streamed in 1 MiB chunks; ``progress(n)`` gets each chunk's byte count."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def walk_files(root: Path) -> Iterator[str]:
    """Relative POSIX paths of the files under ``root``, sorted; skips MANIFEST.json and hidden entries.

    Hidden names (leading '.') are temporaries, caches (``.cache/``) or VCS files, never model content.
    Symlinks to files are followed (a Hugging Face snapshot is made of them); symlinked folders are not.
    """
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if name.startswith("."):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel == MANIFEST_NAME:
                continue
            found.append(rel)
    return iter(sorted(found))


def scan_dir(path: Path, progress: Progress | None = None) -> list[FileEntry]:
    """Size and sha256 of every file under ``path`` (see ``walk_files`` for what is skipped)."""
    rels = list(walk_files(path))
    sizes: dict[str, int] = {}
    for rel in rels:
        try:
            st = (path / rel).stat()
        except OSError as e:
            raise BadModelRef(f"{path}: cannot read {rel} ({e.strerror or e})") from e
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the publish for good, /dev/zero never end it
            raise BadModelRef(f"{path}: {rel} is not a regular file (a FIFO, device or socket, or a link to one); "
                              "remove it from the model folder")
        sizes[rel] = st.st_size
    total = sum(sizes.values())
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    entries = []
    for rel in rels:
        entries.append(FileEntry(path=rel, size=sizes[rel], sha256=hash_file(path / rel, tick)))
    return entries


def verify_dir(path: Path, manifest: Manifest) -> None:
    """Check every file against ``manifest``; raise VerificationError naming the first bad file."""
    where = f"version {manifest.version} at {path}"
    if not path.is_dir():
        raise VerificationError(f"{where}: folder is missing")
    if content_digest(manifest.files) != manifest.digest:
        raise VerificationError(f"{where}: MANIFEST.json digest {manifest.digest} does not match its own "
                                "file list; the manifest was altered")
    entries = sorted(manifest.files, key=lambda f: f.path)
    # Cheap pass first (stat only), so a truncated or missing file fails without hashing gigabytes.
    for entry in entries:
        try:
            size = (path / entry.path).stat().st_size
        except FileNotFoundError:
            raise VerificationError(f"{where}: {entry.path} is missing") from None
        except OSError as e:
            raise VerificationError(f"{where}: {entry.path} is unreadable ({e.strerror or e})") from e
        if size != entry.size:
            raise VerificationError(f"{where}: {entry.path} has size {size} bytes, "
                                    f"MANIFEST.json says {entry.size}")
    listed = {entry.path for entry in entries}
    for rel in walk_files(path):
        if rel not in listed and is_weight_file(rel):
            raise VerificationError(f"{where}: weight file {rel} is not listed in MANIFEST.json; "
                                    "only listed weights may be loaded")
    for entry in entries:
        actual = hash_file(path / entry.path)
        if actual != entry.sha256:
            raise VerificationError(f"{where}: {entry.path} has sha256 {actual}, "
                                    f"MANIFEST.json says {entry.sha256}")


def check_model_dir(src: Path, allow_pickle: bool) -> list[str]:
    """Refuse what is not a model folder, or holds pickle weights without opt-in; return its files."""
    if not src.is_dir():
        raise BadModelRef(f"not a model directory: {src} is not a folder")
    rels = list(walk_files(src))
    top = [r for r in rels if "/" not in r]
    if CONFIG_NAME not in top:
        raise BadModelRef(f"not a model directory: {src} has no config.json "
                          "(a model directory holds config.json and *.safetensors weights)")
    pickles = [r for r in rels if is_pickle_file(r)]
    if pickles and not allow_pickle:
        raise UnsafeModel(f"{src} holds pickle files ({', '.join(pickles[:3])}), which can run code when "
                          "loaded; convert them to safetensors, or opt in with LOCKSTEP_ALLOW_PICKLE=1")
    weights = [r for r in top if r.endswith(".safetensors") or (allow_pickle and is_pickle_file(r))]
    if not weights:
        raise BadModelRef(f"not a model directory: {src} has no *.safetensors weights")
    for rel in rels:
        if rel.endswith(".safetensors"):
            check_safetensors(src / rel, rel)
    return rels


def check_safetensors(path: Path, rel: str) -> None:
    """Refuse a ``.safetensors`` file whose header safetensors cannot read (the header only: no tensor is read)."""
    from safetensors import safe_open

    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise BadModelRef(f"{rel} is not a regular file (a FIFO, device or socket, or a link to one)")
        with safe_open(str(path), framework="numpy"):
            pass
    except BadModelRef:
        raise
    except Exception as exc:  # safetensors raises its own error type, and OSError for what it cannot open
        raise BadModelRef(f"{rel} is not a readable safetensors file ({str(exc)[:300]}); write it with "
                          "safetensors' save_file or save_pretrained") from None
