"""RequestHandle delivers events pushed from another thread to sync and async readers, in order."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lockstep.engine.event import FinalEvent, FinishReason, TokenEvent
from lockstep.engine.request_handle import RequestHandle

FINAL = FinalEvent(FinishReason.LENGTH, "ab", (1, 2), prompt_tokens=3, completion_tokens=2, ttft_s=0.1,
                   latency_s=0.2)


def feed(handle: RequestHandle, start: threading.Event) -> threading.Thread:
    def run() -> None:
        start.wait(10)
        handle._push(TokenEvent((1,), "a"))
        handle._push(TokenEvent((2,), "b"))
        handle._push(FINAL)
        handle._push(TokenEvent((3,), "late"))  # after the final event: dropped

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sync_iteration_and_result() -> None:
    handle = RequestHandle(1, 3, lambda h: None)
    start = threading.Event()
    thread = feed(handle, start)
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.01)
    start.set()
    events = list(handle)
    thread.join()
    assert events == [TokenEvent((1,), "a"), TokenEvent((2,), "b"), FINAL]
    assert handle.result(0) is FINAL and handle.done
    assert list(handle) == events  # a second reader sees the same stream


def test_async_iteration_is_woken_from_another_thread() -> None:
    handle = RequestHandle(1, 3, lambda h: None)
    start = threading.Event()

    async def main() -> list:
        thread = feed(handle, start)
        start.set()
        events = [e async for e in handle.aiter()]
        thread.join()
        assert await handle.aresult() is FINAL
        return events

    assert asyncio.run(main())[-1] is FINAL


def test_cancel_calls_back_once_and_not_after_the_end() -> None:
    calls: list[int] = []
    handle = RequestHandle(7, 1, lambda h: calls.append(h.request_id))
    handle.cancel()
    handle.cancel()
    assert calls == [7] and handle.cancel_requested
    done = RequestHandle(8, 1, lambda h: calls.append(h.request_id))
    done._push(FINAL)
    done.cancel()
    assert calls == [7]


def test_awaiting_the_result_wakes_the_event_loop_once_not_per_token() -> None:
    """A non-streaming answer waits for the final event only: 200 tokens pushed from the engine thread must not
    turn its event loop 200 times (on a small model that is most of a replica's CPU)."""
    wakeups: list[object] = []

    class CountingLoop(asyncio.SelectorEventLoop):
        def call_soon_threadsafe(self, callback, *args, context=None):  # type: ignore[no-untyped-def]
            wakeups.append(callback)
            return super().call_soon_threadsafe(callback, *args, context=context)

    handle = RequestHandle(1, 3, lambda h: None)
    waiting = threading.Event()

    async def main() -> FinalEvent:
        task = asyncio.ensure_future(handle.aresult())
        await asyncio.sleep(0)  # the waiter is registered
        waiting.set()
        return await task

    def engine() -> None:
        waiting.wait(10)
        for i in range(200):
            handle._push(TokenEvent((i,), "x"))
        handle._push(FINAL)

    thread = threading.Thread(target=engine)
    thread.start()
    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        assert runner.run(main()) is FINAL
    thread.join()
    assert len(wakeups) == 1
    with asyncio.Runner() as runner:  # after the end it answers at once
        assert runner.run(handle.aresult()) is FINAL
