"""The manifests fit together and fit the code: selectors, references, settings, security, probes, ports."""

from __future__ import annotations

import base64
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import AliasChoices

from lockstep.core.settings import Settings

from . import K8S, Doc, base_objects, find, load_file, pyproject_version

STATEFULSET = K8S / "statefulset" / "inference-statefulset.yaml"
MONITORING = [K8S / "monitoring" / "servicemonitor.yaml", K8S / "monitoring" / "prometheusrule.yaml"]

# Stand-ins for what the Downward API fills in at run time.
DOWNWARD = {
    "metadata.name": "inference-server-6c9f7d-x2x7q",
    "metadata.namespace": "lockstep",
    "status.podIP": "10.244.1.7",
}
# Environment variables that are not Settings: they point libraries' caches at the writable /tmp, or turn their
# telemetry off.
RUNTIME_ENV = {
    "HOME",
    "TMPDIR",
    "XDG_CACHE_HOME",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "CUDA_CACHE_PATH",
    "HF_HUB_DISABLE_TELEMETRY",
    "VLLM_NO_USAGE_STATS",
    "DO_NOT_TRACK",
}
# Keys both the trainer (coordinator) and the replicas read that may differ between them.
MAY_DIFFER = {"LOCKSTEP_DEVICE", "LOCKSTEP_DTYPE"}
SEED_SERVICES = {"inference-service", "inference-headless", "trainer-service", "ui-service"}
SEED_WORKLOADS = {"inference-server", "trainer-server", "ui-server"}
# The seed's resource table (per replica).
SEED_RESOURCES = {
    "inference-server": (
        {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
        {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
    ),
    "trainer-server": ({"cpu": "500m", "memory": "512Mi"}, {"cpu": "1", "memory": "1Gi"}),
    "ui-server": ({"cpu": "250m", "memory": "256Mi"}, {"cpu": "500m", "memory": "512Mi"}),
}


def all_objects() -> list[Doc]:
    docs = base_objects() + load_file(STATEFULSET)
    return docs + [d for path in MONITORING for d in load_file(path)]


def workloads(docs: list[Doc] | None = None) -> list[Doc]:
    docs = base_objects() + load_file(STATEFULSET) if docs is None else docs
    return [d for d in docs if d.kind in ("Deployment", "StatefulSet")]


def pod_spec(workload: Doc) -> dict[str, Any]:
    return workload.body["spec"]["template"]["spec"]


def pod_labels(workload: Doc) -> dict[str, str]:
    return workload.body["spec"]["template"]["metadata"]["labels"]


def containers(workload: Doc) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels / matchExpressions, or a Service's plain map) against labels."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def settings_aliases() -> dict[str, list[str]]:
    """Each Settings field and the environment variables that set it."""
    out = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            out[name] = [str(c) for c in alias.choices]
        else:
            out[name] = [str(alias or name).upper()]
    return out


ALIASES = {a for choices in settings_aliases().values() for a in choices}


def config_maps(docs: list[Doc]) -> dict[str, dict[str, str]]:
    return {d.name: d.body.get("data") or {} for d in docs if d.kind == "ConfigMap"}


def secrets(docs: list[Doc]) -> dict[str, dict[str, str]]:
    out = {}
    for d in docs:
        if d.kind == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (d.body.get("data") or {}).items()}
            out[d.name] = data | (d.body.get("stringData") or {})
    return out


def resolved_env(container: dict[str, Any], docs: list[Doc]) -> dict[str, tuple[str, str]]:
    """The container's environment as Kubernetes builds it: name -> (where it comes from, value)."""
    cms, secs = config_maps(docs), secrets(docs)
    env: dict[str, tuple[str, str]] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            env |= {k: (f"ConfigMap {name}", v) for k, v in cms[name].items()}
        if "secretRef" in source:
            name = source["secretRef"]["name"]
            env |= {k: (f"Secret {name}", v) for k, v in secs[name].items()}
    for item in container.get("env", []):
        if "value" in item:
            # $(VAR) expands only to variables defined before it; anything else stays literal.
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env[m.group(1)][1] if m.group(1) in env else m.group(0),
                item["value"],
            )
            env[item["name"]] = ("value", value)
        elif "configMapKeyRef" in (ref := item["valueFrom"]):
            env[item["name"]] = (
                f"ConfigMap {ref['configMapKeyRef']['name']}",
                cms[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]],
            )
        elif "secretKeyRef" in ref:
            env[item["name"]] = (
                f"Secret {ref['secretKeyRef']['name']}",
                secs[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]],
            )
        elif "fieldRef" in ref:
            env[item["name"]] = ("Downward API", DOWNWARD[ref["fieldRef"]["fieldPath"]])
    return env


