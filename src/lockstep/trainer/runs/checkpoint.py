"""Training checkpoints: ``checkpoints/<step>/`` = ``model/`` (an HF folder: what gets published),
``optimizer.safetensors`` (AdamW state) and ``state.json`` (step, version, hyperparameters).

A checkpoint is written under a temporary name and renamed into place, so a crash never leaves a half-written
one under a real name; only the newest ``KEEP`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from lockstep.core.atomic import fsync_dir
from lockstep.trainer.runs.policy import Policy

KEEP = 2  # checkpoints kept per run (the newest is what a resume starts from)
MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{step:07d}"


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(path)


def write_checkpoint(root: Path, policy: Policy, step: int, state: dict[str, Any]) -> Path:
    """Write step ``step`` and return its folder; older checkpoints beyond ``KEEP`` are removed."""
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{step:07d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        policy.save_model(tmp / MODEL_DIR)
        save_file(policy.optimizer_tensors(), str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # a resumed run that reached the same step again: the new one wins
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())  # type: ignore[no-any-return]


def restore_optimizer(folder: Path, policy: Policy) -> None:
    policy.load_optimizer_tensors(load_file(str(folder / OPTIMIZER_FILE)))
