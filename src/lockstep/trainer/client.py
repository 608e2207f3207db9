"""The trainer's publish, rollback and cluster API from a script or the CLI (clusters without a shared folder)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from lockstep.core.errors import LockstepError, NotReady
from lockstep.core.http import bearer_headers
from lockstep.sync.coordinator import PublishResult, ReplicaReport

POLL_S = 0.5  # seconds between looks at a running publish job


class TrainerClient:
    """``publish``/``rollback`` through the trainer (which runs the two phases) and its ``cluster`` view."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=bearer_headers(token), timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise NotReady(f"cannot reach the trainer at {self.url} ({exc}); check --trainer / TRAINER_URL and "
                              "that the trainer is running") from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", {}).get("message") or response.text
            except ValueError:
                detail = response.text
            raise LockstepError(f"the trainer answered {response.status_code} to {method} {path}: {detail}")
        return response.json()

    def cluster(self) -> dict[str, Any]:
        """``GET /cluster``: committed version, pending phase and every replica the trainer sees."""
        result: dict[str, Any] = self._call("GET", "/cluster")
        return result

    def publish(self, model: str, *, policy: str | None = None, timeout_s: float | None = None) -> PublishResult:
        """Publish ``model`` through the trainer and wait for the outcome."""
        body = {k: v for k, v in {"model": model, "policy": policy, "timeout_s": timeout_s}.items() if v is not None}
        return self._wait(self._call("POST", "/publish", json=body)["publish_id"])

    def rollback(self, to: int | None = None) -> PublishResult:
        """Commit an earlier version again (default: the one before the committed one) and wait."""
        return self._wait(self._call("POST", "/rollback", json={"to": to} if to is not None else {})["publish_id"])

    def _wait(self, publish_id: str) -> PublishResult:
        while True:
            job = self._call("GET", f"/publishes/{publish_id}")
            if job["status"] == "failed":
                raise LockstepError(f"publish {publish_id} failed on the trainer: {job.get('error')}")
            if job["status"] == "done":
                return result_from_dict(job["result"])
            time.sleep(POLL_S)


def result_from_dict(data: dict[str, Any]) -> PublishResult:
    """A ``PublishResult`` from its ``as_dict()`` form (the trainer's publish job result)."""
    fields = {k: data[k] for k in ("version", "model", "outcome", "reason", "activate_at", "started_at",
                                   "prepare_s", "total_s", "generation", "rollback") if data.get(k) is not None}
    replicas = [ReplicaReport(**r) for r in data.get("replicas") or []]
    return PublishResult(**fields, replicas=replicas)
