"""The page's live feed: one poller for every open page, fanned out as server-sent events.

The UI server polls the trainer itself instead of relaying the trainer's own stream: a poll survives a trainer
restart without any reconnect logic, and while the trainer is down the fleet is still read from the replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from lockstep.ui.upstream import Upstream, UpstreamUnavailable

log = logging.getLogger(__name__)

SLOW_EVERY = 5  # ticks; history and versions are also refetched this often even when nothing seems to change
# ticks; after the fleet changed, history is refetched this many times: the trainer records a flip on its own
# once-a-second tick, so the first refetch may come before the flip is in /history
AFTER_CHANGE = 3
KEEPALIVE_S = 15.0  # seconds between comments on an idle stream, so proxies keep it open
QUEUE_SIZE = 32  # events per subscriber; a page that falls this far behind loses the oldest


@dataclass(frozen=True)
class Event:
    """One server-sent event: a name and a JSON body."""

    name: str
    data: Any

    def encode(self) -> bytes:
        return f"event: {self.name}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n".encode()


def _change_key(cluster: dict[str, Any]) -> str:
    """What, in a cluster snapshot, means the history or the versions may have changed."""
    replicas = sorted((str(r.get("replica_id")), r.get("serving_version"), r.get("staged_version"))
                      for r in cluster.get("replicas") or [] if isinstance(r, dict))
    return json.dumps([cluster.get("generation"), cluster.get("committed"), cluster.get("pending"), replicas],
                      sort_keys=True, default=str)


class Feed:
    """Polls the trainer every ``interval_s`` while at least one page listens; each page gets every change."""

    def __init__(self, upstream: Upstream, interval_s: float = 1.0) -> None:
        self.upstream = upstream
        self.interval_s = interval_s
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._latest: dict[str, Event] = {}  # the last event of each name, replayed to a new page
        self._task: asyncio.Task[None] | None = None
        self._tick = 0
        self._last_key: str | None = None
        self._refetches = 0  # slow refetches still due after the last change

    async def subscribe(self) -> AsyncGenerator[bytes, None]:
        """The event stream of one page: the latest state at once, then every change; keepalives when idle."""
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._subscribers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="ui-feed")
        try:
            yield b"retry: 2000\n\n"  # milliseconds before the browser reconnects after a drop
            for event in list(self._latest.values()):
                yield event.encode()
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                yield event.encode()
        finally:
            self._subscribers.discard(queue)

    @property
    def polling(self) -> bool:
        """Whether the poller runs (it does only while a page listens)."""
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _publish(self, event: Event, *, only_if_changed: bool) -> None:
        previous = self._latest.get(event.name)
        if only_if_changed and previous is not None and previous.data == event.data:
            return
        self._latest[event.name] = event
        for queue in list(self._subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    async def _run(self) -> None:
        while self._subscribers:
            try:
                await self.poll_once()
            except Exception:  # the feed must outlive any one bad answer
                log.exception("feed poll failed")
            await asyncio.sleep(self.interval_s)
        self._task = None

    async def poll_once(self) -> None:
        """One tick: the fleet always; runs and publishes when they changed; history and versions when due."""
        self._tick += 1
        cluster = await self.upstream.cluster()
        self._publish(Event("cluster", cluster), only_if_changed=False)
        if not cluster["trainer"]["reachable"]:
            return
        key = _change_key(cluster)
        if key != self._last_key:
            self._last_key, self._refetches = key, AFTER_CHANGE
        slow_due = self._refetches > 0 or self._tick % SLOW_EVERY == 0 or "history" not in self._latest
        names = ["runs", "publishes"] + (["history", "versions"] if slow_due else [])
        results = await asyncio.gather(*(self.upstream.trainer_json("/" + name) for name in names),
                                       return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, UpstreamUnavailable):
                log.info("feed: %s", result)
            elif isinstance(result, BaseException):
                raise result
            else:
                self._publish(Event(name, result), only_if_changed=True)
        if slow_due and not any(isinstance(r, BaseException) for r in results):
            self._refetches = max(0, self._refetches - 1)
