"""The two phases over HTTP, for clusters without a shared volume: stage and commit on each replica URL.

Prepare: ``POST /admin/stage`` on every URL, then poll ``GET /status`` until each one staged the version,
failed, or the deadline passed. Commit (``commit_refusal`` says whether it may: the same rules as over the
shared folder): ``POST /admin/commit`` with one ``activate_at`` for all; a replica that did not stage is told
too, so it goes unready until it catches up. Otherwise ``POST /admin/abort`` everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from lockstep.core.clock import Clock
from lockstep.core.errors import BadRequest
from lockstep.core.http import bearer_headers
from lockstep.core.settings import CommitPolicy, Settings
from lockstep.models.refs import RefKind, parse_ref
from lockstep.store.manifest import MAX_VERSION
from lockstep.sync.coordinator import ProgressFn, PublishResult, ReplicaReport, commit_refusal

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 3.0  # seconds per GET /status: an unreachable replica must not stall the others
SERVING_GRACE_S = 5.0  # seconds after activate_at to see every committed replica serve the version


def version_of(value: Any) -> int | None:
    """A version number from a replica's answer, or None when it is not one (a string, negative, huge)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_VERSION:
        return value
    return None


def _staged_of(status: dict[str, Any] | None) -> dict[str, Any]:
    staged = (status or {}).get("staged")
    return staged if isinstance(staged, dict) else {}


