"""Session fixtures shared by every test package."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests run the built-in engine (seconds to start) unless they ask for vLLM (minutes to start): tests/engine/vllm
# and the tests parametrized by engine. Settings built in this process and child processes read this.
os.environ["LOCKSTEP_ENGINE"] = "builtin"


@pytest.fixture(scope="session", autouse=True)
def session_tempdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The temp folder of this process and its children, inside pytest's own (which keeps only failed tests').

    Code that defaults to the system temp folder (assembled versions, replica caches) would otherwise leave a
    copy per test's store there, and fill the disk over a few runs.
    """
    folder = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        patch.setattr(tempfile, "tempdir", str(folder))
        yield folder


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
