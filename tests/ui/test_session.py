"""The UI's own login: sessions from the API token or a trusted proxy's header, CSRF on every change."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import ExitStack
from http.cookies import SimpleCookie

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from lockstep.core.clock import FakeClock
from lockstep.core.settings import load_settings
from lockstep.ui.app import create_app
from lockstep.ui.session import CSRF_HEADER, OPEN_ROUTES, SESSION_COOKIE, SESSION_TTL_S, Sessions, until
from tests.support.cluster import free_port

TOKEN = "ui-session-test-token-5d1c9e"
MakeClient = Callable[..., TestClient]


@pytest.fixture(scope="module")
def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def make_client(dead_url: str) -> Iterator[MakeClient]:
    """Factory: a UI with the token configured (unless overridden) whose trainer is unreachable."""
    with ExitStack() as stack:
        def make(*, clock: FakeClock | None = None, base_url: str = "http://testserver",
                 **overrides: object) -> TestClient:
            settings = load_settings(**{"trainer_url": dead_url, "api_token": TOKEN, **overrides})
            app = create_app(settings, clock=clock) if clock is not None else create_app(settings)
            return stack.enter_context(TestClient(app, base_url=base_url))

        yield make


def login(client: TestClient, token: str = TOKEN) -> str:
    """Log in; the client keeps the cookie and sends the CSRF header from now on. Returns the CSRF value."""
    response = client.post("/api/login", json={"token": token})
    assert response.status_code == 200, response.text
    csrf: str = response.json()["csrf"]
    client.headers[CSRF_HEADER] = csrf
    return csrf


def api_routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every /api route of the app, path parameters filled with a valid id."""
    found = []
    for route in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, APIRoute) and route.path.startswith("/api/"):
            path = re.sub(r"\{[^}]+\}", "r1", route.path)
            found += [(method, path) for method in sorted(route.methods) if (method, route.path) not in OPEN_ROUTES]
    return found


def set_cookie(response: httpx.Response) -> SimpleCookie:
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    return cookie


# --------------------------------------------------------------------------------------- every door
def test_every_api_route_needs_a_login(make_client: MakeClient) -> None:
    client = make_client()
    routes = api_routes(client)
    assert {("POST", "/api/publish"), ("POST", "/api/playground"), ("GET", "/api/events"),
            ("GET", "/api/cluster")} <= set(routes), routes
    for method, path in routes:
        response = client.request(method, path, json={})
        assert response.status_code == 401, (method, path, response.text)
        assert "log in" in response.json()["error"]["message"]


def test_public_reads_open_the_views_but_never_a_change(make_client: MakeClient) -> None:
    client = make_client(ui_public_reads=True)
    assert client.get("/api/cluster").status_code == 200  # asked the replicas: the trainer is down
    assert client.get("/api/versions").status_code == 502  # reached the (dead) trainer: the gate let it by
    for method, path in api_routes(client):
        if method == "POST":
            assert client.post(path, json={}).status_code == 401, path


def test_the_page_and_its_files_need_no_login(make_client: MakeClient) -> None:
    client = make_client()
    assert client.get("/").status_code == 200
    assert client.get("/static/login.js").status_code == 200
    assert client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------------------- logging in
def test_a_wrong_token_is_refused_and_sets_no_cookie(make_client: MakeClient) -> None:
    client = make_client()
    for wrong in (TOKEN + "x", TOKEN[:-1], "Bearer " + TOKEN, " "):
        response = client.post("/api/login", json={"token": wrong})
        assert response.status_code in (400, 401), wrong
        assert "set-cookie" not in response.headers
    assert client.get("/api/session").json()["logged_in"] is False
    assert client.get("/api/cluster").status_code == 401


def test_login_sets_a_strict_http_only_session_cookie(make_client: MakeClient) -> None:
    client = make_client()
    response = client.post("/api/login", json={"token": TOKEN})
    assert response.status_code == 200
    morsel = set_cookie(response)[SESSION_COOKIE]
    assert morsel["httponly"] is True and morsel["samesite"].lower() == "strict" and morsel["path"] == "/"
    assert not morsel["secure"], "plain http: a Secure cookie would never come back"
    assert int(morsel["max-age"]) == int(SESSION_TTL_S)
    assert TOKEN not in response.text and TOKEN not in morsel.value
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["logged_in"] is True and body["via"] == "session" and len(body["csrf"]) >= 32
    assert client.get("/api/cluster").status_code == 200


