"""The Kubernetes API calls of a job run: create, read and delete its Job, list its pods, read a pod's log.

``JobApi`` is what ``JobKind`` needs; ``KubernetesJobs`` implements it with the official client, through the
pod's service account (k8s/rbac.yaml grants exactly these calls) or ``LOCKSTEP_KUBECONFIG``. Objects travel as
plain dicts in the API's JSON form (camelCase), as the templates are written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from lockstep.core.errors import Conflict, LockstepError
from lockstep.core.settings import Settings
from lockstep.trainer.cluster.discovery import SERVICE_ACCOUNT_NAMESPACE, in_cluster_api_client, own_namespace

TIMEOUT_S = 10.0  # seconds for one API call


class KubeApiError(LockstepError):
    """The Kubernetes API refused or failed a call; the message names the call and what the API said."""

    status_code = 502
    code = "kubernetes_api_error"


class JobApi(Protocol):
    """The calls a job run makes, in one namespace's terms."""

    def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def delete_job(self, namespace: str, name: str) -> None: ...

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]: ...

    def pod_log(self, namespace: str, pod: str, container: str, tail_lines: int) -> str: ...


def _error(what: str, exc: Any) -> KubeApiError:
    """A readable error from an ``ApiException``: the API's own message when it sent a Status."""
    import json

    message = str(getattr(exc, "reason", "") or exc)
    try:
        message = json.loads(exc.body).get("message") or message
    except (TypeError, ValueError, AttributeError):
        pass
    hint = " (the trainer's Role in k8s/rbac.yaml must allow it)" if getattr(exc, "status", None) == 403 else ""
    return KubeApiError(f"Kubernetes API: {what} failed: {getattr(exc, 'status', '?')} {message}{hint}")


class KubernetesJobs:
    """``JobApi`` over an ``ApiClient`` of the official ``kubernetes`` package."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._client = api_client
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)

    def _plain(self, obj: Any) -> Any:
        return self._client.sanitize_for_serialization(obj)

    def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            job = self._batch.create_namespaced_job(namespace, body, _request_timeout=TIMEOUT_S)
        except ApiException as exc:
            raise _error(f"create job {body['metadata']['name']} in {namespace}", exc) from None
        result: dict[str, Any] = self._plain(job)
        return result

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            job = self._batch.read_namespaced_job(name, namespace, _request_timeout=TIMEOUT_S)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _error(f"read job {name} in {namespace}", exc) from None
        result: dict[str, Any] = self._plain(job)
        return result

    def delete_job(self, namespace: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            # Background: the Job goes at once, the garbage collector removes its pods (SIGTERM, their grace).
            self._batch.delete_namespaced_job(name, namespace, propagation_policy="Background",
                                              _request_timeout=TIMEOUT_S)
        except ApiException as exc:
            if exc.status != 404:
                raise _error(f"delete job {name} in {namespace}", exc) from None

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            pods = self._core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=TIMEOUT_S)
        except ApiException as exc:
            raise _error(f"list pods {selector} in {namespace}", exc) from None
        return [self._plain(p) for p in pods.items or []]

    def pod_log(self, namespace: str, pod: str, container: str, tail_lines: int) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            # Raw bytes: the client would parse a log that happens to be JSON and hand back its repr.
            response = self._core.read_namespaced_pod_log(pod, namespace, container=container, tail_lines=tail_lines,
                                                          _preload_content=False, _request_timeout=TIMEOUT_S)
        except ApiException as exc:
            if exc.status in (400, 404):
                return ""  # not started yet (ContainerCreating), or gone
            raise _error(f"read the log of pod {pod} in {namespace}", exc) from None
        text: str = response.data.decode("utf-8", errors="replace")
        return text


def connect(settings: Settings) -> KubernetesJobs:
    """The trainer's Kubernetes API: ``LOCKSTEP_KUBECONFIG`` when set, else the pod's service account; 409 when
    there is neither (job runs cannot be started)."""
    from kubernetes import client, config

    if settings.kubeconfig is not None:
        configuration = client.Configuration()
        try:
            config.load_kube_config(config_file=str(settings.kubeconfig), client_configuration=configuration)
        except (config.ConfigException, OSError, ValueError) as exc:
            raise Conflict(f"LOCKSTEP_KUBECONFIG={settings.kubeconfig} is not a usable kubeconfig: {exc}") from None
        return KubernetesJobs(client.ApiClient(configuration))
    api_client = in_cluster_api_client()
    if api_client is None:
        raise Conflict("job runs create Kubernetes Jobs, and this trainer has no Kubernetes API: run it in a pod "
                       "with its service account (k8s/rbac.yaml) or point LOCKSTEP_KUBECONFIG at a kubeconfig")
    return KubernetesJobs(api_client)


def namespace(settings: Settings, namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """Where job runs create their Jobs: the trainer's own namespace (POD_NAMESPACE, else the service account's,
    else the kubeconfig's current context), or ``default``."""
    found = own_namespace(settings, namespace_file)
    if not found and settings.kubeconfig is not None:
        from kubernetes import config

        try:
            _, current = config.list_kube_config_contexts(config_file=str(settings.kubeconfig))
            found = str((current or {}).get("context", {}).get("namespace") or "")
        except (config.ConfigException, OSError, ValueError):
            found = ""
    return found or "default"
