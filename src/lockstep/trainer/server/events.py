"""The live event stream: worker threads publish, each ``GET /events`` subscriber reads server-sent events."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

REPLAY = 256  # events kept for subscribers that reconnect with Last-Event-ID
QUEUE_MAX = 1024  # events buffered per subscriber; a consumer this far behind loses the oldest
KEEPALIVE_S = 15.0  # seconds between comment lines that keep proxies from closing an idle stream
# Seconds a stream stays open. uvicorn waits for open responses before it exits, and nothing tells a stream
# that the server is stopping, so streams end by themselves; EventSource reconnects (with Last-Event-ID).
STREAM_S = 15.0


@dataclass(frozen=True)
class Event:
    """One event: ``kind`` is cluster | run | publish | version."""

    id: int
    kind: str
    data: dict[str, Any]
    time: float

    def sse(self) -> bytes:
        body = json.dumps(self.data, separators=(",", ":"), default=str)
        return f"id: {self.id}\nevent: {self.kind}\ndata: {body}\n\n".encode()


class EventBus:
    """Thread-safe fan-out to asyncio subscribers."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._recent: deque[Event] = deque(maxlen=REPLAY)
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = set()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, data: dict[str, Any]) -> Event:
        """Send ``data`` to every subscriber; callable from any thread."""
        with self._lock:
            event = Event(next(self._ids), kind, data, time.time())
            self._recent.append(event)
            targets = list(self._subscribers)
        for loop, queue in targets:
            try:
                loop.call_soon_threadsafe(_put, queue, event)
            except RuntimeError:  # the subscriber's loop closed
                self._subscribers.discard((loop, queue))
        return event

    async def subscribe(self, last_event_id: int | None = None,
                        max_s: float | None = None) -> AsyncGenerator[Event | None, None]:
        """Events as they come (replaying those after ``last_event_id``); None every KEEPALIVE_S of quiet.

        With ``max_s`` the stream ends after that many seconds.
        """
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=QUEUE_MAX)
        entry = (asyncio.get_running_loop(), queue)
        with self._lock:
            backlog = [e for e in self._recent if last_event_id is not None and e.id > last_event_id]
            self._subscribers.add(entry)
        try:
            for event in backlog:
                yield event
            loop = asyncio.get_running_loop()
            end = loop.time() + max_s if max_s is not None else None
            while end is None or loop.time() < end:
                wait = KEEPALIVE_S if end is None else max(0.0, min(KEEPALIVE_S, end - loop.time()))
                try:
                    yield await asyncio.wait_for(queue.get(), timeout=wait)
                except TimeoutError:
                    if end is None or loop.time() < end:
                        yield None
        finally:
            with self._lock:
                self._subscribers.discard(entry)


def _put(queue: asyncio.Queue[Event], event: Event) -> None:
    if queue.full():
        queue.get_nowait()  # drop the oldest: a slow reader sees gaps in ids, not a stalled server
    queue.put_nowait(event)
