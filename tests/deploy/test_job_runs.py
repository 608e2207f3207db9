"""A job run on the manifest-driven local cluster (issue 16): the trainer creates a Job from
k8s/training/job.yaml through its real ``kubernetes`` client, the Job's pod runs the TRL worker under torchrun
and publishes each checkpoint through the upload API, and every replica serves the last one.

Besides those of test_local_cluster.py, two translations: the kubelet runs Jobs (a pod that runs to completion,
tests/deploy/kubelet.py) behind a small API server that implements exactly the calls a job run makes and
enforces the manifests' RBAC (tests/deploy/kube_api.py), and the trainer reaches it through
``LOCKSTEP_KUBECONFIG`` instead of its pod's service account. The Job's pod runs on CPU (the kubelet does not
enforce the GPU node selector, toleration or resources) and starts from builtin:tiny, what the fleet serves.
Needs root for the network namespaces; skipped otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cluster import wait_for

from . import base_objects
from .kube_api import KubeApiServer
from .test_local_cluster import INFERENCE, OVERRIDES, TRAINER, Cluster, _committed, _http, _serving, run_objects

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

BOOT_TIMEOUT_S = 240
RUN_TIMEOUT_S = 300  # torch and TRL imported by two processes of the Job's pod on two shared cores
# Two steps, a checkpoint after each: two versions. Small batches: the model is tiny and so is the machine.
TRAIN = {"steps": 2, "save_steps": 1, "batch_size": 2}
# The worker, started without torchrun so that it fails fast, with an argument it refuses (exit 2).
FAILING = {"command": ["python", "-m", "lockstep.trainer.jobs.worker"], "args": ["--steps", "many"],
           "backoff_limit": 0}


def _post_run(http: httpx.Client, cluster: Cluster, params: dict[str, Any]) -> str:
    response = http.post(cluster.trainer() + "/runs", json={"kind": "job", "params": params},
                         headers={"Authorization": f"Bearer {cluster.token}"}, timeout=60)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _ended(http: httpx.Client, cluster: Cluster, run_id: str) -> dict[str, Any] | None:
    run: dict[str, Any] = http.get(f"{cluster.trainer()}/runs/{run_id}").json()
    return None if run["active"] else run


def _wait_run(http: httpx.Client, cluster: Cluster, run_id: str) -> dict[str, Any]:
    def describe() -> str:
        pods = "\n\n".join(cluster.kubelet.describe(p) for p in cluster.kubelet.all_pods() if p.job)
        return f"run {run_id} to end\n{pods}\n{[p.log(6000) for p in cluster.pods(TRAINER)]}"

    try:
        return wait_for(lambda: _ended(http, cluster, run_id), RUN_TIMEOUT_S, 0.5, f"run {run_id} to end")
    except AssertionError as exc:
        raise AssertionError(describe()) from exc


def test_a_job_run_publishes_versions_every_replica_serves_and_a_failing_job_fails_its_run(
        tmp_path: Path, builtin_dir: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    overrides = {**OVERRIDES, TRAINER: {**OVERRIDES[TRAINER], "LOCKSTEP_KUBECONFIG": str(kubeconfig)}}
    objects = base_objects()
    with run_objects(objects, tmp_path, builtin_dir, overrides) as cluster, _http() as http:
        kubelet = cluster.kubelet
        api = KubeApiServer(kubelet, objects, kubelet.deployments[TRAINER]["spec"]["template"]["spec"]
                            ["serviceAccountName"])
        api.kubeconfig(kubeconfig)
        kubelet.wait_ready(kubelet.apply(INFERENCE) + kubelet.apply(TRAINER), BOOT_TIMEOUT_S)

        # A job that exits non-zero: the run fails with the reason, the fleet keeps its committed version.
        before = _committed(cluster.pvc)
        failed = _wait_run(http, cluster, _post_run(http, cluster, FAILING))
        assert failed["status"] == "failed", failed
        assert failed["error"].startswith(f"job lockstep-{failed['id']} failed (BackoffLimitExceeded"), failed
        assert "container worker exited 2 (Error)" in failed["error"], failed["error"]
        assert "invalid int value: 'many'" in failed["error"], failed["error"]
        assert failed["versions"] == [] and _committed(cluster.pvc) == before
        for pod in cluster.pods(INFERENCE):
            assert _serving(pod) == (before, 200)

        # The default template and worker: TRL on builtin:tiny, a version per checkpoint.
        run_id = _post_run(http, cluster, TRAIN)
        done = _wait_run(http, cluster, run_id)
        assert done["status"] == "succeeded", done
        versions = done["versions"]
        assert len(versions) == 2 and versions == sorted(versions) and versions[0] > before, done
        assert [(m["step"], m["version"]) for m in done["metrics"]] == [(1, versions[0]), (2, versions[1])]
        assert all(isinstance(m["loss"], float) for m in done["metrics"]), done["metrics"]
        last = versions[-1]
        assert _committed(cluster.pvc) == last
        for pod in cluster.pods(INFERENCE):
            wait_for(lambda p=pod: _serving(p) == (last, 200), 30, 0.1, f"{pod.name} serving v{last}")
        for version in versions:  # the MANIFEST names the run: that is how the trainer attributed it
            manifest = json.loads((cluster.pvc / "versions" / f"{version:06d}" / "MANIFEST.json").read_text())
            assert manifest["metadata"]["run_id"] == run_id and manifest["metadata"]["step"] in (1, 2)

        (job_pod,) = [p for p in kubelet.all_pods() if p.job == f"lockstep-{run_id}"]
        assert job_pod.labels["lockstep/publisher"] == "true" and job_pod.labels["lockstep/run-id"] == run_id
        assert done["summary"]["pods"] == [{"name": job_pod.name, "phase": "Succeeded", "exit_codes": {"worker": 0}}]
        logs = http.get(f"{cluster.trainer()}/runs/{run_id}/logs").text
        assert logs.startswith(f"==> {job_pod.name} <==\n") and f"run {run_id}: done; published " in logs, logs

        # Every call the trainer made was one k8s/rbac.yaml allows (a 404: looking for a Job before creating it).
        assert api.requests and {code for _, _, code in api.requests} <= {200, 201, 404}, api.requests
