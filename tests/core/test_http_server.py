"""Every server's uvicorn protocol: request heads bounded in size and time, connections bounded in number, without
harm to pipelined, keep-alive, slow-but-moving or long-answered requests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from lockstep.core.http_server import ReadLimits, server_config
from tests.support.cluster import free_port, wait_for


async def slow(request: Request) -> PlainTextResponse:
    await asyncio.sleep(1.0)
    return PlainTextResponse("slow " + "s" * 200_000)  # longer than one socket write


async def echo(request: Request) -> PlainTextResponse:
    body = await request.body()
    return PlainTextResponse(f"{request.method} {request.url.path} body={len(body)}")


def _serve(limits: ReadLimits | None) -> Iterator[int]:
    app = Starlette(routes=[Route("/slow", slow), Route("/{name}", echo, methods=["GET", "POST"])])
    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, limits=limits))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, 0.02, "the server started")
    yield port
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    yield from _serve(None)


@pytest.fixture(scope="module")
def strict_port() -> Iterator[int]:
    """A server whose clients get 0.6 s for a head, 0.6 s of pause in a body, and 6 connections."""
    yield from _serve(ReadLimits(head_s=0.6, body_idle_s=0.6, connections=6))


def _exchange(port: int, parts: list[bytes], answers: int) -> bytes:
    """Send ``parts`` a moment apart (each its own read on the server), then read until ``answers`` responses."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for part in parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed: read what it said
            time.sleep(0.2)
        got = b""
        while got.count(b"HTTP/1.1 ") < answers:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        return got


def test_a_pipelined_request_after_a_large_body_is_answered_not_refused(port: int) -> None:
    """One read ends a request's 70 KB body and begins the next request's head: the body is no head bytes."""
    got = _exchange(port, [b"POST /a HTTP/1.1\r\nHost: x\r\n",
                           b"Content-Length: 70000\r\n\r\n" + b"b" * 70000 + b"GET /b HTTP/1.1\r\nHo",
                           b"st: x\r\n\r\n"], answers=2)
    assert b"431" not in got, got[:300]
    assert b"POST /a body=70000" in got and b"GET /b body=0" in got, got[:300]


def test_keep_alive_heads_each_under_the_bound_are_all_answered(port: int) -> None:
    head = b"GET /k HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 30_000 + b"\r\n\r\n"
    got = _exchange(port, [head, head, head], answers=3)
    assert got.count(b"GET /k body=0") == 3, got[:300]


def test_a_head_over_the_bound_on_a_fresh_connection_is_431(port: int) -> None:
    parts = [b"GET /h HTTP/1.1\r\nHost: x\r\nX-Pad: "] + [b"p" * 40_000] * 4 + [b"\r\n\r\n"]
    got = _exchange(port, parts, answers=1)
    assert got.startswith(b"HTTP/1.1 431"), got[:300]


def test_a_head_over_the_bound_behind_a_request_still_answered_is_431_after_that_answer_whole(port: int) -> None:
    """Before, the connection closed at once and cut off the earlier request's answer."""
    parts = [b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n"
             b"GET /h HTTP/1.1\r\nHost: x\r\nX-Pad: "] + [b"p" * 40_000] * 4 + [b"\r\n\r\n"]
    got = _exchange(port, parts, answers=3)
    first, second, third = got.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and first.endswith(b"slow " + b"s" * 200_000), first[:200]
    assert second.startswith(b"200") and second.endswith(b"GET /a body=0"), second[:200]
    assert third.startswith(b"431"), third[:200]


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (what a stalled client gets)."""
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def test_a_connection_that_sends_nothing_is_closed_with_408(strict_port: int) -> None:
    with socket.create_connection(("127.0.0.1", strict_port), timeout=30) as sock:
        assert _read_all(sock).startswith(b"HTTP/1.1 408")


def test_a_head_sent_a_line_at_a_time_past_its_time_is_closed_with_408(strict_port: int) -> None:
    """Each line comes well within the time, but the head as a whole does not (the slowloris pattern)."""
    with socket.create_connection(("127.0.0.1", strict_port), timeout=30) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n")
        got = b""
        for i in range(6):
            time.sleep(0.2)
            try:
                sock.sendall(f"X-Drip-{i}: 1\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                break
        got = _read_all(sock)
    assert got.startswith(b"HTTP/1.1 408"), got[:200]


def test_a_stalled_body_is_closed_and_a_slow_moving_one_is_answered(strict_port: int) -> None:
    with socket.create_connection(("127.0.0.1", strict_port), timeout=30) as sock:
        sock.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert b"body=" not in _read_all(sock)  # closed: the app saw a disconnect, not a body
    # 1.5 s in all, longer than either limit, but never a pause as long as the body's limit.
    parts = [b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"] + [b"b"] * 5
    got = _exchange(strict_port, parts, answers=1)
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"POST /a body=5"), got[:200]


def test_a_request_whose_answer_takes_longer_than_the_limits_is_answered_whole(strict_port: int) -> None:
    got = _exchange(strict_port, [b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"], answers=1)
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"s" * 1000), got[:200]


def test_connections_beyond_the_bound_are_refused_with_503_and_the_others_still_served(strict_port: int) -> None:
    held = [socket.create_connection(("127.0.0.1", strict_port), timeout=30) for _ in range(6)]
    try:
        for sock in held:  # each one made it in: its request is answered
            sock.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", strict_port), timeout=30) as extra:
            assert _read_all(extra).startswith(b"HTTP/1.1 503")
        held[0].sendall(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    # Closed connections make room again.
    wait_for(lambda: _exchange(strict_port, [b"GET /z HTTP/1.1\r\nHost: x\r\n\r\n"], answers=1)
             .startswith(b"HTTP/1.1 200"), 30, 0.2, "room for a new connection")
