"""Session fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def builtin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny models (seeds 0, 1, 2), built once per session; child processes reuse them."""
    from lockstep.models.tiny import ensure_builtin

    folder = tmp_path_factory.mktemp("builtin")
    for name in ("tiny-s0", "tiny-s1", "tiny-s2"):
        ensure_builtin(name, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dirs(builtin_dir: Path) -> dict[int, Path]:
    """Seed → directory of a built tiny model."""
    return {seed: builtin_dir / f"tiny-s{seed}" for seed in (0, 1, 2)}
