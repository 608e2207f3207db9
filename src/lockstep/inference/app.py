"""The replica's HTTP API (docs/api.md): a thin layer over ``ReplicaRuntime``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Scope

from lockstep.core.errors import BadRequest
from lockstep.core.guards import install_guard
from lockstep.core.http import check_bearer, install_error_handlers
from lockstep.core.numbers import parse_decimal
from lockstep.core.settings import Settings
from lockstep.engine import SamplingParams
from lockstep.inference import generation, openai_api
from lockstep.inference.metrics import ReplicaMetrics
from lockstep.inference.request_count import CountRequests, note_version
from lockstep.inference.runtime import ReplicaRuntime
from lockstep.inference.schemas import (
    MAX_ACTIVATE_AHEAD_S,
    MAX_ROLLOUT_STEP,
    AbortRequest,
    CommitRequest,
    GenerateChoiceResponse,
    GenerateRequest,
    GenerateResponse,
    SplitRequest,
    StageRequest,
    UpdateModelRequest,
)
from lockstep.store.peer_server import peer_router
from lockstep.store.version_cache import VersionCache
from lockstep.sync.protocol import ReplicaStatus, Split

SESSION_HEADER = "X-Lockstep-Session"
MAX_SESSION_CHARS = 256
VERSION_HEADER = "X-Lockstep-Version"  # answer with this resident version (token): a candidate evaluated before traffic


# Characters a header value keeps as they are when it must be percent-encoded: those of URLs and model references.
HEADER_SAFE = "/:@!$&'()*+,;=~"


def header_value(text: str) -> str:
    """``text`` as a header value: itself when printable ASCII, else percent-encoded UTF-8 (docs/api.md).

    HTTP headers are Latin-1 bytes: a model folder named in Cyrillic made every answer a 500."""
    if text.isascii() and text.isprintable():
        return text
    return quote(text.encode("utf-8", "backslashreplace"), safe=HEADER_SAFE)  # never raises, whatever the text


def version_headers(admitted: generation.Admitted, replica_id: str) -> dict[str, str]:
    """The headers every generation carries: the version that produced it, and where."""
    return {"X-Model-Version": str(admitted.version), "X-Model-Repo-Id": header_value(admitted.model_ref),
            "X-Replica-Id": header_value(replica_id)}


def session_key(request: Request, user: str | None = None) -> str | None:
    """The request's session key: the ``X-Lockstep-Session`` header, else the OpenAI ``user`` field."""
    key = request.headers.get(SESSION_HEADER) or user
    if key is not None and len(key) > MAX_SESSION_CHARS:
        raise BadRequest(f"the session key ({SESSION_HEADER} or user) is {len(key)} characters; the limit is "
                         f"{MAX_SESSION_CHARS}")
    return key or None


def target_version(request: Request, settings: Settings) -> int | None:
    """The resident version a caller with the token asks to answer (``X-Lockstep-Version``), or None."""
    raw = request.headers.get(VERSION_HEADER)
    if raw is None:
        return None
    check_bearer(request, settings.api_token)
    version = parse_decimal(raw, max_digits=15)
    if version is None:
        raise BadRequest(f"{VERSION_HEADER} must be a version number, got {raw[:20]!r}")
    return version


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (plain text when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text)["input_ids"])


def plain_prompt(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})


def is_generation(method: str, path: str) -> bool:
    """Requests anyone who reaches the replica may send: they read the model, they change nothing."""
    return method == "POST" and path in GENERATION_PATHS


def metrics_of(scope: Scope) -> ReplicaMetrics | None:
    """The metrics of the replica an app's request reaches (None before its lifespan built the runtime)."""
    runtime: ReplicaRuntime | None = getattr(scope["app"].state, "runtime", None)
    return None if runtime is None else runtime.replica.metrics


