"""UploadStore: files land atomically, one writer per path, bounded in bytes, files and open uploads; a publish
takes an upload whole, abandoned uploads expire."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lockstep.core.clock import FakeClock
from lockstep.core.errors import BadRequest, Conflict, NotFound, Overloaded
from lockstep.trainer.server.uploads import UPLOAD_TTL_S, UploadStore, UploadTooLarge


async def _body(*chunks: bytes, gate: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    for i, chunk in enumerate(chunks):
        if gate is not None and i == 1:
            await gate.wait()  # the rest of the body is still on its way
        yield chunk


def test_a_file_is_written_whole_and_checked_against_its_digest(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, FakeClock())
    upload_id = store.create()
    data = b"weights" * 1000
    got = asyncio.run(store.receive(upload_id, "sub/model.safetensors", _body(data[:10], data[10:]),
                                    hashlib.sha256(data).hexdigest()))
    assert got == {"path": "sub/model.safetensors", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert (store.folder(upload_id) / "sub" / "model.safetensors").read_bytes() == data
    with pytest.raises(BadRequest, match="corrupted in transit"):
        asyncio.run(store.receive(upload_id, "other.safetensors", _body(data), "0" * 64))
    assert sorted(p.name for p in store.folder(upload_id).rglob("*")) == ["model.safetensors", "sub"]
    with pytest.raises(NotFound):
        store.folder("up-0000000000000000")


def test_an_upload_is_published_only_once_every_file_has_arrived_and_then_takes_no_more(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, FakeClock())
    upload_id = store.create()

    async def scenario() -> None:
        gate = asyncio.Event()
        arriving = asyncio.create_task(store.receive(upload_id, "config.json", _body(b"{", b"}", gate=gate), None))
        await asyncio.sleep(0.01)
        with pytest.raises(Conflict, match="still has a file arriving"):
            store.seal(upload_id)
        gate.set()
        await arriving
        folder = store.seal(upload_id)
        assert (folder / "config.json").read_bytes() == b"{}"
        with pytest.raises(Conflict, match="being published"):
            await store.receive(upload_id, "more.json", _body(b"{}"), None)
        with pytest.raises(Conflict, match="already being published"):
            store.seal(upload_id)
        with pytest.raises(Conflict):
            store.discard(upload_id)

    asyncio.run(scenario())
    store.release(upload_id)
    assert not (tmp_path / upload_id).exists()


def test_uploads_left_unpublished_expire_but_not_one_being_published(tmp_path: Path) -> None:
    clock = FakeClock(start=time.time())
    store = UploadStore(tmp_path, clock)
    store.create()  # abandoned
    publishing = store.create()
    store.seal(publishing)
    clock.advance(UPLOAD_TTL_S + 60)
    fresh = store.create()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([publishing, fresh])


class Body:
    """A request body that says whether anyone read it."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.read += 1
            yield chunk


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_second_put_of_a_path_still_arriving_gets_409_and_the_file_is_the_acknowledged_one(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, FakeClock())
    upload_id = store.create()
    first, second = b"first " * 100, b"second" * 100

    async def scenario() -> dict[str, object]:
        gate = asyncio.Event()
        arriving = asyncio.create_task(store.receive(upload_id, "model.safetensors",
                                                    _body(first[:10], first[10:], gate=gate), sha(first)))
        await asyncio.sleep(0.01)
        with pytest.raises(Conflict, match="already arriving in another request") as refused:
            await store.receive(upload_id, "model.safetensors", _body(second), sha(second))
        assert refused.value.status_code == 409
        other = await store.receive(upload_id, "config.json", _body(b"{}"), sha(b"{}"))  # another path: fine
        assert other["size"] == 2
        gate.set()
        return await arriving

    answer = asyncio.run(scenario())
    on_disk = (store.folder(upload_id) / "model.safetensors").read_bytes()
    assert on_disk == first and answer["sha256"] == sha(on_disk)
    assert files_in(store.folder(upload_id)) == ["config.json", "model.safetensors"]  # no temporary file left
    # Once it answered, the path can be sent again; a corrupted resend leaves the acknowledged bytes in place.
    with pytest.raises(BadRequest, match="corrupted in transit"):
        asyncio.run(store.receive(upload_id, "model.safetensors", _body(second), sha(first)))
    assert (store.folder(upload_id) / "model.safetensors").read_bytes() == first
    asyncio.run(store.receive(upload_id, "model.safetensors", _body(second), sha(second)))
    assert (store.folder(upload_id) / "model.safetensors").read_bytes() == second


