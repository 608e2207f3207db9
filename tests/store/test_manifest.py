"""MANIFEST.json: hashing, scanning, the content digest, verification, tolerant reading."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lockstep.core.errors import VerificationError
from lockstep.store.manifest import (
    CHUNK_BYTES,
    MAX_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_VERSION,
    MAX_WALL_TIME,
    FileEntry,
    Manifest,
    content_digest,
    hash_file,
    scan_dir,
    verify_dir,
)


def write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def model_files(root: Path) -> Path:
    write(root, "config.json", b'{"model_type": "llama"}')
    write(root, "model.safetensors", b"weights-" * 1000)
    write(root, "tokenizer.json", b'{"vocab": {}}')
    return root


def manifest_for(root: Path, **overrides: object) -> Manifest:
    files = scan_dir(root)
    fields: dict[str, object] = {"version": 1, "created_at": 1.0, "source": str(root), "kind": "directory",
                                 "digest": content_digest(files), "files": files}
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_hash_file_streams_in_chunks(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK_BYTES + 123)
    write(tmp_path, "big", data)
    chunks: list[int] = []
    assert hash_file(tmp_path / "big", chunks.append) == hashlib.sha256(data).hexdigest()
    assert chunks == [CHUNK_BYTES, CHUNK_BYTES, 123]


def test_scan_dir_lists_relative_posix_paths_and_skips_manifest_and_hidden(tmp_path: Path) -> None:
    model_files(tmp_path)
    write(tmp_path, "sub/dir/extra.txt", b"x")
    write(tmp_path, "MANIFEST.json", b"{}")
    write(tmp_path, ".model.safetensors.tmp", b"half")
    write(tmp_path, ".cache/huggingface/download.lock", b"")
    progress: list[tuple[int, int]] = []
    entries = scan_dir(tmp_path, lambda done, total: progress.append((done, total)))
    assert [e.path for e in entries] == ["config.json", "model.safetensors", "sub/dir/extra.txt",
                                         "tokenizer.json"]
    by_path = {e.path: e for e in entries}
    data = (tmp_path / "model.safetensors").read_bytes()
    assert by_path["model.safetensors"].size == len(data)
    assert by_path["model.safetensors"].sha256 == hashlib.sha256(data).hexdigest()
    total = sum(e.size for e in entries)
    assert progress[-1] == (total, total)


def test_content_digest_follows_its_documented_definition(tmp_path: Path) -> None:
    entries = scan_dir(model_files(tmp_path))
    triples = sorted([e.path, e.size, e.sha256] for e in entries
                     if e.path in ("config.json", "model.safetensors"))
    expected = hashlib.sha256(json.dumps(triples, separators=(",", ":")).encode()).hexdigest()
    assert content_digest(entries) == expected


def test_content_digest_identifies_weights_and_config_only(tmp_path: Path) -> None:
    a = scan_dir(model_files(tmp_path / "a"))
    base = content_digest(a)
    assert content_digest(list(reversed(a))) == base  # order does not matter
    write(tmp_path / "a", "tokenizer.json", b'{"vocab": {"x": 1}}')
    write(tmp_path / "a", "README.md", b"notes")
    assert content_digest(scan_dir(tmp_path / "a")) == base  # non-weight files do not count
    write(tmp_path / "a", "model.safetensors", b"weights-" * 999 + b"weightsX")
    assert content_digest(scan_dir(tmp_path / "a")) != base
    b = scan_dir(model_files(tmp_path / "b"))
    write(tmp_path / "b", "config.json", b'{"model_type": "gpt2"}')
    assert content_digest(scan_dir(tmp_path / "b")) != base
    write(tmp_path / "b", "config.json", b'{"model_type": "llama"}')
    write(tmp_path / "b", "model-00002-of-00002.safetensors", b"shard")
    write(tmp_path / "b", "model.safetensors.index.json", b"{}")
    shards = scan_dir(tmp_path / "b")
    assert content_digest(shards) != base
    assert content_digest([e for e in shards if e.path != "model.safetensors.index.json"]) \
        != content_digest(shards)  # the weight index is part of the content
    assert content_digest(b) == base


def test_verify_dir_accepts_matching_files(tmp_path: Path) -> None:
    root = model_files(tmp_path)
    verify_dir(root, manifest_for(root))


def _missing(root: Path) -> None:
    (root / "tokenizer.json").unlink()


def _resized(root: Path) -> None:
    write(root, "model.safetensors", b"weights-" * 999)


def _flipped(root: Path) -> None:
    data = bytearray((root / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / "model.safetensors").write_bytes(bytes(data))


def _extra_weights(root: Path) -> None:
    write(root, "adapter.safetensors", b"smuggled")


@pytest.mark.parametrize(("damage", "bad_file", "what"), [
    (_missing, "tokenizer.json", "is missing"),
    (_resized, "model.safetensors", "has size 7992 bytes, MANIFEST.json says 8000"),
    (_flipped, "model.safetensors", "has sha256"),
    (_extra_weights, "adapter.safetensors", "is not listed in MANIFEST.json"),
])
def test_verify_dir_refuses_damaged_files(tmp_path: Path, damage: Callable[[Path], None], bad_file: str,
                                          what: str) -> None:
    root = model_files(tmp_path)
    manifest = manifest_for(root)
    damage(root)
    with pytest.raises(VerificationError) as info:
        verify_dir(root, manifest)
    assert bad_file in str(info.value) and what in str(info.value)


def test_verify_dir_refuses_a_manifest_whose_digest_was_altered(tmp_path: Path) -> None:
    root = model_files(tmp_path)
    manifest = manifest_for(root, digest="0" * 64)
    with pytest.raises(VerificationError, match="digest"):
        verify_dir(root, manifest)


def test_manifest_round_trip_writes_full_schema_and_reads_tolerantly(tmp_path: Path) -> None:
    manifest = manifest_for(model_files(tmp_path), metadata={"step": 3, "loss": 0.5})
    raw = json.loads(manifest.to_json())
    assert set(raw) == {"format", "version", "created_at", "source", "kind", "repo_id", "revision", "parent",
                        "digest", "files", "metadata", "stored", "new_bytes"}
    assert Manifest.from_json(manifest.to_json()) == manifest
    raw["written_by_a_newer_lockstep"] = {"x": 1}
    raw["files"][0]["mode"] = 0o644
    assert Manifest.from_json(json.dumps(raw)) == manifest


@pytest.mark.parametrize("path", ["", "../secret", "a/../../b", "/etc/passwd", "a\\b", "./a", "a//b"])
def test_file_entries_cannot_point_outside_their_version(path: str) -> None:
    with pytest.raises(ValidationError, match="relative POSIX path"):
        FileEntry(path=path, size=1, sha256="0" * 64)


def test_file_entries_need_a_sha256_hex_digest() -> None:
    with pytest.raises(ValidationError, match="64 lowercase hex"):
        FileEntry(path="a", size=1, sha256="xyz")


# ---------------------------------------------------------------------------------------------- hostile files
GOOD_MANIFEST = Manifest(version=3, created_at=1_700_000_000.0, source="/data/run-7", kind="directory", parent=2,
                         digest=content_digest([FileEntry(path="model.safetensors", size=8, sha256="a" * 64)]),
                         files=[FileEntry(path="model.safetensors", size=8, sha256="a" * 64)],
                         metadata={"step": 3})
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)
_hostile = st.sampled_from([0, -1, 2**63, 10**30, MAX_VERSION + 1, 1e308, math.nan, math.inf, -math.inf, True, None,
                            "", "../x", "/etc/passwd", "a\nb", "A" * 64, "g" * 64, [], {}])
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | _hostile,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=10)


def _with(doc: dict[str, object], changes: list[tuple[str, object]]) -> bytes:
    out = json.loads(json.dumps(doc))
    for key, value in changes:
        if "." in key:  # files.0.<field>, while files is still a list of entries
            files = out.get("files")
            if isinstance(files, list) and files and isinstance(files[0], dict):
                files[0][key.split(".")[-1]] = value
        else:
            out[key] = value
    return json.dumps(out).encode()


def _manifest_bytes() -> st.SearchStrategy[bytes]:
    good = GOOD_MANIFEST.to_json()
    doc = json.loads(good)
    keys = [*doc, "files.0.path", "files.0.size", "files.0.sha256"]
    change = st.tuples(st.sampled_from(keys), _hostile | _json)
    return st.one_of(
        st.binary(max_size=300),
        st.integers(min_value=0, max_value=len(good)).map(lambda n: good[:n]),  # torn at any byte
        *[st.lists(change, min_size=1, max_size=3).map(lambda changes: _with(doc, changes))] * 3,
        st.integers(min_value=1, max_value=5000).map(
            lambda d: good[:-2] + b', "metadata": ' + b"[" * d + b"]" * d + b"}"),  # deep free-form metadata
    )


@PROPERTY
@given(_manifest_bytes())
def test_any_manifest_bytes_read_as_a_bounded_manifest_or_a_value_error(data: bytes) -> None:
    try:
        manifest = Manifest.from_json(data)
    except ValueError as exc:
        assert "MANIFEST.json" in str(exc)  # says which file, and (for a field) which one
        return
    assert 1 <= manifest.version <= MAX_VERSION
    assert math.isfinite(manifest.created_at) and 0 <= manifest.created_at <= MAX_WALL_TIME
    assert manifest.parent is None or 0 <= manifest.parent <= MAX_VERSION
    assert len(manifest.digest) == 64 and all(c in "0123456789abcdef" for c in manifest.digest)
    for entry in manifest.files:
        assert 0 <= entry.size <= MAX_FILE_BYTES and not entry.path.startswith("/")
        assert ".." not in entry.path.split("/") and all(ord(c) >= 0x20 for c in entry.path)


@pytest.mark.parametrize(("field", "value"), [
    ("version", MAX_VERSION + 1), ("version", 0), ("created_at", math.nan), ("created_at", -1.0),
    ("created_at", 1e12), ("parent", -1), ("digest", "not-hex"), ("files.0.size", -1), ("files.0.size", 2**60),
    ("files.0.path", "a\nb"), ("files.0.path", "x" * 5000),
])
def test_a_manifest_with_a_field_out_of_range_is_refused_naming_the_field(field: str, value: object) -> None:
    data = _with(json.loads(GOOD_MANIFEST.to_json()), [(field, value)])
    with pytest.raises(ValueError, match=f"MANIFEST.json field '{field}"):
        Manifest.from_json(data)


def test_an_oversized_manifest_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(ValueError, match="over the"):
        Manifest.from_json(b" " * (MAX_MANIFEST_BYTES + 1))
