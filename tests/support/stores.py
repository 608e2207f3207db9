"""Reaching into a store the way a broken disk or an older Lockstep would: a file's chunks, damaged or
truncated, and a version written in the format-1 layout (its files in its own folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

from lockstep.store import MANIFEST_NAME, Manifest, ModelStore, content_digest, scan_dir, version_name


def chunk_paths(root: Path, version: int, rel: str) -> list[Path]:
    """The chunk files of file ``rel`` of version ``version`` in the store at ``root``, in file order."""
    store = ModelStore(root)
    entry = next(f for f in store.get(version).files if f.path == rel)
    return [store.chunks.path(c.sha256) for c in entry.chunks or []]


def damage_stored_file(root: Path, version: int, rel: str, *, truncate: bool = False) -> Path:
    """Flip a byte of (or cut short) the last chunk of file ``rel``; the chunk file it changed."""
    target = chunk_paths(root, version, rel)[-1]
    data = bytearray(target.read_bytes())
    if truncate:
        del data[len(data) // 2:]
    else:
        data[-1] ^= 0x40
    target.write_bytes(bytes(data))
    return target


def publish_as_files(store: ModelStore, src: Path, version: int) -> Manifest:
    """Version ``version`` in the format-1 layout: the files in ``versions/<N>/`` beside a MANIFEST without chunks."""
    folder = store.versions_dir / version_name(version)
    shutil.copytree(src, folder)
    files = scan_dir(folder)
    manifest = Manifest(version=version, created_at=store.clock.time(), source=str(src), kind="directory",
                        digest=content_digest(files), files=files)
    (folder / MANIFEST_NAME).write_bytes(manifest.to_json())
    return manifest


def distinct_model(src: Path, dst: Path, salt: int) -> Path:
    """A copy of the model in ``src`` whose every tensor differs (no chunk in common with any other model)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: v + salt * 1e-3 for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def fine_tuned(src: Path, dst: Path, names: list[str]) -> Path:
    """A copy of the model in ``src`` with the tensors ``names`` changed (the others byte for byte the same)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    for name in names:
        tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
