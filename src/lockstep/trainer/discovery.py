"""Finding individual replicas: static URLs, the headless service's DNS records, the Kubernetes API or
heartbeats.

``auto`` picks Kubernetes when running in a cluster, DNS when a headless service is named, static when
``INFERENCE_URLS`` is set, else the heartbeats on the shared volume. The cluster view then checks what
discovery found against the heartbeats, so disagreements show (``in_heartbeats`` / ``in_discovery``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import BadRequest
from lockstep.core.settings import Settings
from lockstep.sync.protocol import live_heartbeats

log = logging.getLogger(__name__)

# The service account's namespace file, mounted into every pod that has a token.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
K8S_TIMEOUT_S = 5.0  # seconds for one pod list call

Resolver = Callable[..., list[tuple[Any, ...]]]  # socket.getaddrinfo's signature


class DiscoveryMode(StrEnum):
    """Where replica addresses come from."""

    AUTO = "auto"
    STATIC = "static"
    DNS = "dns"
    KUBERNETES = "kubernetes"
    HEARTBEATS = "heartbeats"


@dataclass(frozen=True)
class Endpoint:
    """One replica as discovery sees it; ``url`` is None for a pod that has no IP yet."""

    url: str | None
    source: str
    name: str | None = None  # the pod name (Kubernetes) or replica id (heartbeats)
    ready: bool | None = None  # the pod's Ready condition (Kubernetes only)


@dataclass
class DiscoveryResult:
    """What one discovery pass found; ``error`` says why it found nothing when it failed."""

    mode: DiscoveryMode
    endpoints: list[Endpoint] = field(default_factory=list)
    error: str | None = None

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints if e.url]

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "urls": self.urls, "error": self.error,
                "endpoints": [e.__dict__ for e in self.endpoints]}


def normalize_url(url: str) -> str:
    """Compare URLs loosely: no trailing slash, lower-case scheme and host."""
    url = url.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"


def _url_for(ip: str, port: int) -> str:
    host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    return f"http://{host}:{port}"


def in_cluster_api_client() -> Any | None:
    """An ``ApiClient`` from the pod's service account, or None outside Kubernetes."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        return None
    return client.ApiClient(configuration)


class Discovery:
    """Finds replica URLs the configured way; ``api_client`` and ``resolver`` are injectable for tests."""

    def __init__(self, settings: Settings, *, api_client: Any | None = None, resolver: Resolver | None = None,
                 clock: Clock = SYSTEM_CLOCK, namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> None:
        try:
            self.configured = DiscoveryMode(settings.discovery.strip().lower())
        except ValueError:
            allowed = ", ".join(m.value for m in DiscoveryMode)
            raise BadRequest(f"LOCKSTEP_DISCOVERY={settings.discovery!r} is not a discovery mode; "
                             f"allowed: {allowed}") from None
        self.settings = settings
        self.clock = clock
        self.resolver = resolver or socket.getaddrinfo
        self.namespace_file = namespace_file
        self._api_client = api_client
        self._api_client_checked = api_client is not None

    # ------------------------------------------------------------------ mode
    def _k8s_client(self) -> Any | None:
        if not self._api_client_checked:
            self._api_client_checked = True
            self._api_client = in_cluster_api_client()
        return self._api_client

    @property
    def mode(self) -> DiscoveryMode:
        """The mode in effect (``auto`` resolved)."""
        if self.configured is not DiscoveryMode.AUTO:
            return self.configured
        if self._k8s_client() is not None:
            return DiscoveryMode.KUBERNETES
        if self.settings.headless_service:
            return DiscoveryMode.DNS
        if self.settings.inference_url_list:
            return DiscoveryMode.STATIC
        return DiscoveryMode.HEARTBEATS

    # ------------------------------------------------------------------ discovering
    def discover(self) -> DiscoveryResult:
        """One pass; failures are reported in ``error`` (never raised), so the cluster view still renders."""
        mode = self.mode
        try:
            if mode is DiscoveryMode.STATIC:
                endpoints = [Endpoint(url, "static") for url in self.settings.inference_url_list]
            elif mode is DiscoveryMode.DNS:
                endpoints = self._dns()
            elif mode is DiscoveryMode.KUBERNETES:
                endpoints = self._kubernetes()
            else:
                endpoints = self._heartbeats()
        except Exception as exc:  # DNS failures, API errors, RBAC refusals: shown in the cluster view
            log.warning("%s discovery failed: %s", mode.value, exc)
            return DiscoveryResult(mode, [], f"{mode.value} discovery failed: {exc}")
        return DiscoveryResult(mode, endpoints)

    def _dns(self) -> list[Endpoint]:
        name = self.settings.headless_service
        if not name:
            raise BadRequest("dns discovery needs LOCKSTEP_HEADLESS_SERVICE (e.g. inference-headless)")
        port = self.settings.replica_port
        try:
            infos = self.resolver(name, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise BadRequest(f"cannot resolve {name!r}: {exc}") from exc
        seen: list[str] = []
        for info in infos:
            ip = str(info[4][0]).split("%")[0]  # drop an IPv6 zone index
            if ip not in seen:
                seen.append(ip)
        return [Endpoint(_url_for(ip, port), "dns", name=name) for ip in seen]

    def namespace(self) -> str:
        if self.settings.k8s_namespace:
            return self.settings.k8s_namespace
        try:
            return self.namespace_file.read_text().strip() or "default"
        except OSError:
            return "default"

    def _kubernetes(self) -> list[Endpoint]:
        from kubernetes import client

        api_client = self._k8s_client()
        if api_client is None:
            raise BadRequest("kubernetes discovery needs the in-cluster service account (not running in a "
                             "pod?)")
        pods = client.CoreV1Api(api_client).list_namespaced_pod(
            self.namespace(), label_selector=self.settings.k8s_label_selector, _request_timeout=K8S_TIMEOUT_S)
        endpoints = []
        for pod in pods.items or []:
            status = pod.status
            if status is not None and status.phase in ("Succeeded", "Failed"):
                continue  # finished pods keep their IP in the list but serve nothing
            ip = status.pod_ip if status is not None else None
            conditions = (status.conditions or []) if status is not None else []
            ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
            name = pod.metadata.name if pod.metadata is not None else None
            endpoints.append(Endpoint(_url_for(ip, self.settings.replica_port) if ip else None, "kubernetes",
                                      name=name, ready=ready))
        return endpoints

    def _heartbeats(self) -> list[Endpoint]:
        if self.settings.shared_dir is None:
            raise BadRequest("heartbeats discovery needs the shared folder; without one, name the replicas with "
                             "INFERENCE_URLS, LOCKSTEP_HEADLESS_SERVICE, or run in Kubernetes")
        beats = live_heartbeats(self.settings.shared_dir, self.settings.heartbeat_ttl_s, self.clock.time())
        return [Endpoint(b.url, "heartbeats", name=b.replica_id) for b in beats if b.url]
