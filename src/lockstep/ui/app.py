"""The UI server's app: the page, its files, a login, a checked proxy to the trainer, the live feed, the playground.

Every ``/api/*`` route but the login's own is behind ``SessionGate`` (lockstep.ui.session); the Host allow-list and
the body limit come first (lockstep.core.guards). The API token stays on this server: the page holds a session.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import BadRequest, NotFound, Unauthorized
from lockstep.core.guards import install_guard
from lockstep.core.http import error_body, install_error_handlers
from lockstep.core.settings import Settings
from lockstep.sync.gates import GATE_DESCRIPTIONS
from lockstep.ui.assets import Assets
from lockstep.ui.feed import Feed
from lockstep.ui.playground import Playground
from lockstep.ui.refusals import folders_in, hide_folder_details
from lockstep.ui.schemas import ID_PATTERN, LoginForm, PlaygroundRequest, PublishForm, RollbackForm, RunForm
from lockstep.ui.session import (
    SessionGate,
    Sessions,
    clear_session_cookie,
    set_session_cookie,
    until,
)
from lockstep.ui.upstream import Upstream, parse_json, segment

# The page loads nothing from elsewhere; scripts and styles come from /static only.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
NO_STORE = {"Cache-Control": "no-store"}  # session answers carry the CSRF token: never cached

RunId = Path(pattern=ID_PATTERN, description="a run id as the trainer lists it")
PublishId = Path(pattern=ID_PATTERN, description="a publish id as the trainer lists it")


def relay(response: httpx.Response) -> JSONResponse:
    """The trainer's answer as it is (status and JSON body), errors included; its 401 is this server's fault."""
    if response.status_code == 401:  # relayed as 401, the page would take it for its own session ending
        return JSONResponse(error_body(
            "the trainer refused this UI server's token: set the same LOCKSTEP_API_TOKEN for the UI and the trainer",
            "upstream_unauthorized"), status_code=502)
    return JSONResponse(parse_json(response), status_code=response.status_code)


def relay_rollout(response: httpx.Response) -> JSONResponse:
    """The trainer's rollout view, relayed with what each gate measures (the page's tooltips); errors as they are."""
    if not response.is_success:
        return relay(response)
    body = parse_json(response)
    if isinstance(body, dict):
        body["gate_descriptions"] = dict(GATE_DESCRIPTIONS)
    return JSONResponse(body, status_code=response.status_code)


def create_app(settings: Settings, *, http_client: httpx.AsyncClient | None = None,
               clock: Clock = SYSTEM_CLOCK) -> FastAPI:
    """The UI app; tests may pass their own HTTP client (it is then not closed here) and clock (session expiry)."""
    client = http_client or httpx.AsyncClient(trust_env=False)  # cluster-internal calls never go via a proxy
    upstream = Upstream(settings, client)
    feed = Feed(upstream)
    playground = Playground(settings, upstream)
    assets = Assets()
    sessions = Sessions(settings, clock=clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await feed.close()
            if http_client is None:
                await client.aclose()

    app = FastAPI(title="Lockstep UI", version="1", lifespan=lifespan)
    install_error_handlers(app)
    app.state.upstream, app.state.feed, app.state.playground = upstream, feed, playground
    app.state.sessions = sessions
    # Added last, runs first: the Host and body checks, then the session check, then the routes.
    app.add_middleware(SessionGate, sessions=sessions)
    install_guard(app, settings, token=False)

    def asset_response(name: str, request: Request) -> Response:
        asset = assets.get(name)
        if asset is None:
            raise NotFound(f"no file {name!r} in the page's assets")
        headers = {**PAGE_HEADERS, "ETag": asset.etag}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    # ------------------------------------------------------------------ the page
    @app.get("/healthz", summary="The process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", summary="The page", include_in_schema=False)
    async def index(request: Request) -> Response:
        return asset_response("index.html", request)

    @app.get("/static/{name}", summary="The page's files (no subfolders)", include_in_schema=False)
    async def static(name: str, request: Request) -> Response:
        return asset_response(name, request)

    @app.get("/api/config", summary="How to log in; where the trainer is only for those who may read")
    async def config(request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {"login_required": sessions.login_required, "public_reads": sessions.public_reads,
                                "proxy_login": sessions.proxy_header is not None}
        if sessions.public_reads or sessions.principal(request) is not None:
            body |= {"trainer_url": upstream.trainer_url, "inference_service_url": settings.inference_service_url,
                     "served_model_name": settings.served_model_name, "token_configured": bool(settings.api_token),
                     "feed_interval_s": feed.interval_s}
        return body

    # ------------------------------------------------------------------ logging in
    @app.get("/api/session", summary="Who is logged in, and the CSRF value every change must send")
    async def session(request: Request) -> JSONResponse:
        principal = sessions.principal(request)
        base = {"login_required": sessions.login_required, "public_reads": sessions.public_reads}
        if principal is None:
            return JSONResponse({"logged_in": False, **base}, headers=NO_STORE)
        return JSONResponse({**principal.as_dict(), **base}, headers=NO_STORE)

    @app.post("/api/login", summary="Exchange the API token for a session cookie (HttpOnly, SameSite=Strict)")
    async def login(form: LoginForm, request: Request) -> JSONResponse:
        if not sessions.login_required:
            raise BadRequest("this UI needs no login: no LOCKSTEP_API_TOKEN is configured (loopback only)")
        principal = sessions.login(form.token)
        if principal is None:
            raise Unauthorized("that is not the API token: enter LOCKSTEP_API_TOKEN as the UI server has it "
                               "(`lockstep up` keeps it in <shared>/api-token; k8s: the lockstep-api-token Secret)")
        response = JSONResponse({**principal.as_dict(), "login_required": True,
                                 "public_reads": sessions.public_reads}, headers=NO_STORE)
        set_session_cookie(response, request, principal, sessions.ttl_s)
        return response

    @app.post("/api/logout", summary="End this session")
    async def logout(request: Request) -> JSONResponse:
        principal = sessions.principal(request)
        if principal is not None and principal.via == "proxy":
            return JSONResponse({"logged_in": True, "via": "proxy",
                                 "detail": "you are logged in by the proxy in front of the UI: log out there"})
        sessions.logout(principal.session_id if principal is not None else None)
        response = JSONResponse({"logged_in": False}, headers=NO_STORE)
        clear_session_cookie(response, request)
        return response

    # ------------------------------------------------------------------ reading the trainer
    @app.get("/api/cluster", summary="The fleet: the trainer's /cluster, or the replicas asked directly")
    async def cluster() -> dict[str, Any]:
        return await upstream.cluster()

    @app.get("/api/versions", summary="Published versions")
    async def versions() -> JSONResponse:
        return relay(await upstream.trainer("GET", "/versions"))

    @app.get("/api/history", summary="Publishes and replica flips, for the timeline")
    async def history() -> JSONResponse:
        return relay(await upstream.trainer("GET", "/history"))

    @app.get("/api/publishes", summary="Publish jobs")
    async def publishes() -> JSONResponse:
        return relay(await upstream.trainer("GET", "/publishes"))

    @app.get("/api/publishes/{publish_id}", summary="One publish job and its result")
    async def publish_job(publish_id: str = PublishId) -> JSONResponse:
        return relay(await upstream.trainer("GET", "/publishes/" + segment(publish_id)))

    @app.get("/api/runs", summary="Training runs")
    async def runs() -> JSONResponse:
        return relay(await upstream.trainer("GET", "/runs"))

    @app.get("/api/runs/{run_id}", summary="One run: progress, curves, samples")
    async def run(run_id: str = RunId) -> JSONResponse:
        return relay(await upstream.trainer("GET", "/runs/" + segment(run_id)))

    # ------------------------------------------------------------------ driving the trainer
    @app.post("/api/publish", summary="Publish a model reference to every replica; with canary or shadow, roll it out")
    async def publish(form: PublishForm) -> JSONResponse:
        # exclude_none leaves the values of a dict alone: a gate set to null still reaches the trainer (gate off).
        response = await upstream.trainer("POST", "/publish", json=form.model_dump(exclude_none=True))
        return hide_folder_details(response, folders_in([form.model])) or relay(response)

    @app.get("/api/rollout", summary="The rollout in progress, or the last one: steps, shares, gates")
    async def rollout() -> JSONResponse:
        return relay_rollout(await upstream.trainer("GET", "/rollout"))

    @app.post("/api/rollout/promote", summary="Promote the rollout in progress now, whatever its gates say")
    async def rollout_promote() -> JSONResponse:
        return relay_rollout(await upstream.trainer("POST", "/rollout/promote"))

    @app.post("/api/rollout/abort", summary="Roll the rollout in progress back now, whatever its gates say")
    async def rollout_abort() -> JSONResponse:
        return relay_rollout(await upstream.trainer("POST", "/rollout/abort"))

    @app.post("/api/rollback", summary="Commit an earlier version again")
    async def rollback(form: RollbackForm) -> JSONResponse:
        return relay(await upstream.trainer("POST", "/rollback", json=form.model_dump(exclude_none=True)))

    @app.post("/api/runs", summary="Start a simulation or fine-tune run")
    async def start_run(form: RunForm) -> JSONResponse:
        response = await upstream.trainer("POST", "/runs", json=form.model_dump())
        return hide_folder_details(response, folders_in(form.params.values())) or relay(response)

    @app.post("/api/runs/{run_id}/stop", summary="Stop a run")
    async def stop_run(run_id: str = RunId) -> JSONResponse:
        return relay(await upstream.trainer("POST", f"/runs/{segment(run_id)}/stop"))

    @app.post("/api/runs/{run_id}/resume", summary="Resume an interrupted run")
    async def resume_run(run_id: str = RunId) -> JSONResponse:
        return relay(await upstream.trainer("POST", f"/runs/{segment(run_id)}/resume"))

    @app.delete("/api/runs/{run_id}", status_code=204, summary="Delete an ended run and its files (409 while active)")
    async def delete_run(run_id: str = RunId) -> Response:
        response = await upstream.trainer("DELETE", "/runs/" + segment(run_id))
        return Response(status_code=204) if response.status_code == 204 else relay(response)

    # ------------------------------------------------------------------ live
    @app.get("/api/events", summary="Server-sent events: cluster (each second), runs, publishes, history")
    async def events(request: Request) -> StreamingResponse:
        principal = sessions.principal(request)  # None with public reads: then nothing ends the stream
        valid = sessions.still_valid(principal) if principal is not None else (lambda: True)
        return StreamingResponse(until(feed.subscribe(), valid), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    @app.post("/api/playground", summary="Stream an answer, with the version and replica that produced it")
    async def play(body: PlaygroundRequest) -> Response:
        return await playground.stream(body)

    return app
