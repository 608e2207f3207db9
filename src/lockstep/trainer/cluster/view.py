"""The cluster view: committed and pending versions, and every replica from heartbeats and from discovery.

Its URLs are the ones the trainer probes and sends rollouts to, and the UI calls with the token; so a URL a
heartbeat names is kept only when discovery's ``UrlTrust`` vouches for its host (``url_ignored`` says why
not), and a replica's ``/status`` fills the view only with values of the right type.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.settings import Settings
from lockstep.sync.http_fleet import beat_from_status, bounded_request
from lockstep.sync.protocol import MAX_NAME_CHARS, Heartbeat, SyncState
from lockstep.sync.shared_files import read_heartbeats
from lockstep.sync.tolerant import ProblemLog
from lockstep.trainer.cluster.discovery import Discovery, DiscoveryResult, UrlTrust, normalize_url, url_trust

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0  # seconds per GET /status; the view renders every second
DISCOVERY_TTL_S = 5.0  # seconds a discovery result is reused (the Kubernetes API is not polled every second)
GONE_AFTER_TTLS = 12  # a heartbeat this many TTLs old is left out (the replica is long gone)


@dataclass
class ReplicaView:
    """One replica as the UI shows it (docs/api.md, ``GET /cluster``)."""

    replica_id: str
    url: str | None = None
    state: str = "unknown"
    ready: bool = False
    serving_version: int | None = None
    serving_since: float | None = None
    model: str | None = None
    staged_version: int | None = None
    staged_state: str | None = None
    last_error: str | None = None
    queue_depth: int = 0
    running: int = 0
    tokens_per_s: float = 0.0
    heartbeat_age_s: float | None = None
    in_heartbeats: bool = False
    in_discovery: bool = False
    reachable: bool | None = None  # None: not probed
    pod_ready: bool | None = None  # the Kubernetes Ready condition, when discovery asked the API
    url_ignored: str | None = None  # why the URL its heartbeat names is not used (no discovery vouches for it)
    transfer: dict[str, Any] | None = None  # the last version assembled from chunks: progress, bytes by source

    @property
    def live(self) -> bool:
        """Counted in convergence: a fresh heartbeat, or (without one) it answered the probe."""
        return self.in_heartbeats or bool(self.reachable)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "live": self.live}


@dataclass
class ClusterSnapshot:
    """The whole ``GET /cluster`` body."""

    committed: dict[str, Any] | None
    pending: dict[str, Any] | None
    generation: int
    replicas: list[ReplicaView] = field(default_factory=list)
    discovery: DiscoveryResult | None = None
    time: float = 0.0

    @property
    def committed_version(self) -> int:
        return int(self.committed["version"]) if self.committed else 0

    def convergence(self) -> dict[str, int]:
        live = [r for r in self.replicas if r.live]
        at = [r for r in live if r.ready and r.serving_version == self.committed_version]
        return {"version": self.committed_version, "at_version": len(at), "total": len(live)}

    def ready_urls(self) -> list[str]:
        """URLs of live, ready replicas (where rollouts and probes go)."""
        return [r.url for r in self.replicas if r.url and r.live and r.ready and r.reachable is not False]

    def as_dict(self) -> dict[str, Any]:
        disc = self.discovery.as_dict() if self.discovery else {"mode": None, "urls": [], "error": None}
        return {"committed": self.committed, "pending": self.pending, "generation": self.generation,
                "replicas": [r.as_dict() for r in self.replicas], "convergence": self.convergence(),
                "discovery": disc, "time": self.time}


def _from_heartbeat(beat: Heartbeat, now: float, ttl_s: float) -> ReplicaView:
    fresh = now - beat.time <= ttl_s
    return ReplicaView(
        replica_id=beat.replica_id, url=beat.url, state=beat.state.value if fresh else "gone",
        ready=beat.ready and fresh, serving_version=beat.serving.version if beat.serving else None,
        serving_since=beat.serving.since if beat.serving else None,
        model=beat.serving.model if beat.serving else None,
        staged_version=beat.staged.version if beat.staged else None,
        staged_state=beat.staged.state.value if beat.staged else None, last_error=beat.last_error,
        queue_depth=beat.queue_depth, running=beat.running, tokens_per_s=round(beat.tokens_per_s, 2),
        heartbeat_age_s=round(now - beat.time, 3), in_heartbeats=fresh,
        transfer=beat.transfer.model_dump(mode="json") if beat.transfer else None)


def _count(value: Any) -> int | None:
    """A non-negative integer from a replica's answer, else None (a bool, a string, NaN or a huge number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or not 0 <= value <= 2**53 or value != int(value):
        return None
    return int(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _text(value: Any, limit: int = 4096) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _fill_from_status(view: ReplicaView, status: dict[str, Any], now: float | None = None) -> None:
    """Details of a replica that has no heartbeat, from its own ``GET /status``.

    Read as the ``ReplicaStatus`` it is; one that does not fit that shape (an older or a foreign server) is read
    field by field, and values of another type stay unknown.
    """
    if now is not None and view.url:
        try:
            report = beat_from_status(view.url, status, now, None)
        except ValueError:
            pass
        else:
            fresh = _from_heartbeat(report, now, ttl_s=float("inf"))
            view.replica_id, view.state, view.ready = fresh.replica_id, fresh.state, fresh.ready
            view.serving_version, view.serving_since, view.model = (fresh.serving_version, fresh.serving_since,
                                                                    fresh.model)
            view.staged_version, view.staged_state, view.last_error = (fresh.staged_version, fresh.staged_state,
                                                                       fresh.last_error)
            view.queue_depth, view.running, view.tokens_per_s = fresh.queue_depth, fresh.running, fresh.tokens_per_s
            view.transfer = fresh.transfer
            return
    staged = status.get("staged") if isinstance(status.get("staged"), dict) else {}
    view.replica_id = _text(status.get("replica_id"), MAX_NAME_CHARS) or view.replica_id
    view.state = _text(status.get("state"), 32) or view.state
    view.ready = status.get("ready") is True
    view.serving_version = _count(status.get("serving_version"))
    view.serving_since = _number(status.get("serving_since"))
    view.model = _text(status.get("model"))
    view.staged_version = _count(staged.get("version"))
    view.staged_state = _text(staged.get("state"), 32)
    view.last_error = _text(status.get("last_error"))
    view.queue_depth = _count(status.get("queue_depth")) or 0
    view.running = _count(status.get("running")) or 0
    view.tokens_per_s = max(0.0, _number(status.get("tokens_per_s")) or 0.0)


class ClusterView:
    """Builds snapshots from ``sync_state.json``, heartbeats, discovery and (optionally) probes."""

    def __init__(self, settings: Settings, *, discovery: Discovery, read_state: Any | None = None,
                 clock: Clock = SYSTEM_CLOCK, headers: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.discovery = discovery
        self.read_state = read_state  # () -> SyncState; None without a shared folder
        self.clock = clock
        self._client = httpx.Client(timeout=PROBE_TIMEOUT_S, headers=headers or {})
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        self._lock = threading.Lock()
        self._cached: tuple[float, DiscoveryResult] | None = None
        self._problems = ProblemLog(log, clock=clock)  # each ignored heartbeat or URL once a minute

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    @property
    def uses_heartbeats(self) -> bool:
        """Replicas write heartbeats only to a shared folder; without one, what they say is probed over HTTP."""
        return self.settings.shared_dir is not None

    def discovered_urls(self) -> list[str]:
        """Replica URLs from discovery (a result is reused for a few seconds)."""
        return self._discover().urls

    def _discover(self) -> DiscoveryResult:
        with self._lock:
            now = self.clock.monotonic()
            if self._cached is None or now - self._cached[0] > DISCOVERY_TTL_S:
                self._cached = (now, self.discovery.discover())
            return self._cached[1]

    def _probe(self, url: str) -> dict[str, Any] | None:
        try:
            response = bounded_request(self._client, "GET", url.rstrip("/") + "/status", PROBE_TIMEOUT_S, self.clock)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        try:
            body = response.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def snapshot(self, *, probe: bool = True, discover: bool = True) -> ClusterSnapshot:
        """What the cluster looks like now; ``probe`` asks every replica for ``/status`` (concurrently).

        Without a shared folder there are no heartbeats: discovery and probes are the only view, so both happen.
        """
        if not self.uses_heartbeats:
            probe = discover = True
        state = SyncState(generation=0)
        if self.read_state is not None:
            try:
                state = self.read_state()
            except Exception as exc:  # an unreadable folder must not break the view
                log.warning("cannot read sync_state: %s", exc)
        now = self.clock.time()
        ttl = self.settings.heartbeat_ttl_s
        views: list[ReplicaView] = []
        found = self._discover()  # also when not shown: it says which heartbeat URLs may be called
        result = found if discover else None
        if self.settings.shared_dir is not None:
            trust = found.trust or url_trust(self.settings, found.endpoints)
            for beat in read_heartbeats(self.settings.shared_dir, now, self.settings.clock_skew_s, self._problems):
                if now - beat.time <= max(60.0, GONE_AFTER_TTLS * ttl):
                    views.append(self._trusted(_from_heartbeat(beat, now, ttl), trust))
        endpoints = result.endpoints if result else []
        # A name shared by several endpoints (DNS gives every address the headless Service's name) says
        # nothing about which replica it is: such endpoints are matched and named by URL only.
        counts = Counter(e.name for e in endpoints if e.name)
        for endpoint in endpoints:
            name = endpoint.name if endpoint.name and counts[endpoint.name] == 1 else None
            match = self._match(views, endpoint.url, name)
            if match is None:
                match = ReplicaView(replica_id=name or endpoint.url or endpoint.name or "?", url=endpoint.url)
                views.append(match)
            match.in_discovery = True
            match.pod_ready = endpoint.ready
            if match.url is None and endpoint.url:  # its heartbeat's URL was ignored: discovery's is vouched for
                match.url = endpoint.url
        if probe:
            targets = [v for v in views if v.url and (v.in_heartbeats or v.in_discovery)]
            answers = list(self._pool.map(self._probe, [v.url for v in targets]))
            for view, status in zip(targets, answers, strict=True):
                view.reachable = status is not None
                if status is not None and not view.in_heartbeats:
                    _fill_from_status(view, status, now)
        views.sort(key=lambda v: (v.replica_id, v.url or ""))
        return ClusterSnapshot(
            committed=state.committed.model_dump(mode="json") if state.committed else None,
            pending=state.pending.model_dump(mode="json") if state.pending else None,
            generation=state.generation, replicas=views, discovery=result, time=now)

    def _trusted(self, view: ReplicaView, trust: UrlTrust) -> ReplicaView:
        """The view without its heartbeat's URL unless discovery vouches for it (logged once a minute)."""
        if view.url is not None and (why := trust.problem(view.url)) is not None:
            self._problems.report(view.replica_id, f"heartbeat of {view.replica_id!r}: not calling "
                                  f"{view.url[:200]}: {why}")
            view.url, view.url_ignored = None, why
        return view

    @staticmethod
    def _match(views: list[ReplicaView], url: str | None, name: str | None) -> ReplicaView | None:
        wanted = normalize_url(url) if url else None
        for view in views:
            if wanted and view.url and normalize_url(view.url) == wanted:
                return view
        for view in views:
            if name and view.replica_id == name:
                return view
        return None
