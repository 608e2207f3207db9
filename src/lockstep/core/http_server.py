"""How every Lockstep server runs under uvicorn: request heads bounded, housekeeping at 1 Hz.

uvicorn's httptools protocol buffers a request's line and headers without any limit, and the app (and so
``RequestGuard``) only sees a request once its head is complete: one client sending a 60 MB header held a
replica's event loop for seconds and its memory for the header's size. ``BoundedHeadProtocol`` answers 431 and
closes the connection once a head passes ``MAX_HEAD_BYTES`` or ``MAX_HEADERS``, while it is still arriving (after
the answers to any requests sent before it on the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 << 10  # request line and headers; browsers and proxies send a few KB (nginx refuses at 32 KB)
MAX_HEADERS = 128
LINGER_S = 2.0  # after a 431, how long the rest of the client's request is read and dropped before the close


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head with too many headers."""


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing with 431 a request head over ``MAX_HEAD_BYTES`` or ``MAX_HEADERS``."""

    _in_head = False
    _head_bytes = 0
    _header_count = 0

    _began_in_read = False
    _refusing = False  # a head over the bound came while an earlier request is answered: 431 once it (and any
    # request pipelined before the refused head) has been answered whole

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._header_count = True, 0, 0
        self._began_in_read = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            # Stops the parser; uvicorn then answers through send_400_response, which says 431 instead.
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return  # more of the refused head: read and dropped (left unread, it would turn the close into a reset)
        # A read that only continues an open head is all head bytes. The read that begins a message is not
        # counted (it may end the previous, pipelined request's body), so the bound holds to within one read
        # (asyncio reads at most 256 KiB).
        counted, self._began_in_read = self._in_head, False
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        if counted and not self._began_in_read:
            self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        if self._header_count > MAX_HEADERS:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next request pipelined before the refused head, if any
        if self._refusing and not self.transport.is_closing() and (self.cycle is None or
                                                                    self.cycle.response_complete):
            self._answer_431()

    def _refuse_head(self) -> None:
        self._in_head = False
        self._refusing = True
        if self.cycle is not None and not self.cycle.response_complete:
            return  # an earlier request is still being answered on this connection: the 431 follows its last byte
        self._answer_431()

    def _answer_431(self) -> None:
        msg = (f"the request line and headers are over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers; "
               "send less in headers (a large value belongs in the body)").encode()
        self.transport.write(b"".join([
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(msg)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            msg,
        ]))
        # A lingering close: stop sending, keep reading (and dropping) what the client still sends, then close.
        # Closing with its bytes unread would reset the connection, and the client could lose the answers
        # before they are read.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def server_config(app: Any, host: str, port: int, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for a Lockstep server: bounded request heads, no access log."""
    return uvicorn.Config(app, host=host, port=port, http=BoundedHeadProtocol, log_level="warning",
                          access_log=False, **kwargs)


class QuietServer(uvicorn.Server):
    """``uvicorn.Server``, but its housekeeping tick (Date header, exit check) runs at 1 Hz instead of 10 Hz.

    Ten wake-ups a second were a third of an idle replica's CPU. A signal still stops it at once: the handler
    wakes the loop instead of waiting for the next tick.
    """

    _loop: asyncio.AbstractEventLoop | None = None
    _exit: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._exit = asyncio.get_running_loop(), asyncio.Event()
        while not await self.on_tick(0):  # counter 0: every tick refreshes the Date header
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._exit is not None:
            self._loop.call_soon_threadsafe(self._exit.set)


def run_server(app: Any, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until a signal stops it."""
    QuietServer(server_config(app, host, port)).run()
