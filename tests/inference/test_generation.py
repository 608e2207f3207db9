"""Admission runs in a worker thread: the event loop stays free meanwhile, and a caller that leaves while its
request is being tokenized does not leave that request running."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lockstep.engine import SamplingParams
from lockstep.inference import generation

WAIT_S = 30.0  # bound on every wait (a hang, not a speed check)


@dataclass
class FakeHandle:
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class FakeEngine:
    handles: list[FakeHandle] = field(default_factory=list)

    def submit(self, ids: list[int], params: SamplingParams) -> FakeHandle:
        self.handles.append(FakeHandle())
        return self.handles[-1]


@dataclass
class FakeSlot:
    engine: FakeEngine = field(default_factory=FakeEngine)
    tokenizer: object = "the slot's tokenizer"
    version: int = 3
    model_ref: str = "builtin:tiny"


@dataclass
class FakeReplica:
    slot: FakeSlot = field(default_factory=FakeSlot)
    pins: int = 0

    @contextlib.contextmanager
    def pinned(self, session: str | None = None, version: int | None = None) -> Iterator[FakeSlot]:
        self.pins += 1
        try:
            yield self.slot
        finally:
            self.pins -= 1


class BlockingTokenizer:
    """A prompt builder that holds its worker thread until released (a long chat template, say)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.thread: str | None = None

    def __call__(self, tokenizer: Any) -> list[int]:
        self.thread = threading.current_thread().name
        self.entered.set()
        assert self.release.wait(WAIT_S), "never released"
        return [1, 2, 3]


def test_the_prompt_is_built_off_the_event_loop_while_the_loop_keeps_running() -> None:
    replica, build = FakeReplica(), BlockingTokenizer()

    async def main() -> generation.Admitted:
        task = asyncio.create_task(generation.admit(replica, build, SamplingParams()))  # type: ignore[arg-type]
        ticks = 0
        while not build.entered.is_set() and ticks < WAIT_S * 100:  # the loop runs while the builder blocks
            await asyncio.sleep(0.01)
            ticks += 1
        assert build.entered.is_set() and not task.done()
        assert build.thread != threading.current_thread().name
        build.release.set()
        return await task

    admitted = asyncio.run(main())
    assert admitted.version == 3 and replica.slot.engine.handles == [admitted.handle]
    assert replica.pins == 0  # unpinned once submitted


def test_a_caller_that_leaves_while_admitting_cancels_its_request() -> None:
    replica, build = FakeReplica(), BlockingTokenizer()

    async def main() -> None:
        task = asyncio.create_task(generation.admit(replica, build, SamplingParams()))  # type: ignore[arg-type]
        await asyncio.to_thread(build.entered.wait, WAIT_S)
        task.cancel()  # the client went away mid-tokenization
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the admission was not cancelled")
        build.release.set()  # the worker still submits; the request must then be cancelled
        for _ in range(int(WAIT_S * 100)):
            if replica.slot.engine.handles:
                break
            await asyncio.sleep(0.01)
        handles = replica.slot.engine.handles
        assert len(handles) == 1
        assert await asyncio.to_thread(handles[0].cancelled.wait, WAIT_S)

    asyncio.run(main())
