"""Run kind ``job`` in this process, against a fake Kubernetes API: a bad template is refused with 400 before a
run exists, and a run follows its Job (versions, logs, success, failure with the reason, stop, resume).
The real Kubernetes client and a Job's pod publishing to real replicas: tests/deploy/test_job_runs.py."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lockstep.core.settings import Settings, load_settings
from lockstep.trainer.jobs import template
from lockstep.trainer.jobs.kube import KubeApiError
from lockstep.trainer.jobs.worker import completion, examples
from lockstep.trainer.runs import manager
from lockstep.trainer.runs.job import JobKind
from lockstep.trainer.runs.tasks import digits_reward
from lockstep.trainer.server.app import create_app
from tests.support.cluster import wait_for

TOKEN = "s3cret"
SHIPPED = Path(__file__).resolve().parents[2] / "k8s" / "training" / "job.yaml"


class FakeJobs:
    """The Kubernetes API calls of a job run, in memory; the test moves the Job and its pods along."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, str] = {}
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.failing = 0  # reads of the Job still to fail, as an API server in trouble fails them

    def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append(copy.deepcopy(body))
        self.jobs[body["metadata"]["name"]] = {**copy.deepcopy(body), "status": {}}
        return body

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.failing:
            self.failing -= 1
            raise KubeApiError(f"read job {name} in {namespace} failed: 500 etcdserver: request timed out")
        return copy.deepcopy(self.jobs.get(name))

    def delete_job(self, namespace: str, name: str) -> None:
        self.deleted.append(name)
        self.jobs.pop(name, None)

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        key, _, value = selector.partition("=")
        return [copy.deepcopy(p) for p in self.pods.values() if p["metadata"]["labels"].get(key) == value]

    def pod_log(self, namespace: str, pod: str, container: str, tail_lines: int) -> str:
        return "".join(self.logs.get(pod, "").splitlines(keepends=True)[-tail_lines:])

    # ------------------------------------------------------------------ what the cluster does
    def job(self) -> dict[str, Any]:
        (job,) = self.jobs.values()
        return job

    def pod(self, state: dict[str, Any], phase: str, log: str = "") -> str:
        job = self.job()
        name = f"{job['metadata']['name']}-abcde"
        labels = job["spec"]["template"]["metadata"]["labels"]
        self.pods[name] = {"metadata": {"name": name, "labels": labels, "creationTimestamp": "2025-01-01T00:00:00Z"},
                           "spec": job["spec"]["template"]["spec"],
                           "status": {"phase": phase, "containerStatuses": [{"name": "worker", "state": state}]}}
        self.logs[name] = log
        return name

    def end(self, kind: str, reason: str, message: str, **counts: int) -> None:
        self.job()["status"] = {**counts, "conditions": [{"type": kind, "status": "True", "reason": reason,
                                                          "message": message}]}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeJobs:
    jobs = FakeJobs()
    monkeypatch.setitem(manager.KINDS, "job", JobKind(lambda settings: jobs, poll_s=0.05, log_every_s=0.05))
    return jobs


def _settings(tmp_path: Path, builtin_dir: Path, templates: Path | None) -> Settings:
    return load_settings(shared_dir=tmp_path / "shared", builtin_dir=builtin_dir, api_token=TOKEN,
                         discovery="static", job_template_dir=templates)


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "job.yaml").write_text(SHIPPED.read_text())
    return folder


@pytest.fixture
def api(tmp_path: Path, builtin_dir: Path, templates: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tmp_path, builtin_dir, templates)),
                    headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def error(response: Any) -> str:
    return str(response.json()["error"]["message"])


