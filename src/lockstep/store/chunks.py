"""Content-addressed chunks: how a version's files are cut, and the folder that keeps each chunk once.

How a file is cut
-----------------
A ``.safetensors`` file is cut at tensor boundaries: its header is one chunk, then each tensor's bytes, a
large tensor in pieces of at most ``CHUNK_MAX_BYTES``, small neighbouring tensors together until a chunk
holds ``CHUNK_MIN_BYTES``. Any other file (and a safetensors file whose header does not parse) is cut into
pieces of ``CHUNK_MAX_BYTES``.

Why per tensor: a fine-tune changes whole tensors and keeps every name, shape and dtype, so the header, and
with it every boundary, stays put between versions. An unchanged tensor then keeps its chunks byte for byte
even beside a changed one, where a fixed grid would dirty the chunks that straddle each changed tensor's
edges. The 4 MiB cap keeps a chunk short on the wire: a replica re-serves a chunk as soon as it has verified
it, so the cap bounds how far a chain of peers lags behind its head (docs/protocol.md, Distribution).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, BinaryIO

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from lockstep.core.atomic import open_regular, read_regular

log = logging.getLogger(__name__)

CHUNK_MAX_BYTES = 4 << 20  # a piece of a large tensor (and of any other file)
CHUNK_MIN_BYTES = 1 << 20  # small tensors share a chunk up to this
MAX_CHUNK_BYTES_ACCEPTED = 64 << 20  # what a reader accepts in a MANIFEST: other writers may cut larger
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def is_sha256_hex(text: str) -> bool:
    """A sha256 as 64 lowercase hex digits: what names a chunk or a file's content; anything else is refused."""
    return bool(_SHA256_HEX.match(text))


def _sha256_hex(value: object) -> object:
    if isinstance(value, str) and not is_sha256_hex(value):
        raise ValueError(f"{value[:80]!r} must be a sha256 as 64 lowercase hex digits")
    return value  # not a string: pydantic's own type error says so


# Checked before the length bounds (which put maxLength in the OpenAPI schema), so that any malformed digest
# gets the one message that says what a digest must be.
Sha256Hex = Annotated[str, Field(min_length=64, max_length=64), BeforeValidator(_sha256_hex)]
"""A pydantic field holding a sha256 digest (a chunk's, a file's, a version's)."""


class ChunkEntry(BaseModel):
    """One chunk of a file: its byte range and the sha256 of those bytes (its name in the chunk store)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    offset: int = Field(ge=0, le=1 << 50)
    size: int = Field(ge=1, le=MAX_CHUNK_BYTES_ACCEPTED)
    sha256: Sha256Hex

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` is this chunk: its size and its sha256."""
        return len(data) == self.size and hashlib.sha256(data).hexdigest() == self.sha256


def tiling_problem(size: int, chunks: list[ChunkEntry]) -> str | None:
    """Why ``chunks`` do not cover a file of ``size`` bytes exactly once, in order; None when they do."""
    at = 0
    for i, chunk in enumerate(chunks):
        if chunk.offset != at:
            return f"chunk {i} starts at byte {chunk.offset}, expected {at} (chunks must follow each other)"
        at += chunk.size
    if at != size:
        return f"its chunks add up to {at} bytes, the file has {size}"
    return None


# ---------------------------------------------------------------------------------------------- cutting
def _safetensors_ranges(f: BinaryIO, size: int) -> list[tuple[int, int]] | None:
    """The header's range and each tensor's byte range in file order, or None when it is not safetensors."""
    head = f.read(8)
    if len(head) < 8:
        return None
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > size:
        return None
    try:
        header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested too deeply for Python's parser
        return None
    if not isinstance(header, dict):
        return None
    base = 8 + header_len
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] or base + offsets[1] > size):
            return None
        if offsets[1] > offsets[0]:
            ranges.append((base + offsets[0], base + offsets[1]))
    ranges.sort()
    if any(b < a_end for (_, a_end), (b, _) in zip(ranges, ranges[1:], strict=False)):
        return None  # overlapping tensors: not a file we cut by tensor
    return [(0, base), *ranges]


