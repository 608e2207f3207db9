"""RequestGuard answers before the app reads a byte of the body: Host, then token (401), then size (413)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from lockstep.core.guards import (
    RequestGuard,
    UnsafeExposure,
    bearer_matches,
    check_exposure,
    effective_allowed_hosts,
    host_name,
    is_loopback,
)

TOKEN = "guard-unit-test-token-0123456789"
LIMIT = 1024  # bytes


@dataclass
class Recorder:
    """An ASGI app that reads the whole body (as FastAPI does before parsing) and answers 200 with its size."""

    calls: int = 0
    body: bytes = b""
    answer_first: bool = False  # start the response before reading the body (a streaming handler)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        if self.answer_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        more = True
        while more:
            message = await receive()
            self.body += message.get("body", b"")
            more = message.get("more_body", False)
        if not self.answer_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(self.body)).encode()})


@dataclass
class Exchange:
    """What the guard sent back."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    chunks_read: int = 0

    @property
    def status(self) -> int:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected one response start, got {len(starts)}"
        return int(starts[0]["status"])

    @property
    def error(self) -> dict[str, Any]:
        body = b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")
        return json.loads(body)["error"]  # type: ignore[no-any-return]

    @property
    def headers(self) -> dict[str, str]:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return {k.decode(): v.decode() for k, v in start["headers"]}


def call(guard: RequestGuard, method: str = "POST", path: str = "/admin/stage", *, host: str = "127.0.0.1:8000",
         headers: dict[str, str] | None = None, chunks: Iterable[bytes] = (b"{}",),
         content_length: bool = True) -> Exchange:
    """Drive the guard as a server would: headers in the scope, the body as ``chunks`` (chunked without
    Content-Length when ``content_length`` is False)."""
    parts = list(chunks)
    all_headers = {"host": host, **{k.lower(): v for k, v in (headers or {}).items()}}
    if content_length and "content-length" not in all_headers:
        all_headers["content-length"] = str(sum(len(p) for p in parts))
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in all_headers.items()]}
    exchange = Exchange()

    async def receive() -> dict[str, Any]:
        i = exchange.chunks_read
        exchange.chunks_read += 1
        if i >= len(parts):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": parts[i], "more_body": i < len(parts) - 1}

    async def send(message: dict[str, Any]) -> None:
        exchange.messages.append(message)

    asyncio.run(guard(scope, receive, send))
    return exchange


def guard_of(app: Recorder, **kwargs: Any) -> RequestGuard:
    options: dict[str, Any] = {"token": TOKEN, "max_body_bytes": LIMIT, **kwargs}
    return RequestGuard(app, **options)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --- the token, before the body ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_a_mutation_without_the_token_is_a_401_before_the_body_is_read(method: str) -> None:
    app = Recorder()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        exchange = call(guard_of(app), method, headers=headers, chunks=[b"{not json"])
        assert exchange.status == 401 and exchange.headers["www-authenticate"] == "Bearer"
        assert "LOCKSTEP_API_TOKEN" in exchange.error["message"] and exchange.error["code"] == "unauthorized"
        assert exchange.chunks_read == 0  # not one byte of the body was read
    assert app.calls == 0


def test_the_token_lets_a_mutation_through_and_reads_need_none() -> None:
    app = Recorder()
    assert call(guard_of(app), headers=AUTH).status == 200
    assert call(guard_of(app), headers={"Authorization": f"bearer   {TOKEN} "}).status == 200  # scheme any case
    assert call(guard_of(app), "GET", "/status", chunks=[b""]).status == 200
    assert app.calls == 3


def test_public_routes_need_no_token_and_no_token_configured_means_open() -> None:
    app = Recorder()
    public = guard_of(app, public=lambda method, path: method == "POST" and path == "/generate")
    assert call(public, path="/generate").status == 200
    assert call(public, path="/generate/../admin/stage").status == 401  # only the exact path is public
    assert call(guard_of(app, token=None), path="/admin/stage").status == 200
    assert call(guard_of(app, token=""), path="/admin/stage").status == 200


def test_an_oversized_body_without_the_token_is_a_401_too() -> None:
    # The token comes first: nobody learns anything about the body limit without it.
    exchange = call(guard_of(Recorder()), chunks=[b"x" * (LIMIT + 1)])
    assert exchange.status == 401 and exchange.chunks_read == 0


# --- the body's size, before parsing ---------------------------------------------------------------------------

def test_a_declared_length_over_the_limit_is_a_413_before_anything_is_read() -> None:
    app = Recorder()
    exchange = call(guard_of(app), headers=AUTH, chunks=[b"x" * (LIMIT + 1)])
    assert exchange.status == 413 and exchange.error["code"] == "request_too_large"
    assert "LOCKSTEP_MAX_BODY_BYTES" in exchange.error["message"] and str(LIMIT) in exchange.error["message"]
    assert exchange.chunks_read == 0 and app.calls == 0


