"""Checkpoints: a loadable model folder plus optimizer state, written atomically, the newest few kept."""

from __future__ import annotations

from pathlib import Path

import torch

from lockstep.core.settings import load_settings
from lockstep.trainer.runs.checkpoint import MODEL_DIR, read_state, restore_optimizer, write_checkpoint
from lockstep.trainer.runs.policy import Policy, Scored


def test_a_checkpoint_restores_the_model_and_the_optimizer_state(builtin_dir: Path, tmp_path: Path) -> None:
    settings = load_settings(builtin_dir=builtin_dir, device="cpu")
    policy = Policy.load("builtin:tiny", settings, None, learning_rate=1e-3)
    batch = [Scored("Numbers for a b:", " 12", 1.0, 0, 0), Scored("Numbers for a b:", " cat", 0.0, 0, 0)]
    policy.step(batch, "grpo")
    root = tmp_path / "checkpoints"
    folder = write_checkpoint(root, policy, 3, {"version": 7})
    assert read_state(folder) == {"step": 3, "version": 7}
    assert not list(root.glob(".tmp-*"))
    assert not [p for p in (folder / MODEL_DIR).iterdir() if p.suffix in (".bin", ".pt", ".pth")]

    again = Policy.load(str(folder / MODEL_DIR), settings, None, learning_rate=1e-3)
    restore_optimizer(folder, again)
    restored = again.model.state_dict()
    for name, tensor in policy.model.state_dict().items():
        assert torch.equal(tensor, restored[name]), name
    # Same weights and same Adam moments: the next step lands on the same weights.
    policy.step(batch, "grpo")
    again.step(batch, "grpo")
    for a, b in zip(policy.model.parameters(), again.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_only_the_newest_checkpoints_are_kept(builtin_dir: Path, tmp_path: Path) -> None:
    settings = load_settings(builtin_dir=builtin_dir, device="cpu")
    policy = Policy.load("builtin:tiny", settings, None, learning_rate=1e-3)
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, policy, step, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000002", "0000003"]
