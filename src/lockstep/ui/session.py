"""Who may use the UI: a login with the API token (a server-side session), or a header a trusted proxy sets.

``SessionGate`` sits in front of every ``/api/*`` route. A change (any method but GET/HEAD) needs a login and
the ``X-Lockstep-CSRF`` header the page got at login: a cross-site page can neither send that header without a
CORS preflight (never granted) nor read it, and the SameSite=Strict cookie is not sent cross-site anyway.
Reads need a login too unless LOCKSTEP_UI_PUBLIC_READS=1. With no LOCKSTEP_API_TOKEN (a loopback dev set-up)
nobody logs in, but changes still need the header, so a web page in the operator's browser cannot drive a
local UI.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.http import error_body
from lockstep.core.settings import Settings

SESSION_COOKIE = "lockstep_session"
CSRF_HEADER = "X-Lockstep-CSRF"
SESSION_TTL_S = 12 * 3600.0  # seconds a login lasts: one working day, then the token is asked for again
MAX_SESSIONS = 1024  # logins kept at once; the oldest goes first (only holders of the token can add one)
# Routes anyone may call: what the page needs to know before it logs in, and the login itself.
OPEN_ROUTES = frozenset({("GET", "/api/config"), ("GET", "/api/session"), ("POST", "/api/login")})
READ_METHODS = frozenset({"GET", "HEAD"})
# A user name from the proxy's header: printable, no separators that could forge log lines.
PROXY_USER = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Principal:
    """Someone the UI lets in: how they got in, and the CSRF token their page must echo on every change."""

    user: str
    via: str  # session (logged in with the token) | proxy (trusted header) | open (no token configured)
    csrf: str
    session_id: str | None = None
    expires_in_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"logged_in": True, "user": self.user, "via": self.via, "csrf": self.csrf,
                "expires_in_s": None if self.expires_in_s is None else round(self.expires_in_s)}


@dataclass
class _Session:
    user: str
    expires_at: float  # clock.monotonic() seconds


class Sessions:
    """Server-side sessions in memory (one UI process); a restart logs everyone out."""

    def __init__(self, settings: Settings, *, clock: Clock = SYSTEM_CLOCK, ttl_s: float = SESSION_TTL_S,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self.token = settings.api_token
        self.public_reads = settings.ui_public_reads
        self.proxy_header = (settings.ui_trusted_user_header or "").strip().lower() or None
        self.clock = clock
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._key = secrets.token_bytes(32)  # CSRF tokens are derived from it; never leaves the process
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    @property
    def login_required(self) -> bool:
        """False only when no API token is configured (loopback development)."""
        return self.token is not None

    def csrf_for(self, identity: str) -> str:
        return hmac.new(self._key, identity.encode(), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------ sessions
    def login(self, token: str) -> Principal | None:
        """A new session when ``token`` is the API token (compared in constant time), else None."""
        # Stripped on both sides: a token read from a file or a Secret made --from-file ends in a newline.
        if self.token is None or not hmac.compare_digest(token.strip().encode(), self.token.strip().encode()):
            return None
        session_id = secrets.token_urlsafe(32)
        now = self.clock.monotonic()
        with self._lock:
            self._drop_expired(now)
            while len(self._sessions) >= self.max_sessions:
                self._sessions.pop(next(iter(self._sessions)))  # dicts keep insertion order: the oldest
            self._sessions[session_id] = _Session("operator", now + self.ttl_s)
        return self._session_principal(session_id, "operator", self.ttl_s)

    def logout(self, session_id: str | None) -> None:
        if session_id is not None:
            with self._lock:
                self._sessions.pop(session_id, None)

    def session(self, session_id: str | None) -> Principal | None:
        """The principal of a live session, or None (unknown or expired; an expired one is dropped)."""
        if not session_id:
            return None
        now = self.clock.monotonic()
        with self._lock:
            found = self._sessions.get(session_id)
            if found is None:
                return None
            if found.expires_at <= now:
                del self._sessions[session_id]
                return None
        return self._session_principal(session_id, found.user, found.expires_at - now)

    def _session_principal(self, session_id: str, user: str, left_s: float) -> Principal:
        return Principal(user, "session", self.csrf_for("session:" + session_id), session_id, left_s)

    def _drop_expired(self, now: float) -> None:
        for session_id in [s for s, found in self._sessions.items() if found.expires_at <= now]:
            del self._sessions[session_id]

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # ------------------------------------------------------------------ requests
    def principal(self, request: Request) -> Principal | None:
        """Who sent ``request``: its session cookie, else the trusted proxy's header, else nobody (or open)."""
        found = self.session(request.cookies.get(SESSION_COOKIE))
        if found is not None:
            return found
        if self.proxy_header is not None:
            user = request.headers.get(self.proxy_header, "").strip()
            if PROXY_USER.fullmatch(user):
                return Principal(user, "proxy", self.csrf_for("proxy:" + user))
        if not self.login_required:
            return Principal("anonymous", "open", self.csrf_for("open"))
        return None

    def csrf_ok(self, principal: Principal, request: Request) -> bool:
        return hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), principal.csrf.encode())

    def still_valid(self, principal: Principal) -> Callable[[], bool]:
        """For a long stream: True while the principal's session lasts (always for proxy and open ones)."""
        if principal.session_id is None:
            return lambda: True
        session_id = principal.session_id
        return lambda: self.session(session_id) is not None


def over_tls(request: Request) -> bool:
    """The browser reached us over https: directly, or through a proxy that says so (X-Forwarded-Proto)."""
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def set_session_cookie(response: Response, request: Request, principal: Principal, ttl_s: float) -> None:
    assert principal.session_id is not None
    response.set_cookie(SESSION_COOKIE, principal.session_id, max_age=int(ttl_s), path="/", httponly=True,
                        samesite="strict", secure=over_tls(request))


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=over_tls(request))


async def until(stream: AsyncGenerator[bytes, None], valid: Callable[[], bool]) -> AsyncIterator[bytes]:
    """``stream`` until ``valid()`` turns False (a logout or an expired session ends the live feed)."""
    try:
        async for chunk in stream:
            if not valid():
                return
            yield chunk
    finally:
        await stream.aclose()  # at once, not when collected: the feed stops sending to this page


class SessionGate:
    """ASGI middleware: every ``/api/*`` route but the open ones needs a principal, and a change the CSRF header."""

    def __init__(self, app: Any, *, sessions: Sessions) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_api(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", "GET"), scope["path"].rstrip("/") or "/"
        if (method, path) in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        principal = self.sessions.principal(request)
        if method in READ_METHODS:
            if principal is None and not self.sessions.public_reads:
                await _reply(send, 401, "log in first: POST /api/login with the API token (LOCKSTEP_API_TOKEN), "
                             "or set LOCKSTEP_UI_PUBLIC_READS=1 to let anyone see the read-only views",
                             "unauthorized")
                return
        elif principal is None:
            await _reply(send, 401, "log in first: POST /api/login with the API token (LOCKSTEP_API_TOKEN); "
                         "every change needs a login", "unauthorized")
            return
        elif not self.sessions.csrf_ok(principal, request):
            await _reply(send, 403, f"a change needs the {CSRF_HEADER} header with the csrf value from "
                         "GET /api/session (the page sends it; a request from another site cannot)", "forbidden")
            return
        await self.app(scope, receive, send)


def _is_api(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


async def _reply(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})