def test_a_chunked_body_over_the_limit_is_a_413_once_it_passes_it() -> None:
    app = Recorder()
    chunks = [b"x" * 300] * 10  # 3000 bytes, no Content-Length
    exchange = call(guard_of(app), headers=AUTH, chunks=chunks, content_length=False)
    assert exchange.status == 413 and exchange.error["code"] == "request_too_large"
    assert exchange.chunks_read == 4  # stopped at the chunk that passed 1024 bytes, not at the end
    assert len(app.body) <= LIMIT


def test_a_body_that_lies_about_its_length_is_still_counted() -> None:
    exchange = call(guard_of(Recorder()), headers={**AUTH, "Content-Length": "10"}, chunks=[b"x" * 600] * 3)
    assert exchange.status == 413


def test_a_body_of_exactly_the_limit_passes() -> None:
    app = Recorder()
    assert call(guard_of(app), headers=AUTH, chunks=[b"x" * 512, b"y" * 512], content_length=False).status == 200
    assert len(app.body) == LIMIT


@pytest.mark.parametrize("value", ["abc", "-1", "1e3", "²", " 12"])
def test_a_content_length_that_is_not_a_number_is_a_400(value: str) -> None:
    app = Recorder()
    exchange = call(guard_of(app), headers={**AUTH, "Content-Length": value})
    assert exchange.status == 400 and "Content-Length" in exchange.error["message"]
    assert app.calls == 0


def test_a_response_already_started_is_not_answered_twice() -> None:
    app = Recorder(answer_first=True)
    exchange = call(guard_of(app), headers=AUTH, chunks=[b"x" * 600] * 3, content_length=False)
    assert exchange.status == 200  # the one start the app sent; the guard adds none
    assert not any(m["type"] == "http.response.body" for m in exchange.messages)


def test_unbounded_routes_stream_their_own_bodies() -> None:
    app = Recorder()
    guard = guard_of(app, unbounded=lambda method, path: method == "PUT" and path.startswith("/uploads/"))
    big = [b"x" * LIMIT] * 4
    assert call(guard, "PUT", "/uploads/1/model.safetensors", headers=AUTH, chunks=big).status == 200
    assert len(app.body) == 4 * LIMIT
    assert call(guard, "PUT", "/uploads/1/model.safetensors", chunks=big).status == 401  # never unauthenticated


# --- the Host allow-list ---------------------------------------------------------------------------------------

def test_a_host_outside_the_allow_list_is_a_400_before_anything_else() -> None:
    app = Recorder()
    guard = guard_of(app, allowed_hosts=["127.0.0.1", "localhost", "::1"])
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "", "localhost.:80"):
        exchange = call(guard, host=host, headers=AUTH)
        assert exchange.status == 400 and exchange.error["code"] == "invalid_host", host
        assert "LOCKSTEP_ALLOWED_HOSTS" in exchange.error["message"]
    for host in ("127.0.0.1:8001", "LOCALHOST", "[::1]:8000", "localhost"):
        assert call(guard, host=host, headers=AUTH).status == 200, host
    assert app.calls == 4
    assert call(guard_of(app, allowed_hosts=[]), host="anything.example", headers=AUTH).status == 200


def test_lifespan_and_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    guard = RequestGuard(app, token=TOKEN, max_body_bytes=LIMIT, allowed_hosts=["localhost"])
    asyncio.run(guard({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]


# --- helpers and the start-up check ---------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "name"), [("Example.com:80", "example.com"), ("[::1]:8000", "::1"),
                                              ("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("", "")])
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


def test_bearer_matches_only_the_exact_token() -> None:
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN)
    assert not bearer_matches(f"Bearer {TOKEN}x", TOKEN)
    assert not bearer_matches(TOKEN, TOKEN)
    assert not bearer_matches("Bearer ", TOKEN)
    assert not bearer_matches("Bearer é", TOKEN)  # non-ASCII compares, never raises


def test_loopback_and_the_default_allow_list() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.1") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost") and not is_loopback("0.0.0.0") and not is_loopback("example.com")
    assert effective_allowed_hosts([], "127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert effective_allowed_hosts([], "0.0.0.0") == []
    assert effective_allowed_hosts(["a.example"], "127.0.0.1") == ["a.example"]


def test_check_exposure_refuses_what_anyone_could_drive() -> None:
    with pytest.raises(UnsafeExposure, match="LOCKSTEP_ALLOW_UNAUTHENTICATED"):
        check_exposure("0.0.0.0", None, allow_unauthenticated=False, server="serve")
    with pytest.raises(UnsafeExposure, match="placeholder"):
        check_exposure("127.0.0.1", "replace-me-with-a-random-token", allow_unauthenticated=False, server="serve")
    with pytest.raises(UnsafeExposure, match="16 characters"):
        check_exposure("0.0.0.0", "short", allow_unauthenticated=True, server="trainer")
    check_exposure("127.0.0.1", None, allow_unauthenticated=False, server="serve")
    check_exposure("0.0.0.0", None, allow_unauthenticated=True, server="serve")
    check_exposure("0.0.0.0", TOKEN, allow_unauthenticated=False, server="ui")
