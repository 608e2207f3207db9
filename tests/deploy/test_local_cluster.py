"""The manifests of ``k8s/`` run as a local cluster (issue 7.4): real processes, as a kubelet runs them.

``tests/deploy/kubelet.py`` reads the Deployments, ConfigMaps, Secret and Services and starts every pod
in its own network namespace, with exactly the environment, command and ports its manifest declares;
the PVC ``model-storage`` is a temporary folder. The test probes the pods as the kubelet does, runs a
simulation run through ``trainer-service``, then does ``kubectl scale deployment inference-server
--replicas=3`` and watches the new pod join at the committed version before it turns Ready.

Translations (see kubelet.py): paths under a ``mountPath`` in env values point into the volume's
folder, the image is this checkout on ``PYTHONPATH``, and the trainer's pod discovery is ``dns`` (the
headless Service, resolved from the pods' ``/etc/hosts``) instead of ``kubernetes``: there is no API
server here. The Secret ``lockstep-api-token`` holds a random token, as the operator creates it
(k8s/secret.yaml ships a placeholder that every server refuses). Needs root for the network namespaces;
skipped otherwise.
"""

from __future__ import annotations

import copy
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cluster import wait_for

from . import Doc, base_objects, find
from .kubelet import Kubelet, NetworkUnavailable, Pod, PodNetwork, Probe, expand

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]

INFERENCE, TRAINER, UI = "inference-server", "trainer-server", "ui-server"
BOOT_TIMEOUT_S = 240  # generous: three Python processes import torch at once on two shared cores
RUN_TIMEOUT_S = 240
# Three switches (builtin:tiny -> tiny-s1 -> tiny -> tiny-s1), short answers, load on the replicas during
# each switch. An odd count: the committed weights differ from the initial model a new pod would boot with.
SIMULATION = {"rounds": 3, "requests_per_replica": 2, "max_new_tokens": 4, "background_load": True}
# The one setting changed from the manifests: there is no Kubernetes API server to list pods from, so the
# trainer finds the replicas through the headless Service's DNS records instead (LOCKSTEP_HEADLESS_SERVICE
# is used as written; each pod's /etc/hosts lists every inference pod, ready or not).
OVERRIDES = {TRAINER: {"LOCKSTEP_DISCOVERY": "dns"}}


def _http() -> httpx.Client:
    # Never through a proxy from the environment; a fresh connection per request, so that a Service's
    # proxy picks an endpoint per request (kube-proxy balances connections, not requests).
    return httpx.Client(trust_env=False, timeout=10, headers={"Connection": "close"})


def _token(objects: list[Doc]) -> str:
    """The bearer token as the Secret is written (mutating trainer endpoints need it)."""
    return str(find(objects, "Secret", "lockstep-api-token").body["stringData"]["token"])


def with_real_token(objects: list[Doc], token: str) -> list[Doc]:
    """The objects with the Secret's placeholder replaced by ``token``, as `kubectl create secret` would
    (the manifests are parsed once and shared: the Secret is copied, never changed in place)."""
    secret = find(objects, "Secret", "lockstep-api-token")
    body = copy.deepcopy(secret.body)
    body["stringData"]["token"] = token
    return [Doc(d.source, d.index, body) if d is secret else d for d in objects]


def log_in_to_ui(http: httpx.Client, ui: str, token: str) -> None:
    """Log ``http`` in to the UI with the token, as an operator does on the page (it keeps the cookie)."""
    refused = http.get(ui + "/api/cluster")
    assert refused.status_code == 401, f"the UI showed the fleet before any login: {refused.status_code}"
    refused = http.post(ui + "/api/rollback", json={})
    assert refused.status_code == 401, f"the UI took a change before any login: {refused.status_code}"
    response = http.post(ui + "/api/login", json={"token": token})
    assert response.status_code == 200, response.text


def _committed(pvc: Path) -> int:
    """The committed version in ``/models/sync_state.json``; 0 while the cluster never published."""
    try:
        state = json.loads((pvc / "sync_state.json").read_text())
    except FileNotFoundError:
        return 0
    return int((state.get("committed") or {}).get("version", 0))


def _prefill(pvc: Path, builtin_dir: Path) -> None:
    """The volume as an operator pre-fills it: built-in models in ``/models/builtin`` (linked, not built)."""
    folder = pvc / "builtin"
    folder.mkdir(parents=True)
    for model in builtin_dir.iterdir():
        if model.is_dir() and not model.name.startswith("."):
            (folder / model.name).symlink_to(model, target_is_directory=True)