def chunk_bounds(path: Path, *, max_bytes: int = CHUNK_MAX_BYTES, min_bytes: int = CHUNK_MIN_BYTES) -> list[int]:
    """The offsets where ``path``'s chunks end, ascending, the last one its size (empty for an empty file)."""
    size = path.stat().st_size
    ranges = None
    if path.name.endswith(".safetensors"):
        with open_regular(path) as f:
            ranges = _safetensors_ranges(f, size)
    cuts: list[int] = []
    start = 0

    def cut(at: int) -> None:
        nonlocal start
        if at > start:
            cuts.append(at)
            start = at

    for i, (begin, end) in enumerate(ranges or []):
        if end - start > max_bytes:
            cut(begin)  # a tensor that does not fit starts its own chunk
        while end - start > max_bytes:
            cut(start + max_bytes)
        if i == 0 or end - start >= min_bytes:  # the header (range 0) always stands alone
            cut(end)
    while size - start > max_bytes:
        cut(start + max_bytes)
    cut(size)
    return cuts


def cut_file(path: Path, *, max_bytes: int = CHUNK_MAX_BYTES,
             min_bytes: int = CHUNK_MIN_BYTES) -> Iterator[tuple[ChunkEntry, bytes]]:
    """Each chunk of ``path`` with its bytes, in file order (one read of the file)."""
    start = 0
    with open_regular(path) as f:
        for end in chunk_bounds(path, max_bytes=max_bytes, min_bytes=min_bytes):
            data = f.read(end - start)
            if len(data) != end - start:
                raise OSError(f"{path} changed while it was read ({len(data)} of {end - start} bytes at {start})")
            yield ChunkEntry(offset=start, size=len(data), sha256=hashlib.sha256(data).hexdigest()), data
            start = end


# ---------------------------------------------------------------------------------------------- the store
class ChunkStore:
    """A folder of chunks named by their sha256 (``<root>/<first two hex digits>/<sha256>``), each kept once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if not is_sha256_hex(sha256):
            raise ValueError(f"{sha256[:80]!r} is not a chunk id (64 lowercase hex digits)")
        return self.root / sha256[:2] / sha256

    def has(self, chunk: ChunkEntry) -> bool:
        """Whether the chunk is here with its size (its bytes are checked when read)."""
        try:
            return self.path(chunk.sha256).stat().st_size == chunk.size
        except OSError:
            return False

    def put(self, chunk: ChunkEntry, data: bytes) -> bool:
        """Keep ``data`` as ``chunk`` unless it is here already (then mark it used now); True when written.

        The caller has checked the digest. Marking a reused chunk keeps garbage collection, which only removes
        unreferenced chunks older than its grace period, from deleting it under a publish that counts on it.
        """
        target = self.path(chunk.sha256)
        if self.has(chunk):
            with contextlib.suppress(OSError):
                os.utime(target)
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{uuid.uuid4().hex[:12]}"
        with open(tmp, "xb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)  # two writers of one chunk write the same bytes: either may win
        return True

    def read(self, chunk: ChunkEntry) -> bytes:
        """The chunk's bytes, checked against its sha256; OSError when missing, ValueError when they differ."""
        data = read_regular(self.path(chunk.sha256))
        if not chunk.matches(data):
            raise ValueError(f"chunk {chunk.sha256[:12]} in {self.root} does not match its digest (damaged on disk)")
        return data

    def discard_damaged(self, chunk: ChunkEntry) -> bool:
        """Remove the chunk when its bytes do not match its digest (checked again here); True when removed.

        Only the store's owner calls this (the trainer): a damaged chunk kept under its name would make every later
        publish of the same bytes skip it (``put`` keeps a chunk already here), so it could never be repaired."""
        path = self.path(chunk.sha256)
        data: bytes | None
        try:
            data = read_regular(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                return False  # unreadable for now (permissions, I/O): not known to be damaged
            data = None  # a FIFO, device or socket under the chunk's name
        if data is not None and chunk.matches(data):
            return False  # rewritten whole meanwhile
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        log.warning("removed damaged chunk %s from %s: the next publish or upload of its bytes stores it again",
                    chunk.sha256[:12], self.root)
        return True

    def names(self) -> Iterator[Path]:
        """Every chunk file (for garbage collection)."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if len(sub.name) == 2 and sub.is_dir():
                for entry in sorted(sub.iterdir()):
                    if is_sha256_hex(entry.name):
                        yield entry
