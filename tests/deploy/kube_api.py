"""A Kubernetes API server for the test kubelet: exactly the calls a job run makes, backed by its real processes.

    POST   /apis/batch/v1/namespaces/{ns}/jobs              create a Job; the kubelet's Job controller runs it
    GET    /apis/batch/v1/namespaces/{ns}/jobs/{name}       the Job and its status
    DELETE /apis/batch/v1/namespaces/{ns}/jobs/{name}       delete it (propagation Background: pods stop after)
    GET    /api/v1/namespaces/{ns}/pods?labelSelector=...   pods by an equality selector (k=v,k2=v2)
    GET    /api/v1/namespaces/{ns}/pods/{name}/log          the current container's log (tailLines)

The trainer's real ``kubernetes`` client talks to it through the kubeconfig that ``kubeconfig()`` writes (the
one translation: ``LOCKSTEP_KUBECONFIG`` instead of the pod's service account). Requests must carry that
kubeconfig's token, which stands for the trainer's ServiceAccount, and are authorized against the Roles the
manifests bind to it: a call that k8s/rbac.yaml does not allow gets 403 Forbidden, as from a real API server,
so a job run on the local cluster also checks that the RBAC grants enough. Anything else gets 404 naming what
is implemented.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

from . import Doc
from .kubelet import Exit, Job, JobExists, Kubelet, Pod, UnsupportedManifest

_JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)/log)?$")
IMPLEMENTED = "create, get and delete batch/v1 jobs; list pods by label; get a pod's log"


class ApiError(Exception):
    """Answered as a ``Status`` object, as the API server answers errors."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


def _allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    def has(values: list[str], value: str) -> bool:
        return "*" in values or value in values

    return any(has(r.get("apiGroups", []), group) and has(r.get("resources", []), resource)
               and has(r.get("verbs", []), verb) for r in rules)


def service_account_rules(objects: list[Doc], account: str) -> list[dict[str, Any]]:
    """The rules of every Role bound to ServiceAccount ``account`` (RoleBindings of the same namespace)."""
    roles = {d.name: d.body for d in objects if d.kind == "Role"}
    rules: list[dict[str, Any]] = []
    for binding in (d.body for d in objects if d.kind == "RoleBinding"):
        if any(s.get("kind") == "ServiceAccount" and s.get("name") == account for s in binding["subjects"]):
            rules += roles[binding["roleRef"]["name"]]["rules"]
    return rules


def _terminated(ended: Exit) -> dict[str, Any]:
    state = {"exitCode": ended.code, "reason": ended.reason, "startedAt": ended.started_at,
             "finishedAt": ended.finished_at}
    return {**state, "message": ended.message} if ended.message else state


def pod_object(pod: Pod, kubelet: Kubelet, job: Job | None) -> dict[str, Any]:
    """A pod as ``GET /api/v1/.../pods`` shows it: metadata, the declared spec, and its status from the kubelet."""
    container = pod.spec["containers"][0]
    state: dict[str, Any]
    if pod.phase == "Running" and pod.alive():
        state = {"running": {"startedAt": pod.started_at}}
    elif pod.exits and pod.phase in ("Succeeded", "Failed"):
        state = {"terminated": _terminated(pod.exits[-1])}
    elif pod.exits:  # OnFailure: between two runs of the container
        state = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}}
    else:
        state = {"waiting": {"reason": "ContainerCreating"}}
    status: dict[str, Any] = {
        "phase": pod.phase, "podIP": pod.ip, "podIPs": [{"ip": pod.ip}], "hostIP": kubelet.network.node_ip,
        "startTime": pod.created_at,
        "conditions": [{"type": "PodScheduled", "status": "True"},
                       {"type": "Ready", "status": "True" if pod.phase == "Running" else "False"}],
        "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                               "ready": pod.phase == "Running", "started": pod.phase == "Running",
                               "restartCount": pod.restart_count, "state": state,
                               "lastState": {"terminated": _terminated(pod.exits[-2])} if len(pod.exits) > 1
                               else {}}]}
    metadata: dict[str, Any] = {"name": pod.name, "namespace": pod.namespace, "labels": dict(pod.labels),
                                "uid": f"pod-{pod.name}", "creationTimestamp": pod.created_at}
    if job is not None:
        metadata["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": job.name,
                                        "uid": job.body["metadata"]["uid"], "controller": True,
                                        "blockOwnerDeletion": True}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {**pod.spec, "nodeName": "local"}, "status": status}