def test_an_upload_over_its_byte_budget_is_refused_before_reading_or_while_streaming(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, FakeClock(), max_bytes=100)
    upload_id = store.create()
    asyncio.run(store.receive(upload_id, "a.safetensors", _body(b"a" * 60), None, 60))

    announced = Body(b"b" * 50)
    with pytest.raises(UploadTooLarge, match="has 40 of its 100 bytes left") as refused:
        asyncio.run(store.receive(upload_id, "b.safetensors", announced, None, 50))
    assert refused.value.status_code == 413 and announced.read == 0  # refused before a byte was read

    unannounced = Body(*[b"b" * 10] * 10)  # chunked: no Content-Length
    with pytest.raises(UploadTooLarge, match="passed its 100 bytes"):
        asyncio.run(store.receive(upload_id, "b.safetensors", unannounced, None))
    assert unannounced.read == 5  # stopped at the chunk that went over, not at the end
    assert files_in(store.folder(upload_id)) == ["a.safetensors"]

    # Sending a file again replaces it: its old bytes do not count against the new ones.
    asyncio.run(store.receive(upload_id, "a.safetensors", _body(b"A" * 100), None, 100))
    assert (store.folder(upload_id) / "a.safetensors").read_bytes() == b"A" * 100


def test_bytes_arriving_in_parallel_count_together(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, FakeClock(), max_bytes=100)
    upload_id = store.create()

    async def scenario() -> None:
        gate = asyncio.Event()
        first = asyncio.create_task(store.receive(upload_id, "one.bin", _body(b"1" * 60, b"1", gate=gate), None))
        await asyncio.sleep(0.01)
        with pytest.raises(UploadTooLarge):
            await store.receive(upload_id, "two.bin", _body(b"2" * 50), None)
        gate.set()
        await first

    asyncio.run(scenario())
    assert files_in(store.folder(upload_id)) == ["one.bin"]


def test_an_upload_holds_at_most_max_files_and_a_file_cannot_also_be_a_folder(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, FakeClock(), max_files=2)
    upload_id = store.create()
    for name in ("config.json", "model.safetensors"):
        asyncio.run(store.receive(upload_id, name, _body(b"{}"), None))
    with pytest.raises(UploadTooLarge, match="LOCKSTEP_MAX_UPLOAD_FILES"):
        asyncio.run(store.receive(upload_id, "tokenizer.json", _body(b"{}"), None))
    asyncio.run(store.receive(upload_id, "config.json", _body(b"{ }"), None))  # a resend is no new file
    other = UploadStore(tmp_path / "other", FakeClock())
    second = other.create()
    asyncio.run(other.receive(second, "sub", _body(b"x"), None))
    with pytest.raises(Conflict, match="clashes with sub"):
        asyncio.run(other.receive(second, "sub/model.safetensors", _body(b"x"), None))


def test_at_most_max_open_uploads_at_once(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, FakeClock(), max_open=2)
    first = store.create()
    store.create()
    with pytest.raises(Overloaded, match="LOCKSTEP_MAX_OPEN_UPLOADS") as refused:
        store.create()
    assert refused.value.status_code == 429
    store.discard(first)
    store.create()


