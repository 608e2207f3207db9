"""A checkpoint's weight files, read once and verified, for an engine that loads them itself (vLLM).

vLLM reads the files in its own processes, so the replica cannot digest the weights it holds in memory the way
it does for the built-in engine. Instead every file is read once here, checked against its MANIFEST sha256
(published versions), each tensor cast to the served dtype and refused if NaN or inf, and the result digested:
the ``weights_digest`` a vLLM replica reports is the digest of what the files hold at the served dtype, the same
on every replica that loads the same version, and checked before the (slow) engine start.

For an in-place update the verified bytes are also written to a folder private to this replica, and vLLM reloads
from that copy at the flip: files changed on the shared volume between stage and commit cannot reach the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lockstep.core.atomic import read_regular
from lockstep.core.errors import Conflict, LoadError
from lockstep.inference.inplace import SHAPELESS_CONFIG, PartialCopy, finite_cast, read_weight_file, swap_hint
from lockstep.models import loader

if TYPE_CHECKING:
    from lockstep.engine.vllm import VllmEngine

log = logging.getLogger(__name__)

# Besides the weights, what a reload from the private copy needs.
_SIDE_FILES = ("config.json", "model.safetensors.index.json")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(read_regular(path / "config.json"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"cannot read {path / 'config.json'}: {exc}") from exc
    if not isinstance(config, dict):
        raise LoadError(f"{path / 'config.json'} is not a JSON object")
    return config


@dataclass
class CheckpointFiles:
    """What one checkpoint's weight files hold, verified; optionally a private copy to reload from."""

    source: str  # the reference, for messages
    shapes: dict[str, tuple[int, ...]]  # tensor name → shape, as the files hold them
    config: dict[str, Any]
    weights_digest: str
    num_parameters: int
    copy_dir: Path | None = None  # the verified bytes, private to this replica (in-place stage only)
    _released: bool = field(default=False, repr=False)

    @property
    def max_context(self) -> int:
        return int(self.config.get("max_position_embeddings") or 2048)

    @classmethod
    def read(cls, resolved: loader.ResolvedModel, dtype: torch.dtype, *, like: CheckpointFiles | None = None,
             keep_copy: bool = False) -> CheckpointFiles:
        """Read, verify and digest every weight file of ``resolved`` at ``dtype``.

        ``like``: the serving checkpoint, for an in-place update; refuse other names, shapes or config (the
        update would need swap mode). ``keep_copy``: also keep the verified bytes in a private folder.
        """
        raw = resolved.ref.raw
        config = _read_config(resolved.path)
        if like is not None:
            changed = [k for k in SHAPELESS_CONFIG if k in config and k in like.config and config[k] != like.config[k]]
            if changed:
                raise swap_hint(raw, f"differs from the live model in {', '.join(changed)}")
        files = sorted(resolved.path.glob("*.safetensors"))
        if not files:
            raise LoadError(f"{raw!r} has no *.safetensors weights; the vLLM engine loads safetensors only here "
                            "(convert the checkpoint, or set LOCKSTEP_ENGINE=builtin)")
        copy_dir = Path(tempfile.mkdtemp(prefix="lockstep-staged-")) if keep_copy else None
        try:
            per_tensor: dict[str, str] = {}
            shapes: dict[str, tuple[int, ...]] = {}
            params = 0
            for path in files:
                data = read_weight_file(path, resolved)  # sha256 against the MANIFEST, from bytes read once
                for name, tensor in data.items():
                    if name in per_tensor:
                        raise LoadError(f"{raw!r}: tensor {name!r} is in more than one weight file")
                    cast = finite_cast(raw, name, tensor, dtype)
                    h = hashlib.sha256()
                    h.update(str(cast.dtype).encode())
                    h.update(str(tuple(cast.shape)).encode())
                    h.update(cast.view(torch.uint8).numpy().tobytes() if cast.numel() else b"")
                    per_tensor[name] = h.hexdigest()
                    shapes[name] = tuple(cast.shape)
                    params += cast.numel()
                if copy_dir is not None:
                    from safetensors.torch import save_file

                    save_file(data, str(copy_dir / path.name))  # the very tensors just verified, not the disk again
            if like is not None:
                _check_same_tensors(raw, shapes, like.shapes)
            if copy_dir is not None:
                for name in _SIDE_FILES:
                    if (resolved.path / name).is_file():
                        shutil.copyfile(resolved.path / name, copy_dir / name)
        except BaseException:
            if copy_dir is not None:
                shutil.rmtree(copy_dir, ignore_errors=True)
            raise
        digest = hashlib.sha256()
        for name in sorted(per_tensor):
            digest.update(name.encode())
            digest.update(per_tensor[name].encode())
        return cls(source=raw, shapes=shapes, config=config, weights_digest=digest.hexdigest(),
                   num_parameters=params, copy_dir=copy_dir)

    @property
    def nbytes(self) -> int:
        """Disk the private copy takes (0 without one)."""
        if self.copy_dir is None or not self.copy_dir.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.copy_dir.iterdir() if p.is_file())

    def apply(self, engine: VllmEngine, version: int) -> float:
        """Reload the serving vLLM engine from the private copy (in place); returns vLLM's pause in seconds.

        Any failure is a ``PartialCopy``: vLLM loads layer by layer, so what the live weights hold after a failed
        reload is unknown, and the replica must load the committed version afresh.
        """
        if self.copy_dir is None:
            raise Conflict(f"the weights staged from {self.source!r} kept no copy to reload from; nothing was "
                           "changed")
        try:
            return float(engine.reload_weights(self.copy_dir, str(version)))
        except Exception as exc:
            raise PartialCopy(f"vLLM's reload of {self.source!r} failed: {type(exc).__name__}: {exc}") from exc

    def release(self) -> None:
        """Delete the private copy (after the flip loaded it, or when the stage is dropped)."""
        if self.copy_dir is not None and not self._released:
            shutil.rmtree(self.copy_dir, ignore_errors=True)
            self._released = True


def _check_same_tensors(raw: str, new: dict[str, tuple[int, ...]], live: dict[str, tuple[int, ...]]) -> None:
    """Refuse an in-place update whose tensors are not exactly the live checkpoint's (names and shapes)."""
    missing = sorted(set(live) - set(new))
    if missing:
        raise swap_hint(raw, f"has no tensor {missing[0]!r}")
    extra = sorted(set(new) - set(live))
    if extra:
        raise swap_hint(raw, f"has {len(extra)} tensor(s) the live model lacks, e.g. {extra[0]!r}")
    for name, shape in new.items():
        if shape != live[name]:
            raise swap_hint(raw, f"holds {name} as {shape}, the live model as {live[name]}")
