"""In-place updates: verified new weights, copied into the live model during a short admission pause."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lockstep.core.errors import Conflict, VerificationError
from lockstep.core.settings import Settings
from lockstep.models import loader

# Config fields that change what a model computes without changing any tensor's shape.
_SHAPELESS_CONFIG = ("model_type", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                     "sliding_window", "attention_bias", "mlp_bias")


def _config_differences(path: Path, live_config: Any) -> list[str]:
    """Names of the shape-neutral config fields that differ between ``path/config.json`` and the live model."""
    try:
        new = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise Conflict(f"cannot read {path / 'config.json'} to check the architecture: {exc}") from exc
    live = live_config.to_dict()
    return [k for k in _SHAPELESS_CONFIG if k in new and k in live and new[k] != live[k]]


@dataclass
class InplaceWeights:
    """New weights for the live model, by state-dict name, read lazily from memory-mapped safetensors."""

    resolved: loader.ResolvedModel
    files: dict[str, Path]  # tensor name → the safetensors file holding it
    aliases: dict[str, str]  # state-dict name → name in the files (tied weights)
    weights_digest: str

    @classmethod
    def open(cls, resolved: loader.ResolvedModel, live: loader.LoadedModel, settings: Settings) -> InplaceWeights:
        """Check the files fit the live model (same names, shapes) and digest them as the live model would be."""
        loader.check_safe_files(resolved.path, settings)
        files: dict[str, Path] = {}
        for path in sorted(resolved.path.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    files[name] = path
        state = live.model.state_dict()
        by_storage = {}
        for name, t in state.items():
            by_storage.setdefault((t.data_ptr(), tuple(t.shape)), name)
        aliases: dict[str, str] = {}
        for name, t in state.items():
            if name in files:
                aliases[name] = name
                continue
            twin = by_storage[(t.data_ptr(), tuple(t.shape))]  # tied weights are stored once
            if twin in files:
                aliases[name] = twin
                continue
            raise Conflict(f"in-place update needs the same architecture: {resolved.ref.raw!r} has no tensor "
                           f"{name!r}; set LOCKSTEP_UPDATE_MODE=swap for this update")
        extra = sorted(set(files) - set(aliases.values()))
        if extra:  # e.g. more layers: copying only the live model's tensors would serve another model
            raise Conflict(f"in-place update needs the same architecture: {resolved.ref.raw!r} has {len(extra)} "
                           f"tensor(s) the live model lacks, e.g. {extra[0]!r}; set LOCKSTEP_UPDATE_MODE=swap "
                           "for this update")
        changed = _config_differences(resolved.path, live.model.config)
        if changed:
            raise Conflict(f"in-place update needs the same architecture: {resolved.ref.raw!r} differs from the "
                           f"live model in {', '.join(changed)}; set LOCKSTEP_UPDATE_MODE=swap for this update")
        weights = cls(resolved=resolved, files=files, aliases=aliases, weights_digest="")
        for name, live_t in state.items():
            shape = tuple(weights._read(name).shape)
            if shape != tuple(live_t.shape):
                raise Conflict(f"in-place update needs the same architecture: {name} is {shape} in "
                               f"{resolved.ref.raw!r} but {tuple(live_t.shape)} in the live model; "
                               "set LOCKSTEP_UPDATE_MODE=swap for this update")
        weights.weights_digest = loader.digest_named_tensors(
            (name, weights._finite(name, live_t.dtype)) for name, live_t in sorted(state.items()))
        return weights

    def _finite(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor as the live model would hold it, refused when any value is NaN or inf.

        The in-place stand-in for the canary generation a swap runs: there is no second model to run, but
        non-finite weights (corrupt, or overflowing the live dtype) are what would make its logits non-finite.
        """
        tensor = self._read(name).to(dtype)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise VerificationError(f"{self.resolved.ref.raw!r}: {name} holds non-finite values (NaN or inf) as "
                                    f"{str(dtype).removeprefix('torch.')}; the weights are corrupt or overflow "
                                    "in this dtype")
        return tensor

    def _read(self, name: str) -> torch.Tensor:
        source = self.aliases[name]
        with safe_open(str(self.files[source]), framework="pt") as f:
            return f.get_tensor(source)

    @torch.inference_mode()
    def copy_into(self, model: Any) -> None:
        """Copy every tensor into the live model's storage (no second model in device memory)."""
        for name, live_t in model.state_dict().items():
            live_t.copy_(self._read(name).to(device=live_t.device, dtype=live_t.dtype))