def create_app(settings: Settings, *, runtime: ReplicaRuntime | None = None) -> FastAPI:
    """The replica app; tests pass a prepared runtime, the CLI lets the lifespan build one."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime or ReplicaRuntime(settings)
        app.state.runtime = rt
        rt.start()
        try:
            yield
        finally:
            rt.stop()

    app = FastAPI(title="Lockstep inference replica", version="1", lifespan=lifespan)
    install_error_handlers(app)
    install_guard(app, settings, public=is_generation)
    app.add_middleware(CountRequests, counted=is_generation, metrics_of=metrics_of)  # outermost: counts refusals too

    def rt_of(request: Request) -> ReplicaRuntime:
        return request.app.state.runtime  # type: ignore[no-any-return]

    @app.get("/healthz", summary="The process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="200 only when serving the committed version")
    async def ready(request: Request) -> JSONResponse:
        rt = rt_of(request)
        replica = rt.replica
        body = {"ready": replica.ready, "state": replica.state.value,
                "serving_version": replica.serving.version if replica.serving else None,
                "committed_version": replica.committed_version}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/status", summary="Serving and staged versions, state, errors, uptime")
    async def status(request: Request) -> ReplicaStatus:
        return rt_of(request).report()

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        rt = rt_of(request)
        rt.refresh_gauges()
        return Response(generate_latest(rt.replica.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/generate", response_model=GenerateResponse, summary="Generate text (the seed's API)")
    async def generate(body: GenerateRequest, request: Request) -> JSONResponse:
        rt = rt_of(request)
        rt.check_generation_limits(len(body.prompt) + len(body.system_prompt or ""), body.max_new_tokens)
        params = SamplingParams(max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                                top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=tuple(body.stop or ()),
                                logprobs=body.logprobs)
        session, version = session_key(request), target_version(request, settings)
        fit = "max_new_tokens" not in body.model_fields_set  # the default length is cut to fit the context
        if body.system_prompt:
            messages = [{"role": "system", "content": body.system_prompt}, {"role": "user", "content": body.prompt}]
            admitted = await generation.admit_choices(rt.replica, lambda tok: chat_prompt(tok, messages), params,
                                                      body.n, session, version, fit_context=fit)
        else:
            admitted = await generation.admit_choices(rt.replica, lambda tok: plain_prompt(tok, body.prompt),
                                                      params, body.n, session, version, fit_context=fit)
        note_version(request, admitted[0].version)
        finals = await generation.final_events(rt.replica, admitted, rt.token_rate, "/generate",
                                               request.is_disconnected)
        generation.raise_failed(finals)
        first, final = admitted[0], finals[0]
        answer = GenerateResponse(
            text=final.text, model_version=first.version, model_repo_id=first.model_ref,
            model_digest=first.slot.digest, replica_id=rt.replica_id, finish_reason=final.finish_reason.value,
            prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens,
            latency_s=max(f.latency_s for f in finals), ttft_s=final.ttft_s,
            completion_token_ids=list(final.token_ids), completion_logprobs=generation.json_logprobs(final.logprobs),
            choices=[GenerateChoiceResponse(text=f.text, finish_reason=f.finish_reason.value,
                                            completion_tokens=f.completion_tokens,
                                            completion_token_ids=list(f.token_ids),
                                            completion_logprobs=generation.json_logprobs(f.logprobs))
                     for f in finals] if body.n > 1 else None)
        unasked: dict[str, Any] = {} if body.logprobs else {"completion_logprobs": True,
                                                            "choices": {"__all__": {"completion_logprobs"}}}
        if body.n == 1:
            unasked["choices"] = True
        return JSONResponse(answer.model_dump(exclude=unasked), headers=version_headers(first, rt.replica_id))

    # The admin handlers read the store, walk model folders or take the replica's locks: each runs in a worker
    # thread, so a folder with a million files delays only its own answer, never /healthz.
    @app.post("/update-model", status_code=202, summary="Replace the model (cluster-wide with a shared folder)")
    async def update_model(body: UpdateModelRequest, request: Request) -> dict[str, Any]:
        rt = rt_of(request)
        check_bearer(request, settings.api_token)
        return await asyncio.to_thread(rt.start_update, body.model_repo_id)

    @app.post("/admin/stage", status_code=202, summary="Stage a version beside the serving one (two-phase, HTTP)")
    async def admin_stage(body: StageRequest, request: Request, response: Response) -> dict[str, Any]:
        check_bearer(request, settings.api_token)
        rt = rt_of(request)
        if body.check_only:
            response.status_code = 200  # answered now: nothing was accepted to run in the background
            return await asyncio.to_thread(rt.check_model, body.model)
        return await asyncio.to_thread(rt.start_stage, body.model, body.version, body.digest, body.rollout,
                                       body.peers)

    def cache_of(request: Request) -> VersionCache | None:
        store = rt_of(request).store
        return store if isinstance(store, VersionCache) else None

    app.include_router(peer_router(cache_of, settings.api_token, on_served=lambda request, n:
                                   rt_of(request).replica.metrics.peer_bytes_served.inc(n)))

    @app.post("/admin/split", summary="A rollout step: a share of new requests to the staged version at activate_at")
    async def admin_split(body: SplitRequest, request: Request) -> dict[str, Any]:
        check_bearer(request, settings.api_token)
        rt = rt_of(request)
        if body.activate_at is not None and body.activate_at > rt.clock.time() + MAX_ACTIVATE_AHEAD_S:
            raise BadRequest(f"activate_at is over {MAX_ACTIVATE_AHEAD_S:g} s after this replica's clock; check the "
                             "clocks (and that activate_at is in seconds)")
        split = Split(**body.model_dump(exclude={"model"}))
        return await asyncio.to_thread(rt.schedule_split, split, body.model)

    @app.get("/admin/split/sessions", summary="Sessions the committed version answered before a rollout step")
    async def admin_split_sessions(rollout: Annotated[str, Query(min_length=1, max_length=64)],
                                   step: Annotated[int, Query(ge=0, le=MAX_ROLLOUT_STEP)],
                                   request: Request) -> dict[str, Any]:
        check_bearer(request, settings.api_token)
        pins = await rt_of(request).session_pins(rollout, step)
        return {"rollout": rollout, "step": step, "pins": pins}

    @app.post("/admin/commit", summary="Flip to the staged version at activate_at")
    async def admin_commit(body: CommitRequest, request: Request) -> dict[str, Any]:
        check_bearer(request, settings.api_token)
        rt = rt_of(request)
        now = rt.clock.time()
        activate_at = now if body.activate_at is None else body.activate_at
        if activate_at > now + MAX_ACTIVATE_AHEAD_S:
            raise BadRequest(f"activate_at is {activate_at - now:.0f} s after this replica's clock; the limit is "
                             f"{MAX_ACTIVATE_AHEAD_S:g} s. Coordinators commit a moment ahead: check the clocks "
                             "(and that activate_at is in seconds)")
        return await asyncio.to_thread(rt.schedule_commit, body.version, activate_at)

    @app.post("/admin/abort", summary="Drop what is staged")
    async def admin_abort(body: AbortRequest, request: Request) -> dict[str, Any]:
        check_bearer(request, settings.api_token)
        return await asyncio.to_thread(rt_of(request).abort_stage, body.version)

    openai_api.install(app, rt_of)
    return app
