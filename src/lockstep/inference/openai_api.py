"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming as SSE)."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from lockstep.core.errors import BadRequest, NotFound
from lockstep.core.fields import Number, Text
from lockstep.engine import FinalEvent, SamplingParams, TokenEvent
from lockstep.inference import generation
from lockstep.inference.request_count import note_version
from lockstep.inference.schemas import (
    MAX_CHOICES,
    FreeJson,
    NewTokens,
    NullMeansDefault,
    Seed,
    StopString,
    Temperature,
    TopK,
    TopP,
    at_most,
)

# Hard caps of the schema, checked before any item is validated: a 1 MiB body of tiny messages would otherwise
# cost hundreds of milliseconds of validation, holding the GIL. LOCKSTEP_MAX_CHAT_MESSAGES (at most this) is the
# configured limit on messages.
MAX_CHAT_MESSAGES = 4096
MAX_CONTENT_PARTS = 4096  # text parts over all messages of one request

RuntimeOf = Callable[[Request], Any]


class ModelNotFound(BadRequest):
    code = "model_not_found"


class UnknownModel(NotFound):
    """GET /v1/models/{id} of a model not served here (OpenAI: 404 ``model_not_found``)."""

    code = "model_not_found"


class StreamOptions(NullMeansDefault):
    include_usage: StrictBool = False


Penalty = Annotated[Number, Field(ge=-2.0, le=2.0, description="only 0 is supported")]
ShortText = Annotated[StrictStr, Field(max_length=256)]


class _Common(NullMeansDefault):
    """Fields shared by both endpoints; known-but-unsupported ones are refused with a 400 that says so."""

    model_config = ConfigDict(extra="ignore")

    model: ShortText
    max_tokens: NewTokens | None = None
    max_completion_tokens: NewTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES, description="choices, all written by one version")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: Annotated[dict[str, Annotated[Number, Field(ge=-100, le=100)]], at_most(300)] | None = Field(
        None, max_length=300, description="not supported")
    user: ShortText | None = None

    def unsupported(self) -> list[str]:
        bad = []
        if self.presence_penalty or self.frequency_penalty:
            bad.append("presence_penalty/frequency_penalty (only 0 is supported)")
        if self.logit_bias:
            bad.append("logit_bias")
        return bad

    @property
    def wants_logprobs(self) -> bool:
        """Whether each answer's tokens come with their log-probabilities."""
        return False

    @property
    def length_given(self) -> bool:
        """Whether the client chose the answer's length (else the default is cut to fit the context)."""
        return self.max_tokens is not None or self.max_completion_tokens is not None

    def sampling(self, default_max: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                              stop=tuple(stop), logprobs=self.wants_logprobs)


class CompletionRequest(_Common):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=64)]
    logprobs: StrictInt | None = Field(None, ge=0, le=5, description="0: each chosen token's log-probability; "
                                      "alternatives (1 … 5) are not supported")
    echo: StrictBool = False
    best_of: StrictInt | None = Field(None, ge=1, le=20, description="only 1 is supported")
    suffix: Text | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.logprobs:
            bad.append("logprobs above 0 (alternative tokens; 0 gives each chosen token's log-probability)")
        if self.echo:
            bad.append("echo")
        if self.best_of not in (None, 1):
            bad.append("best_of")
        if self.suffix:
            bad.append("suffix")
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            bad.append("prompt as a list of several prompts (send one prompt per request)")
        return bad

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None


class ContentPart(BaseModel):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is supported."""

    model_config = ConfigDict(extra="ignore")

    type: ShortText
    text: Text | None = None


class ChatMessage(BaseModel):
    """One message of a conversation: a known role and text (a string or text parts)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)]  # and all together

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise BadRequest("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported in "
                                 "messages")
            parts.append(part.text)
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES,
                                        description="also at most LOCKSTEP_MAX_CHAT_MESSAGES")
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20, description="only 0: alternatives are not supported")
    tools: list[FreeJson] | None = Field(None, max_length=128, description="not supported")
    response_format: Annotated[dict[str, FreeJson], at_most(64)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bounded_before_validation(cls, data: Any) -> Any:
        """Count messages and content parts before validating any of them (what keeps validation cheap)."""
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list):
            return data  # the field's own validation says what is wrong
        if len(messages) > MAX_CHAT_MESSAGES:
            raise ValueError(f"messages holds {len(messages)} messages; at most {MAX_CHAT_MESSAGES} are accepted "
                             "(LOCKSTEP_MAX_CHAT_MESSAGES may be lower)")
        parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > MAX_CONTENT_PARTS:
            raise ValueError(f"messages hold {parts} content parts together; at most {MAX_CONTENT_PARTS} are accepted")
        return data

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.top_logprobs:
            bad.append("top_logprobs above 0 (alternative tokens; logprobs: true gives each chosen token's)")
        if self.tools:
            bad.append("tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            bad.append("response_format other than text")
        return bad

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)


