"""What every Lockstep server checks before its app parses anything: the Host, the body's size, the token.

``RequestGuard`` is plain ASGI middleware, so a hostile request is refused before FastAPI reads or parses its
body: a wrong ``Host`` gets 400 (DNS rebinding), a body over the limit 413, and a mutation without the bearer
token 401, even when its body is not JSON (401 before 400). ``check_exposure`` refuses to start a server that
anyone on the network could drive.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException

from lockstep.core.errors import LockstepError
from lockstep.core.http import error_body
from lockstep.core.numbers import parse_decimal

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]
RouteRule = Callable[[str, str], bool]  # (method, path) → bool

# Kubelet probes send the pod IP as Host; they answer "alive"/"ready" only, nothing a rebinding page could use.
PROBE_PATHS = frozenset({"/healthz", "/ready"})
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# The value k8s/secret.yaml ships with; a server refuses to start with it.
PLACEHOLDER_TOKENS = frozenset({"replace-me-with-a-random-token", "changeme", "change-me", "replace-me"})
MIN_TOKEN_CHARS = 16


class UnsafeExposure(LockstepError):
    """A server configured so that anyone who reaches it could change the fleet."""

    status_code = 500
    code = "unsafe_configuration"


class BodyTooLarge(StarletteHTTPException):
    """Raised inside ``receive`` when a body passes the limit while the app reads it (FastAPI answers 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes (LOCKSTEP_MAX_BODY_BYTES)")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(bind_host: str, token: str | None, *, allow_unauthenticated: bool, server: str) -> None:
    """Refuse a placeholder token, and no token at all on a non-loopback address unless the operator opts in."""
    if token is not None and (token.strip().lower() in PLACEHOLDER_TOKENS or len(token.strip()) < MIN_TOKEN_CHARS):
        raise UnsafeExposure(
            f"{server}: LOCKSTEP_API_TOKEN is a placeholder or shorter than {MIN_TOKEN_CHARS} characters. "
            "Set a random one, e.g. `openssl rand -hex 32` (k8s: the lockstep-api-token Secret).")
    if token or allow_unauthenticated or is_loopback(bind_host):
        return
    raise UnsafeExposure(
        f"{server}: refusing to listen on {bind_host} without LOCKSTEP_API_TOKEN: anyone who reaches it could "
        "publish, roll back or start runs. Set LOCKSTEP_API_TOKEN (e.g. `openssl rand -hex 32`), bind to 127.0.0.1, "
        "or set LOCKSTEP_ALLOW_UNAUTHENTICATED=1 if a network boundary you trust already guards it.")


def effective_allowed_hosts(configured: list[str], bind_host: str) -> list[str]:
    """LOCKSTEP_ALLOWED_HOSTS when set; loopback names for a loopback bind; else any (empty list)."""
    if configured:
        return configured
    return list(LOOPBACK_HOSTS) if is_loopback(bind_host) else []


def host_name(header: str) -> str:
    """The name part of a Host header, lower-cased: 'Example.com:80' → 'example.com', '[::1]:8000' → '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def bearer_matches(authorization: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def never(method: str, path: str) -> bool:
    return False


class RequestGuard:
    """ASGI middleware: Host allow-list, body size limit and bearer token, checked before the app runs.

    ``public(method, path)``: mutations anyone may send (generation). ``unbounded(method, path)``: bodies the
    app bounds itself while streaming them to disk (uploads).
    """

    def __init__(self, app: Any, *, token: str | None, max_body_bytes: int, allowed_hosts: list[str] | None = None,
                 public: RouteRule = never, unbounded: RouteRule = never) -> None:
        self.app = app
        self.token = token or None
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts or [])
        self.public = public
        self.unbounded = unbounded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method, path = scope.get("method", "GET"), scope.get("path", "/")
        if (self.allowed_hosts and not (method == "GET" and path in PROBE_PATHS)
                and host_name(headers.get("host", "")) not in self.allowed_hosts):
            await _reply(send, 400, f"Host {headers.get('host', '')!r} is not served here (LOCKSTEP_ALLOWED_HOSTS)",
                         "invalid_host")
            return
        if (self.token and method in MUTATING_METHODS and not self.public(method, path)
                and not bearer_matches(headers.get("authorization", ""), self.token)):
            await _reply(send, 401, "this endpoint needs 'Authorization: Bearer <token>' (LOCKSTEP_API_TOKEN)",
                         "unauthorized", {"WWW-Authenticate": "Bearer"})
            return
        if self.unbounded(method, path):
            await self.app(scope, receive, send)
            return
        await self._bounded(scope, receive, send, headers.get("content-length"))

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, content_length: str | None) -> None:
        limit = self.max_body_bytes
        too_large = f"the request body is larger than {limit} bytes (LOCKSTEP_MAX_BODY_BYTES)"
        if content_length is not None:
            length = parse_decimal(content_length)
            if length is None:
                await _reply(send, 400, "Content-Length is not a number", "invalid_request_error")
                return
            if length > limit:
                await _reply(send, 413, too_large, "request_too_large")
                return
        seen = 0
        started = False

        async def counted_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _reply(send, 413, too_large, "request_too_large")


async def _reply(send: Send, status: int, message: str, code: str, extra: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(message, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install_guard(app: Any, settings: Any, *, public: RouteRule = never, unbounded: RouteRule = never,
                  token: str | None | bool = True) -> None:
    """Put ``RequestGuard`` in front of ``app`` with the settings' token, body limit and Host allow-list.

    ``token=False``: the app authenticates mutations itself (the UI's session login).
    """
    bearer = settings.api_token if token is True else (token or None)
    app.add_middleware(RequestGuard, token=bearer, max_body_bytes=settings.max_body_bytes,
                       allowed_hosts=settings.allowed_host_list, public=public, unbounded=unbounded)