@pytest.mark.parametrize(("base_url", "headers"), [("https://testserver", {}),
                                                   ("http://testserver", {"X-Forwarded-Proto": "https"})])
def test_the_cookie_is_secure_when_the_browser_came_over_tls(make_client: MakeClient, base_url: str,
                                                             headers: dict[str, str]) -> None:
    client = make_client(base_url=base_url)
    response = client.post("/api/login", json={"token": TOKEN}, headers=headers)
    assert set_cookie(response)[SESSION_COOKIE]["secure"] is True


def test_session_ids_are_random_and_each_login_is_its_own(make_client: MakeClient) -> None:
    first, second = make_client(), make_client()
    assert login(first) != login(second)
    assert first.cookies.get(SESSION_COOKIE) != second.cookies.get(SESSION_COOKIE)


def test_the_session_says_who_and_what_a_change_must_send(make_client: MakeClient) -> None:
    client = make_client()
    assert client.get("/api/session").json() == {"logged_in": False, "login_required": True, "public_reads": False}
    csrf = login(client)
    session = client.get("/api/session")
    assert session.headers["cache-control"] == "no-store"
    assert session.json()["csrf"] == csrf and session.json()["user"] == "operator"


def test_config_tells_how_to_log_in_and_nothing_more_before(make_client: MakeClient, dead_url: str) -> None:
    client = make_client()
    before = client.get("/api/config").json()
    assert before == {"login_required": True, "public_reads": False, "proxy_login": False}
    login(client)
    after = client.get("/api/config").json()
    assert after["trainer_url"] == dead_url and after["token_configured"] is True
    assert TOKEN not in client.get("/api/config").text


# ---------------------------------------------------------------------------------------------- CSRF
def test_a_change_without_the_csrf_header_is_forbidden(make_client: MakeClient) -> None:
    client = make_client()
    login(client)
    del client.headers[CSRF_HEADER]
    for method, path in api_routes(client):
        if method == "POST":
            response = client.post(path, json={})
            assert response.status_code == 403, (path, response.text)
            assert CSRF_HEADER in response.json()["error"]["message"]
    assert client.get("/api/cluster").status_code == 200, "reads need no header: EventSource cannot send one"


def test_a_csrf_value_works_only_with_its_own_session(make_client: MakeClient) -> None:
    mine, other = make_client(), make_client()
    login(mine)
    other_csrf = login(other)
    mine.headers[CSRF_HEADER] = other_csrf
    assert mine.post("/api/rollback", json={}).status_code == 403
    mine.headers[CSRF_HEADER] = "0" * 64
    assert mine.post("/api/rollback", json={}).status_code == 403


def test_with_the_header_a_change_reaches_the_trainer(make_client: MakeClient, dead_url: str) -> None:
    client = make_client()
    login(client)
    response = client.post("/api/publish", json={"model": "builtin:tiny-s1"})
    assert response.status_code == 502 and dead_url in response.json()["error"]["message"]
    assert client.post("/api/playground", json={"prompt": "hi"}).status_code == 503  # no replica: it got through


# -------------------------------------------------------------------------------------------- leaving
def test_logout_ends_the_session_on_the_server(make_client: MakeClient) -> None:
    client = make_client()
    login(client)
    stolen = client.cookies.get(SESSION_COOKIE)
    response = client.post("/api/logout")
    assert response.status_code == 200 and response.json() == {"logged_in": False}
    assert set_cookie(response)[SESSION_COOKIE]["max-age"] == "0"
    assert client.get("/api/cluster").status_code == 401
    replay = make_client()  # the old cookie, kept by someone, is worth nothing now
    replay.cookies.set(SESSION_COOKIE, str(stolen))
    assert replay.get("/api/cluster").status_code == 401


def test_a_session_expires(make_client: MakeClient) -> None:
    clock = FakeClock()
    client = make_client(clock=clock)
    login(client)
    clock.advance(SESSION_TTL_S - 60)
    assert client.get("/api/cluster").status_code == 200
    assert client.get("/api/session").json()["expires_in_s"] == 60
    clock.advance(61)
    assert client.get("/api/cluster").status_code == 401
    assert client.post("/api/rollback", json={}).status_code == 401
    assert client.get("/api/session").json()["logged_in"] is False


