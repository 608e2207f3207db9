"""Finding individual replicas: static URLs, the headless service's DNS records, the Kubernetes API or
heartbeats.

``auto`` picks Kubernetes when running in a cluster, DNS when a headless service is named, static when
``INFERENCE_URLS`` is set, else the heartbeats on the shared volume. The cluster view then checks what
discovery found against the heartbeats, so disagreements show (``in_heartbeats`` / ``in_discovery``).

A heartbeat names its own URL, and whoever can write the shared folder can write a heartbeat. So the trainer
(and the UI, through the trainer's ``/cluster``) calls a URL from a heartbeat only when ``UrlTrust`` vouches
for its host: one the operator configured (``INFERENCE_URLS``, the headless Service's names) or one the
configured discovery found (pod IPs from the Kubernetes API, the Service's addresses); loopback only when
nothing is configured (every process on one machine, a local folder as the volume).
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
from lockstep.sync.shared_files import live_heartbeats
from lockstep.sync.tolerant import ProblemLog, url_host, url_problem

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


@dataclass(frozen=True)
class UrlTrust:
    """The replica hosts the trainer may call with its token; every other URL a heartbeat names is ignored."""

    hosts: frozenset[str] = frozenset()  # host names and IP addresses, lower-case, IPv6 compressed
    domains: tuple[str, ...] = ()  # the headless Service's names: the name itself, or one label under it
    loopback: bool = False  # nothing configured: replicas on this machine

    def problem(self, url: str) -> str | None:
        """Why the trainer must not call ``url`` (malformed, or a host nobody configured), or None."""
        if (why := url_problem(url)) is not None:
            return why
        host = url_host(url)
        if host in self.hosts:
            return None
        for domain in self.domains:
            if host == domain or (host.endswith("." + domain) and "." not in host[: -len(domain) - 1]):
                return None
        if self.loopback and _is_loopback(host):
            return None
        return (f"its host {host!r} is not one the configured discovery vouches for ({self.describe()}); "
                "list the replicas in INFERENCE_URLS, name their headless Service (LOCKSTEP_HEADLESS_SERVICE), or "
                "let the trainer list pods through the Kubernetes API")

    def describe(self) -> str:
        parts = sorted(self.hosts)[:5] + [f"*.{d}" for d in self.domains[:4]] + (["loopback"] if self.loopback else [])
        return ", ".join(parts) or "none"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def own_namespace(settings: Settings, namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The trainer's namespace: POD_NAMESPACE, else its service account's; empty when neither is known."""
    if settings.k8s_namespace:
        return settings.k8s_namespace
    try:
        return namespace_file.read_text().strip()
    except OSError:
        return ""


def headless_domains(service: str | None, namespace: str) -> tuple[str, ...]:
    """The names a headless Service's pods are found under (a StatefulSet's ``<pod>.<service>...``)."""
    if not service:
        return ()
    name = service.strip().lower().rstrip(".")
    if "." in name:  # already qualified: exactly that
        return (name,)
    qualified = f"{name}.{namespace}"
    return (name, qualified, f"{qualified}.svc", f"{qualified}.svc.cluster.local")


def url_trust(settings: Settings, endpoints: list[Endpoint], *, namespace: str = "default",
              extra_hosts: frozenset[str] = frozenset(), in_kubernetes: bool = False) -> UrlTrust:
    """What the configuration and the discovered (not heartbeat) endpoints vouch for."""
    hosts = {url_host(u) for u in settings.inference_url_list if url_problem(u) is None}
    hosts |= {url_host(e.url) for e in endpoints
              if e.url and e.source != "heartbeats" and url_problem(e.url) is None}
    configured = bool(settings.inference_url_list or settings.headless_service or in_kubernetes)
    return UrlTrust(hosts=frozenset(hosts | extra_hosts),
                    domains=headless_domains(settings.headless_service, namespace), loopback=not configured)


