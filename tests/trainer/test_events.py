"""The event bus: publish from any thread, every subscriber gets it, a reconnect replays what it missed."""

from __future__ import annotations

import asyncio
import json
import threading

from lockstep.trainer.events import Event, EventBus


def test_events_from_a_thread_reach_every_subscriber_and_replay_after_an_id() -> None:
    bus = EventBus()

    async def scenario() -> tuple[list[Event], list[Event], list[Event]]:
        first, second = bus.subscribe(), bus.subscribe()
        got_first = [asyncio.ensure_future(first.__anext__())]
        got_second = [asyncio.ensure_future(second.__anext__())]
        while bus.subscribers < 2:
            await asyncio.sleep(0.01)
        worker = threading.Thread(target=lambda: [bus.publish("run", {"n": i}) for i in range(3)])
        worker.start()
        worker.join()
        a = [await got_first[0]] + [await first.__anext__() for _ in range(2)]
        b = [await got_second[0]] + [await second.__anext__() for _ in range(2)]
        replay = bus.subscribe(last_event_id=a[0].id)
        c = [await replay.__anext__() for _ in range(2)]
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
