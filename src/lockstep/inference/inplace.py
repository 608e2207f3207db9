"""In-place updates: new weights read once and verified into host memory at stage, copied into the live model
at the flip during a short admission pause.

What the flip copies is exactly what the stage verified: every weight file is read once, checked against its
MANIFEST sha256 (published versions), cast to the live dtype, refused if any value is NaN or inf, checked for
the live model's names and shapes, and digested as the live model will hold it. The files are not read
again, so weights changed on disk between stage and commit cannot reach the live model.

Memory: the accelerator holds one model, which is why in-place exists. The staged copy lives in host RAM
(the model's size at the live dtype) from the stage until the flip or abort, plus up to two copies of one
weight file while that file is read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from lockstep.core.atomic import read_regular
from lockstep.core.errors import Conflict, LoadError, VerificationError
from lockstep.core.settings import Settings
from lockstep.models import loader

# Config fields that change what a model computes without changing any tensor's shape.
SHAPELESS_CONFIG = ("model_type", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                     "sliding_window", "attention_bias", "mlp_bias")


class PartialCopy(LoadError):
    """The copy into the live model failed after some tensors were overwritten: the live weights are mixed."""


def _config_differences(path: Path, live_config: Any) -> list[str]:
    """Names of the shape-neutral config fields that differ between ``path/config.json`` and the live model."""
    try:
        new = json.loads(read_regular(path / "config.json"))
    except (OSError, json.JSONDecodeError) as exc:
        raise Conflict(f"cannot read {path / 'config.json'} to check the architecture: {exc}") from exc
    live = live_config.to_dict()
    return [k for k in SHAPELESS_CONFIG if k in new and k in live and new[k] != live[k]]


def swap_hint(raw: str, detail: str) -> Conflict:
    return Conflict(f"in-place update needs the same architecture: {raw!r} {detail}; set "
                    "LOCKSTEP_UPDATE_MODE=swap for this update")


def read_weight_file(path: Path, resolved: loader.ResolvedModel) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, from bytes read once and checked against the MANIFEST when there is one."""
    try:
        data = read_regular(path)
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc}") from exc
    manifest = resolved.manifest
    if manifest is not None:
        entry = next((f for f in manifest.files if f.path == path.name), None)
        if entry is None:
            raise VerificationError(f"{resolved.ref.raw!r}: weight file {path.name} is not listed in MANIFEST.json; "
                                    "only listed weights may be loaded")
        actual = hashlib.sha256(data).hexdigest()
        if len(data) != entry.size or actual != entry.sha256:
            raise VerificationError(f"{resolved.ref.raw!r}: {path.name} has {len(data)} bytes and sha256 {actual}, "
                                    f"MANIFEST.json says {entry.size} bytes and {entry.sha256}; it changed after "
                                    "it was verified")
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise LoadError(f"{resolved.ref.raw!r}: {path.name} is not a readable safetensors file: {exc}") from exc


