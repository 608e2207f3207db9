"""The live feed: one poller while pages listen, the latest state replayed to a new page, a lost trainer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from lockstep.core.settings import load_settings
from lockstep.ui.feed import Event, Feed
from lockstep.ui.upstream import Upstream
from tests.support.cluster import free_port

pytestmark = pytest.mark.anyio


def parse(chunk: bytes) -> tuple[str, Any]:
    """One encoded server-sent event back into (name, data)."""
    lines = chunk.decode().strip().split("\n")
    name = next(line[len("event: "):] for line in lines if line.startswith("event: "))
    data = json.loads("".join(line[len("data: "):] for line in lines if line.startswith("data: ")))
    return name, data


async def next_event(stream: AsyncIterator[bytes]) -> tuple[str, Any]:
    while True:
        chunk = await asyncio.wait_for(anext(stream), 10)
        if chunk.startswith(b"event:"):
            return parse(chunk)


@pytest.fixture
async def feed() -> AsyncIterator[Feed]:
    dead_trainer, dead_replica = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    async with httpx.AsyncClient() as client:
        upstream = Upstream(load_settings(trainer_url=dead_trainer, inference_urls=dead_replica), client)
        feed = Feed(upstream, interval_s=0.02)
        yield feed
        await feed.close()


def test_an_event_is_encoded_as_sse() -> None:
    assert Event("cluster", {"a": 1}).encode() == b'event: cluster\ndata: {"a":1}\n\n'


async def test_a_page_hears_that_the_trainer_is_unreachable(feed: Feed) -> None:
    stream = feed.subscribe()
    assert (await anext(stream)).startswith(b"retry: ")
    name, cluster = await next_event(stream)
    assert name == "cluster"
    assert cluster["trainer"]["reachable"] is False and "unreachable" in cluster["trainer"]["error"]
    assert cluster["source"] == "replicas"
    assert [r["state"] for r in cluster["replicas"]] == ["unreachable"]
    name, _ = await next_event(stream)
    assert name == "cluster", "the fleet keeps coming every tick while the trainer is down"
    await stream.aclose()


async def test_a_new_page_gets_the_latest_state_at_once(feed: Feed) -> None:
    first = feed.subscribe()
    await next_event(first)
    second = feed.subscribe()
    assert (await anext(second)).startswith(b"retry: ")
    name, cluster = parse(await asyncio.wait_for(anext(second), 1))
    assert name == "cluster" and cluster["trainer"]["reachable"] is False
    await first.aclose()
    await second.aclose()


async def test_polling_stops_when_the_last_page_leaves(feed: Feed) -> None:
    assert not feed.polling
    stream = feed.subscribe()
    await next_event(stream)
    assert feed.polling
    await stream.aclose()
    for _ in range(500):  # bounded: the poller notices within one tick
        if not feed.polling:
            break
        await asyncio.sleep(0.01)
    assert not feed.polling