UNLIKELY = -9999.0  # OpenAI's log-probability for a token too unlikely to state (here: one that underflowed)


class TokenLogprobs:
    """One answer's tokens and their log-probabilities in OpenAI's shapes, in pieces as a stream delivers them."""

    def __init__(self, tokenizer: Any, kind: Literal["text_completion", "chat.completion"]) -> None:
        self.tokenizer, self.kind = tokenizer, kind
        self.offset = 0  # text_offset of the next token (completions)
        self._ids: list[int] = []
        self._logprobs: list[float] = []

    def add(self, ids: tuple[int, ...], logprobs: tuple[float, ...] | None) -> None:
        self._ids += ids
        self._logprobs += logprobs if logprobs is not None else [math.nan] * len(ids)

    def take(self) -> dict[str, Any] | None:
        """The ``logprobs`` of the tokens added since the last take (None when there are none)."""
        if not self._ids:
            return None
        tokens = [self.tokenizer.decode([i]) for i in self._ids]
        values = self._logprobs
        self._ids, self._logprobs = [], []
        if self.kind == "chat.completion":
            return {"content": [{"token": t, "logprob": v if math.isfinite(v) else UNLIKELY,
                                 "bytes": list(t.encode("utf-8", errors="replace")), "top_logprobs": []}
                                for t, v in zip(tokens, values, strict=True)], "refusal": None}
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return {"tokens": tokens, "token_logprobs": generation.json_logprobs(values),
                "top_logprobs": None, "text_offset": offsets}


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def usage_of(finals: list[FinalEvent]) -> dict[str, int]:
    """OpenAI's usage: the prompt once, the tokens of every choice."""
    prompt = finals[0].prompt_tokens if finals else 0
    completion = sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def install(app: FastAPI, rt_of: RuntimeOf) -> None:
    """Add the /v1 routes to a replica app."""
    from lockstep.inference.app import chat_prompt, plain_prompt, session_key, target_version, version_headers

    def model_id(rt: Any, version: int) -> str:
        return f"{rt.settings.served_model_name}@v{version}"

    def check_model(rt: Any, requested: str) -> None:
        serving = rt.replica.serving
        allowed = {rt.settings.served_model_name}
        if serving is not None:
            allowed |= {model_id(rt, serving.version), serving.model_ref}
        if requested not in allowed:
            raise ModelNotFound(f"model {requested!r} is not served here; use one of {sorted(allowed)} "
                                "(GET /v1/models lists them)")

    def validate(rt: Any, body: _Common, prompt_chars: int) -> SamplingParams:
        check_model(rt, body.model)
        bad = body.unsupported()
        if bad:
            raise BadRequest(f"unsupported parameter(s): {', '.join(bad)}")
        params = body.sampling(default_max=16 if isinstance(body, CompletionRequest) else 256)
        rt.check_generation_limits(prompt_chars, params.max_new_tokens)
        return params

    def served_models(rt: Any) -> list[dict[str, Any]]:
        """OpenAI model objects: the served name, and the same with its version (``lockstep@v<N>``)."""
        serving = rt.replica.serving
        if serving is None:
            return []
        created = int(serving.serving_since or time.time())
        return [{"id": mid, "object": "model", "created": created, "owned_by": "lockstep",
                 "version": serving.version, "root": serving.model_ref}
                for mid in (rt.settings.served_model_name, model_id(rt, serving.version))]

    @app.get("/v1/models", summary="OpenAI: the served model")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": served_models(rt_of(request))}

    @app.get("/v1/models/{model:path}", summary="OpenAI: one model that GET /v1/models lists")
    async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
        models = served_models(rt_of(request))
        found = next((m for m in models if m["id"] == model), None)
        if found is None:
            raise UnknownModel(f"the model {model!r} does not exist here; GET /v1/models lists the served ones "
                               f"({', '.join(m['id'] for m in models) or 'none while no model is loaded'})")
        return found

    async def respond(request: Request, rt: Any, admitted: list[generation.Admitted], body: _Common,
                      kind: Literal["text_completion", "chat.completion"], endpoint: str) -> Any:
        first = admitted[0]
        version = first.version
        note_version(request, version)
        digest = (first.slot.digest or first.slot.weights_digest)[:12]
        common = {"id": f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}",
                  "created": int(time.time()), "model": model_id(rt, version),
                  "system_fingerprint": f"v{version}-{digest}"}
        headers = version_headers(first, rt.replica_id)
        if not body.stream:
            finals = await generation.final_events(rt.replica, admitted, rt.token_rate, endpoint,
                                                   request.is_disconnected)
            generation.raise_failed(finals)
            choices = []
            for index, final in enumerate(finals):
                reason = final.finish_reason.value
                logprobs = None
                if body.wants_logprobs:
                    answer = TokenLogprobs(first.slot.tokenizer, kind)
                    answer.add(final.token_ids, final.logprobs)
                    logprobs = answer.take()
                if kind == "text_completion":
                    choices.append({"index": index, "text": final.text, "finish_reason": reason,
                                    "logprobs": logprobs})
                else:
                    choices.append({"index": index, "message": {"role": "assistant", "content": final.text},
                                    "finish_reason": reason, "logprobs": logprobs})
            return JSONResponse({**common, "object": kind, "choices": choices, "usage": usage_of(finals)},
                                headers=headers)

        chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[bytes]:
            if kind == "chat.completion":
                yield _sse({**common, "object": chunk_kind, "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    for i in range(len(admitted))]})
            finals: list[FinalEvent] = []
            # Tokens whose text is still pending (a split UTF-8 character, a possible stop string) keep their
            # log-probabilities until a chunk carries text.
            pending = [TokenLogprobs(a.slot.tokenizer, kind) for a in admitted] if body.wants_logprobs else None
            async with aclosing(interleaved(rt, admitted, endpoint)) as events:  # a break cancels the rest now
                async for index, event in events:
                    if isinstance(event, TokenEvent):
                        if pending is not None:
                            pending[index].add(event.token_ids, event.logprobs)
                        if not event.text:
                            continue
                        logprobs = pending[index].take() if pending is not None else None
                        if kind == "text_completion":
                            choice = {"index": index, "text": event.text, "finish_reason": None,
                                      "logprobs": logprobs}
                        else:
                            choice = {"index": index, "delta": {"content": event.text}, "finish_reason": None}
                            if pending is not None:
                                choice["logprobs"] = logprobs
                        yield _sse({**common, "object": chunk_kind, "choices": [choice]})
                    elif isinstance(event, FinalEvent):
                        if event.finish_reason.value == "error":
                            yield _sse({"error": {"message": f"generation failed: {event.error}",
                                                  "type": "server_error", "param": None, "code": "server_error"}})
                            break
                        finals.append(event)
                        logprobs = pending[index].take() if pending is not None else None
                        if kind == "text_completion":
                            choice = {"index": index, "text": "", "finish_reason": event.finish_reason.value,
                                      "logprobs": logprobs}
                        else:
                            choice = {"index": index, "delta": {}, "finish_reason": event.finish_reason.value}
                            if pending is not None:
                                choice["logprobs"] = logprobs
                        yield _sse({**common, "object": chunk_kind, "choices": [choice]})
                else:
                    if include_usage:
                        yield _sse({**common, "object": chunk_kind, "choices": [], "usage": usage_of(finals)})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def interleaved(rt: Any, admitted: list[generation.Admitted], endpoint: str
                          ) -> AsyncGenerator[tuple[int, TokenEvent | FinalEvent], None]:
        """The events of every choice as they come, each with its choice's index; leaving early cancels them all."""
        if len(admitted) == 1:  # the common case, without a task per choice
            async for event in generation.events(rt.replica, admitted[0], rt.token_rate, endpoint):
                yield 0, event
            return
        arrived: asyncio.Queue[tuple[int, TokenEvent | FinalEvent | None]] = asyncio.Queue()

        async def pump(index: int, one: generation.Admitted) -> None:
            try:
                async for event in generation.events(rt.replica, one, rt.token_rate, endpoint):
                    arrived.put_nowait((index, event))
            finally:
                arrived.put_nowait((index, None))  # this choice has no more events

        pumps = [asyncio.create_task(pump(i, a)) for i, a in enumerate(admitted)]
        try:
            running = len(pumps)
            while running:
                index, item = await arrived.get()
                if item is None:
                    running -= 1
                else:
                    yield index, item
        finally:
            for task in pumps:  # a consumer gone early: each pump's events() cancels its request
                task.cancel()

    @app.post("/v1/completions", summary="OpenAI: text completion")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        rt = rt_of(request)
        params = validate(rt, body, len(body.text))
        if not body.text:
            raise BadRequest("prompt must not be empty")
        admitted = await generation.admit_choices(rt.replica, lambda tok: plain_prompt(tok, body.text), params,
                                                  body.n, session_key(request, body.user),
                                                  target_version(request, rt.settings),
                                                  fit_context=not body.length_given)
        return await respond(request, rt, admitted, body, "text_completion", "/v1/completions")

    @app.post("/v1/chat/completions", summary="OpenAI: chat completion")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        rt = rt_of(request)
        limit = rt.settings.max_chat_messages
        if len(body.messages) > limit:
            raise BadRequest(f"messages holds {len(body.messages)} messages; the limit is {limit} "
                             "(LOCKSTEP_MAX_CHAT_MESSAGES): send a shorter conversation")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        params = validate(rt, body, sum(len(m["content"]) for m in messages))  # all messages' characters
        admitted = await generation.admit_choices(rt.replica, lambda tok: chat_prompt(tok, messages), params,
                                                  body.n, session_key(request, body.user),
                                                  target_version(request, rt.settings),
                                                  fit_context=not body.length_given)
        return await respond(request, rt, admitted, body, "chat.completion", "/v1/chat/completions")