@dataclass
class InplaceWeights:
    """Verified new weights for the live model, held in host memory until the flip copies them in."""

    source: str  # the reference, for messages
    tensors: dict[str, torch.Tensor]  # name in the files → the tensor as the live model will hold it, on the CPU
    aliases: dict[str, str]  # state-dict name → name in ``tensors`` (tied weights are stored once)
    weights_digest: str

    @property
    def nbytes(self) -> int:
        """Host memory the staged copy holds."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @classmethod
    def load(cls, resolved: loader.ResolvedModel, live: loader.LoadedModel, settings: Settings) -> InplaceWeights:
        """Read, verify and cast every weight; refuse another architecture (names, shapes, config) or NaN/inf."""
        raw = resolved.ref.raw
        loader.check_safe_files(resolved.path, settings)
        changed = _config_differences(resolved.path, live.model.config)
        if changed:
            raise swap_hint(raw, f"differs from the live model in {', '.join(changed)}")
        state = live.model.state_dict()
        # File by file, each tensor cast as soon as it is read: host memory peaks at the staged copy plus one
        # file, whatever dtype the files hold.
        tensors: dict[str, torch.Tensor] = {}
        extra: list[str] = []
        for path in sorted(resolved.path.glob("*.safetensors")):
            for name, tensor in read_weight_file(path, resolved).items():
                if name in tensors:
                    raise LoadError(f"{raw!r}: tensor {name!r} is in more than one weight file")
                live_t = state.get(name)
                if live_t is None:  # e.g. more layers: copying only the live model's tensors would serve another
                    extra.append(name)
                    continue
                if tuple(tensor.shape) != tuple(live_t.shape):
                    raise swap_hint(raw, f"holds {name} as {tuple(tensor.shape)}, the live model as "
                                     f"{tuple(live_t.shape)}")
                tensors[name] = finite_cast(raw, name, tensor, live_t.dtype)
        if extra:
            raise swap_hint(raw, f"has {len(extra)} tensor(s) the live model lacks, e.g. {sorted(extra)[0]!r}")
        tied: dict[tuple[int, tuple[int, ...]], list[str]] = {}
        for name, t in state.items():
            tied.setdefault((t.data_ptr(), tuple(t.shape)), []).append(name)
        aliases: dict[str, str] = {}
        for name, t in state.items():
            # Tied weights share one storage: every name of it takes the same tensor (the first the files hold),
            # so the digest says what the copy leaves in memory even when a file holds two different values.
            twin = next((n for n in tied[(t.data_ptr(), tuple(t.shape))] if n in tensors), None)
            if twin is None:
                raise swap_hint(raw, f"has no tensor {name!r}")
            aliases[name] = twin
        for unused in set(tensors) - set(aliases.values()):
            del tensors[unused]
        digest = loader.digest_named_tensors((name, tensors[aliases[name]]) for name in sorted(state))
        return cls(source=raw, tensors=tensors, aliases=aliases, weights_digest=digest)

    @torch.inference_mode()
    def copy_into(self, model: Any) -> None:
        """Copy every staged tensor into the live model's storage (no second model in device memory).

        Every pair is checked (names, shapes, dtypes) before the first copy: ``Conflict`` then means nothing
        was touched. ``PartialCopy`` means a copy failed after others were done, so the live weights are mixed.
        """
        state = model.state_dict()
        if set(state) != set(self.aliases):
            raise Conflict(f"the weights staged from {self.source!r} name other tensors than the live model; "
                           "nothing was copied")
        pairs = []
        for name, live_t in state.items():
            staged = self.tensors[self.aliases[name]]
            if staged.shape != live_t.shape or staged.dtype != live_t.dtype:
                raise Conflict(f"the weights staged from {self.source!r} no longer fit the live model at {name} "
                               f"({tuple(staged.shape)} {staged.dtype} vs {tuple(live_t.shape)} {live_t.dtype}); "
                               "nothing was copied")
            pairs.append((name, live_t, staged))
        for done, (name, live_t, staged) in enumerate(pairs):
            try:
                live_t.copy_(staged)
            except Exception as exc:  # device errors of every kind: what was copied so far cannot be undone
                raise PartialCopy(f"copying {name} from {self.source!r} into the live model failed after "
                                  f"{done} of {len(pairs)} tensors: {type(exc).__name__}: {exc}") from exc


def finite_cast(raw: str, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tensor as the live model would hold it (an owned, contiguous CPU copy), refused when NaN or inf.

    The in-place stand-in for the canary generation a swap runs: there is no second model to run, but
    non-finite weights (corrupt, or overflowing the live dtype) are what would make its logits non-finite.
    """
    cast = tensor.to(device="cpu", dtype=dtype, copy=True).contiguous()
    if cast.is_floating_point() and not bool(torch.isfinite(cast).all()):
        raise VerificationError(f"{raw!r}: {name} holds non-finite values (NaN or inf) as "
                                f"{str(dtype).removeprefix('torch.')}; the weights are corrupt or overflow "
                                "in this dtype")
    return cast
