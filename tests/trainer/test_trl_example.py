"""examples/trl_grpo_on_fleet.py, a plain TRL GRPO script pointed at the fleet, publishes a version every replica
serves, trained on answers tagged with the version it published."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import LocalCluster, Proc, wait_for
from tests.trainer.test_finetune import committed

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trl_grpo_on_fleet.py"


def test_a_trl_script_trains_on_the_fleet_and_publishes_to_it(cluster: LocalCluster, trainer: Proc,
                                                               tmp_path: Path) -> None:
    # A random model, so that the rewards differ within groups and training changes the weights (a fleet already
    # at reward 1.0 gives zero gradients, and publishing the same content again is "unchanged").
    job = trainer.post("/publish", json={"model": "builtin:tiny-s1"})
    assert job.status_code == 202, job.text
    wait_for(lambda: trainer.get(f"/publishes/{job.json()['publish_id']}").json()["status"] != "running", 120, 0.2,
             "the start model to be published")
    before = committed(trainer)  # the script starts from it, downloaded from the trainer
    done = subprocess.run([sys.executable, str(EXAMPLE), "--trainer", trainer.url, "--steps", "2",
                           "--save-steps", "2", "--output", str(tmp_path / "out")],
                          env=cluster.env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"v{before + 1} committed" in done.stdout, done.stdout
    assert committed(trainer) == before + 1
    for proc in cluster.replicas:
        assert proc.status()["serving_version"] == before + 1
