"""Admission runs in a worker thread: the event loop stays free meanwhile, and a caller that leaves while its
request is being tokenized does not leave that request running."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from lockstep.core.errors import BadRequest, Overloaded
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
    max_queue: int = 64
    max_context: int = 32

    def submit(self, ids: list[int], params: SamplingParams) -> FakeHandle:
        self.handles.append(FakeHandle())
        return self.handles[-1]


@dataclass
class FakeSlot:
    engine: FakeEngine = field(default_factory=FakeEngine)
    tokenizer: object = "the slot's tokenizer"
    version: int = 3
    model_ref: str = "builtin:tiny"


class FakeCounter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


@dataclass
class FakeMetrics:
    rejected: FakeCounter = field(default_factory=FakeCounter)


@dataclass
class FakeReplica:
    slot: FakeSlot = field(default_factory=FakeSlot)
    pins: int = 0
    metrics: FakeMetrics = field(default_factory=FakeMetrics)

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


class OverloadedAfter(FakeEngine):
    """Takes ``room`` requests, then answers the next with the engine's 429."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def submit(self, ids: list[int], params: SamplingParams) -> FakeHandle:
        if len(self.handles) >= self.room:
            raise Overloaded("the queue is full")
        return super().submit(ids, params)


def test_n_answers_are_admitted_together_on_one_slot_with_consecutive_seeds() -> None:
    replica = FakeReplica()
    admitted = asyncio.run(generation.admit_choices(replica, lambda tok: [1, 2], SamplingParams(seed=9, temperature=1),
                                                    3))  # type: ignore[arg-type]
    assert [a.params.seed for a in admitted] == [9, 10, 11] and {a.version for a in admitted} == {3}
    assert len(replica.slot.engine.handles) == 3 and replica.pins == 0  # one pin for all three, released
    unseeded = asyncio.run(generation.admit_choices(replica, lambda tok: [1], SamplingParams(), 2))  # type: ignore[arg-type]
    assert [a.params.seed for a in unseeded] == [None, None]


def test_n_answers_are_all_admitted_or_none() -> None:
    replica = FakeReplica(FakeSlot(engine=OverloadedAfter(room=2)))
    try:
        asyncio.run(generation.admit_choices(replica, lambda tok: [1], SamplingParams(), 3))  # type: ignore[arg-type]
    except Overloaded:
        pass
    else:
        raise AssertionError("a third answer did not fit, yet the request was admitted")
    assert [h.cancelled.is_set() for h in replica.slot.engine.handles] == [True, True]
    assert replica.metrics.rejected.value == 1


def test_more_answers_than_the_queue_can_ever_hold_are_a_400_not_a_429() -> None:
    replica = FakeReplica(FakeSlot(engine=FakeEngine(max_queue=6)))
    with pytest.raises(BadRequest) as err:
        asyncio.run(generation.admit_choices(replica, lambda tok: [1], SamplingParams(), 7))  # type: ignore[arg-type]
    assert "n=7" in str(err.value) and "at most 6" in str(err.value) and "LOCKSTEP_MAX_QUEUE" in str(err.value)
    assert replica.slot.engine.handles == [] and replica.metrics.rejected.value == 0
    six = asyncio.run(generation.admit_choices(replica, lambda tok: [1], SamplingParams(), 6))  # type: ignore[arg-type]
    assert len(six) == 6


def test_a_default_length_is_cut_to_the_room_the_prompt_leaves_and_a_chosen_one_is_not() -> None:
    replica = FakeReplica()  # a 32-token context
    prompt = list(range(30))
    fitted = asyncio.run(generation.admit_choices(replica, lambda tok: prompt, SamplingParams(max_new_tokens=16), 2,
                                                  fit_context=True))  # type: ignore[arg-type]
    assert [a.params.max_new_tokens for a in fitted] == [2, 2]
    chosen = asyncio.run(generation.admit_choices(replica, lambda tok: prompt, SamplingParams(max_new_tokens=16),
                                                  1))  # type: ignore[arg-type]
    assert chosen[0].params.max_new_tokens == 16  # the engine refuses it with the limit, naming the field sent


def test_a_prompt_that_fills_the_context_is_a_400_naming_the_limit_even_without_a_length() -> None:
    replica = FakeReplica()
    with pytest.raises(BadRequest) as err:
        asyncio.run(generation.admit_choices(replica, lambda tok: list(range(32)), SamplingParams(), 1,
                                             fit_context=True))  # type: ignore[arg-type]
    assert "prompt (32 tokens)" in str(err.value) and "context limit of 32 tokens" in str(err.value)
    assert "max_new_tokens" not in str(err.value)
