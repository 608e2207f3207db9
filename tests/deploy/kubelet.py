"""A manifest-driven kubelet for tests: runs the Deployments and Jobs of ``k8s/`` as real local processes.

Each pod gets its own network namespace (``ip netns`` + a veth on a private bridge), so every container
binds exactly the port its manifest declares, on its own pod IP. The rest follows the manifests as a
node would:

- environment: ``envFrom`` and ``env`` (``value`` with ``$(VAR)`` expansion, ``configMapKeyRef``,
  ``secretKeyRef``, ``fieldRef``) from the ConfigMaps and the Secret as they are written, on top of a
  small image environment (the Dockerfiles' ``ENV``; nothing is inherited from the test process);
- ``command``/``args`` exactly as declared, ``lockstep`` being ``sys.executable -m lockstep`` and ``torchrun``
  ``sys.executable -m torch.distributed.run``; any other command is the program of that name on the image's
  ``PATH`` (a Job's pod whose command is not there fails to start, ``StartError``, exit code 128);
- volumes: a PersistentVolumeClaim is a folder the caller provides, an ``emptyDir`` a folder per pod, a
  ``configMap`` a folder per pod with one file per key (written at pod start, not updated);
- Services: a ClusterIP (or LoadBalancer) Service gets a virtual IP on the node's side of the bridge,
  forwarded per connection to one *ready* endpoint (kube-proxy); a headless Service is a name in each
  pod's ``/etc/hosts`` with one record per endpoint (``publishNotReadyAddresses`` honoured). Every
  Service is known by its short and its ``<ns>.svc.cluster.local`` name, so URLs such as
  ``http://trainer-service:8080`` work unchanged;
- probes: ``startupProbe`` until it succeeds (a container that exhausts ``failureThreshold`` is
  restarted), then ``readinessProbe`` and ``livenessProbe`` on their own periods (``httpGet`` only);
  a failed liveness probe or an exit restarts the container (``restartPolicy: Always``, with back-off);
- Jobs (``create_job``, as the API server receives them; tests/deploy/kube_api.py serves the API calls): one
  pod at a time runs to completion with the controller's labels (``job-name``, ``controller-uid``). Exit 0
  completes the Job; a failure counts toward ``backoffLimit`` (``OnFailure``: the container restarts in its pod
  after the kubelet's back-off; ``Never``: a new pod after the controller's 10 s, 20 s, ... back-off), past it
  the Job fails (``BackoffLimitExceeded``); ``activeDeadlineSeconds`` stops it (``DeadlineExceeded``);
  ``ttlSecondsAfterFinished`` deletes it; deleting it stops its pods (propagation Background). One container,
  no probes, parallelism and completions of 1.

Translations, the only places where the local run differs from the manifests:

- paths: an env value that starts with a volume's ``mountPath`` (``/models/...``, ``/tmp``) is rewritten
  to that volume's folder; there is no mount namespace per container, so this is how ``/models``
  becomes the shared temporary folder and ``/tmp`` the pod's own emptyDir;
- the image: ``WORKDIR`` (``/tmp``) is the pod's ``/tmp`` emptyDir; the source is on ``PYTHONPATH``
  instead of installed in ``/opt/venv``; ``OMP_NUM_THREADS=1`` stands in for the CPU limits on a small
  machine;
- host names: a pod's processes keep the machine's host name (no UTS namespace), which each pod's hosts file
  maps to the pod's IP, as a pod's own name is;
- the engine: ``LOCKSTEP_ENGINE=builtin`` on top of the ConfigMap's ``auto`` (a vLLM start takes minutes per pod
  on two cores; the vLLM engine has its own end-to-end tests, tests/inference/test_vllm_* and
  tests/sync/test_vllm_cluster.py);
- a caller may set variables on top of a Deployment's (``env_overrides``): each is a translation it
  states, e.g. pod discovery without a Kubernetes API server;
- not enforced: ``securityContext`` (user 10001, read-only root filesystem), ``resources``, GPU
  tolerations and node selectors, ``preStop`` hooks (a test's teardown does not wait them out),
  NetworkPolicies, the service-account token (the API server of kube_api.py, when a test starts one, is
  reached through a kubeconfig instead).

Needs root and iproute2. Addresses come from a /24 in 10.200.0.0/13 that no interface or route on the
machine uses; everything created (namespaces, links, ``/etc/netns/<ns>``) is named after this process
and removed by :meth:`Kubelet.stop` and :meth:`PodNetwork.close`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from . import Doc

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CLUSTER_DOMAIN = "cluster.local"
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for generated name suffixes
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_BACKOFF_S = (10.0, 20.0, 40.0, 80.0, 160.0, 300.0)  # kubelet's crash-loop back-off, seconds
_JOB_BACKOFF_S = (10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 360.0)  # the Job controller's, before each new pod
_KUBELET_MARK = "--- "  # lines the kubelet writes into a pod's log (not the container's output)
_START_MARK = "--- container start "
# Programs of the images run as this checkout's: `lockstep` is installed in the images' venv, `torchrun` is torch's.
IMAGE_COMMANDS = {"lockstep": [sys.executable, "-m", "lockstep"],
                  "torchrun": [sys.executable, "-m", "torch.distributed.run"]}


class NetworkUnavailable(RuntimeError):
    """This machine cannot create network namespaces (not root, no iproute2, or no permission)."""


class UnsupportedManifest(ValueError):
    """The manifest uses something this kubelet does not implement; the message names it."""


# ------------------------------------------------------------------------------------------ network
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


class PodNetwork:
    """A private /24: a bridge in its own namespace, the node's address on a veth, one namespace per pod."""

    def __init__(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise NetworkUnavailable("network namespaces need root and iproute2 (`ip`)")
        _reap_stale()
        self.tag = f"lsk{os.getpid()}"  # every name we create starts with it; <= 15 chars for links
        self.subnet = self._free_subnet()
        hosts = self.subnet.hosts()
        self.node_ip = str(next(hosts))  # the test process reaches pods and services from here
        self._free_ips = [str(ip) for ip in hosts]
        self.bridge_ns = f"{self.tag}-bridge"
        self.pod_namespaces: list[str] = []
        self.service_ips: list[str] = []
        self._lock = threading.Lock()
        self._links = 0
        try:
            _ip("netns", "add", self.bridge_ns)
        except RuntimeError as exc:
            raise NetworkUnavailable(str(exc)) from exc
        try:
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            _ip("link", "add", self.tag, "type", "veth", "peer", "name", "node", "netns", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "set", "node", "master", "br0", "up")
            _ip("addr", "add", f"{self.node_ip}/{self.subnet.prefixlen}", "dev", self.tag)
            _ip("link", "set", self.tag, "up")
        except RuntimeError as exc:
            self.close()
            raise NetworkUnavailable(str(exc)) from exc

    @staticmethod
    def _free_subnet() -> ipaddress.IPv4Network:
        used = _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show", "table", "all").stdout
        found = re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?", used)
        taken = [ipaddress.ip_network(m, strict=False) for m in found]
        candidates = list(ipaddress.ip_network("10.200.0.0/13").subnets(new_prefix=24))
        random.shuffle(candidates)
        for net in candidates:
            if not any(net.overlaps(t) and t.prefixlen > 8 for t in taken):  # a /8 default route is fine
                return net
        raise NetworkUnavailable("no free /24 in 10.200.0.0/13")

    def _take_ip(self) -> str:
        with self._lock:
            if not self._free_ips:
                raise RuntimeError(f"{self.subnet} is full")
            return self._free_ips.pop(0)

    def add_pod(self, pod_name: str) -> tuple[str, str]:
        """A namespace for ``pod_name`` wired to the bridge; returns (namespace, pod IP)."""
        ns, ip = f"{self.tag}-{pod_name}", self._take_ip()
        with self._lock:
            self._links += 1
            port = f"p{self._links}"
        _ip("netns", "add", ns)
        self.pod_namespaces.append(ns)
        _ip("-n", self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns, ip

    def add_service_ip(self) -> str:
        """A virtual IP that answers on the node (where the service proxies listen)."""
        ip = self._take_ip()
        _ip("addr", "add", f"{ip}/32", "dev", self.tag)
        self.service_ips.append(ip)
        return ip

    @staticmethod
    def etc_dir(ns: str) -> Path:
        """``ip netns exec NS`` bind-mounts the files of this folder over ``/etc``."""
        return Path("/etc/netns") / ns

    def exec_prefix(self, ns: str) -> list[str]:
        return [shutil.which("ip") or "ip", "netns", "exec", ns]

    def remove_pod(self, ns: str) -> None:
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)  # only processes inside a namespace this object made
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(self.etc_dir(ns), ignore_errors=True)
        if ns in self.pod_namespaces:
            self.pod_namespaces.remove(ns)

    def close(self) -> None:
        for ns in list(self.pod_namespaces):
            self.remove_pod(ns)
        _ip("link", "del", self.tag, check=False)  # takes its peer in the bridge namespace along
        _ip("netns", "del", self.bridge_ns, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_stale() -> None:
    """Remove what an earlier PodNetwork left behind when its process was killed (names carry its pid)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(r"(lsk(\d+)-\S+)", line)
        if m and not _pid_alive(int(m.group(2))):
            for pid in _ip("netns", "pids", m.group(1), check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", m.group(1), check=False)
            shutil.rmtree(PodNetwork.etc_dir(m.group(1)), ignore_errors=True)
    for m in re.finditer(r"^\d+: (lsk(\d+))@", _ip("-o", "link", "show", check=False).stdout, re.MULTILINE):
        if not _pid_alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)


# ------------------------------------------------------------------------------------------ manifests
@dataclass(frozen=True)
class Probe:
    """One probe of a container, as declared (``httpGet`` only)."""

    kind: str  # startup | readiness | liveness
    path: str
    port: int  # resolved from a port name against the container's ports
    period_s: float
    timeout_s: float
    failure_threshold: int
    success_threshold: int
    initial_delay_s: float

    @classmethod
    def parse(cls, kind: str, spec: dict[str, Any], ports: dict[str, int]) -> Probe:
        if set(spec) & {"exec", "tcpSocket", "grpc"} or "httpGet" not in spec:
            raise UnsupportedManifest(f"{kind}Probe: only httpGet probes are supported, got {sorted(spec)}")
        get = spec["httpGet"]
        if get.get("scheme", "HTTP") != "HTTP" or get.get("httpHeaders") or get.get("host"):
            raise UnsupportedManifest(f"{kind}Probe: only plain HTTP GET to the pod is supported: {get}")
        port = get["port"]
        if isinstance(port, str):
            if port not in ports:
                raise UnsupportedManifest(f"{kind}Probe names port {port!r}; the container has "
                                          f"{sorted(ports)}")
            port = ports[port]
        # Kubernetes' defaults: period 10 s, timeout 1 s, failure 3, success 1, delay 0.
        return cls(kind, get.get("path", "/"), int(port), float(spec.get("periodSeconds", 10)),
                   float(spec.get("timeoutSeconds", 1)), int(spec.get("failureThreshold", 3)),
                   int(spec.get("successThreshold", 1)), float(spec.get("initialDelaySeconds", 0)))


def _objects_by_kind(objects: list[Doc], kind: str) -> dict[str, dict[str, Any]]:
    return {d.name: d.body for d in objects if d.kind == kind}


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` is ``$``, the rest stays."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, value)


def _generated(n: int, rng: random.Random) -> str:
    return "".join(rng.choice(_NAME_ALPHABET) for _ in range(n))


def template_hash(template: dict[str, Any]) -> str:
    """A stable ``pod-template-hash`` for a pod template (names pods like a ReplicaSet does)."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    return "".join(_NAME_ALPHABET[b % len(_NAME_ALPHABET)] for b in digest[:10])


# ------------------------------------------------------------------------------------------ pods
@dataclass(frozen=True)
class ProbeResult:
    """One probe as the kubelet ran it."""

    pod: str
    restart: int  # the container's restart count when it ran
    kind: str
    path: str
    port: int
    at: float  # time.monotonic()
    status: int | None  # HTTP status; None when the connection failed or timed out
    error: str | None
    body: str = ""  # the first 1000 characters of the answer (the kubelet keeps probe output for events)

    @property
    def success(self) -> bool:
        return self.status is not None and 200 <= self.status < 400


@dataclass(frozen=True)
class Exit:
    """How one container run of a Job's pod ended (the API's ``state.terminated``)."""

    code: int  # 128 + the signal for a killed process, as the runtime reports it
    reason: str  # Completed | Error | StartError
    started_at: str
    finished_at: str
    message: str = ""


@dataclass
class Pod:
    """One pod of a Deployment or a Job: its identity, its container's spec and state, and what the kubelet
    saw."""

    name: str
    namespace: str
    deployment: str  # the owner's name: a Deployment's, or a Job's (``job`` is set then)
    labels: dict[str, str]
    ip: str
    netns: str
    spec: dict[str, Any]  # the pod template's spec
    volumes: dict[str, Path]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)  # name -> containerPort
    probes: dict[str, Probe] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    restart_count: int = 0
    started: bool = False
    ready: bool = False
    deleted: bool = False
    results: list[ProbeResult] = field(default_factory=list)
    transitions: list[tuple[float, str, bool]] = field(default_factory=list)  # (monotonic, condition, value)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    job: str | None = None  # the Job that owns it
    created_at: str = ""  # RFC 3339, as the API shows it
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed
    started_at: str | None = None  # the current container's start
    exits: list[Exit] = field(default_factory=list)  # each container run that ended, in order
    start_error: str | None = None  # why the container cannot start (its command is not in the image)

    def url(self, port: int | str = "http") -> str:
        number = self.ports[port] if isinstance(port, str) else port
        return f"http://{self.ip}:{number}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self, tail: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]

    def container_log(self, tail_lines: int) -> str:
        """``kubectl logs --tail``: the current container's output, without the kubelet's own marker lines."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        current = text.rsplit(_START_MARK, 1)[-1].split("\n", 1)[-1] if _START_MARK in text else text
        lines = [line for line in current.splitlines(keepends=True) if not line.startswith(_KUBELET_MARK)]
        return "".join(lines[-tail_lines:] if tail_lines > 0 else lines)

    def probe_results(self, kind: str) -> list[ProbeResult]:
        with self.lock:
            return [r for r in self.results if r.kind == kind]

    def _set(self, condition: str, value: bool) -> None:
        with self.lock:
            if getattr(self, condition) != value:
                setattr(self, condition, value)
                self.transitions.append((time.monotonic(), condition, value))


class ServiceProxy(socketserver.ThreadingTCPServer):
    """kube-proxy for one Service port: each connection goes to the next ready endpoint, or is refused."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], endpoints: Callable[[], list[tuple[str, int]]]) -> None:
        self.endpoints = endpoints
        self._turn = 0
        super().__init__(address, _ProxyHandler)

    def next_endpoint(self) -> tuple[str, int] | None:
        targets = self.endpoints()
        if not targets:
            return None
        self._turn += 1
        return targets[self._turn % len(targets)]

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("service proxy %s: connection from %s failed", self.server_address, client_address)


class _ProxyHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: ServiceProxy = self.server  # type: ignore[assignment]
        target = server.next_endpoint()
        if target is None:
            return  # no ready endpoint: the connection is closed, as kube-proxy rejects it
        try:
            upstream = socket.create_connection(target, timeout=5)
        except OSError:
            return
        upstream.settimeout(None)
        client: socket.socket = self.request
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join(timeout=600)
        upstream.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@dataclass
class Service:
    """A Service as this node implements it."""

    name: str
    selector: dict[str, str]
    ports: list[dict[str, Any]]
    headless: bool
    publish_not_ready: bool
    cluster_ip: str | None = None
    proxies: list[ServiceProxy] = field(default_factory=list)


class JobExists(Exception):
    """A Job of that name exists already (the API's 409 AlreadyExists)."""


@dataclass
class Job:
    """A Job as this node's Job controller runs it: one pod at a time until one succeeds or it gives up."""

    name: str
    body: dict[str, Any]  # as created, with the metadata the API server adds; ``status()`` is computed
    pods: list[Pod] = field(default_factory=list)
    succeeded: int = 0
    failed: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    conditions: list[dict[str, str]] = field(default_factory=list)
    deleted: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return any(c["type"] in ("Complete", "Failed") for c in self.conditions)

    def status(self) -> dict[str, Any]:
        active = sum(1 for p in self.pods if p.phase in ("Pending", "Running") and not p.deleted)
        status: dict[str, Any] = {"active": active, "succeeded": self.succeeded, "failed": self.failed,
                                  "ready": sum(1 for p in self.pods if p.phase == "Running"),
                                  "conditions": list(self.conditions)}
        if self.start_time:
            status["startTime"] = self.start_time
        if self.completion_time:
            status["completionTime"] = self.completion_time
        return status

    def _end(self, kind: str, reason: str, message: str) -> None:
        now = _now()
        types = ["SuccessCriteriaMet", "Complete"] if kind == "Complete" else ["FailureTarget", "Failed"]
        self.conditions += [{"type": t, "status": "True", "reason": reason, "message": message,
                             "lastProbeTime": now, "lastTransitionTime": now} for t in types]
        if kind == "Complete":
            self.completion_time = now


class Kubelet:
    """Runs Deployments and Jobs from parsed manifests on this machine, one network namespace per pod."""

    def __init__(self, objects: list[Doc], root: Path, *, claims: dict[str, Path], network: PodNetwork,
                 namespace: str = "lockstep", image_env: dict[str, str] | None = None,
                 env_overrides: dict[str, dict[str, str]] | None = None, seed: int = 0) -> None:
        self.root = root
        # Deployment -> variables set after the manifest's own: each one is a translation the caller states.
        self.env_overrides = env_overrides or {}
        self.namespace = namespace
        self.network = network
        self.config_maps = _objects_by_kind(objects, "ConfigMap")
        self.secrets = _objects_by_kind(objects, "Secret")
        self.deployments = _objects_by_kind(objects, "Deployment")
        pvcs = _objects_by_kind(objects, "PersistentVolumeClaim")
        missing = set(claims) - set(pvcs)
        if missing:
            raise UnsupportedManifest(f"claims {sorted(missing)} are not PersistentVolumeClaims in the "
                                      "manifests")
        self.claims = claims
        self.image_env = image_env if image_env is not None else default_image_env()
        self.pods: list[Pod] = []
        self.jobs: dict[str, Job] = {}
        self.api_server: Any = None  # kube_api.KubeApiServer once serve_api() started it
        self.services: dict[str, Service] = {}
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.RLock()
        self._http = httpx.Client(trust_env=False)  # probes go straight to the pod, never via a proxy
        for name, body in _objects_by_kind(objects, "Service").items():
            self._add_service(name, body["spec"])

    # -------------------------------------------------------------------- services
    def _add_service(self, name: str, spec: dict[str, Any]) -> None:
        kind = spec.get("type", "ClusterIP")
        if kind not in ("ClusterIP", "LoadBalancer", "NodePort"):
            raise UnsupportedManifest(f"Service {name}: type {kind} is not supported")
        headless = spec.get("clusterIP") == "None"
        svc = Service(name, dict(spec.get("selector") or {}), list(spec["ports"]), headless,
                      bool(spec.get("publishNotReadyAddresses", False)))
        if not headless:
            svc.cluster_ip = self.network.add_service_ip()
            for port in svc.ports:
                target = port.get("targetPort", port["port"])
                proxy = ServiceProxy((svc.cluster_ip, int(port["port"])),
                                     lambda s=svc, t=target: self._endpoints(s, t))
                thread = threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.2},
                                          name=f"proxy-{name}-{port['port']}", daemon=True)
                thread.start()
                svc.proxies.append(proxy)
        self.services[name] = svc

    def _members(self, svc: Service, ready_only: bool) -> list[Pod]:
        with self._lock:
            pods = [p for p in self.pods if not p.deleted]  # an endpoint exists once the pod has its IP
        return [p for p in pods if svc.selector and svc.selector.items() <= p.labels.items()
                and (p.ready or not ready_only)]

    def _endpoints(self, svc: Service, target: int | str) -> list[tuple[str, int]]:
        out = []
        for pod in self._members(svc, ready_only=True):
            port = pod.ports.get(target) if isinstance(target, str) else int(target)
            if port is not None:
                out.append((pod.ip, port))
        return out

    def service_url(self, name: str, port: int | None = None) -> str:
        """``http://<cluster IP>:<port>`` of a ClusterIP Service (its first port by default)."""
        svc = self.services[name]
        if svc.cluster_ip is None:
            raise ValueError(f"{name} is headless: it has no cluster IP")
        return f"http://{svc.cluster_ip}:{port or svc.ports[0]['port']}"

    def _hosts_text(self, pod: Pod) -> str:
        # A pod's own host name resolves to its IP; here its processes keep the machine's host name (no UTS
        # namespace), so that name does (torchrun's rendezvous looks itself up by it).
        lines = ["127.0.0.1\tlocalhost", f"{pod.ip}\t{pod.name} {socket.gethostname()}"]
        for svc in self.services.values():
            names = " ".join(self.dns_names(svc.name))
            if svc.cluster_ip:
                lines.append(f"{svc.cluster_ip}\t{names}")
            else:  # headless: one A record per endpoint; ready ones only unless publishNotReadyAddresses
                members = self._members(svc, ready_only=not svc.publish_not_ready)
                lines += [f"{p.ip}\t{names}" for p in members]
        return "\n".join(lines) + "\n"

    def dns_names(self, service: str) -> list[str]:
        ns = self.namespace
        return [service, f"{service}.{ns}", f"{service}.{ns}.svc", f"{service}.{ns}.svc.{CLUSTER_DOMAIN}"]

    def _refresh_dns(self) -> None:
        """Rewrite every pod's hosts file in place (same inode: the bind mount in running pods sees it)."""
        with self._lock:
            pods = [p for p in self.pods if not p.deleted]
            for pod in pods:
                etc = self.network.etc_dir(pod.netns)
                etc.mkdir(parents=True, exist_ok=True)
                with open(etc / "hosts", "w") as f:
                    f.write(self._hosts_text(pod))
                resolv = etc / "resolv.conf"
                if not resolv.exists():  # search path as in a pod; no name server (names come from hosts)
                    ns, domain = self.namespace, CLUSTER_DOMAIN
                    resolv.write_text(f"search {ns}.svc.{domain} svc.{domain} {domain}\noptions ndots:5\n")

    # -------------------------------------------------------------------- environment
    def _config_value(self, ref: dict[str, Any], what: str) -> str | None:
        source = self.config_maps if what == "configMapKeyRef" else self.secrets
        obj = source.get(ref["name"])
        value: str | None = None
        if obj is not None:
            if what == "configMapKeyRef":
                value = (obj.get("data") or {}).get(ref["key"])
            else:
                string_data = obj.get("stringData") or {}
                if ref["key"] in string_data:
                    value = str(string_data[ref["key"]])
                elif ref["key"] in (obj.get("data") or {}):
                    value = base64.b64decode(obj["data"][ref["key"]]).decode()
        if value is None and not ref.get("optional", False):
            raise UnsupportedManifest(f"{what} {ref['name']}/{ref['key']} does not exist in the manifests")
        return value

    def _field_value(self, pod: Pod, path: str) -> str:
        values = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "status.podIP": pod.ip,
                  "status.podIPs": pod.ip, "spec.nodeName": socket.gethostname(),
                  "status.hostIP": self.network.node_ip,
                  "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default")}
        label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
        if label:
            return pod.labels.get(label.group(1), "")
        if path not in values:
            raise UnsupportedManifest(f"fieldRef {path} is not supported (known: {sorted(values)})")
        return values[path]

    def container_env(self, pod: Pod, container: dict[str, Any]) -> dict[str, str]:
        """The container's environment: image env, then ``envFrom``, then ``env`` in order (later wins)."""
        env = {"HOSTNAME": pod.name}  # the runtime sets it to the pod name
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = (self.config_maps.get(ref["name"]) or {}).get("data")
                if data is None and not ref.get("optional", False):
                    raise UnsupportedManifest(f"envFrom ConfigMap {ref['name']} is not in the manifests")
                env.update({prefix + k: str(v) for k, v in (data or {}).items()})
            elif "secretRef" in source:
                ref = source["secretRef"]
                secret = self.secrets.get(ref["name"]) or {}
                data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
                data.update({k: str(v) for k, v in (secret.get("stringData") or {}).items()})
                env.update({prefix + k: v for k, v in data.items()})
        declared: dict[str, str] = {}
        for var in container.get("env") or []:
            if "value" in var:
                value: str | None = expand(str(var["value"]), {**self.image_env, **env, **declared})
            else:
                source = var.get("valueFrom") or {}
                if "fieldRef" in source:
                    value = self._field_value(pod, source["fieldRef"]["fieldPath"])
                elif "configMapKeyRef" in source or "secretKeyRef" in source:
                    what = "configMapKeyRef" if "configMapKeyRef" in source else "secretKeyRef"
                    value = self._config_value(source[what], what)
                else:
                    raise UnsupportedManifest(f"env {var['name']}: valueFrom {sorted(source)} is unsupported")
            if value is not None:
                declared[var["name"]] = value
        env.update(declared)
        # Only what the manifests declare is translated; the image's own paths are this machine's already.
        local = {"LOCKSTEP_ENGINE": "builtin"}  # the stated translation above
        return {**self.image_env, **{k: self._host_path(pod, container, v) for k, v in env.items()}, **local}

    def _host_path(self, pod: Pod, container: dict[str, Any], value: str) -> str:
        """THE translation: a path under a volume's mountPath becomes the path in that volume's folder."""
        if not value.startswith("/"):
            return value
        mounts = sorted(container.get("volumeMounts") or [], key=lambda m: len(m["mountPath"]), reverse=True)
        for mount in mounts:
            mount_path = mount["mountPath"].rstrip("/")
            if value == mount_path or value.startswith(mount_path + "/"):
                folder = pod.volumes[mount["name"]] / mount.get("subPath", "")
                return str(folder) + value[len(mount_path):]
        return value

    def _volumes(self, pod_dir: Path, spec: dict[str, Any]) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for vol in spec.get("volumes") or []:
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                if claim not in self.claims:
                    raise UnsupportedManifest(f"volume {vol['name']}: no folder was given for claim {claim}")
                out[vol["name"]] = self.claims[claim]
            elif "emptyDir" in vol:
                out[vol["name"]] = pod_dir / "volumes" / vol["name"]
                out[vol["name"]].mkdir(parents=True, exist_ok=True)
            elif "configMap" in vol:
                out[vol["name"]] = self._config_map_files(pod_dir / "volumes" / vol["name"], vol["configMap"])
            else:
                raise UnsupportedManifest(f"volume {vol['name']}: only PVCs, emptyDirs and ConfigMaps are supported")
        return out

    def _config_map_files(self, folder: Path, ref: dict[str, Any]) -> Path:
        """A ConfigMap volume: one file per key, written once at pod start (updates are not propagated)."""
        if set(ref) - {"name", "optional", "defaultMode"}:
            raise UnsupportedManifest(f"configMap volume {ref['name']}: only name, optional and defaultMode")
        config_map = self.config_maps.get(ref["name"])
        if config_map is None and not ref.get("optional", False):
            raise UnsupportedManifest(f"configMap volume: ConfigMap {ref['name']} is not in the manifests")
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in ((config_map or {}).get("data") or {}).items():
            (folder / key).write_text(str(value))
        return folder

    def _command(self, container: dict[str, Any], env: dict[str, str]) -> list[str]:
        command = [expand(c, env) for c in container.get("command") or []]
        args = [expand(a, env) for a in container.get("args") or []]
        if command[:1] and command[0] in IMAGE_COMMANDS:
            return [*IMAGE_COMMANDS[command[0]], *command[1:], *args]
        # Any other program the image has: found on the image's PATH (this machine's programs, the venv's first).
        found = shutil.which(command[0], path=self.image_env.get("PATH")) if command else None
        if found is None:
            raise UnsupportedManifest(f"container {container['name']}: command {command} is neither one of "
                                      f"{sorted(IMAGE_COMMANDS)} nor a program on the image's PATH")
        return [found, *command[1:], *args]

    # -------------------------------------------------------------------- pods
    def create_pod(self, deployment: str) -> Pod:
        """Schedule one pod of ``deployment`` from its template and start its probe loop."""
        template = self.deployments[deployment]["spec"]["template"]
        with self._lock:
            name = f"{deployment}-{template_hash(template)}-{_generated(5, self._rng)}"
        labels = {**template["metadata"].get("labels", {}), "pod-template-hash": template_hash(template)}
        pod = self._new_pod(name, deployment, template, labels)
        thread = threading.Thread(target=self._run_pod, args=(pod,), name=f"kubelet-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return pod

    def _new_pod(self, name: str, owner: str, template: dict[str, Any], labels: dict[str, str],
                 start_errors: bool = False) -> Pod:
        """A pod from a pod template: its network namespace, volumes, environment and command (not started).
        ``start_errors``: a command missing from the image is the pod's start error (a Job's pod fails with it,
        as in a cluster) instead of a manifest this kubelet refuses."""
        spec = template["spec"]
        containers = spec["containers"]
        if len(containers) != 1 or spec.get("initContainers"):
            raise UnsupportedManifest(f"{owner}: one container and no init containers are supported")
        container = containers[0]
        pod_dir = self.root / "pods" / name
        ns, ip = self.network.add_pod(name)
        pod = Pod(name, self.namespace, owner, labels, ip, ns, spec, self._volumes(pod_dir, spec),
                  pod_dir / f"{container['name']}.log", created_at=_now())
        pod.ports = {p["name"]: int(p["containerPort"]) for p in container.get("ports") or [] if "name" in p}
        pod.env = {**self.container_env(pod, container), **self.env_overrides.get(owner, {})}
        try:
            pod.argv = self._command(container, pod.env)
        except UnsupportedManifest as exc:
            if not start_errors:
                raise
            pod.start_error = f"exec: {exc}"
        # The image's WORKDIR is /tmp, which is the pod's /tmp emptyDir.
        pod.cwd = Path(self._host_path(pod, container, "/tmp"))
        pod.probes = {kind: Probe.parse(kind, container[f"{kind}Probe"], pod.ports)
                      for kind in ("startup", "readiness", "liveness") if f"{kind}Probe" in container}
        with self._lock:
            self.pods.append(pod)
        self._refresh_dns()
        return pod

    # -------------------------------------------------------------------- jobs
    def create_job(self, body: dict[str, Any]) -> Job:
        """What the API server and the Job controller do with a new Job: record it, then run its pods to
        completion in a thread (one at a time: parallelism and completions of 1)."""
        spec = body.get("spec") or {}
        template = spec.get("template") or {}
        pod_spec = template.get("spec") or {}
        unsupported = sorted(set(spec) & {"parallelism", "completions", "completionMode", "podFailurePolicy",
                                          "successPolicy", "suspend", "podReplacementPolicy", "managedBy"})
        if [k for k in unsupported if not (k in ("parallelism", "completions") and spec[k] == 1)]:
            raise UnsupportedManifest(f"Job {body['metadata']['name']}: {unsupported} are not supported")
        if pod_spec.get("restartPolicy") not in ("Never", "OnFailure"):
            raise UnsupportedManifest("a Job's pods need restartPolicy Never or OnFailure")
        containers = pod_spec.get("containers") or []
        if len(containers) != 1 or any(f"{k}Probe" in containers[0] for k in ("startup", "readiness", "liveness")):
            raise UnsupportedManifest("a Job's pod here: one container, no probes")
        name = body["metadata"]["name"]
        with self._lock:
            if name in self.jobs:
                raise JobExists(name)
            stored = json.loads(json.dumps(body))  # the API server keeps its own copy
            stored["metadata"].update({"namespace": self.namespace, "uid": _uid(self._rng), "generation": 1,
                                       "resourceVersion": "1", "creationTimestamp": _now()})
            job = Job(name, stored)
            self.jobs[name] = job
        thread = threading.Thread(target=self._run_job, args=(job,), name=f"job-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return job

    def delete_job(self, name: str) -> Job | None:
        """Delete a Job, propagation Background: it is gone at once, its pods are stopped and removed after."""
        with self._lock:
            job = self.jobs.pop(name, None)
        if job is None:
            return None
        job.deleted.set()
        thread = threading.Thread(target=self._remove_pods, args=(list(job.pods),), name=f"gc-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return job

    def _remove_pods(self, pods: list[Pod]) -> None:
        for pod in pods:
            self._kill(pod, grace_s=float(pod.spec.get("terminationGracePeriodSeconds", 30)))
            pod.deleted = True
            self.network.remove_pod(pod.netns)
        self._refresh_dns()

    def _run_job(self, job: Job) -> None:
        try:
            self._job_loop(job)
            ttl = job.body["spec"].get("ttlSecondsAfterFinished")
            if ttl is not None and not self._stop.wait(float(ttl)) and not job.deleted.is_set():
                self.delete_job(job.name)  # the TTL controller
        except Exception:  # a kubelet bug must not kill the test process' thread silently
            log.exception("job controller of %s failed", job.name)

    def _job_loop(self, job: Job) -> None:
        spec = job.body["spec"]
        limit = int(spec.get("backoffLimit", 6))
        deadline = spec.get("activeDeadlineSeconds")
        ends_at = time.monotonic() + float(deadline) if deadline is not None else float("inf")
        on_failure = spec["template"]["spec"]["restartPolicy"] == "OnFailure"
        job.start_time = _now()
        while True:
            pod = self._job_pod(job)
            while True:  # the container's runs in this pod (more than one with restartPolicy OnFailure)
                ended = self._run_to_completion(pod, job, ends_at)
                if ended is None:  # deleted, or past the deadline
                    pod.phase = "Failed"
                    if not job.deleted.is_set() and not self._stop.is_set():
                        job._end("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
                    return
                if ended.code == 0:
                    pod.phase, job.succeeded = "Succeeded", 1
                    job._end("Complete", "CompletionsReached", "Reached expected number of succeeded pods")
                    return
                job.failed += 1
                if job.failed > limit:
                    pod.phase = "Failed"
                    job._end("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                    return
                if not on_failure:
                    pod.phase = "Failed"
                    break
                pod.restart_count += 1  # OnFailure: the kubelet restarts it in place, after its back-off
                if not self._job_wait(job, _BACKOFF_S[min(pod.restart_count - 1, len(_BACKOFF_S) - 1)], ends_at):
                    return self._job_interrupted(job, pod)
            # Never: the controller makes a new pod, after its back-off.
            if not self._job_wait(job, _JOB_BACKOFF_S[min(job.failed - 1, len(_JOB_BACKOFF_S) - 1)], ends_at):
                return self._job_interrupted(job, None)

    def _job_interrupted(self, job: Job, pod: Pod | None) -> None:
        if pod is not None:
            pod.phase = "Failed"
        if not job.deleted.is_set() and not self._stop.is_set():
            job._end("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")

    def _job_wait(self, job: Job, seconds: float, ends_at: float) -> bool:
        """Sleep up to ``seconds``; False when the Job was deleted, passed its deadline or the kubelet stops."""
        until = min(time.monotonic() + seconds, ends_at)
        while time.monotonic() < until:
            if job.deleted.is_set() or self._stop.wait(0.05):
                return False
        return time.monotonic() < ends_at and not job.deleted.is_set()

    def _job_pod(self, job: Job) -> Pod:
        template = job.body["spec"]["template"]
        uid = job.body["metadata"]["uid"]
        with self._lock:
            name = f"{job.name}-{_generated(5, self._rng)}"
        # The labels the Job controller adds to its pods.
        labels = {**template["metadata"].get("labels", {}), "batch.kubernetes.io/controller-uid": uid,
                  "batch.kubernetes.io/job-name": job.name, "controller-uid": uid, "job-name": job.name}
        pod = self._new_pod(name, job.name, template, labels, start_errors=True)
        pod.job = job.name
        job.pods.append(pod)
        return pod

    def _run_to_completion(self, pod: Pod, job: Job, ends_at: float) -> Exit | None:
        """Run the pod's container once; how it ended, or None when the Job was deleted or ran out of time
        (the container is stopped then)."""
        pod.started_at = _now()
        if pod.start_error is not None:  # as the runtime reports a command missing from the image
            with open(pod.log_path, "a") as f:
                f.write(f"--- container failed to start: {pod.start_error}\n")
            ended = Exit(128, "StartError", pod.started_at, _now(), pod.start_error)
            pod.exits.append(ended)
            return ended
        self._start_container(pod)
        pod.phase = "Running"
        assert pod.process is not None
        while pod.process.poll() is None:
            if job.deleted.is_set() or self._stop.is_set() or time.monotonic() >= ends_at:
                self._kill(pod, grace_s=float(pod.spec.get("terminationGracePeriodSeconds", 30)))
                return None
            time.sleep(0.05)
        code = pod.process.returncode
        code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number
        ended = Exit(code, "Completed" if code == 0 else "Error", pod.started_at, _now())
        pod.exits.append(ended)
        with open(pod.log_path, "a") as f:
            f.write(f"--- container exited {code}\n")
        return ended

    def job_pods(self, selector: dict[str, str]) -> list[Pod]:
        """Pods (of Jobs and Deployments) whose labels include ``selector``."""
        with self._lock:
            return [p for p in self.pods if not p.deleted and selector.items() <= p.labels.items()]

    def apply(self, deployment: str, replicas: int | None = None) -> list[Pod]:
        """Create the Deployment's pods (``spec.replicas`` unless given), like ``kubectl apply``."""
        count = self.deployments[deployment]["spec"].get("replicas", 1) if replicas is None else replicas
        return [self.create_pod(deployment) for _ in range(count)]

    def scale(self, deployment: str, replicas: int) -> list[Pod]:
        """``kubectl scale deployment NAME --replicas=N``: returns the pods it created (scale-up only)."""
        current = self.pods_of(deployment)
        if replicas < len(current):
            raise UnsupportedManifest("scaling down is not supported by this kubelet")
        return [self.create_pod(deployment) for _ in range(replicas - len(current))]

    def pods_of(self, deployment: str) -> list[Pod]:
        with self._lock:
            return [p for p in self.pods if p.deployment == deployment and not p.deleted]

    def _start_container(self, pod: Pod) -> None:
        pod.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(pod.log_path, "ab") as out:
            out.write(f"--- container start {pod.restart_count}: {' '.join(pod.argv[1:])}\n".encode())
            out.flush()
            pod.process = subprocess.Popen(self.network.exec_prefix(pod.netns) + pod.argv, env=pod.env,
                                           cwd=pod.cwd, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)

    def _probe(self, pod: Pod, probe: Probe) -> ProbeResult:
        status, error, body = None, None, ""
        try:
            answer = self._http.get(f"http://{pod.ip}:{probe.port}{probe.path}", timeout=probe.timeout_s)
            status, body = answer.status_code, answer.text[:1000]
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        result = ProbeResult(pod.name, pod.restart_count, probe.kind, probe.path, probe.port,
                             time.monotonic(), status, error, body)
        with pod.lock:
            pod.results.append(result)
        return result

    def _wait(self, pod: Pod, seconds: float) -> bool:
        """Sleep up to ``seconds``; False at once when the container exited or the kubelet stops."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._stop.is_set() or pod.deleted or not pod.alive():
                return False
            self._stop.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        return not (self._stop.is_set() or pod.deleted) and pod.alive()

    def _run_pod(self, pod: Pod) -> None:
        try:
            self._pod_loop(pod)
        except Exception:  # a kubelet bug must not kill the test process' thread silently
            log.exception("kubelet loop of %s failed", pod.name)
            with open(pod.log_path, "a") as f:
                f.write("--- kubelet loop failed; see the test log\n")

    def _pod_loop(self, pod: Pod) -> None:
        while not (self._stop.is_set() or pod.deleted):
            self._start_container(pod)
            reason = self._container_life(pod)
            pod._set("ready", False)
            pod._set("started", False)
            if self._stop.is_set() or pod.deleted:
                return
            self._kill(pod, grace_s=float(pod.spec.get("terminationGracePeriodSeconds", 30)))
            with open(pod.log_path, "a") as f:
                f.write(f"--- container restarted by the kubelet: {reason}\n")
            backoff = _BACKOFF_S[min(pod.restart_count, len(_BACKOFF_S) - 1)]
            pod.restart_count += 1
            if self._stop.wait(backoff):
                return

    def _container_life(self, pod: Pod) -> str:
        """Probe one container instance until it must be restarted; returns why."""
        startup = pod.probes.get("startup")
        if startup is not None:
            failures = 0
            if not self._wait(pod, startup.initial_delay_s):
                return "exited"
            while True:
                if self._probe(pod, startup).success:
                    break
                failures += 1
                if failures >= startup.failure_threshold:
                    return f"startup probe failed {failures} times"
                if not self._wait(pod, startup.period_s):
                    return "exited"
        pod._set("started", True)
        readiness = pod.probes.get("readiness")
        if readiness is not None:
            thread = threading.Thread(target=self._readiness_loop, args=(pod, readiness, pod.restart_count),
                                      name=f"readiness-{pod.name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        else:
            pod._set("ready", True)
            self._refresh_dns()
        liveness = pod.probes.get("liveness")
        failures = 0
        # Liveness waits its initialDelaySeconds from container start; startup already took some of it.
        if liveness is not None and not self._wait(pod, liveness.initial_delay_s):
            return "exited"
        while True:
            if liveness is None:
                if not self._wait(pod, 3600):
                    return "exited"
                continue
            failures = 0 if self._probe(pod, liveness).success else failures + 1
            if failures >= liveness.failure_threshold:
                return f"liveness probe failed {failures} times"
            if not self._wait(pod, liveness.period_s):
                return "exited"

    def _readiness_loop(self, pod: Pod, probe: Probe, restart: int) -> None:
        try:
            successes = failures = 0
            if not self._wait(pod, probe.initial_delay_s):
                return
            while pod.restart_count == restart:
                if self._probe(pod, probe).success:
                    successes, failures = successes + 1, 0
                    if successes >= probe.success_threshold and not pod.ready:
                        pod._set("ready", True)
                        self._refresh_dns()
                else:
                    successes, failures = 0, failures + 1
                    if failures >= probe.failure_threshold and pod.ready:
                        pod._set("ready", False)
                        self._refresh_dns()
                if not self._wait(pod, probe.period_s):
                    return
        except Exception:
            log.exception("readiness loop of %s failed", pod.name)

    def _kill(self, pod: Pod, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` seconds (no preStop hook: see the module docstring)."""
        process = pod.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)

    def wait_ready(self, pods: list[Pod], timeout_s: float) -> None:
        """Block until every pod is Ready; fail with their logs and probe results otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(p.ready for p in pods):
                return
            for pod in pods:
                if pod.restart_count:
                    raise AssertionError(f"{pod.name} was restarted:\n{self.describe(pod)}")
            time.sleep(0.1)
        laggards = [p for p in pods if not p.ready]
        details = "\n".join(self.describe(p) for p in laggards)
        raise AssertionError(f"not Ready after {timeout_s:.0f}s:\n{details}")

    def describe(self, pod: Pod) -> str:
        """``kubectl describe pod`` and ``kubectl logs``, briefly."""
        with pod.lock:
            last = pod.results[-6:]
        probes = "\n".join(f"  {r.kind} {r.path}:{r.port} -> {r.status or r.error}" for r in last)
        return (f"pod {pod.name} ip={pod.ip} started={pod.started} ready={pod.ready} "
                f"restarts={pod.restart_count} alive={pod.alive()}\nlast probes:\n{probes}\n"
                f"log tail:\n{pod.log()}")

    def all_pods(self) -> Iterator[Pod]:
        with self._lock:
            yield from list(self.pods)

    def stop(self) -> None:
        """Stop every container (SIGTERM, short grace), the proxies, and remove the pods' namespaces."""
        self._stop.set()
        if self.api_server is not None:
            self.api_server.close()
        pods = list(self.all_pods())
        for pod in pods:
            if pod.alive():
                pod.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for pod in pods:
            self._kill(pod, grace_s=15)  # teardown: not the manifests' 120 s grace
            pod.deleted = True
        for svc in self.services.values():
            for proxy in svc.proxies:
                proxy.shutdown()
                proxy.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        for pod in pods:
            self.network.remove_pod(pod.netns)
        self._http.close()


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _now() -> str:
    """The time as the Kubernetes API writes it (RFC 3339, UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def default_image_env() -> dict[str, str]:
    """What the images' ``ENV`` gives every container, with the two local differences of the docstring."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(REPO / "src"),  # the image installs the package into /opt/venv instead
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",  # stands in for the CPU limits: several pods share two cores here
        "TOKENIZERS_PARALLELISM": "false",
    }
