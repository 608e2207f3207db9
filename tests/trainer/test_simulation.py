"""The seed's simulation, end to end: rounds of switching between two models, each checked on every
replica."""

from __future__ import annotations

import httpx
import pytest

from tests.support.cluster import LocalCluster, Proc, wait_for
from tests.trainer.conftest import RUN_S, wait_run

pytestmark = pytest.mark.e2e


def start_simulation(trainer: Proc, rounds: int) -> str:
    """Start a simulation switching between the two built-in models; its run id."""
    created = trainer.post("/runs", json={"kind": "simulation", "params": {
        "rounds": rounds, "initial_model": "builtin:tiny", "substitute_model": "builtin:tiny-s1",
        "requests_per_replica": 2, "max_new_tokens": 4}})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def test_a_simulation_switches_models_and_every_round_converges_without_failures(cluster: LocalCluster,
                                                                               trainer: Proc) -> None:
    run = wait_run(trainer, start_simulation(trainer, rounds=2))
    assert run["status"] == "succeeded", run["error"]
    rounds = run["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    # Every round is a real switch, alternating (round 1 goes to the model the cluster does not serve).
    assert sorted(r["model"] for r in rounds) == ["builtin:tiny", "builtin:tiny-s1"]
    for r in rounds:
        assert r["outcome"] == "committed" and r["converged"], r
        assert r["failed"] == 0 and r["mislabeled"] == 0 and r["errors"] == [], r
        assert r["replicas"] == 2 and r["requests"] >= 2 * 2
        assert r["skew_s"] is not None and r["skew_s"] >= 0 and r["propagation_s"] > 0
        assert r["version"] > r["from_version"]
    assert run["versions"] == [r["version"] for r in rounds]
    assert run["summary"]["converged"] == 2 and run["summary"]["failed"] == 0
    # The check answers after each round came from every replica, under that round's version.
    by_version: dict[int, set[str]] = {}
    for sample in run["samples"]:
        by_version.setdefault(sample["version"], set()).add(sample["replica_id"])
    for r in rounds:
        assert by_version[r["version"]] == {p.name for p in cluster.replicas}
    for proc in cluster.replicas:
        assert proc.status()["serving_version"] == rounds[-1]["version"]


def test_an_ended_run_can_be_deleted_with_its_files_and_an_active_one_cannot(cluster: LocalCluster,
                                                                            trainer: Proc) -> None:
    run_id = start_simulation(trainer, rounds=50)
    folder = cluster.shared / "runs" / run_id
    wait_for(lambda: trainer.get(f"/runs/{run_id}").json()["status"] == "running", RUN_S, 0.1, "the run to start")

    refused = httpx.delete(f"{trainer.url}/runs/{run_id}")
    assert refused.status_code == 409 and "stop it" in refused.json()["error"]["message"]
    assert (folder / "run.json").is_file()

    assert trainer.post(f"/runs/{run_id}/stop").status_code == 202
    assert wait_run(trainer, run_id)["status"] == "stopped"
    assert httpx.delete(f"{trainer.url}/runs/{run_id}").status_code == 204

    assert not folder.exists()
    assert trainer.get(f"/runs/{run_id}").status_code == 404
    assert run_id not in [r["id"] for r in trainer.get("/runs").json()["runs"]]
    assert httpx.delete(f"{trainer.url}/runs/{run_id}").status_code == 404
    assert trainer.post(f"/runs/{run_id}/resume").status_code == 404
