"""How every Lockstep server runs under uvicorn: request heads bounded in size and time, connections bounded in
number, housekeeping at 1 Hz.

uvicorn's httptools protocol buffers a request's line and headers without any limit, and the app (and so
``RequestGuard``) only sees a request once its head is complete: one client sending a 60 MB header held a
replica's event loop for seconds and its memory for the header's size. ``BoundedHeadProtocol`` answers 431 and
closes the connection once a head passes ``MAX_HEAD_BYTES`` or ``MAX_HEADERS``, while it is still arriving (after
the answers to any requests sent before it on the connection).

uvicorn also waits forever for a head or a body that never ends, and accepts connections until the process runs
out of file descriptors: one client holding 20,000 half-sent requests open stopped a replica's heartbeats, and
the fleet declared it gone. ``ReadLimits`` bounds both: a head must arrive whole within ``head_s``, a body may
not pause longer than ``body_idle_s``, and a connection beyond ``connections`` is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 << 10  # request line and headers; browsers and proxies send a few KB (nginx refuses at 32 KB)
MAX_HEADERS = 128
LINGER_S = 2.0  # after a 431, how long the rest of the client's request is read and dropped before the close


def default_connection_limit() -> int:
    """Half the process's file descriptors (the rest is for its files, engine and peers), within 64–4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = 65536 if soft == resource.RLIM_INFINITY else soft
    return max(64, min(4096, budget // 2))


@dataclass(frozen=True)
class ReadLimits:
    """How long a client may take to send a request, and how many connections a server holds open."""

    head_s: float = 30.0  # the request line and headers, whole, from the connection's open or the request's start
    # A body's longest pause between reads: a whole upload may take longer on a slow link, a stalled one not.
    body_idle_s: float = 60.0
    connections: int = field(default_factory=default_connection_limit)


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head with too many headers."""


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing with 431 a request head over ``MAX_HEAD_BYTES`` or ``MAX_HEADERS``,
    closing a connection whose request stalls (``ReadLimits``), and refusing connections beyond the bound."""

    limits = ReadLimits()
    _read_timer: asyncio.TimerHandle | None = None
    _in_body = False

    _in_head = False
    _head_bytes = 0
    _header_count = 0

    _began_in_read = False
    _refusing = False  # a head over the bound came while an earlier request is answered: 431 once it (and any
    # request pipelined before the refused head) has been answered whole

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.connections:
            self._answer_and_close(b"503 Service Unavailable", f"this server holds {self.limits.connections} "
                                   "connections open and has no room for more; retry later, or reuse connections")
            return
        self._arm(self.limits.head_s)  # the first request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._header_count = True, 0, 0
        self._began_in_read = True
        self._in_body = False
        if self._read_timer is None:  # a request after a keep-alive pause: its head from its first byte
            self._arm(self.limits.head_s)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm()  # the request is whole: the wait for its answer is the server's, not the client's
        super().on_message_complete()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            # Stops the parser; uvicorn then answers through send_400_response, which says 431 instead.
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True
        self._arm(self.limits.body_idle_s)  # disarmed at once by on_message_complete when there is no body
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return  # more of the refused head: read and dropped (left unread, it would turn the close into a reset)
        # A read that only continues an open head is all head bytes. The read that begins a message is not
        # counted (it may end the previous, pipelined request's body), so the bound holds to within one read
        # (asyncio reads at most 256 KiB).
        counted, self._began_in_read = self._in_head, False
        if self._in_body:
            self._arm(self.limits.body_idle_s)  # the body moves
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

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or self._refusing:
            return
        if self.flow is not None and self.flow.read_paused:
            # Reading is paused on this side (the app has not taken the body yet, or requests are pipelined):
            # the client is not the one stalling.
            self._arm(self.limits.body_idle_s if self._in_body else self.limits.head_s)
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # an answer is on its way (or the app waits for the body): no room for a 408
            return
        what = "body paused longer than" if self._in_body else "line and headers took longer than"
        seconds = self.limits.body_idle_s if self._in_body else self.limits.head_s
        self._answer_and_close(b"408 Request Timeout", f"the request's {what} {seconds:g} s; send it whole")

    def _answer_and_close(self, status: bytes, message: str) -> None:
        msg = message.encode()
        self.transport.write(b"".join([
            b"HTTP/1.1 " + status + b"\r\n",
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(msg)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            msg,
        ]))
        self.transport.close()

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


def server_config(app: Any, host: str, port: int, *, limits: ReadLimits | None = None,
                  **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for a Lockstep server: bounded request heads and connections, no access log."""
    protocol = BoundedHeadProtocol
    if limits is not None:
        class LimitedProtocol(BoundedHeadProtocol):
            pass

        LimitedProtocol.limits = limits
        protocol = LimitedProtocol
    return uvicorn.Config(app, host=host, port=port, http=protocol, log_level="warning", access_log=False,
                          **kwargs)


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
