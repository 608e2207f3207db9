"""The trainer and the replicas as the UI server sees them: one HTTP client, the token, plain-word errors."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any
from urllib.parse import quote

import httpx

from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import LockstepError
from lockstep.core.http import bearer_headers
from lockstep.core.settings import Settings

log = logging.getLogger(__name__)

# seconds; the trainer answers reads from memory, so a slow answer means it is stuck or gone
TRAINER_TIMEOUT = httpx.Timeout(10.0, connect=2.0)
# seconds; starting a run or a publish checks its model reference first (reads the store, maybe the hub cache)
MUTATE_TIMEOUT = httpx.Timeout(60.0, connect=2.0)
# seconds; a replica's /status is cheap, and a fleet view must not stall on one dead replica
STATUS_TIMEOUT = httpx.Timeout(2.0, connect=1.0)


class UpstreamUnavailable(LockstepError):
    """The trainer or a replica could not be reached, or answered with something that is not JSON."""

    status_code = 502
    code = "upstream_unavailable"


def describe(exc: Exception) -> str:
    """Plain words for a transport failure (what failed, not a traceback)."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "the connection timed out"
    if isinstance(exc, httpx.TimeoutException):
        return "it did not answer in time"
    if isinstance(exc, httpx.ConnectError):
        return "the connection was refused or the host is unknown"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "it closed the connection"
    if isinstance(exc, httpx.LocalProtocolError):  # its text quotes the header it refused: the token, maybe
        return "the request could not be sent (a header value is invalid)"
    return str(exc) or type(exc).__name__


def error_message(body: Any, fallback: str) -> str:
    """The message of an OpenAI-shaped error body, or ``fallback``."""
    if isinstance(body, dict):
        err = body.get("error")
        message = err.get("message") if isinstance(err, dict) else body.get("detail")
        if isinstance(message, str):
            return message
    return fallback


class Upstream:
    """Calls to the trainer and to replicas; the token is added here and never reaches the page."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.client = client
        self.clock = clock
        self.trainer_url = settings.trainer_url.rstrip("/")
        self._known_replicas: dict[str, str] = {}  # url → replica_id, from the trainer's last /cluster
        self._last: tuple[float, dict[str, Any]] | None = None  # (monotonic s, the last fleet snapshot)

    def auth_headers(self) -> dict[str, str]:
        return bearer_headers(self.settings.api_token)

    # ------------------------------------------------------------------ trainer
    async def trainer(self, method: str, path: str, json: Any = None) -> httpx.Response:
        """One call to the trainer; ``path`` is built by the UI server from validated parts only."""
        url = self.trainer_url + path
        try:
            return await self.client.request(method, url, json=json, headers=self.auth_headers(),
                                             timeout=TRAINER_TIMEOUT if method == "GET" else MUTATE_TIMEOUT)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"the trainer at {self.trainer_url} is unreachable: {describe(exc)}. "
                "Check that `lockstep trainer` is running and TRAINER_URL points at it.") from exc

    async def trainer_json(self, path: str) -> Any:
        """GET a trainer resource as JSON; a non-2xx answer raises with the trainer's own message."""
        response = await self.trainer("GET", path)
        body = parse_json(response)
        if response.status_code >= 400:
            raise UpstreamUnavailable(f"the trainer answered {path} with {response.status_code}: "
                                      f"{error_message(body, response.text[:200])}")
        return body

    # ------------------------------------------------------------------ replicas
    def allowed_replicas(self) -> dict[str, str]:
        """Replica URL → id that the UI may call: the trainer's last /cluster, plus INFERENCE_URLS."""
        known = dict(self._known_replicas)
        for url in self.settings.inference_url_list:
            known.setdefault(url, url)
        return known

    def remember(self, cluster: dict[str, Any]) -> None:
        urls = {}
        for replica in cluster.get("replicas") or []:
            url = replica.get("url") if isinstance(replica, dict) else None
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                urls[url.rstrip("/")] = str(replica.get("replica_id") or url)
        self._known_replicas = urls

    async def replica_status(self, url: str, replica_id: str) -> dict[str, Any]:
        """A replica's /status in the trainer's /cluster shape; an unreachable one says so."""
        try:
            response = await self.client.get(url + "/status", timeout=STATUS_TIMEOUT)
            status = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            why = describe(exc) if isinstance(exc, httpx.HTTPError) else "its /status is not JSON"
            return {"replica_id": replica_id, "url": url, "state": "unreachable", "ready": False,
                    "serving_version": None, "staged_version": None, "staged_state": None,
                    "last_error": f"unreachable: {why}",
                    "queue_depth": None, "running": None, "tokens_per_s": None, "reachable": False}
        staged = status.get("staged") or {}
        return {"replica_id": status.get("replica_id") or replica_id, "url": url,
                "state": status.get("state"), "ready": bool(status.get("ready")),
                "serving_version": status.get("serving_version"),
                "staged_version": staged.get("version"), "staged_state": staged.get("state"),
                "last_error": status.get("last_error"), "queue_depth": status.get("queue_depth"),
                "running": status.get("running"), "tokens_per_s": status.get("tokens_per_s"),
                "committed_version": status.get("committed_version"), "reachable": True}

    # ------------------------------------------------------------------ the fleet
    async def cluster(self, max_age_s: float = 0.0) -> dict[str, Any]:
        """The trainer's /cluster; when the trainer is down, the replicas it last listed, asked directly.

        ``max_age_s``: a snapshot taken this recently (by the feed, every second) is good enough.
        """
        if self._last is not None and self.clock.monotonic() - self._last[0] <= max_age_s:
            return self._last[1]
        try:
            cluster = await self.trainer_json("/cluster")
            if not isinstance(cluster, dict):
                raise UpstreamUnavailable("the trainer's /cluster answer is not a JSON object")
        except UpstreamUnavailable as exc:
            snapshot = await self._cluster_from_replicas(str(exc))
        else:
            self.remember(cluster)
            trainer = {"url": self.trainer_url, "reachable": True}
            snapshot = {**cluster, "source": "trainer", "trainer": trainer}
        self._last = (self.clock.monotonic(), snapshot)
        return snapshot

    async def _cluster_from_replicas(self, trainer_error: str) -> dict[str, Any]:
        known = self.allowed_replicas()
        replicas = list(await asyncio.gather(*(self.replica_status(url, rid) for url, rid in known.items())))
        committed = Counter(r["committed_version"] for r in replicas
                            if r.get("committed_version") is not None)
        version = committed.most_common(1)[0][0] if committed else None
        at_version = sum(1 for r in replicas if r["ready"] and r["serving_version"] == version)
        trainer = {"url": self.trainer_url, "reachable": False, "error": trainer_error}
        return {"source": "replicas", "trainer": trainer,
                "committed": {"version": version} if version is not None else None, "pending": None,
                "generation": None, "replicas": replicas,
                "convergence": {"version": version, "at_version": at_version, "total": len(replicas)}}


def parse_json(response: httpx.Response) -> Any:
    """The body as JSON, or a plain-words error when it is not JSON."""
    try:
        return response.json()
    except ValueError as exc:
        raise UpstreamUnavailable(f"{response.request.url} answered {response.status_code} with something "
                                  "that is not JSON") from exc


def segment(value: str) -> str:
    """One URL path segment, percent-encoded (ids are validated before; this keeps '/' out regardless)."""
    return quote(value, safe="")
