"""RemoteStore: versions downloaded from the trainer's store over HTTP, verified file by file, cached.

The trainer's real routes serve the store (in this process, through its ASGI app); nothing is mocked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lockstep.core.errors import NotFound, Unauthorized, VerificationError
from lockstep.core.settings import load_settings
from lockstep.models import loader
from lockstep.store import ModelStore
from lockstep.store.remote import RemoteStore
from lockstep.trainer.server.app import create_app
from tests.support.stores import damage_stored_file, publish_as_files

TOKEN = "s3cret"
BASE = "http://trainer"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "trainer-data"


@pytest.fixture
def trainer(data_dir: Path) -> Iterator[TestClient]:
    settings = load_settings(api_token=TOKEN, discovery="static", trainer_data_dir=data_dir).model_copy(
        update={"shared_dir": None})
    with TestClient(create_app(settings), base_url=BASE, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


@pytest.fixture
def remote(trainer: TestClient, tmp_path: Path) -> RemoteStore:
    return RemoteStore(BASE, tmp_path / "cache", client=trainer, keep=2)


def publish(data_dir: Path, folder: Path) -> int:
    return ModelStore(data_dir).publish_dir(folder, source=str(folder)).version


def test_a_version_is_downloaded_verified_cached_and_loads(remote: RemoteStore, data_dir: Path,
                                                           tiny_dirs: dict[int, Path],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    n = publish(data_dir, tiny_dirs[1])
    caplog.set_level(logging.INFO, logger="lockstep.store.version_cache")
    folder = remote.path_of(n)
    assert folder == remote.cache_dir / f"{n:06d}"
    originals = {p.name: p.read_bytes() for p in tiny_dirs[1].iterdir() if p.is_file()}
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "MANIFEST.json"} == originals
    assert "every chunk verified" in caplog.text
    caplog.clear()
    assert remote.path_of(n) == folder  # the cached copy is used: no second download
    assert "assembling" not in caplog.text
    # loader.resolve takes the remote store as it takes the shared one: a verified folder with the digest.
    settings = load_settings()
    resolved = loader.resolve(f"versions/{n}", settings, remote)
    assert resolved.path == folder and resolved.content_digest == remote.get(n).digest


def test_a_damaged_chunk_in_the_trainers_store_is_refused_and_nothing_is_cached(
        remote: RemoteStore, data_dir: Path, tiny_dirs: dict[int, Path]) -> None:
    n = publish(data_dir, tiny_dirs[1])
    damaged = damage_stored_file(data_dir, n, "model.safetensors")
    with pytest.raises(NotFound, match="does not match its digest"):  # the trainer checks before it sends
        remote.path_of(n)
    assert [p.name for p in remote.cache_dir.iterdir()] == []
    # The damaged chunk is gone from the trainer's store, so publishing the model again, as the error says,
    # stores it anew (a chunk kept under its name is never rewritten).
    assert not damaged.exists()
    again = publish(data_dir, tiny_dirs[1])
    folder = remote.path_of(again)
    assert (folder / "model.safetensors").read_bytes() == (tiny_dirs[1] / "model.safetensors").read_bytes()


def test_a_truncated_chunk_in_the_trainers_store_is_refused(remote: RemoteStore, data_dir: Path,
                                                            tiny_dirs: dict[int, Path]) -> None:
    n = publish(data_dir, tiny_dirs[1])
    damage_stored_file(data_dir, n, "model.safetensors", truncate=True)
    with pytest.raises(NotFound, match="does not match its digest"):
        remote.path_of(n)


def test_a_version_stored_as_files_is_downloaded_file_by_file_and_checked(
        remote: RemoteStore, data_dir: Path, tiny_dirs: dict[int, Path]) -> None:
    store = ModelStore(data_dir)
    store.versions_dir.mkdir(parents=True)
    publish_as_files(store, tiny_dirs[1], 1)  # written by an older Lockstep
    folder = remote.path_of(1)
    assert (folder / "model.safetensors").read_bytes() == (tiny_dirs[1] / "model.safetensors").read_bytes()
    weights = store.folder_of(1) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    publish_as_files(store, tiny_dirs[1], 2)
    (store.folder_of(2) / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.safetensors has sha256 .* the download is refused"):
        remote.path_of(2)


def test_a_cached_copy_that_differs_from_the_trainers_version_is_replaced(remote: RemoteStore, data_dir: Path,
                                                                          tiny_dirs: dict[int, Path]) -> None:
    n = publish(data_dir, tiny_dirs[1])
    remote.path_of(n)
    # The trainer lost its data folder and numbered another model N again: the replica follows the trainer.
    (data_dir / "versions" / f"{n:06d}").rename(data_dir / "gone")
    assert publish(data_dir, tiny_dirs[2]) == n
    folder = remote.path_of(n)
    assert (folder / "model.safetensors").read_bytes() == (tiny_dirs[2] / "model.safetensors").read_bytes()
    remote.verify(n)


def test_the_cache_keeps_only_the_newest_versions(remote: RemoteStore, data_dir: Path,
                                                  tiny_dirs: dict[int, Path]) -> None:
    versions = [publish(data_dir, tiny_dirs[seed]) for seed in (0, 1, 2)]
    for n in versions:
        remote.path_of(n)
    assert sorted(p.name for p in remote.cache_dir.iterdir()) == [f"{n:06d}" for n in versions[-2:]]


def test_the_cache_keeps_what_was_used_last_so_a_served_old_version_stays_and_leftovers_go(
        remote: RemoteStore, data_dir: Path, tiny_dirs: dict[int, Path]) -> None:
    import os

    versions = [publish(data_dir, tiny_dirs[seed]) for seed in (0, 1, 2)]
    for n in versions:
        remote.path_of(n)
    partial = remote.cache_dir / ".partial-000009-deadbeef"  # a download a crash cut off
    partial.mkdir()
    trash = remote.cache_dir / ".trash-cafebabe"  # a removal a crash cut off
    trash.mkdir()
    (trash / "model.safetensors").write_bytes(b"half")
    served = versions[1]  # rolled back to: served again, then a new version comes
    past = os.stat(remote.cache_dir / f"{versions[2]:06d}").st_mtime - 10
    os.utime(remote.cache_dir / f"{versions[2]:06d}", (past, past))  # the newest was used before the rollback
    assert remote.path_of(served) == remote.cache_dir / f"{served:06d}"  # a cache hit marks it used
    fourth = publish(data_dir, tiny_dirs[0])
    remote.path_of(fourth)  # the download prunes: the two used last stay (keep=2), whatever their numbers
    assert sorted(p.name for p in remote.cache_dir.iterdir()) == [f"{served:06d}", f"{fourth:06d}"]


def test_a_wrong_token_and_an_unknown_version_say_what_is_wrong(trainer: TestClient, data_dir: Path,
                                                                tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    n = publish(data_dir, tiny_dirs[0])
    trainer.headers["Authorization"] = "Bearer wrong"
    with pytest.raises(Unauthorized, match="LOCKSTEP_API_TOKEN"):
        RemoteStore(BASE, tmp_path / "cache", client=trainer).path_of(n)
    trainer.headers["Authorization"] = f"Bearer {TOKEN}"
    with pytest.raises(NotFound, match="version 99"):
        RemoteStore(BASE, tmp_path / "cache", client=trainer).path_of(99)
