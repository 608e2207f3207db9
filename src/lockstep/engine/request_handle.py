"""A caller's view of one request: iterate events synchronously or with ``async for``; cancel it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from lockstep.engine.event import Event, FinalEvent, TokenEvent


class RequestHandle:
    """Thread-safe event stream of one request, fed by the engine thread, read by any thread or event loop."""

    def __init__(self, request_id: int, prompt_tokens: int,
                 on_cancel: Callable[[RequestHandle], None]) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._events: list[Event] = []  # kept whole so several readers (or a late result()) see everything
        self._final: FinalEvent | None = None
        self._cancel_requested = False
        # Event-loop waiters woken with call_soon_threadsafe: no polling from asyncio. A waiter that wants only the
        # final event (``aresult``) is not woken per token: each wake-up is a turn of its event loop.
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, bool]] = []

    # --- producer side (the engine) ------------------------------------------------------------------
    def _push(self, event: Event) -> None:
        with self._cond:
            if self._final is not None:
                return  # a request ends once; anything after the final event is dropped
            self._events.append(event)
            if isinstance(event, FinalEvent):
                self._final = event
            self._cond.notify_all()
            final = self._final is not None
            waiters = [(loop, ev) for loop, ev, every in self._async_waiters if every or final]
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:
                pass  # that loop was closed; its reader is gone

    # --- consumer side -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once the final event was delivered."""
        return self._final is not None

    @property
    def cancel_requested(self) -> bool:
        """True once cancel() was called."""
        return self._cancel_requested

    def cancel(self) -> None:
        """Stop this request (e.g. its client went away); its batch slot is freed at the next step."""
        with self._cond:
            if self._final is not None or self._cancel_requested:
                return
            self._cancel_requested = True
        self._on_cancel(self)

    def __iter__(self) -> Iterator[Event]:
        """Yield every event in order, blocking between them; ends after the final event."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events):
                    self._cond.wait()
                event = self._events[i]
            i += 1
            yield event
            if isinstance(event, FinalEvent):
                return

    def result(self, timeout: float | None = None) -> FinalEvent:
        """Block until the request ends and return its final event; TimeoutError after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._final is not None, timeout=timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            assert self._final is not None
            return self._final

    async def aiter(self) -> AsyncIterator[Event]:
        """Yield every event in order without blocking the event loop; ends after the final event."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        waiter = (loop, wake, True)
        with self._cond:
            self._async_waiters.append(waiter)
        try:
            i = 0
            while True:
                with self._cond:
                    batch = self._events[i:]
                    if not batch:
                        wake.clear()  # cleared under the lock: a push after this sets it again
                if not batch:
                    await wake.wait()
                    continue
                i += len(batch)
                for event in batch:
                    yield event
                    if isinstance(event, FinalEvent):
                        return
        finally:
            with self._cond:
                self._async_waiters.remove(waiter)

    async def aresult(self) -> FinalEvent:
        """Await the final event without blocking the event loop (woken once, not per token)."""
        wake = asyncio.Event()
        waiter = (asyncio.get_running_loop(), wake, False)
        with self._cond:
            if self._final is not None:
                return self._final
            self._async_waiters.append(waiter)
        try:
            await wake.wait()
        finally:
            with self._cond:
                self._async_waiters.remove(waiter)
        assert self._final is not None  # set before the wake-up
        return self._final

    def tokens(self) -> Iterator[TokenEvent]:
        """Only the token events (convenience for streaming text)."""
        for event in self:
            if isinstance(event, TokenEvent):
                yield event
