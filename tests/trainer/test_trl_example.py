"""examples/trl_grpo_on_fleet.py, a plain TRL GRPO script pointed at the fleet, publishes a version every replica
serves, trained on answers tagged with the version it published."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import LocalCluster, Proc
from tests.trainer.test_finetune import committed

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trl_grpo_on_fleet.py"


def test_a_trl_script_trains_on_the_fleet_and_publishes_to_it(cluster: LocalCluster, trainer: Proc,
                                                               tmp_path: Path) -> None:
    before = committed(trainer)
    model = f"versions/{before}" if before else "builtin:tiny"  # what the fleet serves now
    done = subprocess.run([sys.executable, str(EXAMPLE), "--trainer", trainer.url, "--model", model, "--steps", "2",
                           "--save-steps", "2", "--output", str(tmp_path / "out")],
                          env=cluster.env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"v{before + 1} committed" in done.stdout, done.stdout
    assert committed(trainer) == before + 1
    for proc in cluster.replicas:
        assert proc.status()["serving_version"] == before + 1