# ------------------------------------------------------------------------------------------ refused up front
BROKEN = {
    "unparseable": ("kind: Job\nspec: [unclosed\n", "does not parse as YAML"),
    "not-a-job": (SHIPPED.read_text().replace("kind: Job", "kind: Deployment").replace("batch/v1", "apps/v1"),
                  "is a apps/v1 Deployment, not a batch/v1 Job"),
    "no-publisher": (SHIPPED.read_text().replace('lockstep/publisher: "true"', 'lockstep/publisher: "false"'),
                     'lack the label lockstep/publisher: "true"'),
    "two-documents": (SHIPPED.read_text() + "---\n" + SHIPPED.read_text(), "holds 2 YAML documents"),
    "always-restarts": (SHIPPED.read_text().replace("restartPolicy: Never", "restartPolicy: Always"),
                        "restartPolicy is 'Always'"),
    "no-containers": ("apiVersion: batch/v1\nkind: Job\nspec:\n  template:\n    metadata:\n      labels:\n"
                      "        lockstep/publisher: \"true\"\n    spec:\n      restartPolicy: Never\n",
                      "must list at least one container"),
    # Shapes a Job never has, where a mapping belongs: each a 400 naming the place, never a 500.
    "metadata-a-string": ("apiVersion: batch/v1\nkind: Job\nmetadata: trainer\nspec: {}\n",
                          "metadata is not a mapping"),
    "pod-metadata-a-string": ("apiVersion: batch/v1\nkind: Job\nspec:\n  template:\n    metadata: pods\n",
                              "spec.template.metadata is missing or not a mapping"),
    "labels-a-list": ("apiVersion: batch/v1\nkind: Job\nspec:\n  template:\n    metadata:\n      labels:\n"
                      "        - lockstep/publisher\n", "spec.template.metadata.labels is missing or not a mapping"),
    "job-labels-a-list": ("apiVersion: batch/v1\nkind: Job\nmetadata:\n  labels: [a, b]\nspec:\n  template:\n"
                          "    metadata:\n      labels:\n        lockstep/publisher: \"true\"\n    spec:\n"
                          "      restartPolicy: Never\n      containers: [{name: worker, image: x}]\n",
                          "metadata.labels is missing or not a mapping"),
    "env-a-number": ("apiVersion: batch/v1\nkind: Job\nspec:\n  template:\n    metadata:\n      labels:\n"
                     "        lockstep/publisher: \"true\"\n    spec:\n      restartPolicy: Never\n"
                     "      containers: [{name: worker, image: x, env: 3}]\n", "containers[0].env is not a list"),
    "nested-too-deeply": ("apiVersion: batch/v1\nkind: Job\nspec: " + "[" * 20_000 + "]" * 20_000 + "\n",
                          "nested too deeply"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_bad_template_is_refused_with_400_before_a_run_exists(api: TestClient, templates: Path, fake: FakeJobs,
                                                                name: str) -> None:
    text, message = BROKEN[name]
    (templates / f"{name}.yaml").write_text(text)
    response = api.post("/runs", json={"kind": "job", "params": {"template": name}})
    assert response.status_code == 400, response.text
    assert message in error(response) and str(templates / f"{name}.yaml") in error(response)
    assert api.get("/runs").json()["runs"] == [] and fake.created == []


@pytest.mark.parametrize(("params", "message"), [
    ({"template": "nope"}, "no job template 'nope'"),
    ({"template": "../job"}, "params.template"),
    ({"env": {"LOCKSTEP_RUN_ID": "x"}}, "set by the trainer"),
    ({"env": {"9LIVES": "x"}}, "params.env"),
    ({"steps": 0}, "params.steps"),
    ({"deadline_s": 10**9}, "params.deadline_s"),
    ({"task": "juggling"}, "unknown task 'juggling'"),
    ({"model": "versions/77"}, "77"),
])
def test_bad_parameters_are_refused_before_a_run_exists(api: TestClient, fake: FakeJobs, params: dict[str, Any],
                                                        message: str) -> None:
    response = api.post("/runs", json={"kind": "job", "params": params})
    assert response.status_code in (400, 404), response.text
    assert message in error(response)
    assert fake.created == []


def test_without_templates_or_a_kubernetes_api_job_runs_are_refused(tmp_path: Path, builtin_dir: Path,
                                                                     templates: Path) -> None:
    with TestClient(create_app(_settings(tmp_path, builtin_dir, None)),
                    headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        response = client.post("/runs", json={"kind": "job"})
        assert response.status_code == 409 and "LOCKSTEP_JOB_TEMPLATE_DIR" in error(response), response.text
    # The shipped template passes; this process is no pod and has no kubeconfig.
    with TestClient(create_app(_settings(tmp_path, builtin_dir, templates)),
                    headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        response = client.post("/runs", json={"kind": "job"})
        assert response.status_code == 409 and "no Kubernetes API" in error(response), response.text


def test_the_shipped_template_renders_the_runs_job() -> None:
    from lockstep.trainer.server.schemas import JobParams

    params = JobParams(image="registry/trainer:1", args=["-m", "my.script"], env={"EXTRA": "1"}, steps=7,
                       save_steps=3, deadline_s=600, backoff_limit=0)
    job = template.render(template.parse(SHIPPED.read_text(), "shipped"), run_id="20250101-000000-job-abc123",
                          model="versions/4", params=params)
    assert job["metadata"]["name"] == "lockstep-20250101-000000-job-abc123"
    assert job["metadata"]["labels"]["lockstep/run-id"] == "20250101-000000-job-abc123"
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["lockstep/run-id"] == "20250101-000000-job-abc123"
    assert pod["metadata"]["labels"]["lockstep/publisher"] == "true"
    assert (job["spec"]["activeDeadlineSeconds"], job["spec"]["backoffLimit"]) == (600, 0)
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry/trainer:1" and container["command"] == ["torchrun"]
    assert container["args"] == ["-m", "my.script"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["EXTRA"] == "1" and env["LOCKSTEP_JOB_MODEL"] == "versions/4" and env["LOCKSTEP_JOB_STEPS"] == "7"
    assert env["LOCKSTEP_JOB_SAVE_STEPS"] == "3" and env["TRAINER_URL"] == "http://trainer-service:8080"
    assert env["LOCKSTEP_API_TOKEN"] == {"secretKeyRef": {"name": "lockstep-api-token", "key": "token"}}


# ------------------------------------------------------------------------------------------ following the Job
def _publish_as(api: TestClient, model: Path, run_id: str, step: int) -> int:
    """A version whose MANIFEST names the run, recorded as committed (what the Job's upload publish leaves)."""
    coordinator = api.app.state.trainer.coordinator  # type: ignore[attr-defined]
    manifest = coordinator.store.publish_dir(model, source="test", metadata={"run_id": run_id, "step": step})
    history = coordinator.data_dir / "history"
    history.mkdir(exist_ok=True)
    (history / f"{int(time.time() * 1000):015d}-v{manifest.version}.json").write_text(
        json.dumps({"version": manifest.version, "outcome": "committed"}))
    return int(manifest.version)


def _run(api: TestClient, run_id: str, status: str) -> dict[str, Any]:
    return wait_for(lambda: (r := api.get(f"/runs/{run_id}").json())["status"] == status and r, 30, 0.05,
                    f"run {run_id} {status}")


def test_a_job_run_follows_its_job_to_success(api: TestClient, fake: FakeJobs, tiny_dirs: dict[int, Path]) -> None:
    created = api.post("/runs", json={"kind": "job", "params": {"steps": 8, "save_steps": 4}})
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    wait_for(lambda: fake.jobs, 30, 0.05, "the Job")
    (body,) = fake.created
    assert body["metadata"]["name"] == f"lockstep-{run_id}"
    env = {e["name"]: e.get("value") for e in body["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LOCKSTEP_RUN_ID"] == run_id and env["LOCKSTEP_JOB_MODEL"] == "builtin:tiny"  # v0: no replicas

    # Publishing while it runs: the run's own upload publish is not refused, anyone else's is.
    refused = api.post("/publish", json={"model": "builtin:tiny-s1"})
    assert refused.status_code == 409 and f"run_id={run_id}" in error(refused)

    pod = fake.pod({"running": {}}, "Running", log="step 1\nstep 2\n")
    first = _publish_as(api, tiny_dirs[1], run_id, 4)
    _publish_as(api, tiny_dirs[2], "someone-else", 1)
    # The version, the step and the pod's state arrive in separate updates of the run: wait for all three.
    running = wait_for(lambda: (r := api.get(f"/runs/{run_id}").json())["versions"] and r["progress"]["step"] == 4
                       and f"pod {pod} Running" in r["progress"]["message"] and r, 30, 0.05, "v listed")
    assert running["versions"] == [first]

    fake.logs[pod] += "published v1\n"
    fake.pods[pod]["status"] = {"phase": "Succeeded", "containerStatuses": [
        {"name": "worker", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}
    fake.end("Complete", "CompletionsReached", "Reached expected number of succeeded pods", succeeded=1)
    done = _run(api, run_id, "succeeded")
    assert done["versions"] == [first] and done["error"] is None
    assert [(m["step"], m["version"]) for m in done["metrics"]] == [(4, first)]  # the curve: a point a version
    assert done["summary"]["pods"] == [{"name": pod, "phase": "Succeeded", "exit_codes": {"worker": 0}}]
    assert done["summary"]["job"] == f"lockstep-{run_id}"
    logs = api.get(f"/runs/{run_id}/logs")
    assert logs.status_code == 200 and logs.text == f"==> {pod} <==\nstep 1\nstep 2\npublished v1\n"
    assert api.get("/runs/no-such-run/logs").status_code == 404
    assert fake.deleted == []  # a finished Job is left to its TTL


def test_the_runs_pods_may_publish_uploads_while_it_runs_and_nobody_else(api: TestClient, fake: FakeJobs,
                                                                         tiny_dirs: dict[int, Path]) -> None:
    import hashlib

    run_id = api.post("/runs", json={"kind": "job"}).json()["id"]
    upload = api.post("/store/uploads").json()["upload_id"]
    for path in sorted(p for p in tiny_dirs[1].iterdir() if p.is_file()):
        data = path.read_bytes()
        sent = api.put(f"/store/uploads/{upload}/files/{path.name}", content=data,
                       headers={"X-Content-SHA256": hashlib.sha256(data).hexdigest()})
        assert sent.status_code == 200, sent.text
    for metadata in ({}, {"run_id": "20250101-000000-job-000000"}):
        refused = api.post(f"/store/uploads/{upload}/publish", json={"metadata": metadata})
        assert refused.status_code == 409 and f"run {run_id} (job) is active" in error(refused), refused.text
    accepted = api.post(f"/store/uploads/{upload}/publish", json={"metadata": {"run_id": run_id, "step": 2}})
    assert accepted.status_code == 202, accepted.text
    assert api.get(f"/publishes/{accepted.json()['publish_id']}").json()["run_id"] == run_id
    wait_for(lambda: api.get(f"/publishes/{accepted.json()['publish_id']}").json()["status"] != "running", 60,
             0.05, "the publish to end")


def test_a_failed_job_fails_the_run_with_its_exit_code_and_log(api: TestClient, fake: FakeJobs) -> None:
    run_id = api.post("/runs", json={"kind": "job"}).json()["id"]
    wait_for(lambda: fake.jobs, 30, 0.05, "the Job")
    log = "".join(f"line {i}\n" for i in range(40)) + "ValueError: no such dataset\n"
    fake.pod({"terminated": {"exitCode": 3, "reason": "Error"}}, "Failed", log=log)
    fake.end("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit", failed=2)
    done = _run(api, run_id, "failed")
    assert done["error"].startswith(f"job lockstep-{run_id} failed (BackoffLimitExceeded: Job has reached the "
                                    "specified backoff limit): pod ")
    assert "container worker exited 3 (Error)" in done["error"]
    assert done["error"].endswith("line 39\nValueError: no such dataset") and "line 25" not in done["error"]
    assert done["versions"] == [] and done["summary"]["failed"] == 2


def test_a_job_that_cannot_start_fails_the_run_and_is_deleted(api: TestClient, fake: FakeJobs) -> None:
    run_id = api.post("/runs", json={"kind": "job", "params": {"image": "nowhere/none:1"}}).json()["id"]
    wait_for(lambda: fake.jobs, 30, 0.05, "the Job")
    fake.pod({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image nowhere/none:1"}},
             "Pending")
    done = _run(api, run_id, "failed")
    assert "cannot start: container worker ImagePullBackOff: Back-off pulling image nowhere/none:1" in done["error"]
    assert fake.deleted == [f"lockstep-{run_id}"]


def test_stopping_a_job_run_deletes_its_job(api: TestClient, fake: FakeJobs) -> None:
    run_id = api.post("/runs", json={"kind": "job"}).json()["id"]
    wait_for(lambda: fake.jobs, 30, 0.05, "the Job")
    fake.pod({"running": {}}, "Running", log="training\n")
    assert api.post(f"/runs/{run_id}/stop").status_code == 202
    done = _run(api, run_id, "stopped")
    assert fake.deleted == [f"lockstep-{run_id}"] and done["error"] is None
    assert done["progress"]["message"].startswith("stopped after step"), done["progress"]  # not what it was doing
    assert "training" in api.get(f"/runs/{run_id}/logs").text
    # Resumed, with its Job gone: a new Job, from the version the fleet serves now.
    assert api.post(f"/runs/{run_id}/resume").status_code == 202
    wait_for(lambda: len(fake.created) == 2, 30, 0.05, "a second Job")
    assert api.post(f"/runs/{run_id}/stop").status_code == 202
    _run(api, run_id, "stopped")


def test_a_restarted_trainer_attaches_to_the_job_it_left_running(tmp_path: Path, builtin_dir: Path,
                                                                 templates: Path, fake: FakeJobs) -> None:
    settings = _settings(tmp_path, builtin_dir, templates)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(settings), headers=headers) as first:
        run_id = first.post("/runs", json={"kind": "job"}).json()["id"]
        wait_for(lambda: fake.jobs, 30, 0.05, "the Job")
        fake.pod({"running": {}}, "Running")
    # The trainer shut down: the run is interrupted and its Job left running.
    assert fake.deleted == [] and len(fake.jobs) == 1
    with TestClient(create_app(settings), headers=headers) as second:
        assert second.get(f"/runs/{run_id}").json()["status"] == "interrupted"
        assert second.post(f"/runs/{run_id}/resume").status_code == 202
        wait_for(lambda: second.get(f"/runs/{run_id}").json()["progress"]["message"].startswith("job "), 30, 0.05,
                 "the resumed run following the Job")
        fake.end("Complete", "CompletionsReached", "Reached expected number of succeeded pods", succeeded=1)
        done = _run(second, run_id, "succeeded")
        assert done["resumes"] == 1 and len(fake.created) == 1  # attached to it, not a second Job


# ------------------------------------------------------------------------------------------ the worker's data
def test_the_workers_completions_are_what_the_tasks_reward() -> None:
    pairs = examples("digits", 16, seed=0)
    assert len(pairs) == 16 and all(digits_reward(p["prompt"], p["completion"]) == 1.0 for p in pairs)
    assert examples("digits", 16, seed=0) == pairs  # the same data for the same seed
    pair = examples("target_word", 1, seed=0)[0]
    assert pair["completion"].strip() in pair["prompt"]
    with pytest.raises(ValueError, match="no supervised completions"):
        import random

        completion("riddles", "?", random.Random(0))


def test_a_job_run_rides_out_a_failing_kubernetes_api(api: TestClient, fake: FakeJobs) -> None:
    """Before, one 500 from the API failed the run and left its Job running, untracked."""
    run_id = api.post("/runs", json={"kind": "job"}).json()["id"]
    wait_for(lambda: fake.jobs, 30, 0.05, "the Job")
    fake.failing = 5
    wait_for(lambda: fake.failing == 0, 30, 0.05, "five failed reads")
    fake.end("Complete", "CompletionsReached", "Reached expected number of succeeded pods", succeeded=1)
    done = _run(api, run_id, "succeeded")
    assert done["error"] is None and fake.deleted == []


def test_a_run_that_loses_the_kubernetes_api_deletes_its_job_and_refuses_its_publishes(
        api: TestClient, monkeypatch: pytest.MonkeyPatch, tiny_dirs: dict[int, Path]) -> None:
    import hashlib

    jobs = FakeJobs()
    monkeypatch.setitem(manager.KINDS, "job", JobKind(lambda settings: jobs, poll_s=0.05, log_every_s=0.05,
                                                      api_grace_s=0.5))
    run_id = api.post("/runs", json={"kind": "job"}).json()["id"]
    wait_for(lambda: jobs.jobs, 30, 0.05, "the Job")
    jobs.failing = 10**9
    done = _run(api, run_id, "failed")
    assert "lost the Kubernetes API" in done["error"] and f"job lockstep-{run_id} was deleted" in done["error"]
    assert jobs.deleted == [f"lockstep-{run_id}"]
    # A pod of that Job still publishing (its deletion under way) is refused: no version the run does not track.
    upload = api.post("/store/uploads").json()["upload_id"]
    for path in sorted(p for p in tiny_dirs[1].iterdir() if p.is_file()):
        data = path.read_bytes()
        api.put(f"/store/uploads/{upload}/files/{path.name}", content=data,
                headers={"X-Content-SHA256": hashlib.sha256(data).hexdigest()})
    refused = api.post(f"/store/uploads/{upload}/publish", json={"metadata": {"run_id": run_id, "step": 2}})
    assert refused.status_code == 409 and f"run {run_id} (job) is failed" in error(refused), refused.text
    # Naming no run of this trainer, an upload publishes as any other.
    accepted = api.post(f"/store/uploads/{upload}/publish", json={"metadata": {"run_id": "mine-0001"}})
    assert accepted.status_code == 202, accepted.text
    wait_for(lambda: api.get(f"/publishes/{accepted.json()['publish_id']}").json()["status"] != "running", 60,
             0.05, "the publish to end")
