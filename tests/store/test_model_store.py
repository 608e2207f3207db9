"""ModelStore with real files: publish, list, verify, crash safety, racing publishers, refs, gc."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import lockstep
from lockstep.core.clock import FakeClock
from lockstep.core.errors import BadModelRef, BadRequest, NotFound, UnsafeModel, VerificationError
from lockstep.store import MANIFEST_NAME, Manifest, ModelStore, content_digest, scan_dir
from lockstep.store.model_store import _Listing
from tests.support.stores import damage_stored_file, publish_as_files


def make_model(path: Path, seed: int = 0, *, big: bool = False) -> Path:
    """A fake model folder: config.json, model.safetensors (small tensors; 4 MiB more when big), tokenizer."""
    import torch  # imported here so that spawned publisher processes do not pay for it
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "seed": seed}))
    tensors = {"w": torch.full((8, 8), float(seed)), "b": torch.arange(8, dtype=torch.float32) + seed}
    if big:
        tensors["big"] = torch.zeros(1 << 20)  # 4 MiB: several 1 MiB copy chunks
    save_file(tensors, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    return path


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "shared")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_model(tmp_path / "src")


def numbers(store: ModelStore) -> list[int]:
    return [m.version for m in store.list()]


def test_publish_dir_round_trip(store: ModelStore, src: Path) -> None:
    calls: list[tuple[int, int]] = []
    manifest = store.publish_dir(src, metadata={"step": 10, "loss": 1.5},
                                 progress=lambda done, total: calls.append((done, total)))
    assert manifest.version == 1 and manifest.kind == "directory" and manifest.parent is None
    assert manifest.source == str(src.resolve()) and manifest.metadata == {"step": 10, "loss": 1.5}
    assert [f.model_copy(update={"chunks": None}) for f in manifest.files] == scan_dir(src)
    assert manifest.digest == content_digest(scan_dir(src))
    assert manifest.stored == "chunks" and manifest.new_bytes == manifest.total_size  # a first version is all new
    assert store.list() == [manifest] and store.get(1) == manifest and store.latest() == manifest
    assert store.verify(1) == manifest
    assert sorted(os.listdir(store.folder_of(1))) == [MANIFEST_NAME]  # the bytes live in chunks/, once
    assert Manifest.from_json((store.folder_of(1) / MANIFEST_NAME).read_bytes()) == manifest
    path = store.path_of(1)  # assembled on local disk for a reader in this process
    for entry in manifest.files:
        assert (path / entry.path).read_bytes() == (src / entry.path).read_bytes()
    assert sorted(os.listdir(store.versions_dir)) == ["000001"]  # no temporaries left behind
    total = manifest.total_size
    assert calls[-1] == (total, total)


def test_a_deleted_stores_assembled_versions_go_when_another_store_assembles(tmp_path: Path, src: Path) -> None:
    assembled = tmp_path / "assembled"
    gone, kept = (ModelStore(tmp_path / name, assemble_dir=assembled / name) for name in ("gone", "kept"))
    for store in (gone, kept):
        store.publish_dir(src)
        assert (store.path_of(1) / "model.safetensors").is_file()
    (assembled / "unmarked" / "000001").mkdir(parents=True)  # not a store's: left alone
    shutil.rmtree(gone.root)

    ModelStore(tmp_path / "kept", assemble_dir=assembled / "kept").path_of(1)  # a new process on the kept store

    assert sorted(p.name for p in assembled.iterdir() if not p.name.startswith(".")) == ["kept", "unmarked"]
    assert not any(p.name.startswith(".gone") for p in assembled.iterdir())
    assert (kept.path_of(1) / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_versions_are_numbered_in_order_and_identify_content(store: ModelStore, tmp_path: Path) -> None:
    first = store.publish_dir(make_model(tmp_path / "a", seed=1), source="run-1/step-1")
    second = store.publish_dir(make_model(tmp_path / "b", seed=2), parent=1, metadata={"step": 2})
    again = store.publish_dir(tmp_path / "a", parent=2)
    assert [first.version, second.version, again.version] == [1, 2, 3]
    assert first.source == "run-1/step-1" and again.parent == 2
    assert again.digest == first.digest != second.digest  # same files, same digest
    assert numbers(store) == [1, 2, 3] and store.next_version_hint() == 4
    assert store.latest() == again and ModelStore.ref(3) == "versions/000003"


@pytest.mark.parametrize("remove", ["config.json", "model.safetensors"])
def test_refuses_a_folder_that_is_not_a_model(store: ModelStore, src: Path, remove: str) -> None:
    (src / remove).unlink()
    with pytest.raises(BadModelRef, match="not a model directory"):
        store.publish_dir(src)
    with pytest.raises(BadModelRef, match="not a model directory"):
        store.publish_dir(src / "nowhere")
    assert store.next_version_hint() == 1 and store.list() == []


@pytest.mark.parametrize("header", [b"[" * 100_000 + b"]" * 100_000, b"{not json", b'{"w": {"dtype": "F32"}}'],
                         ids=["nested-too-deeply", "not-json", "no-offsets"])
def test_refuses_weights_whose_safetensors_header_cannot_be_read(store: ModelStore, src: Path, header: bytes) -> None:
    """Before, a header nested too deeply passed the check, and the publish (202) then failed on a
    RecursionError, the upload gone."""
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(BadModelRef, match="model.safetensors is not a readable safetensors file"):
        store.publish_dir(src)
    assert store.list() == []


def test_refuses_pickle_weights_unless_allowed(store: ModelStore, src: Path) -> None:
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UnsafeModel, match="LOCKSTEP_ALLOW_PICKLE=1"):
        store.publish_dir(src)
    assert store.list() == []
    manifest = store.publish_dir(src, allow_pickle=True)
    assert "pytorch_model.bin" in [f.path for f in manifest.files]
    assert manifest.digest != content_digest([f for f in manifest.files if f.path != "pytorch_model.bin"])
    store.verify(manifest.version)


def test_refuses_metadata_that_is_not_json(store: ModelStore, src: Path) -> None:
    with pytest.raises(BadRequest, match="JSON"):
        store.publish_dir(src, metadata={"when": object()})
    assert store.next_version_hint() == 1


def test_a_flipped_byte_in_a_weight_file_is_refused(store: ModelStore, src: Path) -> None:
    store.publish_dir(src)
    damage_stored_file(store.root, 1, "model.safetensors")
    with pytest.raises(VerificationError) as info:
        store.verify(1)
    assert "model.safetensors" in str(info.value) and "does not match its digest" in str(info.value)


def make_hf_snapshot(hf_home: Path, src: Path, revision: str) -> Path:
    """A Hugging Face cache layout: snapshot files are symlinks to content-addressed blobs."""
    repo = hf_home / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for entry in scan_dir(src):
        (repo / "blobs" / entry.sha256).write_bytes((src / entry.path).read_bytes())
        (snapshot / entry.path).symlink_to(Path("../../blobs") / entry.sha256)
    return snapshot


def test_publish_repo_records_the_revision_without_copying(store: ModelStore, src: Path,
                                                           tmp_path: Path) -> None:
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = make_hf_snapshot(tmp_path / "hf_home", src, revision)
    manifest = store.publish_repo(snapshot, repo_id="org/tiny", revision=revision, metadata={"note": "base"})
    assert (manifest.kind, manifest.repo_id, manifest.revision, manifest.source) == \
        ("repo", "org/tiny", revision, "org/tiny")
    assert os.listdir(store.path_of(manifest.version)) == [MANIFEST_NAME]
    assert manifest.digest == content_digest(scan_dir(src))  # same files as a copied-in version
    with pytest.raises(BadRequest, match="snapshot folder"):
        store.verify(manifest.version)
    assert store.verify(manifest.version, snapshot) == manifest
    blob = snapshot.parent.parent / "blobs" / next(f.sha256 for f in manifest.files
                                                    if f.path == "model.safetensors")
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"model\.safetensors has sha256"):
        store.verify(manifest.version, snapshot)


def test_list_skips_unreadable_versions_with_a_warning(store: ModelStore, src: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    store.publish_dir(src)
    versions = store.versions_dir
    (versions / "000002").mkdir()
    (versions / "000002" / MANIFEST_NAME).write_text('{"version": 2, "files": [')  # torn
    (versions / "000003").mkdir()  # no manifest at all
    (versions / "000004").mkdir()
    (versions / "000004" / MANIFEST_NAME).write_bytes(store.get(1).to_json())  # says version 1
    (versions / "junk").mkdir()
    with caplog.at_level(logging.WARNING):
        assert numbers(store) == [1]
    assert "skipping version 2" in caplog.text and "skipping version 4" in caplog.text
    assert store.latest() == store.get(1)
    for n in (2, 3, 4):
        with pytest.raises(NotFound):
            store.get(n)
    assert store.publish_dir(src).version == 5  # numbers of broken entries are never reused


def test_a_publish_in_progress_is_invisible(store: ModelStore, src: Path) -> None:
    store.publish_dir(src)
    partial = store.versions_dir / ".partial-000002" / "content"
    partial.mkdir(parents=True)
    (partial / MANIFEST_NAME).write_bytes(store.get(1).to_json())
    assert numbers(store) == [1]
    with pytest.raises(NotFound):
        store.get(2)
    assert store.next_version_hint() == 3
    assert store.publish_dir(src).version == 3


class StaleListingStore(ModelStore):
    """A store whose directory listings are stale, as on an NFS client with cached directories."""

    def _scan(self) -> _Listing:
        return _Listing()


def test_a_stale_listing_still_gets_a_unique_number(store: ModelStore, src: Path, tmp_path: Path) -> None:
    for _ in range(3):
        store.publish_dir(src)
    before = store.list()
    stale = StaleListingStore(store.root)
    manifest = stale.publish_dir(make_model(tmp_path / "other", seed=5))
    assert manifest.version == 4
    assert store.list() == [*before, manifest]
    for n in (1, 2, 3, 4):
        store.verify(n)
    assert not [name for name in os.listdir(store.versions_dir) if name.startswith(".")]


CRASHING_PUBLISHER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lockstep.store import ModelStore

    root, src, marker = (Path(arg) for arg in sys.argv[1:4])

    def progress(done, total):
        if done > (1 << 20) and not marker.exists():  # past the first MiB of the weight file
            marker.write_text(str(done))
            time.sleep(120)  # hold still mid-copy until the test kills us

    ModelStore(root).publish_dir(src, progress=progress)
""")


