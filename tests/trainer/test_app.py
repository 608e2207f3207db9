"""The trainer's HTTP API in this process: probes, metrics, and every kind of bad input refused with a clear
4xx (the cluster is not touched). End-to-end runs are in test_finetune.py and test_simulation.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from lockstep.core.settings import load_settings
from lockstep.trainer.app import create_app

TOKEN = "s3cret"


@pytest.fixture
def api(tmp_path: Path, builtin_dir: Path) -> Iterator[TestClient]:
    settings = load_settings(shared_dir=tmp_path / "shared", builtin_dir=builtin_dir, api_token=TOKEN,
                             reward_plugins="tests.trainer.plugins", discovery="static")
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def error(response: Any) -> str:
    return str(response.json()["error"]["message"])


def test_probes_and_metrics(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/ready").status_code == 200
    text = api.get("/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"lockstep_publish", "lockstep_publish_duration_seconds", "lockstep_run_active"} <= names
    assert 'lockstep_publish_total{outcome="committed"} 0.0' in text


def test_mutating_endpoints_need_the_token(api: TestClient) -> None:
    for path, body in (("/runs", {"kind": "simulation"}), ("/publish", {"model": "builtin:tiny"}),
                       ("/rollback", {}), ("/runs/some-run/stop", None), ("/runs/some-run/resume", None)):
        response = api.post(path, json=body, headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401, path
        assert "Bearer" in error(response)
    assert api.get("/runs", headers={"Authorization": ""}).status_code == 200  # reading needs no token


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"kind": "dance"}, 400, "allowed: finetune, simulation"),
    ({"kind": "finetune", "params": {"steps": -3}}, 400, "params.steps"),
    ({"kind": "finetune", "params": {"learning_rate": 50}}, 400, "params.learning_rate"),
    ({"kind": "finetune", "params": {"learning_rate": 0}}, 400, "params.learning_rate"),
    ({"kind": "finetune", "params": {"batch_size": 1024, "group_size": 64}}, 400, "at most 4096"),
    ({"kind": "finetune", "params": {"steps": True}}, 400, "params.steps"),
    ({"kind": "finetune", "params": {"temperature": "hot"}}, 400, "params.temperature"),
    ({"kind": "finetune", "params": {"stepz": 3}}, 400, "params.stepz is not a parameter"),
    ({"kind": "finetune", "params": {"group_size": 1}}, 400, "params.group_size"),
    ({"kind": "finetune", "params": {"task": "chess"}}, 400, "built-in tasks: digits"),
    ({"kind": "finetune", "params": {"model": "versions/99"}}, 404, "version 99 is not in the store"),
    ({"kind": "finetune", "params": {"model": "./no/such/dir"}}, 400, "does not exist"),
    ({"kind": "finetune", "params": {"model": "builtin:huge"}}, 400, "unknown built-in model"),
    ({"kind": "finetune", "params": {"reward": "os:system"}}, 400, "not allowed"),
    ({"kind": "finetune", "params": {"reward": "tests.trainer.plugins:always_raises"}}, 400,
     "ValueError: this reward is broken on purpose"),
    ({"kind": "finetune", "params": {"reward": "tests.trainer.plugins:not_a_number"}}, 400, "finite number"),
    ({"kind": "simulation", "params": {"rounds": 0}}, 400, "params.rounds"),
    ({"kind": "simulation", "params": {"rounds": 5000}}, 400, "params.rounds"),
    ({"kind": "simulation", "params": {"substitute_model": "versions/7"}}, 404, "version 7"),
    ({"kind": "simulation", "params": {"substitute_model": "not a model!"}}, 400, "not a valid model"),
    ({"params": {}}, 400, "kind is required"),
])
def test_bad_runs_are_refused_with_what_is_wrong(api: TestClient, body: dict[str, Any], status: int,
                                                 message: str) -> None:
    response = api.post("/runs", json=body)
    assert response.status_code == status, response.text
    assert message in error(response)
    assert api.get("/runs").json() == {"runs": []}  # nothing was created


def test_bad_publishes_rollbacks_and_run_ids(api: TestClient) -> None:
    assert api.post("/publish", json={"model": "versions/12"}).status_code == 404
    response = api.post("/publish", json={"model": "../../etc"})
    assert response.status_code == 400 and "model" in error(response)
    assert api.post("/publish", json={"model": "builtin:tiny", "timeout_s": -1}).status_code == 400
    assert api.post("/publish", json={"model": "builtin:tiny", "policy": "sometimes"}).status_code == 400
    assert api.post("/rollback", json={"to": 4}).status_code == 404
    assert "nothing to roll back" in error(api.post("/rollback", json={}))
    assert api.post("/rollback", json={"to": -1}).status_code == 400
    assert api.get("/runs/NOT..valid").status_code == 400
    assert api.get("/runs/no-such-run").status_code == 404
    assert api.post("/runs/no-such-run/stop").status_code == 404
    assert api.post("/runs/no-such-run/resume").status_code == 404
    assert api.get("/publishes/pub-nothing").status_code == 404


def test_the_cluster_view_and_versions_work_on_an_empty_folder(api: TestClient) -> None:
    cluster = api.get("/cluster").json()
    assert cluster["committed"] is None and cluster["replicas"] == []
    assert cluster["convergence"] == {"version": 0, "at_version": 0, "total": 0}
    assert cluster["discovery"]["mode"] == "static"
    assert api.get("/versions").json() == {"committed": 0, "versions": []}
    assert api.get("/history").json() == {"publishes": [], "flips": []}


def _finished(client: TestClient, job_id: str) -> dict[str, Any]:
    for _ in range(600):  # bounded: 60 s
        job: dict[str, Any] = client.get(f"/publishes/{job_id}").json()
        if job["status"] != "running":
            return job
        time.sleep(0.1)
    raise AssertionError(f"publish {job_id} did not end")


def test_without_a_shared_folder_the_trainer_keeps_everything_in_its_data_folder(tmp_path: Path,
                                                                                builtin_dir: Path) -> None:
    settings = load_settings(builtin_dir=builtin_dir, api_token=TOKEN, discovery="static",
                             trainer_data_dir=tmp_path / "data").model_copy(update={"shared_dir": None})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(settings), headers=auth) as api:
        assert api.get("/ready").status_code == 200
        assert api.get("/sync/committed").json() == {"committed": None, "generation": 0}
        job = api.post("/publish", json={"model": "builtin:tiny-s1"}).json()
        job = _finished(api, job["id"])
        # The version went into the trainer's own store; with no replica answering, nothing was committed.
        assert job["result"]["outcome"] == "aborted" and "no live replicas" in job["result"]["reason"]
        version = job["result"]["version"]
        assert (tmp_path / "data" / "versions" / f"{version:06d}" / "MANIFEST.json").is_file()
        manifest = api.get(f"/store/versions/{version}/manifest").json()
        assert manifest["version"] == version and manifest["kind"] == "directory"
        assert api.get(f"/store/versions/{version}/manifest", headers={"Authorization": ""}).status_code == 401
        config = api.get(f"/store/versions/{version}/files/config.json")
        assert config.status_code == 200 and config.json()["model_type"]
        assert api.get(f"/store/versions/{version}/files/MANIFEST.json").status_code == 404  # not a listed file
        assert api.get("/store/versions/99/manifest").status_code == 404
    # A restarted trainer on the same folder finds its versions and history again.
    with TestClient(create_app(settings), headers=auth) as api:
        assert [v["version"] for v in api.get("/versions").json()["versions"]] == [version]
        assert [p["outcome"] for p in api.get("/history").json()["publishes"]] == ["aborted"]


def test_without_a_shared_folder_heartbeat_discovery_says_what_to_set_instead(tmp_path: Path) -> None:
    settings = load_settings(discovery="heartbeats", trainer_data_dir=tmp_path / "data").model_copy(
        update={"shared_dir": None})
    with TestClient(create_app(settings)) as api:
        discovery = api.get("/cluster").json()["discovery"]
        assert discovery["urls"] == [] and "INFERENCE_URLS" in discovery["error"]


def test_an_unwritable_data_folder_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from lockstep.core.errors import BadRequest

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    settings = load_settings(trainer_data_dir=blocker / "data").model_copy(update={"shared_dir": None})
    with pytest.raises(BadRequest, match="LOCKSTEP_TRAINER_DATA_DIR"):
        create_app(settings)
