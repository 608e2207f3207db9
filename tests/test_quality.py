"""Code health the project holds itself to: lint clean, layers import only downward."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def test_ruff_is_clean() -> None:
    done = subprocess.run([_tool("ruff"), "check", "src", "tests", "benchmarks", "examples"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_layers_import_only_downward() -> None:
    # cli → launcher → ui | trainer → inference → sync → engine | models → store → core (pyproject.toml)
    done = subprocess.run([_tool("lint-imports")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_protocol_packages_type_check_strictly() -> None:
    # sync, store and inference (pyproject.toml [tool.mypy]): the coordinator, its ledgers and fleets, the agent
    done = subprocess.run([_tool("mypy")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