@dataclass
class DiscoveryResult:
    """What one discovery pass found; ``error`` says why it found nothing when it failed."""

    mode: DiscoveryMode
    endpoints: list[Endpoint] = field(default_factory=list)
    error: str | None = None
    trust: UrlTrust | None = None  # which heartbeat URLs may be called; None: judge from the settings alone

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints if e.url]

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "urls": self.urls, "error": self.error,
                "endpoints": [e.__dict__ for e in self.endpoints],
                "trusted_hosts": self.trust.describe() if self.trust else None}


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
        self._problems = ProblemLog(log, clock=clock)  # each refused heartbeat URL once a minute

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
        extra: frozenset[str] = frozenset()
        try:
            if mode is DiscoveryMode.STATIC:
                endpoints = [Endpoint(url, "static") for url in self.settings.inference_url_list]
            elif mode is DiscoveryMode.DNS:
                endpoints = self._dns()
            elif mode is DiscoveryMode.KUBERNETES:
                endpoints = self._kubernetes()
            else:
                extra = self._vouched_hosts()
                endpoints = self._heartbeats(self.url_trust([], extra))
        except Exception as exc:  # DNS failures, API errors, RBAC refusals: shown in the cluster view
            log.warning("%s discovery failed: %s", mode.value, exc)
            return DiscoveryResult(mode, [], f"{mode.value} discovery failed: {exc}", self.url_trust([], extra))
        return DiscoveryResult(mode, endpoints, trust=self.url_trust(endpoints, extra))

    def url_trust(self, endpoints: list[Endpoint], extra_hosts: frozenset[str] = frozenset()) -> UrlTrust:
        """Which heartbeat URLs the trainer may call, given what this pass found."""
        # static and dns never ask the Kubernetes API; the other modes do when running in a pod
        in_kubernetes = self.configured not in (DiscoveryMode.STATIC, DiscoveryMode.DNS) and (
            self._k8s_client() is not None)
        namespace = self.namespace() if self.settings.headless_service else "default"
        return url_trust(self.settings, endpoints, namespace=namespace, extra_hosts=extra_hosts,
                         in_kubernetes=in_kubernetes)

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
        return own_namespace(self.settings, self.namespace_file) or "default"

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

    def _vouched_hosts(self) -> frozenset[str]:
        """For heartbeats discovery: the addresses the rest of the configuration vouches for (pods by label, the
        headless Service's addresses); a lookup that fails vouches for nothing and is logged."""
        hosts: set[str] = set()
        lookups = []
        if self.settings.headless_service:
            lookups.append(("dns", self._dns))
        if self._k8s_client() is not None:
            lookups.append(("kubernetes", self._kubernetes))
        for name, lookup in lookups:
            try:
                hosts |= {url_host(e.url) for e in lookup() if e.url}
            except Exception as exc:  # DNS or API trouble: those heartbeats are not called this pass
                self._problems.report(name, f"heartbeats discovery: cannot list addresses by {name}: {exc}")
        return frozenset(hosts)

    def _heartbeats(self, trust: UrlTrust) -> list[Endpoint]:
        if self.settings.shared_dir is None:
            raise BadRequest("heartbeats discovery needs the shared folder; without one, name the replicas with "
                             "INFERENCE_URLS, LOCKSTEP_HEADLESS_SERVICE, or run in Kubernetes")
        beats = live_heartbeats(self.settings.shared_dir, self.settings.heartbeat_ttl_s, self.clock.time(),
                                self.settings.clock_skew_s)
        endpoints = []
        for beat in beats:
            if not beat.url:
                continue
            if (why := trust.problem(beat.url)) is not None:
                self._problems.report(beat.replica_id, f"heartbeat of {beat.replica_id!r}: not calling "
                                      f"{beat.url[:200]}: {why}")
                continue
            endpoints.append(Endpoint(beat.url, "heartbeats", name=beat.replica_id))
        return endpoints