@dataclass
class Cluster:
    """The kubelet, the volume and what the test needs to talk to the pods."""

    kubelet: Kubelet
    pvc: Path
    token: str

    def pods(self, deployment: str) -> list[Pod]:
        return self.kubelet.pods_of(deployment)

    def trainer(self) -> str:
        return self.kubelet.service_url("trainer-service")

    def explain(self) -> str:
        return "\n\n".join(self.kubelet.describe(p) for p in self.kubelet.all_pods())


@contextmanager
def run_objects(objects: list[Doc], tmp_path: Path, builtin_dir: Path,
                overrides: dict[str, dict[str, str]] | None = None) -> Iterator[Cluster]:
    """Run ``objects`` as pods, each in its own network namespace, ``model-storage`` on a prefilled folder;
    ``overrides``: the variables set on top of a Deployment's (default OVERRIDES), each a stated translation."""
    objects = with_real_token(objects, secrets.token_hex(32))
    pvc = tmp_path / "pvc-model-storage"
    _prefill(pvc, builtin_dir)
    try:
        network = PodNetwork()
    except NetworkUnavailable as exc:
        pytest.skip(f"no network namespaces on this machine: {exc}")
    try:
        kubelet = Kubelet(objects, tmp_path, claims={"model-storage": pvc}, network=network,
                          env_overrides=dict(OVERRIDES if overrides is None else overrides))
        try:
            yield Cluster(kubelet, pvc, _token(objects))
        finally:
            kubelet.stop()
    finally:
        network.close()


@pytest.fixture
def cluster(tmp_path: Path, builtin_dir: Path) -> Iterator[Cluster]:
    with run_objects(base_objects(), tmp_path, builtin_dir) as running:
        yield running


# ------------------------------------------------------------------------------------------ checks
def check_probes(cluster: Cluster, pod: Pod) -> None:
    """Each probe hit the path and port its manifest declares, and the app answered as the kubelet expects."""
    declared = cluster.kubelet.deployments[pod.deployment]["spec"]["template"]["spec"]["containers"][0]
    for kind, probe in pod.probes.items():
        spec = declared[f"{kind}Probe"]["httpGet"]
        assert probe.path == spec["path"] and probe.port == pod.ports.get(spec["port"], spec["port"])
        results = pod.probe_results(kind)
        assert results, f"{pod.name}: no {kind} probe ran\n{cluster.explain()}"
        assert all(r.path == probe.path and r.port == probe.port for r in results)
        if kind == "startup":  # refused while the process starts, then 200; never an HTTP error
            assert results[-1].status == 200 and all(r.status in (None, 200) for r in results), results
        elif kind == "liveness":  # only after startup succeeded, and alive from its first answer on
            first = next((i for i, r in enumerate(results) if r.status == 200), None)
            assert first is not None, results
            assert all(r.status == 200 for r in results[first:]), results
            if "startup" in pod.probes:
                assert first == 0 and results[0].at >= pod.probe_results("startup")[-1].at, results
            else:
                # No startup probe (the UI): on a loaded machine the first probes may come before the process
                # listens (initialDelaySeconds); refused then, never an HTTP error, and too few to restart it.
                assert all(r.status is None for r in results[:first]), results
                assert first < declared["livenessProbe"].get("failureThreshold", 3), results
    assert pod.restart_count == 0, cluster.kubelet.describe(pod)


def check_readiness_bodies(cluster: Cluster, pod: Pod) -> None:
    """An inference pod's ``/ready``: 503 or 200; 200 only while serving the version it knows is committed."""
    results = pod.probe_results("readiness")
    assert results and {r.status for r in results} <= {200, 503}, results
    for r in results:
        body = json.loads(r.body)
        assert "ready" in body, f"{pod.name}: {r.path} is not the readiness endpoint (it answered {r.body})"
        assert (r.status == 200) == bool(body["ready"]), r
        if r.status == 200:
            assert body["serving_version"] == body["committed_version"], r


@dataclass(frozen=True)
class Sample:
    """What a watcher saw of the joining pod at one instant."""

    committed: int  # sync_state.json, read just before the pod was asked
    ready_status: int | None  # GET /ready; None while nothing answers
    serving_version: int | None
    model: str | None
    kubelet_ready: bool


