"""UploadStore: files land atomically, a publish takes an upload whole, abandoned uploads expire."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lockstep.core.clock import FakeClock
from lockstep.core.errors import BadRequest, Conflict, NotFound
from lockstep.trainer.uploads import UPLOAD_TTL_S, UploadStore


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
