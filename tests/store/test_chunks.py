"""Versions as content-addressed chunks: how files are cut, what a publish writes, what a stage fetches and from
where (its own disk, peers, the origin), and what it does with peers that send bad bytes or none.

Peers are real HTTP servers on 127.0.0.1 running the replica's own peer route over a real ``VersionCache``;
a hostile peer is a server that answers every chunk with other bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse

from lockstep.core.clock import FakeClock
from lockstep.core.errors import LoadError
from lockstep.core.http import install_error_handlers
from lockstep.store import Manifest, ModelStore, version_cache
from lockstep.store.chunks import ChunkEntry, chunk_bounds, cut_file
from lockstep.store.peer_server import peer_router
from lockstep.store.version_cache import FolderOrigin, VersionCache
from tests.support.cluster import free_port, serving
from tests.support.stores import fine_tuned

TOKEN = "peer-token"


def tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}


def test_a_safetensors_file_is_cut_at_tensor_boundaries(tiny_dirs: dict[int, Path]) -> None:
    path = tiny_dirs[0] / "model.safetensors"
    ranges = tensor_ranges(path)
    ends = {e for _, e in ranges.values()}
    header_end = min(b for b, _ in ranges.values())
    cuts = chunk_bounds(path, max_bytes=1 << 20, min_bytes=256 << 10)
    assert cuts[0] == header_end and cuts[-1] == path.stat().st_size  # the header alone, then the tensors
    for start, end in zip([0, *cuts], cuts, strict=False):
        assert end - start <= 1 << 20
        inside = [name for name, (b, e) in ranges.items() if b < end < e]
        # a cut inside a tensor only where the tensor is larger than a chunk, at a whole number of chunks in
        assert end in ends or all(ranges[name][1] - ranges[name][0] > 1 << 20 for name in inside)
    data = path.read_bytes()
    pieces = list(cut_file(path, max_bytes=1 << 20, min_bytes=256 << 10))
    assert b"".join(d for _, d in pieces) == data
    assert all(c.sha256 == hashlib.sha256(d).hexdigest() for c, d in pieces)


def test_any_other_file_is_cut_into_equal_pieces(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(b"x" * (10 << 20))
    assert chunk_bounds(path) == [4 << 20, 8 << 20, 10 << 20]
    (tmp_path / "empty.txt").write_bytes(b"")
    assert chunk_bounds(tmp_path / "empty.txt") == []


def manifest_with_chunks(chunks: list[dict[str, object]], size: int) -> bytes:
    return json.dumps({"format": 2, "version": 1, "created_at": 1.0, "source": "s", "kind": "directory",
                       "digest": "0" * 64, "stored": "chunks",
                       "files": [{"path": "model.safetensors", "size": size, "sha256": "a" * 64,
                                  "chunks": chunks}]}).encode()


@pytest.mark.parametrize(("chunks", "size", "why"), [
    ([{"offset": 0, "size": 10, "sha256": "b" * 64}, {"offset": 12, "size": 8, "sha256": "c" * 64}], 20,
     "chunk 1 starts at byte 12, expected 10"),
    ([{"offset": 0, "size": 10, "sha256": "b" * 64}, {"offset": 5, "size": 15, "sha256": "c" * 64}], 20,
     "chunk 1 starts at byte 5, expected 10"),
    ([{"offset": 0, "size": 10, "sha256": "b" * 64}], 20, "add up to 10 bytes, the file has 20"),
    ([{"offset": 0, "size": 0, "sha256": "b" * 64}], 0, "greater than or equal to 1"),
    ([{"offset": 0, "size": 10, "sha256": "../../etc/passwd".ljust(64, "x")}], 10, "64 lowercase hex digits"),
])
def test_a_manifest_whose_chunks_do_not_add_up_to_its_files_is_refused(chunks: list[dict[str, object]], size: int,
                                                                      why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Manifest.from_json(manifest_with_chunks(chunks, size))


def test_a_version_stored_as_chunks_must_list_them() -> None:
    raw = json.loads(manifest_with_chunks([], 0))
    del raw["files"][0]["chunks"]
    with pytest.raises(ValueError, match="lists no chunks"):
        Manifest.from_json(json.dumps(raw))


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "shared", clock=FakeClock(start=time.time()),  # chunk mtimes are real
                      assemble_dir=tmp_path / "assembled")


def new_chunks(old: Manifest, new: Manifest) -> int:
    have = {c.sha256 for _, c in old.chunk_list()}
    return sum(c.size for c in {c.sha256: c for _, c in new.chunk_list() if c.sha256 not in have}.values())


def chunk_bytes_on_disk(store: ModelStore) -> int:
    return sum(p.stat().st_size for p in store.chunks.names())


def test_a_fine_tune_that_changes_one_tensor_writes_only_its_chunk(store: ModelStore, tiny_dirs: dict[int, Path],
                                                                   tmp_path: Path) -> None:
    v1 = store.publish_dir(tiny_dirs[0])
    tuned = fine_tuned(tiny_dirs[0], tmp_path / "tuned", ["lm_head.weight"])
    v2 = store.publish_dir(tuned)
    tensor = tensor_ranges(tuned / "model.safetensors")["lm_head.weight"]
    assert v2.new_bytes == new_chunks(v1, v2) == tensor[1] - tensor[0]  # 2 MiB of a 15 MiB model
    assert chunk_bytes_on_disk(store) == v1.total_size + v2.new_bytes  # each chunk kept once
    assert store.verify(2) == v2
    assert store.publish_dir(tuned).new_bytes == 0  # publishing the same content again writes nothing


@contextmanager
def peer(cache: VersionCache) -> Iterator[str]:
    """A peer: the replica's own peer route over ``cache``."""
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(peer_router(lambda _: cache, TOKEN, wait_s=10.0))
    with serving(app) as url:
        yield url


