"""The event bus: publish from any thread, every subscriber gets it, a reconnect replays what it missed."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncGenerator

from lockstep.trainer.server.events import Event, EventBus


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