def test_a_crash_mid_publish_leaves_nothing_visible(store: ModelStore, tmp_path: Path) -> None:
    src = make_model(tmp_path / "big", big=True)
    store.publish_dir(make_model(tmp_path / "small"))
    marker = tmp_path / "mid-copy"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(lockstep.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-c", CRASHING_PUBLISHER, str(store.root), str(src), str(marker)]
    proc = subprocess.Popen(argv, env=env)
    try:
        for _ in range(1200):  # bounded: at most ~60 s for the child to start and reach mid-copy
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), f"publisher never reached mid-copy (exit code {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    partial = store.versions_dir / ".partial-000002"
    assert partial.is_dir() and not (partial / "content" / MANIFEST_NAME).exists()  # really killed mid-publish
    assert numbers(store) == [1]
    assert store.publish_dir(src).version == 3  # a fresh number, not the crashed one's

    assert store.gc(keep_newest=5, protect=set()) == [] and partial.exists()  # young: maybe alive
    later = ModelStore(store.root, clock=FakeClock(start=time.time() + 2 * 3600))
    assert later.gc(keep_newest=5, protect=set()) == []
    assert not partial.exists()
    assert sorted(os.listdir(store.versions_dir)) == ["000001", "000003"]
    assert store.publish_dir(src).version == 4
    store.verify(3)


