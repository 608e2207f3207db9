"""The cluster view: heartbeats and discovery merged, disagreements shown, convergence counted."""

from __future__ import annotations

import time
from pathlib import Path

from lockstep.core.settings import load_settings
from lockstep.sync.protocol import Heartbeat, ReplicaState, ServingInfo
from lockstep.sync.shared_files import write_heartbeat
from lockstep.trainer.cluster.discovery import Discovery, DiscoveryMode, DiscoveryResult, Endpoint
from lockstep.trainer.cluster.view import ClusterSnapshot, ClusterView
from tests.support.cluster import LocalCluster, wait_for
from tests.trainer.k8s_api import fake_api_server


def beat(replica_id: str, url: str | None, version: int, *, age_s: float = 0.0,
         ready: bool = True) -> Heartbeat:
    state = ReplicaState.SERVING if ready else ReplicaState.BEHIND
    return Heartbeat(replica_id=replica_id, url=url, state=state,
                     ready=ready, serving=ServingInfo(version=version, model=f"versions/{version:06d}",
                                                      since=time.time() - 30), time=time.time() - age_s)


def test_pods_match_heartbeats_by_name_and_each_side_shows_what_the_other_lacks(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, beat("replica-1", "http://10.9.9.9:8000", 4))  # URL differs from the pod IP
    write_heartbeat(tmp_path, beat("lonely", "http://10.2.0.1:8000", 3, ready=False))
    write_heartbeat(tmp_path, beat("gone", "http://10.2.0.2:8000", 4, age_s=30))  # TTL 5 s: stale
    settings = load_settings(shared_dir=tmp_path, discovery="kubernetes", k8s_namespace="lockstep")
    with fake_api_server() as server:
        api = server.api_client()
        view = ClusterView(settings, discovery=Discovery(settings, api_client=api))
        try:
            snap = view.snapshot(probe=False)
        finally:
            view.close()
            api.close()
    replicas = {r.replica_id: r for r in snap.replicas}
    assert replicas["replica-1"].in_heartbeats and replicas["replica-1"].in_discovery
    assert replicas["replica-1"].pod_ready is True and replicas["replica-1"].serving_version == 4
    assert replicas["lonely"].in_heartbeats and not replicas["lonely"].in_discovery
    assert replicas["replica-2"].in_discovery and not replicas["replica-2"].in_heartbeats
    assert replicas["replica-3"].url is None and replicas["replica-3"].in_discovery
    gone = replicas["gone"]
    assert gone.state == "gone" and not gone.in_heartbeats and not gone.ready
    # Live = fresh heartbeat; sync_state is missing, so the committed version is 0.
    assert snap.as_dict()["convergence"] == {"version": 0, "at_version": 0, "total": 2}
    assert snap.as_dict()["discovery"]["mode"] == "kubernetes"


def test_real_replicas_found_statically_and_by_dns_agree_with_their_heartbeats(cluster: LocalCluster,
                                                                              ghost_url: str) -> None:
    urls = ",".join([r.url for r in cluster.replicas] + [ghost_url])
    settings = cluster_settings(cluster, discovery="static", inference_urls=urls)
    view = ClusterView(settings, discovery=Discovery(settings))
    try:
        def both_ready() -> ClusterSnapshot | None:
            snap = view.snapshot()
            return snap if sum(1 for r in snap.replicas if r.ready) == 2 else None

        snap = wait_for(both_ready, 60, 0.2, "both replicas ready in the view")
        by_url = {r.url: r for r in snap.replicas}
        for proc in cluster.replicas:
            r = by_url[proc.url]
            assert r.in_heartbeats and r.in_discovery and r.reachable and r.replica_id == proc.name
        ghost = by_url[ghost_url]
        assert ghost.in_discovery and not ghost.in_heartbeats and ghost.reachable is False
        assert snap.convergence()["total"] == 2
        assert sorted(snap.ready_urls()) == sorted(p.url for p in cluster.replicas)
    finally:
        view.close()

    first = cluster.replicas[0]
    settings = cluster_settings(cluster, discovery="dns", headless_service="localhost",
                                replica_port=first.port)
    view = ClusterView(settings, discovery=Discovery(settings))
    try:
        snap = view.snapshot()
    finally:
        view.close()
    flags = {r.replica_id: (r.in_heartbeats, r.in_discovery) for r in snap.replicas if r.in_heartbeats}
    assert flags[first.name] == (True, True)
    assert flags[cluster.replicas[1].name] == (True, False)