def test_sessions_are_bounded_and_the_oldest_goes_first() -> None:
    sessions = Sessions(load_settings(api_token=TOKEN), max_sessions=2)
    first, second, third = (sessions.login(TOKEN) for _ in range(3))
    assert first and second and third
    assert sessions.count() == 2
    assert sessions.session(first.session_id) is None
    assert sessions.session(third.session_id) is not None


def test_the_live_feed_ends_when_the_session_does() -> None:
    closed: list[bool] = []

    async def endless() -> AsyncGenerator[bytes, None]:
        try:
            for i in range(1000):  # bounded: the test fails rather than hangs if until() ignores valid()
                yield f"event {i}\n\n".encode()
        finally:
            closed.append(True)

    async def read() -> list[bytes]:
        seen: list[bytes] = []
        async for chunk in until(endless(), lambda: len(seen) < 3):
            seen.append(chunk)
        return seen

    # Its own loop in a fresh thread: the browser tests leave one running in this thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert len(pool.submit(asyncio.run, read()).result(timeout=60)) == 3
    assert closed == [True], "the feed's own generator is closed at once (it stops queueing for the page)"


# ----------------------------------------------------------------------------------- a trusted proxy
def test_a_trusted_proxy_header_counts_as_a_login(make_client: MakeClient) -> None:
    client = make_client(ui_trusted_user_header="X-Forwarded-User")
    alice = {"X-Forwarded-User": "alice@example.com"}
    assert client.get("/api/config").json()["proxy_login"] is True
    session = client.get("/api/session", headers=alice).json()
    assert session["logged_in"] is True and session["via"] == "proxy" and session["user"] == "alice@example.com"
    assert client.get("/api/cluster", headers=alice).status_code == 200
    assert client.post("/api/rollback", json={}, headers=alice).status_code == 403, "still needs the CSRF header"
    allowed = client.post("/api/rollback", json={}, headers={**alice, CSRF_HEADER: session["csrf"]})
    assert allowed.status_code == 502  # through to the (dead) trainer
    bob = client.get("/api/session", headers={"X-Forwarded-User": "bob"}).json()
    assert bob["csrf"] != session["csrf"]
    assert client.get("/api/cluster").status_code == 401, "without the header: not logged in"


def test_the_proxy_header_means_nothing_unless_configured(make_client: MakeClient) -> None:
    client = make_client()
    assert client.get("/api/cluster", headers={"X-Forwarded-User": "mallory"}).status_code == 401
    assert client.get("/api/session", headers={"X-Forwarded-User": "mallory"}).json()["logged_in"] is False


# ------------------------------------------------------------------------------------- no token at all
def test_without_a_token_nobody_logs_in_but_changes_still_need_the_header(make_client: MakeClient) -> None:
    client = make_client(api_token=None)
    session = client.get("/api/session").json()
    assert session["logged_in"] is True and session["via"] == "open" and session["login_required"] is False
    assert client.get("/api/config").json()["login_required"] is False
    assert client.post("/api/rollback", json={}).status_code == 403  # a cross-site form post to loopback
    assert client.post("/api/rollback", json={}, headers={CSRF_HEADER: session["csrf"]}).status_code == 502
    assert client.post("/api/login", json={"token": "anything-at-all-here"}).status_code == 400


# ------------------------------------------------------------------------------- before the app runs
def test_a_foreign_host_is_refused_dns_rebinding(make_client: MakeClient) -> None:
    client = make_client(allowed_hosts="127.0.0.1,localhost")
    refused = client.get("/api/session", headers={"Host": "evil.example"})
    assert refused.status_code == 400 and "evil.example" in refused.json()["error"]["message"]
    assert client.post("/api/login", json={"token": TOKEN}, headers={"Host": "evil.example:8080"}).status_code == 400
    assert client.get("/api/session", headers={"Host": "127.0.0.1:8080"}).status_code == 200


def test_a_huge_login_body_is_refused_before_parsing(make_client: MakeClient) -> None:
    client = make_client()
    response = client.post("/api/login", content=b'{"token": "' + b"x" * 2_000_000 + b'"}',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413