def _publisher(root: str, src: str, rounds: int, barrier: Any, results: Any) -> None:
    """Runs in a spawned process: publish ``rounds`` versions as soon as every publisher is ready."""
    store = ModelStore(Path(root))
    barrier.wait(timeout=120)
    try:
        results.put([store.publish_dir(Path(src), metadata={"pid": os.getpid()}).version
                     for _ in range(rounds)])
    except Exception as e:  # noqa: BLE001 - reported, so the test fails at once with the reason
        results.put(f"publisher {os.getpid()} failed: {e!r}")


def test_racing_publishers_never_get_the_same_number(store: ModelStore, src: Path) -> None:
    publishers, rounds = 4, 3
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(publishers), ctx.Queue()
    procs = [ctx.Process(target=_publisher, args=(str(store.root), str(src), rounds, barrier, results))
             for _ in range(publishers)]
    for proc in procs:
        proc.start()
    try:
        reports = [results.get(timeout=180) for _ in procs]
        assert not [r for r in reports if isinstance(r, str)], reports
        got = [n for report in reports for n in report]
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    assert len(got) == publishers * rounds and len(set(got)) == len(got)
    assert numbers(store) == sorted(got)
    for n in got:
        store.verify(n)
    assert {m.metadata["pid"] for m in store.list()} == {p.pid for p in procs}
    assert not [name for name in os.listdir(store.versions_dir) if name.startswith(".")]


