"""The UI server's app: the page, its files, a checked proxy to the trainer, the live feed, the playground."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lockstep.core.errors import NotFound
from lockstep.core.http import install_error_handlers
from lockstep.core.settings import Settings
from lockstep.ui.assets import Assets
from lockstep.ui.feed import Feed
from lockstep.ui.playground import Playground
from lockstep.ui.schemas import ID_PATTERN, PlaygroundRequest, PublishForm, RollbackForm, RunForm
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

RunId = Path(pattern=ID_PATTERN, description="a run id as the trainer lists it")
PublishId = Path(pattern=ID_PATTERN, description="a publish id as the trainer lists it")


def relay(response: httpx.Response) -> JSONResponse:
    """The trainer's answer as it is (status and JSON body), errors included."""
    return JSONResponse(parse_json(response), status_code=response.status_code)


def create_app(settings: Settings, *, http_client: httpx.AsyncClient | None = None) -> FastAPI:
    """The UI app; tests may pass their own HTTP client (it is then not closed here)."""
    client = http_client or httpx.AsyncClient(trust_env=False)  # cluster-internal calls never go via a proxy
    upstream = Upstream(settings, client)
    feed = Feed(upstream)
    playground = Playground(settings, upstream)
    assets = Assets()

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

    @app.get("/api/config", summary="What the page needs to know about this UI server")
    async def config() -> dict[str, Any]:
        return {"trainer_url": upstream.trainer_url, "inference_service_url": settings.inference_service_url,
                "served_model_name": settings.served_model_name, "token_configured": bool(settings.api_token),
                "feed_interval_s": feed.interval_s}

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
    @app.post("/api/publish", summary="Publish a model reference to every replica")
    async def publish(form: PublishForm) -> JSONResponse:
        return relay(await upstream.trainer("POST", "/publish", json=form.model_dump(exclude_none=True)))

    @app.post("/api/rollback", summary="Commit an earlier version again")
    async def rollback(form: RollbackForm) -> JSONResponse:
        return relay(await upstream.trainer("POST", "/rollback", json=form.model_dump(exclude_none=True)))

    @app.post("/api/runs", summary="Start a simulation or fine-tune run")
    async def start_run(form: RunForm) -> JSONResponse:
        return relay(await upstream.trainer("POST", "/runs", json=form.model_dump()))

    @app.post("/api/runs/{run_id}/stop", summary="Stop a run")
    async def stop_run(run_id: str = RunId) -> JSONResponse:
        return relay(await upstream.trainer("POST", f"/runs/{segment(run_id)}/stop"))

    @app.post("/api/runs/{run_id}/resume", summary="Resume an interrupted run")
    async def resume_run(run_id: str = RunId) -> JSONResponse:
        return relay(await upstream.trainer("POST", f"/runs/{segment(run_id)}/resume"))

    # ------------------------------------------------------------------ live
    @app.get("/api/events", summary="Server-sent events: cluster (each second), runs, publishes, history")
    async def events() -> StreamingResponse:
        return StreamingResponse(feed.subscribe(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/api/playground", summary="Stream an answer, with the version and replica that produced it")
    async def play(body: PlaygroundRequest) -> Response:
        return await playground.stream(body)

    return app
