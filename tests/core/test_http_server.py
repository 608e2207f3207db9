"""Every server's uvicorn protocol: request heads bounded, without harm to pipelined or keep-alive requests."""

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

from lockstep.core.http_server import server_config
from tests.support.cluster import free_port, wait_for


async def slow(request: Request) -> PlainTextResponse:
    await asyncio.sleep(1.0)
    return PlainTextResponse("slow " + "s" * 200_000)  # longer than one socket write


async def echo(request: Request) -> PlainTextResponse:
    body = await request.body()
    return PlainTextResponse(f"{request.method} {request.url.path} body={len(body)}")


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = Starlette(routes=[Route("/slow", slow), Route("/{name}", echo, methods=["GET", "POST"])])
    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, 0.02, "the server started")
    yield port
    server.should_exit = True
    thread.join(timeout=30)


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