@pytest.mark.parametrize("ref", ["versions/000002", "versions/2", "versions/0000002", "v2", "2"])
def test_resolve_ref_accepts_version_forms(store: ModelStore, src: Path, ref: str) -> None:
    store.publish_dir(src)
    store.publish_dir(src)
    assert store.resolve_ref(ref) == 2


@pytest.mark.parametrize("ref", [
    "", "..", "../versions/000001", "versions/../../etc/passwd", "versions/000001/../../x",
    "/models/versions/000001", "C:/models/versions/000001", "versions\\000001", "versions/abc",
    "versions/1/config.json", "versions/1/", "./versions/1", "org/model", "versions/-1", " versions/1", "v 1",
])
def test_resolve_ref_refuses_anything_else(store: ModelStore, src: Path, ref: str) -> None:
    store.publish_dir(src)
    with pytest.raises(BadModelRef, match="allowed: versions/<N>"):
        store.resolve_ref(ref)


def test_resolve_ref_refuses_a_symlink_leading_outside(store: ModelStore, src: Path, tmp_path: Path) -> None:
    store.publish_dir(src)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / MANIFEST_NAME).write_bytes(store.get(1).to_json().replace(b'"version": 1', b'"version": 2'))
    (store.versions_dir / "000002").symlink_to(outside)
    with pytest.raises(BadModelRef, match="symlink leading outside"):
        store.resolve_ref("versions/2")
    assert numbers(store) == [1]


def test_resolve_ref_of_an_unpublished_version_is_not_found(store: ModelStore, src: Path) -> None:
    store.publish_dir(src)
    with pytest.raises(NotFound, match="published: 1"):
        store.resolve_ref("versions/000099")


def test_gc_keeps_protected_and_newest(store: ModelStore, src: Path) -> None:
    for _ in range(6):
        store.publish_dir(src)
    assert store.gc(keep_newest=2, protect={1, 3}) == [2, 4]
    assert numbers(store) == [1, 3, 5, 6]
    assert sorted(os.listdir(store.versions_dir)) == ["000001", "000003", "000005", "000006"]
    assert store.gc(keep_newest=2, protect={1, 3}) == []
    assert store.gc(keep_newest=1, protect=set()) == [1, 3, 5]
    assert store.publish_dir(src).version == 7  # the newest survives, so numbers never go back
    with pytest.raises(BadRequest, match="at least 1"):
        store.gc(keep_newest=0, protect=set())