def component_settings(workload_name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a container of this workload starts with (this process's environment left out)."""
    docs = base_objects()
    container = containers(find(docs, "Deployment", workload_name))[0]
    for alias in ALIASES:
        monkeypatch.delenv(alias, raising=False)
    env = {k: v for k, (_, v) in resolved_env(container, docs).items() if k in ALIASES}
    return Settings(**env)


def service_port(docs: list[Doc], url: str) -> tuple[Doc, int]:
    """The Service and port a cluster-internal URL (http://NAME:PORT) reaches."""
    parsed = urlparse(url)
    service = find(docs, "Service", parsed.hostname or "")
    assert parsed.port in [p["port"] for p in service.body["spec"]["ports"]], f"{url}: no such Service port"
    return service, parsed.port


def target_container_port(service: Doc, port: int, docs: list[Doc]) -> int:
    """The container port behind a Service port, resolving a named targetPort on the selected pods."""
    spec_port = next(p for p in service.body["spec"]["ports"] if p["port"] == port)
    target = spec_port.get("targetPort", port)
    if isinstance(target, int):
        return target
    pods = [w for w in workloads(docs) if matches(service.body["spec"]["selector"], pod_labels(w))]
    numbers = {
        p["containerPort"]
        for w in pods
        for c in containers(w)
        for p in c.get("ports", [])
        if p.get("name") == target
    }
    assert len(numbers) == 1, f"Service {service.name}: targetPort {target!r} resolves to {numbers}"
    return numbers.pop()


# --- Services and selectors ----------------------------------------------------------------------------


def test_seed_names_are_kept() -> None:
    docs = base_objects()
    assert {d.name for d in docs if d.kind == "Service"} == SEED_SERVICES
    assert {d.name for d in workloads(docs)} == SEED_WORKLOADS
    assert {d.name for d in docs if d.kind == "ConfigMap"} == {
        "inference-config",
        "trainer-config",
        "ui-config",
        "trainer-job-templates",  # files, not settings: the Job templates of job runs
    }
    assert find(docs, "PersistentVolumeClaim", "model-storage").body["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    for workload in workloads():
        assert pod_labels(workload)["app"] == workload.name


@pytest.mark.parametrize("variant", ["deployment", "statefulset"])
def selector_problems(docs: list[Doc]) -> list[str]:
    """Services that select no pods, pods of several workloads, or a targetPort no selected pod has."""
    problems = []
    for service in (d for d in docs if d.kind == "Service"):
        selector = service.body["spec"]["selector"]
        selected = [w for w in workloads(docs) if matches(selector, pod_labels(w))]
        if not selected:
            problems.append(
                f"Service {service.name} ({service.source}) selects no pods: selector {selector}; "
                f"pod labels: {[pod_labels(w) for w in workloads(docs)]}"
            )
        elif len(selected) > 1:
            problems.append(f"Service {service.name} selects pods of {[w.name for w in selected]}")
        for port in service.body["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and not any(
                p.get("name") == target for w in selected for c in containers(w) for p in c.get("ports", [])
            ):
                problems.append(f"Service {service.name}: no selected pod has a port named {target!r}")
    return problems


@pytest.mark.parametrize("variant", ["deployment", "statefulset"])
def test_every_service_selects_pods_and_their_named_port(variant: str) -> None:
    docs = base_objects()
    if variant == "statefulset":
        docs = [d for d in docs if (d.kind, d.name) != ("Deployment", "inference-server")]
        docs += load_file(STATEFULSET)
    problems = selector_problems(docs)
    assert not problems, "\n".join(problems)


def test_a_service_selecting_nothing_is_named() -> None:
    docs = []
    for doc in base_objects():
        if (doc.kind, doc.name) == ("Service", "inference-service"):
            body = yaml.safe_load(yaml.safe_dump(doc.body))
            body["spec"]["selector"] = {"app": "inference-srever"}
            doc = Doc(doc.source, doc.index, body)
        docs.append(doc)
    problems = selector_problems(docs)
    assert len(problems) == 2, problems
    assert problems[0].startswith("Service inference-service (k8s/inference-service.yaml) selects no pods")
    assert "no selected pod has a port named 'http'" in problems[1]


def test_workload_selectors_match_their_own_pods() -> None:
    for workload in workloads():
        assert matches(workload.body["spec"]["selector"], pod_labels(workload)), workload.where


def test_service_ports_follow_the_seed() -> None:
    docs = base_objects()
    expected = {
        "inference-service": (8000, 8000),
        "inference-headless": (8000, 8000),
        "trainer-service": (8080, 8080),
        "ui-service": (80, 8080),
    }
    for name, (port, container_port) in expected.items():
        service = find(docs, "Service", name)
        assert [p["port"] for p in service.body["spec"]["ports"]] == [port], name
        assert target_container_port(service, port, docs) == container_port, name
    # The UI drives the fleet: cluster-internal, reached by port-forward or an Ingress (never a bare public address).
    assert find(docs, "Service", "ui-service").body["spec"].get("type", "ClusterIP") == "ClusterIP"
    headless = find(docs, "Service", "inference-headless").body["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    statefulset = find(load_file(STATEFULSET), "StatefulSet", "inference-server").body["spec"]
    assert statefulset["serviceName"] == "inference-headless"


def test_disruption_budget_covers_the_replicas() -> None:
    docs = base_objects()
    pdb = find(docs, "PodDisruptionBudget", "inference-server-pdb").body["spec"]
    inference = find(docs, "Deployment", "inference-server")
    assert matches(pdb["selector"], pod_labels(inference))
    assert 1 <= pdb["minAvailable"] < inference.body["spec"]["replicas"]


# --- references ------------------------------------------------------------------------------------------


def test_every_reference_names_an_existing_object_and_key() -> None:
    docs = base_objects()
    cms, secs = config_maps(docs), secrets(docs)
    names = {(d.kind, d.name) for d in docs}
    problems = []
    for workload in workloads(docs + load_file(STATEFULSET)):
        spec = pod_spec(workload)
        where = f"{workload.source} {workload.kind}/{workload.name}"
        for c in containers(workload):
            for source in c.get("envFrom", []):
                for ref_kind, kind, store in (
                    ("configMapRef", "ConfigMap", cms),
                    ("secretRef", "Secret", secs),
                ):
                    if ref_kind in source and source[ref_kind]["name"] not in store:
                        problems.append(f"{where}: envFrom {kind} {source[ref_kind]['name']} does not exist")
            for item in c.get("env", []):
                for ref_kind, kind, store in (
                    ("configMapKeyRef", "ConfigMap", cms),
                    ("secretKeyRef", "Secret", secs),
                ):
                    ref = item.get("valueFrom", {}).get(ref_kind)
                    if ref and ref["key"] not in store.get(ref["name"], {}):
                        problems.append(
                            f"{where}: env {item['name']} wants key {ref['key']!r} of {kind} "
                            f"{ref['name']}, which has {sorted(store.get(ref['name'], {}))}"
                        )
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and ("PersistentVolumeClaim", claim) not in names:
                problems.append(f"{where}: volume {volume['name']} claims {claim}, which does not exist")
            config_map = volume.get("configMap", {}).get("name")
            if config_map and config_map not in cms:
                problems.append(f"{where}: volume {volume['name']} mounts ConfigMap {config_map}, which does not "
                                "exist")
        account = spec.get("serviceAccountName")
        if account and ("ServiceAccount", account) not in names:
            problems.append(f"{where}: serviceAccountName {account} does not exist")
    for binding in (d for d in docs if d.kind == "RoleBinding"):
        if (binding.body["roleRef"]["kind"], binding.body["roleRef"]["name"]) not in names:
            problems.append(f"{binding.where}: roleRef names a missing Role")
        for subject in binding.body["subjects"]:
            if (subject["kind"], subject["name"]) not in names:
                problems.append(
                    f"{binding.where}: subject {subject['kind']}/{subject['name']} does not exist"
                )
    assert not problems, "\n".join(problems)


def test_variable_references_only_use_variables_defined_before_them() -> None:
    for workload in workloads():
        for c in containers(workload):
            defined = {
                k
                for s in c.get("envFrom", [])
                for k in config_maps(base_objects()).get(s.get("configMapRef", {}).get("name"), {})
            }
            for item in c.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", item.get("value", "")):
                    assert ref in defined, (
                        f"{workload.where}: {item['name']} uses $({ref}) before it is defined"
                    )
                defined.add(item["name"])


# --- settings: every one reachable from config.yaml / the Secret / the Downward API ---------------------


def test_every_setting_can_be_set_by_the_manifests() -> None:
    docs = base_objects()
    configured = {name for w in workloads(docs) for c in containers(w) for name in resolved_env(c, docs)}
    missing = {
        field: aliases for field, aliases in settings_aliases().items() if not set(aliases) & configured
    }
    assert not missing, (
        "Settings not set by any ConfigMap in k8s/config.yaml, the Secret or the Downward "
        f"API (field: its variables): {missing}"
    )
    for workload in workloads():
        config = f"{workload.name.removesuffix('-server')}-config"
        for c in containers(workload):
            refs = [s.get("configMapRef", {}).get("name") for s in c.get("envFrom", [])]
            assert config in refs, (
                f"{workload.where}: loads {refs}; it must load its ConfigMap {config} whole"
            )


def test_config_keys_and_env_names_are_settings_variables() -> None:
    docs = base_objects()
    loaded = {s["configMapRef"]["name"] for w in workloads(docs) for c in containers(w)
              for s in c.get("envFrom", []) if "configMapRef" in s}
    for name, data in config_maps(docs).items():
        if name not in loaded:
            continue  # mounted as files (the Job templates), not read as settings
        unknown = sorted(set(data) - ALIASES)
        assert not unknown, f"k8s/config.yaml ConfigMap {name}: {unknown} are not Settings variables (typo?)"
    for workload in workloads():
        for c in containers(workload):
            unknown = sorted({e["name"] for e in c.get("env", [])} - ALIASES - RUNTIME_ENV)
            assert not unknown, (
                f"{workload.where}: env {unknown} are neither Settings variables nor RUNTIME_ENV"
            )


def test_inference_settings_from_the_manifests(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = base_objects()
    s = component_settings("inference-server", monkeypatch)
    assert s.shared_dir == Path("/models") and s.sync_state_path == Path("/models/sync_state.json")
    assert s.hf_home_path == Path("/models/hf_home")
    assert s.replica_id == DOWNWARD["metadata.name"] and s.pod_ip == DOWNWARD["status.podIP"]
    assert s.advertise_url == f"http://{DOWNWARD['status.podIP']}:8000"
    assert s.api_token == secrets(docs)["lockstep-api-token"]["token"]
    port = containers(find(docs, "Deployment", "inference-server"))[0]["ports"][0]["containerPort"]
    assert urlparse(s.advertise_url).port == port


def test_trainer_settings_from_the_manifests(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = base_objects()
    s = component_settings("trainer-server", monkeypatch)
    inference = find(docs, "Deployment", "inference-server")
    assert s.discovery in {"kubernetes", "dns", "heartbeats", "auto"}
    selector = dict(part.split("=", 1) for part in s.k8s_label_selector.split(","))
    assert matches(selector, pod_labels(inference)), "the trainer's label selector misses the inference pods"
    assert not matches(selector, pod_labels(find(docs, "Deployment", "trainer-server")))
    headless = find(docs, "Service", s.headless_service or "")
    assert headless.body["spec"]["clusterIP"] == "None"
    assert s.replica_port == containers(inference)[0]["ports"][0]["containerPort"]
    assert s.k8s_namespace == DOWNWARD["metadata.namespace"]
    service, port = service_port(docs, s.inference_service_url or "")
    assert (
        service.name == "inference-service" and target_container_port(service, port, docs) == s.replica_port
    )


def test_ui_settings_from_the_manifests(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = base_objects()
    s = component_settings("ui-server", monkeypatch)
    trainer, port = service_port(docs, s.trainer_url)
    assert trainer.name == "trainer-service" and port == 8080
    inference, _ = service_port(docs, s.inference_service_url or "")
    assert inference.name == "inference-service"


@pytest.mark.parametrize("workload", ["inference-server", "trainer-server", "ui-server"])
def test_the_shipped_placeholder_token_is_refused_and_a_real_one_accepted(workload: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Every server binds 0.0.0.0 in the pod; the Secret as shipped must stop it, the operator's real one not.
    from lockstep.core.guards import UnsafeExposure, check_exposure

    args = containers(find(base_objects(), "Deployment", workload))[0]["args"]
    host = args[args.index("--host") + 1]
    assert host == "0.0.0.0", f"{workload} binds {host}: is the exposure check still the one that matters?"
    s = component_settings(workload, monkeypatch)
    assert s.api_token == secrets(base_objects())["lockstep-api-token"]["token"]
    assert not s.allow_unauthenticated, f"{workload} opts out of authentication"
    with pytest.raises(UnsafeExposure, match="placeholder"):
        check_exposure(host, s.api_token, allow_unauthenticated=False, server=workload)
    check_exposure(host, "f" * 8 + "0123456789abcdef" * 3, allow_unauthenticated=False, server=workload)
    with pytest.raises(UnsafeExposure, match="LOCKSTEP_ALLOW_UNAUTHENTICATED"):
        check_exposure(host, None, allow_unauthenticated=False, server=workload)


def test_coordinator_and_replicas_agree_on_shared_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    cms = config_maps(base_objects())
    inference, trainer = cms["inference-config"], cms["trainer-config"]
    differ = {
        k: (inference[k], trainer[k])
        for k in set(inference) & set(trainer) - MAY_DIFFER
        if inference[k] != trainer[k]
    }
    assert not differ, f"inference-config and trainer-config disagree (inference, trainer): {differ}"
    for name in ("inference-server", "trainer-server"):
        s = component_settings(name, monkeypatch)
        assert s.commit_margin_s >= 2 * s.poll_interval_s, f"{name}: commit margin under 2 poll intervals"
        assert s.heartbeat_ttl_s >= 3 * s.heartbeat_interval_s, f"{name}: heartbeat TTL under 3 heartbeats"
        assert s.lease_ttl_s > s.commit_margin_s


# Paths the process only reads: a read-only mount (a ConfigMap's files) is where they belong.
READ_ONLY_ENV = {"LOCKSTEP_JOB_TEMPLATE_DIR"}


def test_absolute_paths_in_the_environment_are_writable_mounts() -> None:
    docs = base_objects() + load_file(STATEFULSET)
    for workload in workloads(docs):
        for c in containers(workload):
            mounts = [
                PurePosixPath(m["mountPath"]) for m in c.get("volumeMounts", []) if not m.get("readOnly")
            ]
            read_only = [PurePosixPath(m["mountPath"]) for m in c.get("volumeMounts", []) if m.get("readOnly")]
            for name, (source, value) in resolved_env(c, docs).items():
                if value.startswith("/"):
                    allowed = mounts + (read_only if name in READ_ONLY_ENV else [])
                    assert any(PurePosixPath(value).is_relative_to(m) for m in allowed), (
                        f"{workload.where}: {name}={value} ({source}) is on the read-only root filesystem"
                    )


# --- security ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: f"{w.kind}/{w.name}")
def test_pods_run_locked_down(workload: Doc) -> None:
    spec = pod_spec(workload)
    pod_sc = spec.get("securityContext", {})
    assert spec.get("enableServiceLinks") is False, f"{workload.where}: enableServiceLinks must be false"
    for c in containers(workload):
        sc = c.get("securityContext", {})
        where = f"{workload.where} container {c['name']}"
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) >= 10000, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("privileged", False) is False, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", where
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp must be a writable emptyDir"
        assert "sizeLimit" in volumes[tmp[0]["name"]]["emptyDir"], f"{where}: bound the /tmp emptyDir"


# Everything the trainer may do through the Kubernetes API (k8s/rbac.yaml): discovery reads pods; a job run
# creates, reads and deletes its Job, lists its pods and reads their logs.
TRAINER_RULES = {
    ("trainer-pod-reader", "", "pods"): {"list"},
    ("trainer-job-runner", "batch", "jobs"): {"create", "get", "delete"},
    ("trainer-job-runner", "", "pods"): {"list"},
    ("trainer-job-runner", "", "pods/log"): {"get"},
}


def test_only_the_trainer_gets_a_kubernetes_api_token_and_it_may_only_do_what_it_needs() -> None:
    docs = base_objects() + load_file(STATEFULSET)
    for workload in workloads(docs):
        token = pod_spec(workload).get("automountServiceAccountToken")
        assert token is (workload.name == "trainer-server"), f"{workload.where}: automountServiceAccountToken"
    trainer = pod_spec(find(docs, "Deployment", "trainer-server"))
    bindings = [
        d
        for d in docs
        if d.kind == "RoleBinding"
        and any(
            s["kind"] == "ServiceAccount" and s["name"] == trainer["serviceAccountName"]
            for s in d.body["subjects"]
        )
    ]
    assert bindings, "the trainer's ServiceAccount is bound to no Role"
    assert not [d for d in docs if d.kind in ("ClusterRole", "ClusterRoleBinding")], "no cluster-wide RBAC"
    granted: dict[tuple[str, str, str], set[str]] = {}
    for binding in bindings:
        role = find(docs, "Role", binding.body["roleRef"]["name"])
        for rule in role.body["rules"]:
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((role.name, group, resource), set()).update(rule["verbs"])
    assert granted == TRAINER_RULES


# --- labels, images, resources, probes ---------------------------------------------------------------------


def test_every_object_carries_the_recommended_labels() -> None:
    version = pyproject_version()
    for doc in all_objects():
        labels = doc.body["metadata"].get("labels", {})
        for key in ("name", "instance", "component", "part-of", "version"):
            assert f"app.kubernetes.io/{key}" in labels, f"{doc.where}: missing label app.kubernetes.io/{key}"
        assert labels["app.kubernetes.io/part-of"] == "lockstep", doc.where
        assert labels["app.kubernetes.io/version"] == version, f"{doc.where}: version label is not {version}"
    for workload in workloads():
        labels = pod_labels(workload)
        assert labels["app"] == workload.name and labels["app.kubernetes.io/version"] == version, (
            workload.where
        )


def test_images_are_the_seed_images() -> None:
    # The seed's guide builds and deploys `<name>:latest`; a registry pins tags with `kustomize edit set image`.
    for workload in workloads():
        for c in containers(workload):
            assert c["image"] == f"{workload.name}:latest", f"{workload.where}: image {c['image']}"
    for path in (K8S / "kustomization.yaml", K8S / "statefulset" / "kustomization.yaml"):
        images = yaml.safe_load(path.read_text())["images"]
        assert {i["name"]: i["newTag"] for i in images} == {w: "latest" for w in SEED_WORKLOADS}, path


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: f"{w.kind}/{w.name}")
def test_resources_follow_the_seed(workload: Doc) -> None:
    requests, limits = SEED_RESOURCES[workload.name]
    resources = containers(workload)[0]["resources"]
    assert {k: v for k, v in resources["requests"].items() if k in requests} == requests
    assert {k: v for k, v in resources["limits"].items() if k in limits} == limits


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: f"{w.kind}/{w.name}")
def test_probes_use_declared_ports_and_drain_in_time(workload: Doc) -> None:
    spec = pod_spec(workload)
    for c in containers(workload):
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        arg_port = int(c["args"][c["args"].index("--port") + 1])
        assert list(ports.values()) == [arg_port], f"{workload.where}: containerPort differs from --port"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if probe:
                port = probe["httpGet"]["port"]
                assert port in ports or port in ports.values(), f"{workload.where}: {kind} port {port}"
        assert "readinessProbe" in c and "livenessProbe" in c, workload.where
        sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert spec.get("terminationGracePeriodSeconds", 30) >= sleep + 30, (
            f"{workload.where}: no time to drain"
        )
    if workload.name == "inference-server":
        c = containers(workload)[0]
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, (
            "startup budget under 10 minutes"
        )
        assert c["lifecycle"]["preStop"]["sleep"]["seconds"] >= 5, "endpoints need time to drop the pod"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert workload.body["spec"]["replicas"] == 2
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        claim = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mounts["/models"])
        assert claim["persistentVolumeClaim"]["claimName"] == "model-storage"


# --- network policy: a small evaluator of the policies against the flows the system needs ------------------

APP_NS = {"kubernetes.io/metadata.name": "lockstep"}
MONITORING_NS = {"kubernetes.io/metadata.name": "monitoring"}
KUBE_SYSTEM_NS = {"kubernetes.io/metadata.name": "kube-system"}


class Peer:
    """A pod (labels in a namespace) or an address outside the cluster's pods."""

    def __init__(
        self, labels: dict[str, str] | None = None, ns: dict[str, str] = APP_NS, ip: str = ""
    ) -> None:
        self.labels, self.ns, self.ip = labels, ns, ip


def _ip_in(ip: str, block: dict[str, Any]) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    return addr in ipaddress.ip_network(block["cidr"]) and not any(
        addr in ipaddress.ip_network(e) for e in block.get("except", [])
    )


def _peer_matches(rule_peer: dict[str, Any], who: Peer) -> bool:
    if "ipBlock" in rule_peer:
        return bool(who.ip) and who.labels is None and _ip_in(who.ip, rule_peer["ipBlock"])
    if who.labels is None:
        return False
    ns_ok = (
        matches(rule_peer["namespaceSelector"], who.ns)
        if "namespaceSelector" in rule_peer
        else who.ns == APP_NS
    )
    pod_ok = matches(rule_peer["podSelector"], who.labels) if "podSelector" in rule_peer else True
    return ns_ok and pod_ok


def _port_matches(rule: dict[str, Any], port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(
        p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports
    )


def _direction_allows(
    policies: list[dict[str, Any]], direction: str, subject: Peer, other: Peer, port: int, protocol: str
) -> bool:
    if subject.labels is None or subject.ns != APP_NS:
        return True  # the policies here select only pods of the app's namespace
    selecting = [
        p
        for p in policies
        if direction.capitalize() in p["spec"].get("policyTypes", ["Ingress"])
        and matches(p["spec"]["podSelector"], subject.labels)
    ]
    if not selecting:
        return True
    key = "from" if direction == "ingress" else "to"
    return any(
        _port_matches(rule, port, protocol)
        and (key not in rule or any(_peer_matches(x, other) for x in rule[key]))
        for p in selecting
        for rule in p["spec"].get(direction, [])
    )


def allowed(src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
    policies = [d.body for d in base_objects() if d.kind == "NetworkPolicy"]
    return _direction_allows(policies, "egress", src, dst, port, protocol) and _direction_allows(
        policies, "ingress", dst, src, port, protocol
    )


def _pod(name: str) -> Peer:
    return Peer(pod_labels(find(base_objects(), "Deployment", name)))


PROMETHEUS = Peer({"app.kubernetes.io/name": "prometheus"}, MONITORING_NS)
KUBE_DNS = Peer({"k8s-app": "kube-dns"}, KUBE_SYSTEM_NS)
OUTSIDER = Peer({"app": "something-else"})
INGRESS_CONTROLLER = Peer({"app.kubernetes.io/name": "ingress-nginx"}, {"kubernetes.io/metadata.name": "ingress-nginx"})
UI_PROXY = Peer({"app": "oauth2-proxy", "lockstep.io/ui-client": "true"})
INTERNET = Peer(ip="203.0.113.7")
API_SERVER = Peer(ip="10.0.0.1")  # the kubernetes Service's endpoint: not a pod


def test_network_policy_allows_every_flow_the_system_needs() -> None:
    inference, trainer, ui = _pod("inference-server"), _pod("trainer-server"), _pod("ui-server")
    client = Peer({"app": "my-client", "lockstep.io/inference-client": "true"})
    needed = [
        ("ui", ui, "trainer", trainer, 8080),
        ("ui", ui, "inference", inference, 8000),
        ("trainer", trainer, "inference", inference, 8000),
        ("inference", inference, "inference peer", inference, 8000),
        ("prometheus", PROMETHEUS, "inference", inference, 8000),
        ("prometheus", PROMETHEUS, "trainer", trainer, 8080),
        ("labelled client", client, "inference", inference, 8000),
        ("the ingress controller", INGRESS_CONTROLLER, "ui", ui, 8080),
        ("an authenticating proxy", UI_PROXY, "ui", ui, 8080),
        ("trainer", trainer, "the API server", API_SERVER, 443),
        ("trainer", trainer, "the API server (kubeadm)", API_SERVER, 6443),
        ("inference", inference, "the Hugging Face Hub", Peer(ip="18.154.227.67"), 443),
    ]
    blocked = [f"{a} -> {b}:{port}" for a, src, b, dst, port in needed if not allowed(src, dst, port)]
    for name, pod in (("inference", inference), ("trainer", trainer), ("ui", ui)):
        if not allowed(pod, KUBE_DNS, 53, "UDP"):
            blocked.append(f"{name} -> kube-dns:53/UDP")
    assert not blocked, f"k8s/networkpolicy.yaml blocks flows the system needs: {blocked}"


def test_network_policy_refuses_everything_else() -> None:
    inference, trainer, ui = _pod("inference-server"), _pod("trainer-server"), _pod("ui-server")
    refused = [
        ("an unlabelled pod", OUTSIDER, "inference", inference, 8000),
        ("an unlabelled pod", OUTSIDER, "trainer", trainer, 8080),
        ("the internet", INTERNET, "inference", inference, 8000),
        ("the internet", INTERNET, "trainer", trainer, 8080),
        ("inference", inference, "trainer", trainer, 8080),
        ("inference", inference, "a private address", API_SERVER, 443),
        ("ui", ui, "the internet", INTERNET, 443),
        ("the internet", INTERNET, "ui", ui, 8080),
        ("an unlabelled pod", OUTSIDER, "ui", ui, 8080),
        ("a pod in another namespace", Peer({"app": "x"}, {"kubernetes.io/metadata.name": "other"}), "ui", ui, 8080),
        ("trainer", trainer, "ssh", API_SERVER, 22),
        (
            "prometheus-like pod in the app namespace",
            Peer({"app.kubernetes.io/name": "prometheus"}),
            "inference",
            inference,
            8000,
        ),
    ]
    open_ = [f"{a} -> {b}:{port}" for a, src, b, dst, port in refused if allowed(src, dst, port)]
    assert not open_, f"k8s/networkpolicy.yaml lets through: {open_}"


def test_service_monitor_scrapes_the_replicas_and_the_trainer() -> None:
    docs = base_objects()
    monitor = find(load_file(K8S / "monitoring" / "servicemonitor.yaml"), "ServiceMonitor", "lockstep").body[
        "spec"
    ]
    scraped = [
        d for d in docs if d.kind == "Service" and matches(monitor["selector"], d.body["metadata"]["labels"])
    ]
    assert {d.name for d in scraped} == {"inference-headless", "trainer-service"}
    jobs = set()
    for service in scraped:
        port_names = {p.get("name") for p in service.body["spec"]["ports"]}
        assert all(e["port"] in port_names for e in monitor["endpoints"]), service.name
        jobs.add(service.body["metadata"]["labels"][monitor["jobLabel"]])
    assert jobs == {"inference", "trainer"}  # the job names the alerts use
    for endpoint in monitor["endpoints"]:
        assert endpoint["path"] == "/metrics"