def test_a_restarted_trainer_counts_the_files_already_uploaded_and_drops_cut_off_ones(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, FakeClock(), max_bytes=100)
    upload_id = store.create()
    asyncio.run(store.receive(upload_id, "a.bin", _body(b"a" * 80), None))
    cut_off = store.folder(upload_id) / ".b.bin.0123456789ab.tmp"  # a PUT the restart interrupted
    cut_off.write_bytes(b"b" * 10)
    restarted = UploadStore(tmp_path, FakeClock(), max_bytes=100)
    with pytest.raises(UploadTooLarge, match="has 20 of its 100 bytes left"):
        asyncio.run(restarted.receive(upload_id, "b.bin", _body(b"b" * 30), None, 30))
    assert not cut_off.exists()
    assert files_in(restarted.seal(upload_id)) == ["a.bin"]


def test_the_chunks_an_upload_adds_to_the_store_count_against_its_byte_budget(tmp_path: Path) -> None:
    from lockstep.store.chunks import ChunkEntry, ChunkStore

    chunks = ChunkStore(tmp_path / "chunks")
    store = UploadStore(tmp_path / "uploads", FakeClock(), max_bytes=100)
    upload_id = store.create()

    def chunk(data: bytes) -> ChunkEntry:
        return ChunkEntry(offset=0, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    for i in range(2):
        data = bytes([i]) * 40
        assert store.receive_chunk(upload_id, chunk(data), data, chunks)["stored"] is True
    again = bytes([0]) * 40  # the store holds it already: it costs nothing
    assert store.receive_chunk(upload_id, chunk(again), again, chunks)["stored"] is False
    over = b"x" * 40
    with pytest.raises(UploadTooLarge, match="new chunks") as refused:
        store.receive_chunk(upload_id, chunk(over), over, chunks)
    assert refused.value.status_code == 413 and not chunks.has(chunk(over))
    other = store.create()  # another upload has a budget of its own
    assert store.receive_chunk(other, chunk(over), over, chunks)["stored"] is True


def test_uploads_write_on_threads_of_their_own_so_the_other_routes_keep_theirs(tmp_path: Path) -> None:
    import threading

    from lockstep.trainer.server.uploads import UPLOAD_WORKERS

    store = UploadStore(tmp_path, FakeClock())
    release = threading.Event()

    async def scenario() -> None:
        busy = [asyncio.ensure_future(store.run(release.wait)) for _ in range(UPLOAD_WORKERS * 8)]
        # Every upload thread is taken and more upload work waits; the default threads are free.
        answer = await asyncio.wait_for(asyncio.to_thread(lambda: "store route"), timeout=60)
        assert answer == "store route" and not any(task.done() for task in busy)
        release.set()
        await asyncio.gather(*busy)

    asyncio.run(scenario())
    store.close()


def test_a_chunk_damaged_in_the_store_is_asked_for_again_and_the_bytes_sent_replace_it(tmp_path: Path) -> None:
    """Before, the store kept the damaged chunk (same size, so "held"), ignored the bytes the client sent again and
    asked for them forever: the upload of that model could never complete."""
    from lockstep.store.chunks import ChunkEntry, ChunkStore
    from lockstep.store.manifest import FileEntry

    chunks = ChunkStore(tmp_path / "chunks")
    store = UploadStore(tmp_path / "uploads", FakeClock())
    upload_id = store.create()
    data = b"weights" * 100
    sha = hashlib.sha256(data).hexdigest()
    chunk = ChunkEntry(offset=0, size=len(data), sha256=sha)
    entry = FileEntry(path="model.safetensors", size=len(data), sha256=sha, chunks=[chunk])
    assert chunks.put(chunk, data)
    chunks.path(sha).write_bytes(b"W" + data[1:])  # a bit flipped on disk, the size unchanged
    assert store.assemble(upload_id, entry, chunks) == {"path": "model.safetensors", "missing": [sha]}
    assert store.receive_chunk(upload_id, chunk, data, chunks)["stored"] is True
    assert store.assemble(upload_id, entry, chunks)["path"] == "model.safetensors"
    assert (store.folder(upload_id) / "model.safetensors").read_bytes() == data