def test_gc_removes_old_leftovers_only(store: ModelStore, src: Path) -> None:
    store.publish_dir(src)
    partial = store.versions_dir / ".partial-000002" / "content"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    trash = store.versions_dir / ".trash-000009-deadbeef"
    trash.mkdir()
    (trash / "config.json").write_text("{}")
    clock = FakeClock(start=time.time())
    aged = ModelStore(store.root, clock=clock)
    assert aged.gc(keep_newest=1, protect=set()) == []
    assert partial.exists() and not trash.exists()  # unfinished deletions always go
    clock.advance(1800)
    aged.gc(keep_newest=1, protect=set())
    assert partial.exists()
    now = clock.time()
    os.utime(partial / "model.safetensors", (now, now))  # a live publisher keeps writing: not stale
    clock.advance(3000)
    aged.gc(keep_newest=1, protect=set())
    assert partial.exists()
    clock.advance(1000)
    aged.gc(keep_newest=1, protect=set())
    assert not partial.parent.exists()
    assert sorted(os.listdir(store.versions_dir)) == ["000001"]


def test_plan_gc_tells_committed_aborted_unrecorded_and_unusable_versions_apart(store: ModelStore, src: Path
                                                                                ) -> None:
    clock = FakeClock(start=time.time())
    store = ModelStore(store.root, clock=clock)
    for _ in range(6):
        store.publish_dir(src)
    (store.folder_of(2) / MANIFEST_NAME).write_text("{torn")  # unusable
    outcomes = {1: "committed", 3: "aborted", 4: "committed", 6: "committed"}  # 5: no outcome recorded
    young = {e.version: e for e in store.plan_gc(1, {1: "served by r1"}, outcomes, grace_s=600).entries}
    assert [n for n, e in young.items() if e.remove] == [4]  # within the grace period every leftover stays
    assert "aborted, never committed" in young[3].reason and "kept for 10 min more" in young[3].reason
    assert "no outcome recorded yet" in young[5].reason and "unusable" in young[2].reason

    clock.advance(601)
    plan = store.plan_gc(1, {1: "served by r1"}, outcomes, grace_s=600)
    decided = {e.version: (e.remove, e.reason) for e in plan.entries}
    assert decided[1] == (False, "served by r1")
    assert decided[2][0] and decided[2][1].startswith("unusable: MANIFEST.json is missing or invalid")
    assert decided[3] == (True, "aborted, never committed")
    assert decided[4][0] and "older than the 1 newest committed" in decided[4][1]
    assert decided[5][0]  # unrecorded past the grace period counts as committed: out of the window of 1
    assert decided[6] == (False, "the newest version (its number is never reused); one of the 1 newest committed "
                                 "versions (LOCKSTEP_KEEP_VERSIONS)")
    assert plan.freed_bytes == 3 * sum(f.stat().st_size for f in src.iterdir())  # 3, 4, 5 (2's size is unknown)
    assert store.apply_gc(plan) == [2, 3, 4, 5]
    assert numbers(store) == [1, 6]


def test_a_grace_period_of_zero_never_removes_a_publish_that_is_still_writing(store: ModelStore, src: Path) -> None:
    store.publish_dir(src)
    partial = store.versions_dir / ".partial-000002" / "content"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"being written")
    plan = store.plan_gc(1, {}, {}, grace_s=0)
    assert [e.name for e in plan.removals] == [] and store.apply_gc(plan) == []
    assert partial.exists()


def test_a_served_file_never_leads_out_of_its_version(store: ModelStore, src: Path, tmp_path: Path) -> None:
    n = publish_as_files(store, src, 1).version  # served file by file: the format-1 layout
    assert store.file_path(n, "config.json") == (store.path_of(n) / "config.json").resolve()
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (store.path_of(n) / "config.json").unlink()
    (store.path_of(n) / "config.json").symlink_to(outside)
    with pytest.raises(NotFound, match="outside the version's folder"):
        store.file_path(n, "config.json")
    with pytest.raises(NotFound, match="no file 'MANIFEST.json'"):
        store.file_path(n, MANIFEST_NAME)
    (store.path_of(n) / "tokenizer.json").unlink()
    with pytest.raises(NotFound, match="missing"):
        store.file_path(n, "tokenizer.json")