def scale_in_a_replica(cluster: Cluster, committed_at: Path, committed: int) -> Pod:
    """Scale the replicas to 3 and watch the new pod: 503 while it loads, Ready only at ``committed``, and
    never serving anything else (not the initial model, not a version in between). ``committed_at`` is the
    folder whose sync_state.json names the committed version."""
    kubelet = cluster.kubelet
    (joiner,) = kubelet.scale(INFERENCE, 3)
    samples: list[Sample] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_join, args=(joiner, committed_at, stop, samples), daemon=True)
    watcher.start()
    try:
        kubelet.wait_ready([joiner], BOOT_TIMEOUT_S)
        time.sleep(0.2)  # a few samples after the kubelet turned it Ready
    finally:
        stop.set()
        watcher.join(timeout=10)

    answered = [s for s in samples if s.ready_status is not None]
    assert answered, f"the new pod never answered /ready\n{kubelet.describe(joiner)}"
    first_ready = next((i for i, s in enumerate(answered) if s.ready_status == 200), None)
    assert first_ready is not None, answered[-5:]
    assert any(s.ready_status == 503 for s in answered[:first_ready]), answered[:5]  # 503 while it loads
    assert all(s.committed == committed for s in samples)  # nothing published meanwhile
    assert {s.serving_version for s in answered} <= {None, committed}, answered
    assert all(s.serving_version == committed for s in answered if s.ready_status == 200 or s.kubelet_ready)
    return joiner


def watch_join(pod: Pod, pvc: Path, stop: threading.Event, out: list[Sample]) -> None:
    """Sample the joining pod as fast as it answers until ``stop`` (bounded by the caller's deadline)."""
    with _http() as http:
        while not stop.is_set():
            committed = _committed(pvc)
            ready_status = serving = model = None
            try:
                ready_status = http.get(pod.url() + "/ready", timeout=2).status_code
                status = http.get(pod.url() + "/status", timeout=2).json()
                serving, model = status.get("serving_version"), status.get("model")
            except (httpx.HTTPError, ValueError):
                pass
            out.append(Sample(committed, ready_status, serving, model, pod.ready))
            stop.wait(0.03)


# ------------------------------------------------------------------------------------------ the test
def test_the_manifests_run_a_simulation_and_a_scaled_replica_joins_at_the_committed_version(
        cluster: Cluster) -> None:
    kubelet = cluster.kubelet

    # kubectl apply -k k8s/: every Deployment at its declared replica count.
    pods = kubelet.apply(INFERENCE) + kubelet.apply(TRAINER) + kubelet.apply(UI)
    assert len(cluster.pods(INFERENCE)) == 2
    kubelet.wait_ready(pods, BOOT_TIMEOUT_S)
    for pod in pods:
        wait_for(lambda p=pod: p.probe_results("liveness"), 30, 0.2, f"a liveness probe of {pod.name}")
    for pod in cluster.pods(INFERENCE):
        check_readiness_bodies(cluster, pod)
        beat = json.loads((cluster.pvc / "replicas" / f"{pod.name}.json").read_text())
        # Downward API + $(POD_IP) expansion: the replica advertises its pod IP on the declared port.
        assert beat["replica_id"] == pod.name and beat["url"] == f"http://{pod.ip}:8000", beat

    # The UI reaches the trainer by its Service name (TRAINER_URL: http://trainer-service:8080), once logged in.
    with _http() as http:
        ui = kubelet.service_url("ui-service")
        log_in_to_ui(http, ui, cluster.token)
        view = wait_for(lambda: _trainer_view(http, ui, 2), 60, 0.5, "the UI showing the trainer's view")
        assert {r["replica_id"] for r in view["replicas"]} == {p.name for p in cluster.pods(INFERENCE)}

        run_simulation(http, cluster)  # through trainer-service, authenticated with the Secret's token

    committed = _committed(cluster.pvc)
    assert committed >= 1, "the simulation run committed no version"
    for pod in cluster.pods(INFERENCE):
        wait_for(lambda p=pod: _serving(p) == (committed, 200), 30, 0.1, f"{pod.name} serving v{committed}")

    # kubectl scale deployment inference-server --replicas=3
    joiner = scale_in_a_replica(cluster, cluster.pvc, committed)
    check_readiness_bodies(cluster, joiner)
    assert all(json.loads(r.body)["serving_version"] == committed
               for r in joiner.probe_results("readiness") if r.status == 200)
    assert "loaded builtin:tiny " not in joiner.log(tail=10**6)
    with _http() as http:
        check_service_reaches_all_at(http, cluster, committed)
        # ... and the trainer finds all three through the headless Service's records, in sync.
        log_in_to_ui(http, kubelet.service_url("ui-service"), cluster.token)
        view = wait_for(lambda: _trainer_view(http, kubelet.service_url("ui-service"), 3), 60, 0.5,
                        "the trainer listing three replicas, all at the committed version")
        assert view["discovery"]["mode"] == "dns" and view["discovery"]["error"] is None, view["discovery"]
        assert set(view["discovery"]["urls"]) == {f"http://{p.ip}:8000" for p in cluster.pods(INFERENCE)}
        assert all(r["in_discovery"] and r["in_heartbeats"] for r in view["replicas"]), view["replicas"]
        assert view["convergence"] == {"version": committed, "at_version": 3, "total": 3}, view["convergence"]

    for pod in kubelet.all_pods():
        check_probes(cluster, pod)


