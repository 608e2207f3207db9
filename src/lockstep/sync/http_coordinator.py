"""The two phases over HTTP, for clusters without a shared volume: stage and commit on each replica URL."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from lockstep.core.clock import Clock
from lockstep.core.errors import BadRequest
from lockstep.core.settings import CommitPolicy, Settings
from lockstep.models.refs import RefKind, parse_ref
from lockstep.sync.coordinator import PublishResult, ReplicaReport, commit_refusal

log = logging.getLogger(__name__)


class HttpCoordinator:
    """Drives ``/admin/stage`` → ``/admin/commit`` (or ``/admin/abort``) on a list of replica URLs."""

    def __init__(self, settings: Settings, urls: list[str], *, clock: Clock, client: httpx.Client | None = None
                 ) -> None:
        if not urls:
            raise BadRequest("no replica URLs to publish to; set INFERENCE_URLS or configure discovery")
        self.settings = settings
        self.urls = [u.rstrip("/") for u in urls]
        self.clock = clock
        headers = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
        self.client = client or httpx.Client(timeout=10.0, headers=headers)

    def _status(self, url: str) -> dict[str, Any] | None:
        try:
            response = self.client.get(f"{url}/status")
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def publish(self, model: str, *, version: int | None = None, policy: CommitPolicy | None = None,
                timeout_s: float | None = None) -> PublishResult:
        """Stage ``model`` as the next version on every URL, then commit at one ``activate_at`` for all."""
        ref = parse_ref(model)
        if ref.kind is RefKind.VERSION:
            raise BadRequest("versions/N needs the shared store; over HTTP publish a repo id, builtin or directory")
        policy = policy or self.settings.commit_policy
        timeout_s = timeout_s or self.settings.stage_timeout_s
        started = self.clock.time()
        statuses = {url: self._status(url) for url in self.urls}
        if version is None:
            version = 1 + max((s.get("serving_version") or 0 for s in statuses.values() if s), default=0)
        reports: dict[str, ReplicaReport] = {}
        for url in self.urls:
            try:
                response = self.client.post(f"{url}/admin/stage", json={"model": ref.raw, "version": version})
                response.raise_for_status()
            except httpx.HTTPError as exc:
                reports[url] = ReplicaReport(url, "failed", f"stage request failed: {exc}")
        deadline = self.clock.time() + timeout_s
        while True:
            for url in self.urls:
                if url in reports:
                    continue
                staged = (self._status(url) or {}).get("staged") or {}
                if staged.get("version") == version and staged.get("state") == "staged":
                    reports[url] = ReplicaReport(url, "staged", None, staged.get("seconds"),
                                                 staged.get("weights_digest"))
                elif staged.get("version") == version and staged.get("state") == "failed":
                    reports[url] = ReplicaReport(url, "failed", staged.get("error"), staged.get("seconds"))
            failed = [r for r in reports.values() if r.outcome == "failed"]
            if len(reports) == len(self.urls) or (failed and policy is CommitPolicy.STRICT):
                break
            if self.clock.time() >= deadline:
                for url in self.urls:
                    reports.setdefault(url, ReplicaReport(url, "timeout", "did not stage before the deadline"))
                break
            self.clock.sleep(self.settings.poll_interval_s)
        ordered = [reports.get(url) or ReplicaReport(url, "timeout", "no answer") for url in self.urls]
        result = PublishResult(version, ref.raw, "aborted", started_at=started, replicas=ordered,
                               prepare_s=self.clock.time() - started)
        staged = [r for r in ordered if r.outcome == "staged"]
        result.reason = commit_refusal(ordered, policy)
        if result.reason:
            for url in self.urls:
                try:
                    self.client.post(f"{url}/admin/abort", json={"version": version})
                except httpx.HTTPError:
                    pass
        else:
            activate_at = self.clock.time() + max(self.settings.commit_margin_s, 0.2)
            for report in staged:
                try:
                    self.client.post(f"{report.replica_id}/admin/commit",
                                     json={"version": version, "activate_at": activate_at}).raise_for_status()
                    report.outcome = "serving"
                except httpx.HTTPError as exc:
                    report.outcome, report.error = "behind", f"commit failed: {exc}"
            result.outcome, result.activate_at = "committed", activate_at
        result.total_s = self.clock.time() - started
        log.info("http publish %s", result.summary())
        return result
