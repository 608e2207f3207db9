"""Discovery: static URLs, DNS (``localhost``), and the Kubernetes API through a real ``ApiClient`` talking to
a tiny local HTTP server that serves a pod list."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockstep.core.errors import BadRequest
from lockstep.core.settings import load_settings
from lockstep.trainer.cluster.discovery import Discovery, DiscoveryMode, UrlTrust, headless_domains, normalize_url
from tests.trainer.k8s_api import FakeApiServer, fake_api_server


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    with fake_api_server() as server:
        yield server


def test_kubernetes_discovery_lists_pods_by_label_with_their_ready_condition(
        api_server: FakeApiServer) -> None:
    settings = load_settings(discovery="kubernetes", k8s_namespace="lockstep",
                             k8s_label_selector="app=inference-server", replica_port=8000)
    api = api_server.api_client()
    try:
        result = Discovery(settings, api_client=api).discover()
    finally:
        api.close()
    assert result.error is None and result.mode is DiscoveryMode.KUBERNETES
    path, query = api_server.requests[-1]
    assert path == "/api/v1/namespaces/lockstep/pods" and query["labelSelector"] == ["app=inference-server"]
    by_name = {e.name: e for e in result.endpoints}
    assert set(by_name) == {"replica-1", "replica-2", "replica-3"}  # the finished pod serves nothing
    assert by_name["replica-1"].url == "http://10.1.0.5:8000" and by_name["replica-1"].ready is True
    assert by_name["replica-2"].url == "http://[fd00::7]:8000" and by_name["replica-2"].ready is False
    assert by_name["replica-3"].url is None  # pending: no IP yet
    assert result.urls == ["http://10.1.0.5:8000", "http://[fd00::7]:8000"]


def test_a_refused_pod_list_is_reported_not_raised(api_server: FakeApiServer, tmp_path: Path) -> None:
    api_server.status = 403
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("from-the-service-account\n")
    api = api_server.api_client()
    try:
        result = Discovery(load_settings(discovery="kubernetes"), api_client=api,
                           namespace_file=namespace_file).discover()
    finally:
        api.close()
    assert result.endpoints == [] and "403" in (result.error or "")
    assert api_server.requests[-1][0] == "/api/v1/namespaces/from-the-service-account/pods"


def test_dns_discovery_finds_every_address_behind_the_name() -> None:
    settings = load_settings(discovery="dns", headless_service="localhost", replica_port=8123)
    result = Discovery(settings).discover()
    assert result.error is None and "http://127.0.0.1:8123" in result.urls
    assert all(e.source == "dns" for e in result.endpoints)
    assert len(result.urls) == len(set(result.urls))


def test_dns_discovery_reports_a_name_that_does_not_resolve() -> None:
    settings = load_settings(discovery="dns", headless_service="no-such-host.invalid")
    result = Discovery(settings).discover()
    assert result.endpoints == [] and "no-such-host.invalid" in (result.error or "")
    assert "LOCKSTEP_HEADLESS_SERVICE" in (Discovery(load_settings(discovery="dns")).discover().error or "")


def test_auto_picks_kubernetes_then_dns_then_static_then_heartbeats(api_server: FakeApiServer) -> None:
    api = api_server.api_client()
    try:
        assert Discovery(load_settings(), api_client=api).mode is DiscoveryMode.KUBERNETES
    finally:
        api.close()
    # Outside a pod there is no service account, so auto falls through to the other sources.
    def auto(**fields: object) -> Discovery:
        base: dict[str, object] = {"discovery": "auto", "headless_service": None, "inference_urls": ""}
        return Discovery(load_settings().model_copy(update={**base, **fields}))

    assert auto(headless_service="svc", inference_urls="http://a:1").mode is DiscoveryMode.DNS
    assert auto(inference_urls="http://a:1, http://b:2/").mode is DiscoveryMode.STATIC
    assert auto(inference_urls="http://a:1, http://b:2/").discover().urls == ["http://a:1", "http://b:2"]
    assert auto().mode is DiscoveryMode.HEARTBEATS
    with pytest.raises(BadRequest, match="allowed: auto"):
        Discovery(load_settings(discovery="consul"))


def test_urls_compare_without_trailing_slash_or_host_case() -> None:
    assert normalize_url("HTTP://Host:80/") == normalize_url("http://host:80")


# ------------------------------------------------------------------ which heartbeat URLs the trainer may call
def _beat(shared: Path, replica_id: str, url: str, *, age_s: float = 0.0) -> None:
    import time

    from lockstep.sync.protocol import Heartbeat, ReplicaState
    from lockstep.sync.shared_files import write_heartbeat

    write_heartbeat(shared, Heartbeat(replica_id=replica_id, url=url, state=ReplicaState.SERVING, ready=True,
                                      time=time.time() - age_s))


def _heartbeat_discovery(shared: Path, **fields: object) -> Discovery:
    base: dict[str, object] = {"discovery": "heartbeats", "shared_dir": shared, "headless_service": None,
                               "inference_urls": ""}
    return Discovery(load_settings().model_copy(update={**base, **fields}))


def test_heartbeat_urls_are_called_only_on_hosts_the_configuration_vouches_for(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _beat(tmp_path, "listed", "http://10.0.0.5:8000")
    _beat(tmp_path, "stateful", "http://inference-server-0.inference-headless.lockstep.svc.cluster.local:8000")
    _beat(tmp_path, "metadata", "http://169.254.169.254:80")  # the cloud metadata service
    _beat(tmp_path, "elsewhere", "https://collector.example.com/steal")
    _beat(tmp_path, "lookalike", "http://x.inference-headless.lockstep.svc.cluster.local.example.com:8000")
    _beat(tmp_path, "userinfo", "http://10.0.0.5:8000@evil.example")
    discovery = _heartbeat_discovery(tmp_path, inference_urls="http://10.0.0.5:8000",
                                     headless_service="inference-headless", k8s_namespace="lockstep")
    discovery.resolver = lambda *a, **k: []  # the Service resolves to nothing here: names alone vouch
    with caplog.at_level(logging.WARNING, logger="lockstep.trainer.cluster.discovery"):
        result = discovery.discover()
    assert sorted(e.name for e in result.endpoints if e.name) == ["listed", "stateful"]
    for refused in ("metadata", "elsewhere", "lookalike"):
        assert f"heartbeat of {refused!r}: not calling" in caplog.text
    assert result.trust is not None and result.trust.problem("http://10.0.0.5:9999") is None  # by host


def test_with_nothing_configured_only_replicas_on_this_machine_are_called(tmp_path: Path) -> None:
    _beat(tmp_path, "local", "http://127.0.0.1:8001")
    _beat(tmp_path, "remote", "http://10.0.0.5:8000")
    result = _heartbeat_discovery(tmp_path).discover()
    assert [e.name for e in result.endpoints] == ["local"]
    # Once anything is configured, loopback is no longer a default: only what is configured counts.
    result = _heartbeat_discovery(tmp_path, inference_urls="http://10.0.0.5:8000").discover()
    assert [e.name for e in result.endpoints] == ["remote"]


def test_heartbeats_discovery_trusts_the_pods_the_kubernetes_api_lists(
        tmp_path: Path, api_server: FakeApiServer) -> None:
    _beat(tmp_path, "pod", "http://10.1.0.5:8000")  # replica-1's IP in the fake API
    _beat(tmp_path, "stranger", "http://10.1.0.99:8000")
    api = api_server.api_client()
    try:
        settings = load_settings().model_copy(update={
            "discovery": "heartbeats", "shared_dir": tmp_path, "headless_service": None, "inference_urls": "",
            "k8s_namespace": "lockstep"})
        result = Discovery(settings, api_client=api).discover()
    finally:
        api.close()
    assert [e.name for e in result.endpoints] == ["pod"]


def test_a_heartbeat_from_the_future_is_not_discovered(tmp_path: Path) -> None:
    _beat(tmp_path, "now", "http://127.0.0.1:8001")
    _beat(tmp_path, "future", "http://127.0.0.1:8002", age_s=-3600)
    assert [e.name for e in _heartbeat_discovery(tmp_path).discover().endpoints] == ["now"]


def test_the_headless_service_names_cover_a_statefulsets_pods_and_nothing_else() -> None:
    trust = UrlTrust(domains=headless_domains("inference-headless", "prod"))
    for ok in ("http://inference-headless:8000", "http://inference-server-1.inference-headless:8000",
               "http://inference-server-1.inference-headless.prod.svc.cluster.local:8000"):
        assert trust.problem(ok) is None, ok
    for bad in ("http://a.b.inference-headless:8000", "http://inference-headless.other.svc:8000",
                "http://inference-headless.prod.svc.cluster.local.evil.example:8000", "http://evil-headless:8000"):
        assert trust.problem(bad) is not None, bad
    assert headless_domains("svc.ns.svc.cluster.local", "ignored") == ("svc.ns.svc.cluster.local",)