def error_text(response: httpx.Response) -> str:
    """The message of a Lockstep error body, else the start of the body."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


class HttpCoordinator:
    """Drives ``/admin/stage`` → ``/admin/commit`` (or ``/admin/abort``) on a list of replica URLs."""

    def __init__(self, settings: Settings, urls: list[str], *, clock: Clock, client: httpx.Client | None = None
                 ) -> None:
        if not urls:
            raise BadRequest("no replica URLs to publish to; set INFERENCE_URLS or configure discovery")
        self.settings = settings
        self.urls = [u.rstrip("/") for u in urls]
        self.clock = clock
        self.client = client or httpx.Client(timeout=10.0, headers=bearer_headers(settings.api_token))

    # ------------------------------------------------------------------ requests to every replica at once
    def _each(self, fn: Callable[[str], Any], urls: list[str] | None = None) -> dict[str, Any]:
        urls = self.urls if urls is None else urls
        if len(urls) <= 1:
            return {url: fn(url) for url in urls}
        with ThreadPoolExecutor(max_workers=min(16, len(urls)), thread_name_prefix="http-sync") as pool:
            return dict(zip(urls, pool.map(fn, urls), strict=True))

    def _status(self, url: str) -> dict[str, Any] | None:
        try:
            response = self.client.get(f"{url}/status", timeout=STATUS_TIMEOUT_S)
            body = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        """``GET /status`` of every URL (None where it did not answer)."""
        return self._each(self._status)

    def _post(self, url: str, path: str, body: dict[str, Any]) -> str | None:
        """POST and return None on 2xx, else why it failed."""
        try:
            response = self.client.post(f"{url}{path}", json=body)
        except httpx.HTTPError as exc:
            return f"{path} request failed: {exc}"
        return None if response.is_success else f"{path} refused: {error_text(response)}"

    def tell(self, path: str, body: dict[str, Any], urls: list[str] | None = None) -> dict[str, str | None]:
        """POST ``body`` to ``path`` on every URL at once; per URL None (done) or why it failed."""
        return self._each(lambda u: self._post(u, path, body), urls)

    def _check(self, model: str) -> None:
        """Ask one replica whether ``model`` exists and may be loaded, before any replica is asked to stage.

        BadRequest with the replica's reason when it says no (4xx); when none can answer, staging reports it.
        """
        for url in self.urls:
            try:
                response = self.client.post(f"{url}/admin/stage", json={"model": model, "version": 0,
                                                                        "check_only": True})
            except httpx.HTTPError:
                continue
            if response.is_success or response.status_code in (401, 403) or response.status_code >= 500:
                return  # accepted; or the replica cannot judge (auth is reported by the stage itself)
            raise BadRequest(f"{model!r} refused before staging ({url} checked it): {error_text(response)}")

    # ------------------------------------------------------------------ the two phases
    def publish(self, model: str, *, version: int | None = None, digest: str | None = None,
                policy: CommitPolicy | None = None, timeout_s: float | None = None,
                progress: ProgressFn | None = None, rollback: bool = False, activate_now: bool = False,
                decide: Callable[[PublishResult], str | None] | None = None) -> PublishResult:
        """Stage ``model`` as ``version`` (default: the next one) on every URL, then commit at one ``activate_at``.

        ``versions/N`` needs ``version`` (the trainer passes the one its store gave; replicas download its files
        from the trainer). ``activate_now`` flips at once: for replicas catching up, which are unready anyway.
        ``decide(result)`` is called once the outcome is known and before any replica is told: the trainer
        records the decision there first (so a crash never leaves replicas ahead of it); for a commit it may
        return a reason to abort instead.
        """
        ref = parse_ref(model)
        if ref.kind is RefKind.VERSION and version is None:
            raise BadRequest("versions/N lives in a store the replicas cannot see from here; publish it through "
                             "the trainer (POST /publish), or publish a repo id, builtin or directory")
        if ref.kind is not RefKind.VERSION and not activate_now:
            self._check(ref.raw)
        policy = policy or self.settings.commit_policy
        timeout_s = timeout_s or self.settings.stage_timeout_s
        started = self.clock.time()
        if version is None:
            statuses = self.statuses()
            version = 1 + max((version_of(s.get("serving_version")) or 0 for s in statuses.values() if s), default=0)
        if progress:
            progress("prepare", {"version": version, "replicas": len(self.urls)})
        body: dict[str, Any] = {"model": ref.raw, "version": version}
        if digest:
            body["digest"] = digest
        reports: dict[str, ReplicaReport] = {}
        for url, why in self.tell("/admin/stage", body).items():
            if why is not None:
                reports[url] = ReplicaReport(url, "failed", why)
        deadline = self.clock.time() + timeout_s
        names: dict[str, str] = {}
        while True:
            waiting = [u for u in self.urls if u not in reports]
            for url, status in self._each(self._status, waiting).items():
                if status and status.get("replica_id"):
                    names[url] = str(status["replica_id"])
                staged = _staged_of(status)
                if staged.get("version") == version and staged.get("state") == "staged":
                    reports[url] = ReplicaReport(url, "staged", None, staged.get("seconds"),
                                                 staged.get("weights_digest"))
                elif staged.get("version") == version and staged.get("state") == "failed":
                    reports[url] = ReplicaReport(url, "failed", staged.get("error"), staged.get("seconds"))
            failed = [r for r in reports.values() if r.outcome == "failed"]
            if progress:
                progress("staging", {"staged": len(reports) - len(failed), "failed": len(failed),
                                     "live": len(self.urls)})
            if len(reports) == len(self.urls) or (failed and policy is CommitPolicy.STRICT):
                break
            if self.clock.time() >= deadline:
                break
            self.clock.sleep(self.settings.poll_interval_s)
        late = ("did not stage before the deadline" if self.clock.time() >= deadline
                else "still staging when another replica failed")
        ordered = [reports.get(url) or ReplicaReport(url, "timeout", late) for url in self.urls]
        result = PublishResult(version, ref.raw, "aborted", started_at=started, replicas=ordered,
                               prepare_s=self.clock.time() - started, rollback=rollback)
        self._name(result, names)
        result.reason = commit_refusal(ordered, policy)
        if result.reason is None:
            margin = 0.0 if activate_now else max(self.settings.commit_margin_s, 0.2)
            result.outcome, result.activate_at = "committed", self.clock.time() + margin
        if decide is not None:
            veto = decide(result)
            if veto and result.outcome == "committed":
                result.outcome, result.activate_at, result.reason = "aborted", None, veto
                decide(result)
        if result.outcome == "aborted":
            self.tell("/admin/abort", {"version": version})
            log.warning("abort v%d: %s", version, result.reason)
        else:
            activate_at = result.activate_at
            assert activate_at is not None
            commit = {"version": version, "activate_at": activate_at}
            # Replicas that did not stage (quorum) are told as well: they go unready until they catch up.
            for url, why in self.tell("/admin/commit", commit).items():
                report = reports.get(url)
                if why is not None and report is not None and report.outcome == "staged":
                    report.outcome, report.error = "behind", f"commit failed: {why}"
            if progress:
                progress("commit", {"version": version, "activate_at": activate_at})
            self._wait_serving(result)
        result.total_s = self.clock.time() - started
        log.info("http publish %s", result.summary())
        return result

    def _wait_serving(self, result: PublishResult) -> None:
        """After a commit, note which replicas serve it and are ready; bounded by activate_at + a few seconds."""
        assert result.activate_at is not None
        until = result.activate_at + SERVING_GRACE_S
        by_url = dict(zip(self.urls, result.replicas, strict=True))
        while True:
            pending = [u for u, r in by_url.items() if r.outcome == "staged"]
            for url, status in self._each(self._status, pending).items():
                if status and status.get("serving_version") == result.version and status.get("ready"):
                    by_url[url].outcome = "serving"
            if not any(r.outcome == "staged" for r in result.replicas):
                return
            if self.clock.time() >= until:
                for report in result.replicas:
                    if report.outcome == "staged":
                        report.outcome = "behind"
                return
            self.clock.sleep(self.settings.poll_interval_s)

    def _name(self, result: PublishResult, names: dict[str, str]) -> None:
        """Report replicas by the id they give in /status (their URL when they never answered)."""
        for url, report in zip(self.urls, result.replicas, strict=True):
            report.replica_id = names.get(url, url)