# ------------------------------------------------------------------------------------------ helpers
def _trainer_view(http: httpx.Client, ui: str, replicas: int) -> dict[str, Any] | None:
    """The trainer's cluster view through the UI, once it has ``replicas`` replicas in heartbeats and DNS."""
    view = http.get(ui + "/api/cluster").json()
    if view.get("source") != "trainer" or len(view.get("replicas") or []) != replicas:
        return None
    if len(view["discovery"]["urls"]) != replicas or view["convergence"]["at_version"] != replicas:
        return None  # discovery is cached for a few seconds; the new replica's heartbeat comes every 0.5 s
    return view  # type: ignore[no-any-return]


def run_simulation(http: httpx.Client, cluster: Cluster) -> dict[str, Any]:
    """A simulation run through trainer-service (the Secret's token); asserts it ran clean, returns it."""
    run = http.post(cluster.trainer() + "/runs", json={"kind": "simulation", "params": SIMULATION},
                    headers={"Authorization": f"Bearer {cluster.token}"}, timeout=120)
    assert run.status_code == 201, run.text
    run_id = run.json()["id"]
    done: dict[str, Any] = wait_for(lambda: _finished(http, cluster.trainer(), run_id), RUN_TIMEOUT_S, 0.5,
                                    f"run {run_id} to finish\n{cluster.explain()}")
    assert done["status"] == "succeeded", done
    check_run_clean(done)  # both replicas flipped every round, under load, no answer lost or mislabelled
    return done


def check_service_reaches_all_at(http: httpx.Client, cluster: Cluster, committed: int) -> None:
    """Every replica holds the same (committed) weights, and inference-service reaches each of them: three
    requests over fresh connections, all answered at the committed version by three different pods."""
    digests = {http.get(p.url() + "/status").json()["weights_digest"] for p in cluster.pods(INFERENCE)}
    assert len(digests) == 1, digests
    names = {p.name for p in cluster.pods(INFERENCE)}
    answers = [http.post(cluster.kubelet.service_url("inference-service") + "/generate", timeout=120,
                         json={"prompt": "Once upon a time", "max_new_tokens": 4, "temperature": 0})
               for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
    assert {a.headers["x-model-version"] for a in answers} == {str(committed)}
    assert {a.headers["x-replica-id"] for a in answers} == names


def _finished(http: httpx.Client, trainer: str, run_id: str) -> dict[str, Any] | None:
    run = http.get(f"{trainer}/runs/{run_id}").json()
    return run if run["status"] in ("succeeded", "failed", "stopped", "interrupted") else None


def _serving(pod: Pod) -> tuple[int | None, int]:
    with _http() as http:
        serving = http.get(pod.url() + "/status").json()["serving_version"]
        return serving, http.get(pod.url() + "/ready").status_code


def check_run_clean(run: dict[str, Any]) -> None:
    """Every round committed and converged under load; no answer failed or named the wrong version."""
    rounds = run["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, SIMULATION["rounds"] + 1)), rounds
    for r in rounds:
        assert r["outcome"] == "committed" and r["converged"] and r["replicas"] == 2, r
        assert r["requests"] > 0 and r["failed"] == 0 and r["mislabeled"] == 0, r
    assert [r["version"] for r in rounds] == run["versions"] and len(set(run["versions"])) == len(rounds), run
    summary = run["summary"]
    assert summary["failed"] == 0 and summary["mislabeled"] == 0, summary
    assert summary["converged"] == SIMULATION["rounds"], summary


# ------------------------------------------------------------------------------------------ kubelet parsing
def test_dependent_variables_expand_as_kubernetes_does() -> None:
    env = {"POD_IP": "10.0.0.7"}
    assert expand("http://$(POD_IP):8000", env) == "http://10.0.0.7:8000"
    assert expand("$$(POD_IP) $(UNSET) $$", env) == "$(POD_IP) $(UNSET) $"  # escaped; unknown: as written


def test_probes_resolve_named_ports_and_take_kubernetes_defaults() -> None:
    probe = Probe.parse("readiness", {"httpGet": {"path": "/ready", "port": "http"}}, {"http": 8000})
    defaults = (probe.period_s, probe.timeout_s, probe.failure_threshold, probe.success_threshold)
    assert probe.port == 8000 and defaults == (10.0, 1.0, 3, 1)
    declared = find(base_objects(), "Deployment", INFERENCE).body["spec"]["template"]["spec"]["containers"][0]
    startup = Probe.parse("startup", declared["startupProbe"], {"http": 8000})
    assert startup.path == "/healthz" and startup.port == 8000
