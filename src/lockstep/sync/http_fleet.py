"""Replicas driven over HTTP, for clusters without a shared volume (docs/protocol.md §5).

A decision is a POST to each replica: ``/admin/stage`` (prepare), ``/admin/commit`` (with one ``activate_at``
for all) and ``/admin/abort``. What a replica reports is its ``GET /status``, read as the heartbeat it would
have written to a shared folder; ``generation_seen`` is the generation of the last decision it accepted.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx

from lockstep.core.clock import Clock
from lockstep.core.errors import BadRequest
from lockstep.core.http import bearer_headers
from lockstep.core.settings import Settings
from lockstep.sync.distribution import HOLDER_PEERS, chain_peers
from lockstep.sync.protocol import Heartbeat, Pending, Phase, ReplicaStatus, Split

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 3.0  # seconds per GET /status: an unreachable replica must not stall the others
ADMIN_TIMEOUT_S = 10.0  # seconds for a whole answer to /admin/stage, /admin/commit... (they answer at once)
MAX_ANSWER_BYTES = 1 << 20  # a replica's answer is a few KB; past this it is no replica's answer
OFFSET_READINGS = 8  # recent GET /status readings kept per replica to measure its clock by
OFFSET_LOG_STEP_S = 0.05  # a replica's clock correction is logged when it moves by more than this
T = TypeVar("T")


def beat_from_status(url: str, status: dict[str, Any], now: float, generation_seen: int | None,
                     clock_offset: float = 0.0) -> ReplicaStatus:
    """A replica's ``GET /status`` with where and when it was read, and the last decision it accepted.

    ``clock_offset``: how far the replica's clock is ahead of the reader's; the times it reports (when it began
    serving, started, put a rollout step in force) are moved onto the reader's clock.

    ``ValueError`` (pydantic's) when a field does not fit the shape: such a replica is not counted as live.
    """
    beat = ReplicaStatus.model_validate({"replica_id": url, **status, "url": url, "time": now,
                                         "generation_seen": generation_seen})
    if not clock_offset:
        return beat

    def moved(t: float | None) -> float | None:
        return None if t is None else t - clock_offset

    serving = beat.serving and beat.serving.model_copy(update={"since": moved(beat.serving.since)})
    splits = [s.model_copy(update={"at": s.at - clock_offset}) for s in beat.splits]
    return beat.model_copy(update={"serving": serving, "splits": splits, "started_at": moved(beat.started_at),
                                   "commit_poll_until": moved(beat.commit_poll_until)})


class ClockOffsets:
    """How far each replica's clock is ahead of this one, measured from the ``time`` in its ``GET /status``.

    A reading sent at t0 and answered at t1, with the replica's time T, puts the replica's clock T − (t0 + t1)/2
    ahead, give or take (t1 − t0)/2 (NTP's estimate); of a replica's recent readings the least delayed is the
    tightest. The offset used is the one nearest zero that this reading allows, so a replica whose clock agrees
    with this one within what can be measured is left alone: a slow answer never adds skew where there was none.
    """

    def __init__(self, keep: int = OFFSET_READINGS) -> None:
        self._keep = keep
        self._readings: dict[str, deque[tuple[float, float]]] = {}  # url → (delay, offset) of recent readings
        self._started: dict[str, object] = {}  # url → the replica's started_at: another process, another clock
        self._logged: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe(self, url: str, sent: float, answered: float, status: dict[str, Any]) -> None:
        """Record one ``GET /status`` answer, sent at ``sent`` and answered at ``answered`` (this clock)."""
        replica_time = status.get("time")
        if isinstance(replica_time, bool) or not isinstance(replica_time, int | float) \
                or not math.isfinite(replica_time) or answered < sent:
            return  # no time to measure by (or this clock stepped back meanwhile): the reading says nothing
        with self._lock:
            if self._started.get(url) != status.get("started_at"):
                self._readings.pop(url, None)  # a restarted replica may run on another node's clock
                self._started[url] = status.get("started_at")
            readings = self._readings.setdefault(url, deque(maxlen=self._keep))
            readings.append((answered - sent, replica_time - (sent + answered) / 2))
        offset = self.of(url)
        if abs(offset - self._logged.get(url, 0.0)) > OFFSET_LOG_STEP_S:
            self._logged[url] = offset
            log.warning("the clock of %s is %.3f s %s this one's (± %.3f s): its commits are scheduled on its "
                        "own clock; keep the nodes on NTP", url, abs(offset), "ahead of" if offset > 0 else "behind",
                        self.error_s(url))

    def of(self, url: str) -> float:
        """Seconds the clock at ``url`` is ahead of this one (negative: behind); 0 when none can be measured."""
        delay, offset = self._best(url)
        return math.copysign(max(0.0, abs(offset) - delay / 2), offset)

    def error_s(self, url: str) -> float:
        """How far ``of(url)`` may be from the truth: the round trip of the reading it comes from (inf: none)."""
        return self._best(url)[0]

    def _best(self, url: str) -> tuple[float, float]:
        with self._lock:
            readings = self._readings.get(url)
            return min(readings) if readings else (math.inf, 0.0)


class UnboundedAnswer(httpx.HTTPError):
    """An answer that did not arrive whole within its time, or was larger than any replica's: no answer."""


def bounded_request(client: httpx.Client, method: str, url: str, timeout_s: float, clock: Clock,
                    **kwargs: Any) -> httpx.Response:
    """One request to a replica whose whole answer arrives within ``timeout_s`` and ``MAX_ANSWER_BYTES``.

    httpx's timeout bounds each read, so an answer dripping a byte a second would hold the coordinator, and its
    deadlines, for as long as the sender likes; and it would read an answer of any size into memory.
    """
    deadline = clock.monotonic() + timeout_s
    with client.stream(method, url, timeout=timeout_s, **kwargs) as response:
        body = bytearray()
        for part in response.iter_bytes():
            body += part
            if len(body) > MAX_ANSWER_BYTES:
                raise UnboundedAnswer(f"{url} answered more than {MAX_ANSWER_BYTES} bytes")
            if clock.monotonic() > deadline:
                raise UnboundedAnswer(f"{url} did not answer whole within {timeout_s:g} s")
    return httpx.Response(response.status_code, headers=response.headers, content=bytes(body),
                          request=response.request)


def error_text(response: httpx.Response) -> str:
    """The message of a Lockstep error body, else the start of the body."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


class HttpFleet:
    """The replicas at ``urls()`` (static, or what discovery finds each time)."""

    pushes = True
    replicas_verify = True  # they download versions/N and hash every file against its MANIFEST

    def __init__(self, settings: Settings, urls: Callable[[], list[str]], *, clock: Clock,
                 client: httpx.Client | None = None) -> None:
        self.settings = settings
        self.urls = urls
        self.clock = clock
        self.client = client or httpx.Client(timeout=10.0, headers=bearer_headers(settings.api_token))
        self._seen: dict[str, int] = {}  # url → generation of the last decision it accepted
        self._process: dict[str, object] = {}  # url → its started_at: a restarted replica has seen nothing
        self._round_trip: dict[str, float] = {}  # url → seconds of its slowest recent answer
        self._last_live: list[Heartbeat] = []  # the last reading: who holds which version, for peer lists
        # Each replica flips at its own clock's activate_at: what it is told is moved onto its clock.
        self.clock_offsets = ClockOffsets()
        # The bytes a version adds to the one before (its MANIFEST's new_bytes), when the caller can say.
        self.new_bytes: Callable[[int], int | None] = lambda version: None

    def close(self) -> None:
        self.client.close()

    def _each(self, fn: Callable[[str], T], urls: list[str]) -> dict[str, T]:
        if len(urls) <= 1:
            return {url: fn(url) for url in urls}
        with ThreadPoolExecutor(max_workers=min(16, len(urls)), thread_name_prefix="http-fleet") as pool:
            return dict(zip(urls, pool.map(fn, urls), strict=True))

    def _timed(self, url: str, send: Callable[[], httpx.Response]) -> httpx.Response:
        began = self.clock.monotonic()
        response = send()
        self._round_trip[url] = self.clock.monotonic() - began
        return response

    def _request(self, method: str, url: str, timeout_s: float, **kwargs: Any) -> httpx.Response:
        return bounded_request(self.client, method, url, timeout_s, self.clock, **kwargs)

    def _status(self, url: str) -> dict[str, Any] | None:
        sent = self.clock.time()
        try:
            response = self._timed(url, lambda: self._request("GET", f"{url}/status", STATUS_TIMEOUT_S))
            answered = self.clock.time()
            body = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(body, dict):
            return None
        self.clock_offsets.observe(url, sent, answered, body)
        return body

    def live(self) -> list[Heartbeat]:
        """Replicas that answer ``GET /status`` at the URLs."""
        urls = [u.rstrip("/") for u in self.urls()]
        now = self.clock.time()
        beats: list[Heartbeat] = []
        for url, status in self._each(self._status, urls).items():
            if status is None:
                continue
            if self._process.setdefault(url, status.get("started_at")) != status.get("started_at"):
                self._process[url] = status.get("started_at")
                self._seen.pop(url, None)  # another process answers there now: what it was told went with the old
            try:
                beats.append(beat_from_status(url, status, now, self._seen.get(url), self.clock_offsets.of(url)))
            except ValueError as exc:  # a /status we cannot read: not counted as live
                log.warning("ignoring the GET /status answer of %s: %s", url, exc)
        self._last_live = beats
        return beats

    def deliver(self, decision: Pending, generation: int, to: list[Heartbeat] | None = None) -> dict[str, str]:
        targets = {b.url: b.replica_id for b in (self.live() if to is None else to) if b.url}
        if decision.phase is Phase.PREPARE:
            path, body = "/admin/stage", {"model": decision.model, "version": decision.version}
            if decision.digest:
                body["digest"] = decision.digest
            if decision.rollout:
                body["rollout"] = decision.rollout
            holders = [b.url for b in self._last_live if b.url and b.ready and b.url not in targets
                       and b.serving is not None and b.serving.version == decision.version]
            peers = chain_peers(list(targets), holders, new_bytes=self.new_bytes(decision.version),
                                seed=decision.version)
            return self._post_each(path, body, generation, targets, extra=lambda url: {"peers": peers[url]})
        elif decision.phase is Phase.COMMIT:
            path, body = "/admin/commit", {"version": decision.version}
            return self._post_each(path, body, generation, targets, extra=self._moment(decision.activate_at))
        else:
            path, body = "/admin/abort", {"version": decision.version}

        return self._post_each(path, body, generation, targets)

    def _moment(self, activate_at: float | None) -> Callable[[str], dict[str, Any]] | None:
        """The body field that tells each replica ``activate_at`` on its own clock (None: none to tell)."""
        if activate_at is None:
            return None
        return lambda url: {"activate_at": activate_at + self.clock_offsets.of(url)}

    def holders(self, version: int, limit: int = HOLDER_PEERS) -> list[str]:
        """URLs of replicas that were ready serving ``version`` at the last reading, a few picked at random."""
        urls = [b.url for b in self._last_live if b.url and b.ready and b.serving is not None
                and b.serving.version == version]
        return random.sample(urls, min(limit, len(urls)))

    def _post_each(self, path: str, body: dict[str, Any], generation: int, targets: dict[str, str],
                   extra: Callable[[str], dict[str, Any]] | None = None) -> dict[str, str]:
        def post(url: str) -> str | None:
            sent = body if extra is None else {**body, **extra(url)}
            try:
                response = self._timed(url, lambda: self._request("POST", f"{url}{path}", ADMIN_TIMEOUT_S, json=sent))
            except httpx.HTTPError as exc:
                return f"{path} request failed: {exc}"
            if not response.is_success:
                return f"{path} refused: {error_text(response)}"
            self._seen[url] = generation
            return None

        outcomes = self._each(post, list(targets))
        return {targets[url]: why for url, why in outcomes.items() if why is not None}

    def deliver_split(self, split: Split, model: str, generation: int, to: list[Heartbeat]) -> dict[str, str]:
        body = {**split.model_dump(mode="json"), "model": model}
        return self._post_each("/admin/split", body, generation, {b.url: b.replica_id for b in to if b.url},
                               extra=self._moment(split.activate_at))

    def session_pins(self, rollout: str, step: int, to: list[Heartbeat], until: float
                     ) -> tuple[dict[str, list[str]], dict[str, str]]:
        """``GET /admin/split/sessions`` of each replica (it answers once the step is in force there)."""
        targets = {b.url: b.replica_id for b in to if b.url}

        def ask(url: str) -> list[str] | str:
            wait = max(0.5, until - self.clock.monotonic())
            try:
                response = self._request("GET", f"{url}/admin/split/sessions", wait + 5.0,
                                         params={"rollout": rollout, "step": step})
                if not response.is_success:
                    return f"GET /admin/split/sessions refused: {error_text(response)}"
                pins = response.json().get("pins")
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                return f"GET /admin/split/sessions failed: {exc}"
            if not isinstance(pins, list) or not all(isinstance(p, str) for p in pins):
                return "GET /admin/split/sessions answered no list of pins"
            return pins

        outcomes = self._each(ask, list(targets))
        found = {targets[u]: v for u, v in outcomes.items() if isinstance(v, list)}
        return found, {targets[u]: v for u, v in outcomes.items() if isinstance(v, str)}

    def reach_s(self, staged: list[Heartbeat], slack_s: float) -> float:
        """A POST reaches a replica within its slowest recent round trip (the poll interval if none was timed)."""
        return max((self._round_trip.get(b.url or "", self.settings.poll_interval_s) for b in staged), default=0.0)

    def check(self, model: str) -> None:
        """Ask one replica whether it may load ``model``; ``BadRequest`` with its reason when it says no."""
        for url in self.urls():
            try:
                response = self._request("POST", f"{url.rstrip('/')}/admin/stage", ADMIN_TIMEOUT_S,
                                         json={"model": model, "version": 0, "check_only": True})
            except httpx.HTTPError:
                continue
            if response.is_success or response.status_code in (401, 403) or response.status_code >= 500:
                return  # accepted; or the replica cannot judge (auth is reported by the stage itself)
            raise BadRequest(f"{model!r} refused before staging ({url} checked it): {error_text(response)}")

    def describe(self) -> str:
        urls = self.urls()
        return f"the replica URLs {', '.join(urls)}" if urls else "the replica URLs (discovery found none)"