@contextmanager
def hostile_peer(answer: Callable[[str], bytes]) -> Iterator[str]:
    """A peer that answers every chunk with ``answer(sha256)``."""
    app = FastAPI()

    @app.get("/peer/chunks/{sha256}")
    def chunk(sha256: str) -> Response:
        return Response(answer(sha256), media_type="application/octet-stream")

    with serving(app) as url:
        yield url


class Tally:
    """What a cache reports through its hooks."""

    def __init__(self) -> None:
        self.fetched: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()

    def attach(self, cache: VersionCache) -> VersionCache:
        cache.on_fetched = lambda source, n: self.fetched.update({source: n})
        cache.on_bad_chunk = lambda reason: self.bad.update([reason])
        return cache


def cache_for(store: ModelStore, folder: Path, tally: Tally, origin: FolderOrigin | None = None) -> VersionCache:
    return tally.attach(VersionCache(origin or FolderOrigin(store), folder, keep=3, token=TOKEN))


def same_files(folder: Path, src: Path) -> bool:
    return all((folder / p.name).read_bytes() == p.read_bytes() for p in src.iterdir() if p.is_file())


def test_a_stage_copies_the_unchanged_chunks_from_the_served_version_and_fetches_the_rest(
        store: ModelStore, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    v1 = store.publish_dir(tiny_dirs[0])
    tuned = fine_tuned(tiny_dirs[0], tmp_path / "tuned", ["lm_head.weight", "model.layers.1.mlp.up_proj.weight"])
    v2 = store.publish_dir(tuned)
    tally = Tally()
    cache = cache_for(store, tmp_path / "replica", tally)
    served = cache.path_of(1)
    assert tally.fetched == {"origin": v1.total_size}
    before = {p.name: p.stat().st_mtime_ns for p in served.iterdir()}
    tally.fetched.clear()
    staged = cache.path_of(2)
    assert tally.fetched == {"local": v2.total_size - new_chunks(v1, v2), "origin": new_chunks(v1, v2)}
    assert same_files(staged, tuned) and same_files(served, tiny_dirs[0])
    assert {p.name: p.stat().st_mtime_ns for p in served.iterdir()} == before  # the served copy is never written
    assert cache.transfer is not None and cache.transfer.report()["done_bytes"] == v2.total_size
    assert cache.verify(2) == v2


def test_peers_feed_a_replica_and_bad_or_absent_peers_are_counted_and_avoided(
        store: ModelStore, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    v1 = store.publish_dir(tiny_dirs[0])
    holder = cache_for(store, tmp_path / "holder", Tally())
    holder.path_of(1)
    dead = f"http://127.0.0.1:{free_port()}"
    tally = Tally()
    newcomer = cache_for(store, tmp_path / "newcomer", tally)
    with (peer(holder) as good, hostile_peer(lambda sha: b"not the chunk" * 100) as liar,
          hostile_peer(lambda sha: hashlib.sha256(sha.encode()).digest()) as short):
        newcomer.suggest_peers(1, [dead, liar, short, good])
        assert same_files(newcomer.path_of(1), tiny_dirs[0])
    assert tally.fetched == {"peer": v1.total_size}  # nothing from the origin
    assert tally.bad == {"down": 1, "truncated": 1, "digest": 1}  # each counted once, then never asked again
    assert newcomer.transfer is not None and newcomer.transfer.avoided == {dead: "down", liar: "digest",
                                                                           short: "truncated"}


@contextmanager
def streaming_peer(parts: Callable[[], Iterator[bytes]], sent: list[int]) -> Iterator[str]:
    """A peer that answers every chunk with the stream ``parts()``, adding up in ``sent`` what it handed over."""
    app = FastAPI()

    def counted() -> Iterator[bytes]:
        for part in parts():
            sent.append(len(part))
            yield part

    app.get("/peer/chunks/{sha256}")(lambda sha256: StreamingResponse(counted()))
    with serving(app) as url:
        yield url


def test_a_peer_that_floods_or_drips_is_cut_off_and_the_origin_sends_the_chunk(
        store: ModelStore, tiny_dirs: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(version_cache, "PEER_WAIT_S", 0.5)  # a chunk's whole answer: 0.5 s + 1 s per MiB

    def flood() -> Iterator[bytes]:
        for _ in range(4096):  # 256 MiB, more than any chunk
            yield b"x" * (64 << 10)

    def drip() -> Iterator[bytes]:
        for _ in range(600):
            time.sleep(0.1)
            yield b"x"

    v1 = store.publish_dir(tiny_dirs[0])
    largest = max(c.size for f in v1.files for c in f.chunks or [])
    flooded: list[int] = []
    for parts, reason in ((flood, "digest"), (drip, "slow")):
        tally = Tally()
        newcomer = cache_for(store, tmp_path / f"newcomer-{reason}", tally)
        with streaming_peer(parts, flooded if parts is flood else []) as url:
            newcomer.suggest_peers(1, [url])
            assert same_files(newcomer.path_of(1), tiny_dirs[0])
        assert tally.bad == {reason: 1} and tally.fetched == {"origin": v1.total_size}
    # The flood was read no further than a chunk's bytes (and what the connection buffers held).
    assert sum(flooded) < largest + (16 << 20)


def test_when_no_peer_has_a_chunk_the_origin_sends_it(store: ModelStore, tiny_dirs: dict[int, Path],
                                                      tmp_path: Path) -> None:
    v1 = store.publish_dir(tiny_dirs[0])
    empty = cache_for(store, tmp_path / "empty", Tally())
    tally = Tally()
    newcomer = cache_for(store, tmp_path / "newcomer", tally)
    with peer(empty) as url:
        newcomer.suggest_peers(1, [url])
        newcomer.path_of(1)
    assert tally.fetched == {"origin": v1.total_size} and tally.bad == {"missing": 1}


class SlowOrigin(FolderOrigin):
    """The shared folder on a slow link: each chunk takes a while to read."""

    def read_chunk(self, manifest: Manifest, chunk: ChunkEntry) -> bytes:
        time.sleep(0.05)
        return super().read_chunk(manifest, chunk)


def test_replicas_staging_together_stream_the_version_down_a_chain(store: ModelStore, tiny_dirs: dict[int, Path],
                                                                   tmp_path: Path) -> None:
    """The head reads each chunk from the origin once; each next replica takes it from the one before as soon as
    that one has verified it (its request waits there meanwhile)."""
    v1 = store.publish_dir(tiny_dirs[1])
    tallies = [Tally() for _ in range(3)]
    caches = [cache_for(store, tmp_path / f"r{i}", t, SlowOrigin(store)) for i, t in enumerate(tallies)]
    with peer(caches[0]) as first, peer(caches[1]) as second:
        caches[1].suggest_peers(1, [first])
        caches[2].suggest_peers(1, [second, first])
        threads = [threading.Thread(target=c.path_of, args=(1,)) for c in caches]
        for t in reversed(threads):  # the tail starts first: it must wait for chunks, not fall back
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert tallies[0].fetched == {"origin": v1.total_size}
    assert tallies[1].fetched == tallies[2].fetched == {"peer": v1.total_size}
    assert all(same_files(c.cache_dir / "000001", tiny_dirs[1]) for c in caches)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB file system (tmpfs), to run out of space for real; root only."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_replica_without_room_for_the_new_version_fails_its_stage_with_that_reason(
        store: ModelStore, tiny_dirs: dict[int, Path], small_disk: Path) -> None:
    store.publish_dir(tiny_dirs[0])
    cache = VersionCache(FolderOrigin(store), small_disk / "cache")
    with pytest.raises(LoadError, match=r"no room for version 1 .* MiB are free"):
        cache.path_of(1)
    assert list((small_disk / "cache").iterdir()) == []


def test_gc_removes_the_chunks_no_kept_version_lists_once_past_the_grace_period(
        store: ModelStore, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    v1 = store.publish_dir(tiny_dirs[0])
    tuned = fine_tuned(tiny_dirs[0], tmp_path / "tuned", ["lm_head.weight"])
    store.publish_dir(tuned)
    store.publish_dir(tiny_dirs[1])
    clock = store.clock
    assert isinstance(clock, FakeClock)
    assert store.gc(keep_newest=2, protect=set()) == [1]
    assert chunk_bytes_on_disk(store) > v1.total_size  # v1's own chunk is younger than the grace period: kept
    clock.advance(7200)
    store.gc(keep_newest=2, protect=set())
    listed = {c.sha256 for n in (2, 3) for _, c in store.get(n).chunk_list()}
    assert {p.name for p in store.chunks.names()} == listed  # v1's own chunk went; v2 still has its shared ones
    assert store.verify(2) and store.verify(3)


def test_a_failed_stage_leaves_every_chunk_of_the_kept_versions_servable(
        store: ModelStore, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    """Chunks the failed version shared with a kept one are still served from the kept one, and a pruned version's
    chunks that a kept version also holds stay servable."""
    v1 = store.publish_dir(tiny_dirs[0])
    tuned = fine_tuned(tiny_dirs[0], tmp_path / "tuned", ["lm_head.weight"])
    v2 = store.publish_dir(tuned)
    cache = cache_for(store, tmp_path / "replica", Tally())
    cache.path_of(1)
    (store.chunks.path(next(c.sha256 for _, c in v2.chunk_list()
                            if c.sha256 not in {x.sha256 for _, x in v1.chunk_list()}))).unlink()
    with pytest.raises(LoadError):
        cache.path_of(2)  # its new chunk is gone from the origin: the stage fails
    assert all(cache.wait_chunk(c.sha256, 0.1) is not None for _, c in v1.chunk_list())
    cache.keep = 2
    store.publish_dir(tiny_dirs[1])  # v3
    cache.path_of(3)
    past = time.time() - 10
    os.utime(cache.cache_dir / "000003", (past, past))  # used before v1 (folder mtimes order pruning)
    cache.path_of(1)
    v4 = store.publish_dir(fine_tuned(tiny_dirs[1], tmp_path / "tuned-1", ["lm_head.weight"]))
    cache.path_of(4)  # keeps v1 and v4: v3, whose chunks v4 mostly shares, is removed
    assert not (cache.cache_dir / "000003").exists()
    assert all(cache.wait_chunk(c.sha256, 0.1) is not None for m in (v1, v4) for _, c in m.chunk_list())


def test_a_replica_restarted_mid_stage_uses_again_the_chunks_it_had_written(
        store: ModelStore, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    v1 = store.publish_dir(tiny_dirs[0])
    first = cache_for(store, tmp_path / "replica", Tally())
    first.path_of(1)
    # As a process killed mid-stage leaves it: the version's folder not renamed into place yet.
    folder = first.cache_dir / "000001"
    (folder / ".MANIFEST.json").write_bytes((folder / "MANIFEST.json").read_bytes())
    (folder / "MANIFEST.json").unlink()
    folder.rename(first.cache_dir / ".partial-000001-0badc0de")
    half = first.cache_dir / ".partial-000001-0badc0de" / "model.safetensors"
    data = bytearray(half.read_bytes())
    data[-10] ^= 0xFF  # the chunk being written when it died: torn
    half.write_bytes(bytes(data))
    tally = Tally()
    restarted = cache_for(store, tmp_path / "replica", tally)
    assert same_files(restarted.path_of(1), tiny_dirs[0])
    torn = next(c for _, c in v1.chunk_list() if c.offset + c.size == len(data) and c.size > 1000)
    assert tally.fetched == {"local": v1.total_size - torn.size, "origin": torn.size}
    assert [p.name for p in restarted.cache_dir.iterdir()] == ["000001"]  # the leftover is gone


def test_a_peer_that_announces_a_chunk_and_closes_halfway_is_counted_as_truncated(
        store: ModelStore, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    v1 = store.publish_dir(tiny_dirs[0])
    sizes = {c.sha256: c.size for f in v1.files for c in f.chunks or []}
    app = FastAPI()

    @app.get("/peer/chunks/{sha256}")
    def chunk(sha256: str) -> StreamingResponse:
        def half() -> Iterator[bytes]:
            yield b"x" * (sizes[sha256] // 2)  # then the connection closes, short of its Content-Length

        return StreamingResponse(half(), headers={"content-length": str(sizes[sha256])})

    tally = Tally()
    newcomer = cache_for(store, tmp_path / "newcomer", tally)
    with serving(app) as url:
        newcomer.suggest_peers(1, [url])
        assert same_files(newcomer.path_of(1), tiny_dirs[0])
    assert tally.bad == {"truncated": 1} and tally.fetched == {"origin": v1.total_size}
    assert newcomer.transfer is not None and newcomer.transfer.report()["failed"] is None


def test_a_stage_that_stops_short_says_so_in_its_transfer_report(store: ModelStore, tiny_dirs: dict[int, Path],
                                                                 tmp_path: Path) -> None:
    v1 = store.publish_dir(tiny_dirs[0])
    _, lost = v1.chunk_list()[-1]
    store.chunks.path(lost.sha256).unlink()  # no source has it any more
    cache = cache_for(store, tmp_path / "replica", Tally())
    with pytest.raises(Exception, match=lost.sha256[:12]):
        cache.path_of(1)
    assert cache.transfer is not None
    report = cache.transfer.report()
    assert report["finished"] is True and lost.sha256[:12] in str(report["failed"])


def test_asks_for_chunks_nobody_sends_do_not_hold_up_a_chunk_this_replica_has(
        store: ModelStore, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    import asyncio

    import httpx

    v1 = store.publish_dir(tiny_dirs[0])
    holder = cache_for(store, tmp_path / "holder", Tally())
    holder.path_of(1)  # idle: no stage runs, so an unknown chunk waits a moment for one to start
    _, real = v1.chunk_list()[0]
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def asks(url: str) -> tuple[int, list[bool]]:
        async with httpx.AsyncClient(headers=headers, timeout=60) as client:
            unknown = [asyncio.ensure_future(client.get(f"{url}/peer/chunks/{i:064x}")) for i in range(48)]
            await asyncio.sleep(0.2)  # every one of them has arrived and waits
            answer = await client.get(f"{url}/peer/chunks/{real.sha256}")
            pending_then = [not task.done() for task in unknown]
            statuses = {r.status_code for r in await asyncio.gather(*unknown)}
            assert statuses == {404}
            return answer.status_code, pending_then

    with peer(holder) as url:
        status, pending_then = asyncio.run(asks(url))
    assert status == 200
    assert all(pending_then)  # answered while all 48 still waited: they held none of the peer threads


def test_the_version_a_replica_serves_is_never_pruned_however_many_newer_ones_arrive(
        store: ModelStore, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    """Stages that never commit (aborted publishes) were once "used more recently" than the served version, whose
    copy then went: a later diff came from the origin instead of this disk, and peers asking for it got 404s."""
    store.publish_dir(tiny_dirs[0])
    for i in range(5):
        store.publish_dir(fine_tuned(tiny_dirs[0], tmp_path / f"tuned{i}", [f"model.layers.{i % 2}.mlp.up_proj.weight"]
                                     if i % 2 else ["lm_head.weight"]))
    tally = Tally()
    cache = cache_for(store, tmp_path / "replica", tally)  # keeps 3
    cache.in_use = lambda: {1}
    served = cache.path_of(1)
    for n in range(2, 7):
        cache.path_of(n)  # staged, then aborted: the replica goes on serving 1
    assert served.is_dir() and cache.verify(1)
    assert sorted(p.name for p in cache.cache_dir.iterdir()) == ["000001", "000004", "000005", "000006"]


def test_a_local_copy_found_damaged_is_neither_used_again_nor_served_to_peers(
        store: ModelStore, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    v1 = store.publish_dir(tiny_dirs[0])
    tuned = [fine_tuned(tiny_dirs[0], tmp_path / f"tuned{i}", [name])
             for i, name in enumerate(["lm_head.weight", "model.layers.1.mlp.up_proj.weight"])]
    v2, v3 = (store.publish_dir(folder) for folder in tuned)
    tally = Tally()
    cache = cache_for(store, tmp_path / "replica", tally)
    served = cache.path_of(1)
    entry, first = v1.chunk_list()[0]  # a chunk every later version shares
    with open(served / entry.path, "r+b") as f:  # a bit flips on this replica's disk
        f.seek(first.offset)
        byte = f.read(1)
        f.seek(first.offset)
        f.write(bytes([byte[0] ^ 0x01]))
    tally.fetched.clear()
    cache.path_of(2)
    assert tally.fetched["origin"] == new_chunks(v1, v2) + first.size  # the damaged chunk came from the origin once
    assert cache.read_held(first.sha256, timeout_s=1) == store.chunks.read(first)  # peers get the good copy
    tally.fetched.clear()
    cache.path_of(3)
    assert tally.fetched["origin"] == v3.new_bytes  # the next stage takes the good copy: no second fetch


def test_a_stage_refused_for_lack_of_room_says_so_in_its_transfer_report(
        store: ModelStore, tiny_dirs: dict[int, Path], small_disk: Path) -> None:
    store.publish_dir(tiny_dirs[0])
    cache = VersionCache(FolderOrigin(store), small_disk / "cache")
    with pytest.raises(LoadError, match="no room"):
        cache.path_of(1)
    assert cache.transfer is not None
    report = cache.transfer.report()
    assert report["version"] == 1 and report["finished"] is True and "no room" in str(report["failed"])
