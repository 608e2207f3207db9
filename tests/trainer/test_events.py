"""The event bus: publish from any thread, every subscriber gets it, a reconnect replays what it missed."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncGenerator

import httpx
import pytest

from lockstep.trainer.server.events import Event, EventBus
from tests.support.cluster import Proc


async def next_event(stream: AsyncGenerator[Event | None, None]) -> Event:
    event = await stream.__anext__()
    assert event is not None  # keepalives come only after 15 s of quiet
    return event


def test_events_from_a_thread_reach_every_subscriber_and_replay_after_an_id() -> None:
    bus = EventBus()

    async def scenario() -> tuple[list[Event], list[Event], list[Event]]:
        first, second = bus.subscribe(), bus.subscribe()
        got_first = [asyncio.ensure_future(next_event(first))]
        got_second = [asyncio.ensure_future(next_event(second))]
        while bus.subscribers < 2:
            await asyncio.sleep(0.01)
        worker = threading.Thread(target=lambda: [bus.publish("run", {"n": i}) for i in range(3)])
        worker.start()
        worker.join()
        a = [await got_first[0]] + [await next_event(first) for _ in range(2)]
        b = [await got_second[0]] + [await next_event(second) for _ in range(2)]
        replay = bus.subscribe(last_event_id=a[0].id)
        c = [await next_event(replay) for _ in range(2)]
        for gen in (first, second, replay):
            await gen.aclose()
        return a, b, c

    a, b, c = asyncio.run(scenario())
    assert [e.data["n"] for e in a] == [e.data["n"] for e in b] == [0, 1, 2]
    assert [e.data["n"] for e in c] == [1, 2]
    assert bus.subscribers == 0


def test_an_event_is_one_server_sent_event() -> None:
    text = Event(7, "version", {"version": 3}, 1.0).sse().decode()
    lines = text.split("\n")
    assert lines[0] == "id: 7" and lines[1] == "event: version" and json.loads(lines[2][6:]) == {"version": 3}
    assert text.endswith("\n\n")


def test_a_stream_with_a_lifetime_ends_by_itself() -> None:
    bus = EventBus()

    async def scenario() -> list[Event | None]:
        return [e async for e in bus.subscribe(max_s=0.2)]

    assert asyncio.run(scenario()) == []
    assert bus.subscribers == 0


@pytest.mark.parametrize("raw", [b"\xb2", b"\xb9\xb3", b"-1", b"9" * 40, b"abc"])
def test_a_last_event_id_that_is_no_event_id_is_ignored(trainer: Proc, raw: bytes) -> None:
    # Over a real socket, as a browser or curl sends it: a header byte 0xB2 reaches the app as '²', a digit to
    # str.isdigit() but not to int(). The stream starts anyway, from now.
    with httpx.stream("GET", trainer.url + "/events", headers={"Last-Event-ID": raw}, timeout=30) as response:
        assert response.status_code == 200
        assert next(response.iter_lines()).startswith("retry:")
