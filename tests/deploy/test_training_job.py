"""The Job template of job runs (k8s/training/job.yaml) fits the trainer and the rest of the manifests: the
trainer's own check accepts it, it reaches the trainer through the Secret, the Service and the NetworkPolicy,
it is locked down like the other pods and ready for GPU nodes, and it ships to the trainer as a ConfigMap
(schema validation and yamllint: test_manifest_schema.py, like every file under k8s/)."""

from __future__ import annotations

import importlib.util
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml

from lockstep.trainer.jobs import template

from . import K8S, Doc, base_objects, find, load_file, pyproject_version
from .test_k8s_wiring import (
    Peer,
    _pod,
    allowed,
    component_settings,
    resolved_env,
    service_port,
    target_container_port,
)

JOB_FILE = K8S / "training" / "job.yaml"
GPU = "nvidia.com/gpu"


@pytest.fixture
def job() -> Doc:
    (doc,) = load_file(JOB_FILE)
    return doc


def pod_spec(job: Doc) -> dict[str, Any]:
    return job.body["spec"]["template"]["spec"]


def test_the_trainer_accepts_the_shipped_template(job: Doc) -> None:
    assert template.parse(JOB_FILE.read_text(), str(JOB_FILE)) == job.body
    container = pod_spec(job)["containers"][0]
    assert container["command"] == ["torchrun"] and "--nproc-per-node=1" in container["args"]
    module = container["args"][container["args"].index("-m") + 1]
    assert module == "lockstep.trainer.jobs.worker" and importlib.util.find_spec(module) is not None


def test_it_ships_to_the_trainer_as_a_configmap_at_the_template_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = base_objects()
    config_map = find(docs, "ConfigMap", "trainer-job-templates").body
    assert config_map["data"] == {"job.yaml": JOB_FILE.read_text()}  # params.template "job", the default
    trainer = find(docs, "Deployment", "trainer-server").body["spec"]["template"]["spec"]
    volume = next(v for v in trainer["volumes"] if v.get("configMap", {}).get("name") == "trainer-job-templates")
    mount = next(m for m in trainer["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    settings = component_settings("trainer-server", monkeypatch)
    assert settings.job_template_dir is not None and mount["readOnly"] is True
    assert PurePosixPath(settings.job_template_dir) == PurePosixPath(mount["mountPath"])
    assert settings.kubeconfig is None  # the pod's service account
    # Data for the trainer, not a workload: nothing in the base runs it.
    assert not [d for d in docs if d.kind == "Job"]
    assert "training/job.yaml" not in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]


def test_its_pods_reach_the_trainer_with_the_token(job: Doc) -> None:
    docs = base_objects()
    env = resolved_env(pod_spec(job)["containers"][0], docs)
    assert env["LOCKSTEP_API_TOKEN"] == ("Secret lockstep-api-token", find(
        docs, "Secret", "lockstep-api-token").body["stringData"]["token"])
    service, port = service_port(docs, env["TRAINER_URL"][1])
    assert service.name == "trainer-service" and target_container_port(service, port, docs) == 8080
    labels = job.body["spec"]["template"]["metadata"]["labels"]
    assert labels[template.PUBLISHER_LABEL] == "true"
    assert allowed(Peer(labels), _pod("trainer-server"), 8080)
    unlabelled = {k: v for k, v in labels.items() if k != template.PUBLISHER_LABEL}
    assert not allowed(Peer(unlabelled), _pod("trainer-server"), 8080)  # why the trainer insists on the label


def test_its_pods_run_locked_down_and_clean_up(job: Doc) -> None:
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False and spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] >= 10000
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"]["type"] == "RuntimeDefault"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = [PurePosixPath(m["mountPath"]) for m in container["volumeMounts"]]
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "sizeLimit" in volumes[tmp["name"]]["emptyDir"]
    for name, (source, value) in resolved_env(container, base_objects()).items():
        if value.startswith("/"):
            assert any(PurePosixPath(value).is_relative_to(m) for m in mounts), f"{name}={value} ({source})"
    run = job.body["spec"]
    assert run["backoffLimit"] >= 0 and run["activeDeadlineSeconds"] > 0 and run["ttlSecondsAfterFinished"] > 0


def test_it_is_ready_for_gpu_nodes(job: Doc) -> None:
    spec = pod_spec(job)
    resources = spec["containers"][0]["resources"]
    assert resources["requests"][GPU] == resources["limits"][GPU] == "1"
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    dshm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["medium"] == "Memory"


def test_it_carries_the_recommended_labels(job: Doc) -> None:
    for labels in (job.body["metadata"]["labels"], job.body["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/part-of"] == "lockstep"
        assert labels["app.kubernetes.io/version"] == pyproject_version()
        assert labels["app.kubernetes.io/component"] == "training"