class KubeApiServer:
    """Serves the calls above on the kubelet's node address; ``close`` stops it."""

    def __init__(self, kubelet: Kubelet, objects: list[Doc], service_account: str) -> None:
        self.kubelet = kubelet
        self.account = service_account
        self.rules = service_account_rules(objects, service_account)
        self.token = secrets.token_hex(16)
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status): what the trainer asked
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                url = urlparse(self.path)
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = json.loads(self.rfile.read(length)) if length else None
                    if self.headers.get("Authorization") != f"Bearer {owner.token}":
                        raise ApiError(401, "Unauthorized", "Unauthorized")
                    code, answer = owner.handle(method, url.path, parse_qs(url.query), body)
                except ApiError as exc:
                    code, answer = exc.code, exc.status()
                except UnsupportedManifest as exc:  # this kubelet's limits, not Kubernetes'
                    code, answer = 422, ApiError(422, "Invalid", f"the test kubelet cannot run it: {exc}").status()
                owner.requests.append((method, url.path, code))
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's names)
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((kubelet.network.node_ip, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{kubelet.network.node_ip}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="kube-api", daemon=True)
        self.thread.start()
        kubelet.api_server = self  # stopped with the kubelet

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for this server: its URL, the token standing for the ServiceAccount, the namespace."""
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "local",
                  "clusters": [{"name": "local", "cluster": {"server": self.url}}],
                  "users": [{"name": self.account, "user": {"token": self.token}}],
                  "contexts": [{"name": "local", "context": {"cluster": "local", "user": self.account,
                                                             "namespace": self.kubelet.namespace}}]}
        path.write_text(yaml.safe_dump(config))
        return path

    # ------------------------------------------------------------------ the calls
    def _authorize(self, group: str, resource: str, verb: str, namespace: str) -> None:
        if namespace != self.kubelet.namespace:
            raise ApiError(404, "NotFound", f"this test cluster has only the namespace {self.kubelet.namespace}")
        if not _allowed(self.rules, group, resource, verb):
            what = f"{resource}.{group}" if group else resource
            raise ApiError(403, "Forbidden", f'{what} is forbidden: User "system:serviceaccount:{namespace}:'
                           f'{self.account}" cannot {verb} resource "{resource}" in API group "{group}" in the '
                           f'namespace "{namespace}"')

    def handle(self, method: str, path: str, query: dict[str, list[str]],
               body: Any) -> tuple[int, dict[str, Any] | str]:
        if m := _JOBS.match(path):
            namespace, name = m.groups()
            verb = {("POST", False): "create", ("GET", True): "get", ("DELETE", True): "delete"}.get(
                (method, name is not None))
            if verb is not None:
                self._authorize("batch", "jobs", verb, namespace)
                return self._jobs(verb, name, body)
        elif (m := _PODS.match(path)) and method == "GET":
            namespace, log_of = m.groups()
            if log_of is not None:
                self._authorize("", "pods/log", "get", namespace)
                return 200, self._log(log_of, query)
            self._authorize("", "pods", "list", namespace)
            return 200, self._pods(query)
        raise ApiError(404, "NotFound", f"{method} {path}: this test API server implements {IMPLEMENTED}")

    def _jobs(self, verb: str, name: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        if verb == "create":
            if not isinstance(body, dict) or body.get("kind") != "Job" or body.get("apiVersion") != "batch/v1":
                raise ApiError(400, "BadRequest", "the body is not a batch/v1 Job")
            try:
                job = self.kubelet.create_job(body)
            except JobExists:
                raise ApiError(409, "AlreadyExists", f'jobs.batch "{body["metadata"]["name"]}" already exists') \
                    from None
            return 201, self._job_object(job)
        assert name is not None
        job = self.kubelet.delete_job(name) if verb == "delete" else self.kubelet.jobs.get(name)
        if job is None:
            raise ApiError(404, "NotFound", f'jobs.batch "{name}" not found')
        if verb == "delete":
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": "batch", "kind": "jobs",
                                     "uid": job.body["metadata"]["uid"]}}
        return 200, self._job_object(job)

    @staticmethod
    def _job_object(job: Job) -> dict[str, Any]:
        return {**job.body, "status": job.status()}

    def _pods(self, query: dict[str, list[str]]) -> dict[str, Any]:
        selector: dict[str, str] = {}
        for term in filter(None, (query.get("labelSelector") or [""])[0].split(",")):
            key, op, value = re.split(r"(==?)", term, maxsplit=1) if "=" in term else (term, "", "")
            if not op or "!" in key:
                raise ApiError(400, "BadRequest", f"labelSelector {term!r}: only key=value terms here")
            selector[key.strip()] = value.strip()
        jobs = self.kubelet.jobs
        items = [pod_object(p, self.kubelet, jobs.get(p.job) if p.job else None)
                 for p in self.kubelet.job_pods(selector)]
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}

    def _log(self, name: str, query: dict[str, list[str]]) -> str:
        pod = next((p for p in self.kubelet.all_pods() if p.name == name and not p.deleted), None)
        if pod is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found')
        container = (query.get("container") or [pod.spec["containers"][0]["name"]])[0]
        if container != pod.spec["containers"][0]["name"]:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        tail = int((query.get("tailLines") or ["0"])[0])
        return pod.container_log(tail)