def cluster_settings(cluster: LocalCluster, **overrides: object):  # -> Settings
    return load_settings(shared_dir=cluster.shared, heartbeat_ttl_s=3.0, **overrides)


class _HeadlessDns:
    """What DNS discovery returns for a headless Service: every address under the Service's one name."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls

    def discover(self) -> DiscoveryResult:
        return DiscoveryResult(DiscoveryMode.DNS, [Endpoint(url, "dns", name="inference-headless")
                                                   for url in self.urls])


def test_endpoints_sharing_a_name_stay_separate_replicas(tmp_path: Path) -> None:
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]  # closed: probes fail fast
    settings = load_settings(shared_dir=None, trainer_data_dir=tmp_path, discovery="dns")
    view = ClusterView(settings, discovery=_HeadlessDns(urls))  # type: ignore[arg-type]
    try:
        snap = view.snapshot(probe=False)
    finally:
        view.close()
    assert sorted(r.url for r in snap.replicas) == urls
    assert sorted(r.replica_id for r in snap.replicas) == urls  # named by URL until /status names them


def test_the_view_lists_no_heartbeat_url_that_discovery_does_not_vouch_for(tmp_path: Path) -> None:
    # The UI calls the URLs of the trainer's /cluster with the token: none may come from a heartbeat alone.
    write_heartbeat(tmp_path, beat("replica-1", "http://127.0.0.1:8001", 2))
    write_heartbeat(tmp_path, beat("planted", "http://attacker.example:8000", 2))
    write_heartbeat(tmp_path, beat("from-the-future", "http://127.0.0.1:8003", 2, age_s=-3600))
    settings = load_settings(shared_dir=tmp_path, discovery="static", inference_urls="http://127.0.0.1:8001")
    view = ClusterView(settings, discovery=Discovery(settings))
    try:
        snap = view.snapshot(probe=False, discover=False)
    finally:
        view.close()
    replicas = {r.replica_id: r for r in snap.replicas}
    assert set(replicas) == {"replica-1", "planted"}  # a beat stamped an hour ahead would never expire
    assert replicas["replica-1"].url == "http://127.0.0.1:8001" and replicas["replica-1"].url_ignored is None
    planted = replicas["planted"]
    assert planted.url is None and "attacker.example" in (planted.url_ignored or "")
    assert planted.in_heartbeats and planted.ready  # still shown, just never called
    assert snap.ready_urls() == ["http://127.0.0.1:8001"]
    assert "attacker.example:8000" not in str(snap.as_dict()["replicas"])


def test_a_replicas_status_of_the_wrong_shape_fills_nothing_it_cannot_read() -> None:
    from lockstep.trainer.cluster.view import ReplicaView, _fill_from_status

    view = ReplicaView(replica_id="http://10.0.0.1:8000", url="http://10.0.0.1:8000")
    _fill_from_status(view, {"replica_id": ["x"], "state": 3, "ready": "yes", "serving_version": "7",
                             "serving_since": float("nan"), "staged": [1], "queue_depth": "many",
                             "running": 1e300, "tokens_per_s": float("inf"), "last_error": {"x": 1}})
    assert (view.replica_id, view.state, view.ready, view.serving_version) == ("http://10.0.0.1:8000", "unknown",
                                                                             False, None)
    assert (view.serving_since, view.staged_version, view.queue_depth, view.running, view.tokens_per_s,
            view.last_error) == (None, None, 0, 0, 0.0, None)
    _fill_from_status(view, {"replica_id": "replica-9", "ready": True, "serving_version": 4, "queue_depth": 2,
                             "staged": {"version": 5, "state": "staged"}})
    assert (view.replica_id, view.ready, view.serving_version, view.staged_version, view.queue_depth) == (
        "replica-9", True, 4, 5, 2)
