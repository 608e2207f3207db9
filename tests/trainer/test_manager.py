"""Durability: a run whose trainer process is killed is reported as interrupted after a restart, and it can be
resumed from its last checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lockstep.store import ModelStore
from lockstep.trainer.runs.manager import _owner_gone
from lockstep.trainer.runs.record import Owner
from tests.support.cluster import LocalCluster, wait_for
from tests.trainer.conftest import RUN_S, start_trainer, wait_run


def test_a_run_owner_is_gone_when_its_process_is(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    assert _owner_gone(Owner(host=host, pid=dead.pid, instance="old"), 0.0, 100.0, "new")
    assert not _owner_gone(Owner(host=host, pid=os.getppid(), instance="old"), 0.0, 100.0, "new")
    assert _owner_gone(Owner(host=host, pid=os.getpid(), instance="old"), 0.0, 100.0, "new")  # pid reused
    assert not _owner_gone(Owner(host=host, pid=os.getpid(), instance="me"), 0.0, 100.0, "me")
    assert _owner_gone(Owner(host="elsewhere", pid=1, instance="x"), 0.0, 1000.0, "new")
    assert not _owner_gone(Owner(host="elsewhere", pid=1, instance="x"), 990.0, 1000.0, "new")
    assert _owner_gone(None, None, 0.0, "new")


def killed_mid_run(cluster: LocalCluster, name: str, params: dict[str, Any], until: str) -> str:
    """Start a trainer and a finetune run with ``params``; once the run's record has ``until``, SIGKILL the trainer
    (no chance to record anything). The run's id."""
    first = start_trainer(cluster, name)
    created = first.post("/runs", json={"kind": "finetune", "params": {"eval_prompts": 4, **params}})
    assert created.status_code == 201, created.text
    run_id: str = created.json()["id"]

    def reached() -> dict[str, Any] | None:
        run: dict[str, Any] = first.get(f"/runs/{run_id}").json()
        return run if run[until] else None

    run = wait_for(reached, RUN_S, 0.1, f"the run's {until}")
    assert run["status"] == "running"
    first.kill()
    return run_id


@pytest.mark.e2e
@pytest.mark.parametrize("mode", [{}, {"async": True, "max_staleness": 0}], ids=["sync", "async"])
def test_a_killed_trainer_leaves_an_interrupted_run_that_resumes_from_its_checkpoint(
        cluster: LocalCluster, mode: dict[str, Any]) -> None:
    run_id = killed_mid_run(cluster, "trainer-killed", {"steps": 60, "publish_every": 2, **mode}, "checkpoint")

    second = start_trainer(cluster, "trainer-restarted")
    try:
        run = second.get(f"/runs/{run_id}").json()
        assert run["status"] == "interrupted" and "went away" in run["error"]
        checkpoint = run["checkpoint"]
        # The cluster kept serving a committed version meanwhile.
        serving = {p.status()["serving_version"] for p in cluster.replicas}
        assert len(serving) == 1 and all(p.ready() for p in cluster.replicas)
        [served] = serving
        assert served in run["versions"]

        resumed = second.post(f"/runs/{run_id}/resume")
        assert resumed.status_code == 202, resumed.text
        assert second.post(f"/runs/{run_id}/resume").status_code == 409  # already running again
        wait_for(lambda: len(second.get(f"/runs/{run_id}").json()["versions"]) > len(run["versions"]), RUN_S,
                 0.5, "a version published after the resume")
        assert second.post(f"/runs/{run_id}/stop").status_code == 202
        done = wait_run(second, run_id)
        assert done["status"] == "stopped" and done["resumes"] == 1
        assert done["checkpoint"]["step"] > checkpoint["step"]
        steps = [m["step"] for m in done["metrics"]]
        assert steps == list(range(1, steps[-1] + 1))  # steps redone after the checkpoint appear once
        # The kill came while (or before) the newest version was evaluated: the resumed run evaluates it.
        assert served in {e["version"] for e in done["evals"]}
        if mode:  # the resumed collector goes on with the stream and the schedule from the checkpoint's step
            resumed_steps = [m for m in done["metrics"] if m.get("type") == "step" and m["step"] > checkpoint["step"]]
            assert resumed_steps and all(set(m["staleness"]) == {"0"} and m["stale"] == 0 for m in resumed_steps)
    finally:
        second.process.terminate()
        second.process.wait(timeout=30)


@pytest.mark.e2e
def test_a_run_resumed_after_another_publish_puts_its_checkpoint_back_in_front(cluster: LocalCluster) -> None:
    """While the run was away someone else published: its updates must not train on that version's answers, so
    the resume publishes its checkpoint again first. That version names the one it repeats, and counts no samples
    (each counts once, under the version it first trained)."""
    run_id = killed_mid_run(cluster, "trainer-away", {"steps": 60, "publish_every": 2}, "checkpoint")
    other = cluster.publish("builtin:tiny")
    assert other.returncode == 0, other.stderr

    second = start_trainer(cluster, "trainer-back")
    try:
        away = second.get(f"/runs/{run_id}").json()
        checkpoint, mine = away["checkpoint"], away["versions"]
        assert second.post(f"/runs/{run_id}/resume").status_code == 202
        wait_for(lambda: len(second.get(f"/runs/{run_id}").json()["versions"]) > len(mine) + 1, RUN_S, 0.5,
                 "the checkpoint published again and a version trained after the resume")
        assert second.post(f"/runs/{run_id}/stop").status_code == 202
        done = wait_run(second, run_id)
    finally:
        second.process.terminate()
        second.process.wait(timeout=30)
    again = done["versions"][len(mine)]
    manifests = {m["version"]: m for m in manifests_of(cluster)}
    assert manifests[again]["metadata"]["republishes"] == checkpoint["version"]
    assert manifests[again]["metadata"]["samples"]["used"] == done["version_samples"][str(again)]["used"] == 0
    assert manifests[again]["digest"] == manifests[checkpoint["version"]]["digest"]  # the same weights
    resumed = [m for m in done["metrics"] if m.get("type") == "step" and m["step"] > checkpoint["step"]]
    assert resumed and all(m["foreign"] == 0 and set(m["sample_versions"]) <= {str(v) for v in done["versions"]}
                           for m in resumed)


@pytest.mark.e2e
def test_a_run_killed_before_its_first_checkpoint_starts_again_and_evaluates_its_start_version_once(
        cluster: LocalCluster) -> None:
    run_id = killed_mid_run(cluster, "trainer-early", {"steps": 4, "publish_every": 4}, "evals")

    second = start_trainer(cluster, "trainer-again")
    try:
        away = second.get(f"/runs/{run_id}").json()
        assert away["checkpoint"] is None and away["status"] == "interrupted"
        assert second.post(f"/runs/{run_id}/resume").status_code == 202
        done = wait_run(second, run_id)
    finally:
        second.process.terminate()
        second.process.wait(timeout=30)
    assert done["status"] == "succeeded", done["error"]
    evaluated = [e["version"] for e in done["evals"]]
    assert evaluated == [done["start_version"], *done["versions"]], evaluated
    assert done["summary"]["eval_reward_first"] == done["evals"][0]["reward"]


def manifests_of(cluster: LocalCluster) -> list[dict[str, Any]]:
    """Every version's MANIFEST in the cluster's store."""
    return [m.model_dump() for m in ModelStore(cluster.shared).list()]
