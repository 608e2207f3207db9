"""Request and response bodies of the replica's seed-compatible API; every number's bounds are in the schema."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)

from lockstep.core.fields import Number, Text
from lockstep.engine.sampling_params import MAX_NEW_TOKENS, MAX_SEED, MAX_STOP_CHARS, MAX_TOP_K
from lockstep.store.manifest import MAX_VERSION  # what the store and the protocol's records take
from lockstep.sync.protocol import MAX_PINS, PIN_CHARS

MAX_FREE_JSON_ITEMS = 10_000  # values inside one free-form field (tools, response_format): refused beyond


def _finite_json(value: Any) -> Any:
    """Free-form JSON, small, with no NaN or infinity anywhere inside (what passes may be logged or forwarded)."""
    pending = [value]
    seen = 0
    while pending:  # iterative: the body limit bounds the size, not the depth
        item = pending.pop()
        seen += 1
        if seen > MAX_FREE_JSON_ITEMS:
            raise ValueError(f"holds more than {MAX_FREE_JSON_ITEMS} values; this field is never that large")
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("must not hold NaN or Infinity")
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return value


def at_most(limit: int) -> BeforeValidator:
    """Refuse a list or object with more than ``limit`` entries before validating any of them (cheap)."""

    def check(value: Any) -> Any:
        if isinstance(value, (list, dict)) and len(value) > limit:
            raise ValueError(f"has {len(value)} entries; at most {limit} are accepted")
        return value

    return BeforeValidator(check)


FreeJson = Annotated[Any, AfterValidator(_finite_json)]
Temperature = Annotated[Number, Field(ge=0.0, le=2.0, description="0 = greedy")]
TopP = Annotated[Number, Field(gt=0.0, le=1.0, description="nucleus mass kept; 1 = off")]
TopK = Annotated[StrictInt, Field(ge=0, le=MAX_TOP_K, description="tokens kept; 0 = off")]
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
MAX_CHOICES = 64  # answers one request may ask for (n); all of them are admitted together, on one version
NewTokens = Annotated[StrictInt, Field(ge=1, le=MAX_NEW_TOKENS,
                                       description="also at most LOCKSTEP_MAX_NEW_TOKENS_LIMIT and the context")]
StopString = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Version = Annotated[StrictInt, Field(ge=0, le=MAX_VERSION)]
Digest = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$", description="sha256 content digest, lowercase hex")]
# Unix seconds, 1970 to 2286: a wrong clock or unit (milliseconds) is refused instead of waited for.
WallTime = Annotated[Number, Field(ge=0, le=1e10)]
MAX_ROLLOUT_STEP = 1000  # a rollout's steps, the shadow step included, are far fewer
MAX_ACTIVATE_AHEAD_S = 3600.0  # the furthest in the future a commit may be scheduled (coordinators use < 1 s)


MAX_BODY_FIELDS = 64  # top-level fields of a body; more is refused before each is looked at


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_ABOUT = ("title", "description", "default")  # what describes a field, not the values it takes


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """A property's JSON schema that also takes ``null``; a number's bounds stay beside the ``anyOf`` too,
    where readers of the plain schema find them."""
    if "anyOf" in schema:
        if {"type": "null"} not in schema["anyOf"]:
            schema["anyOf"].append({"type": "null"})
        return schema
    about = {key: schema.pop(key) for key in _ABOUT if key in schema}
    bounds = {key: schema[key] for key in _BOUNDS if key in schema}
    return {"anyOf": [schema, {"type": "null"}], **bounds, **about}


def _optional_fields_take_null(schema: dict[str, Any]) -> None:
    """The /openapi.json of a ``NullMeansDefault`` body: every optional field also takes ``null``."""
    required = set(schema.get("required", ()))
    properties = schema.get("properties", {})
    for name, prop in properties.items():
        if name not in required:
            properties[name] = _nullable(prop)


class NullMeansDefault(BaseModel):
    """A body whose optional fields take their default when sent as JSON ``null`` (OpenAI marks them nullable,
    and many clients send null for what they leave unset); the schema says so, each field's bounds unchanged."""

    model_config = ConfigDict(json_schema_extra=_optional_fields_take_null)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls_of_optional_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict) or None not in data.values():
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if value is not None or key not in fields or fields[key].is_required()}


class _StrictBody(BaseModel):
    """A request body whose unknown fields are refused, cheaply however many there are."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _few_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > MAX_BODY_FIELDS:
            raise ValueError(f"the body has {len(data)} fields; the supported ones are {', '.join(cls.model_fields)}")
        return data


class GenerateRequest(NullMeansDefault, _StrictBody):
    """POST /generate (the seed's)."""

    prompt: Text = Field(min_length=1)
    max_new_tokens: NewTokens = 64
    temperature: Temperature = 0.7
    system_prompt: Text | None = None
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None  # answer i of n samples with seed + i
    stop: list[StopString] | None = Field(None, max_length=8)
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)  # answers to the prompt, all from one version
    logprobs: StrictBool = False  # also return each generated token's log-probability (completion_logprobs)


class GenerateChoiceResponse(BaseModel):
    """One of the ``n`` answers of a ``/generate`` request."""

    text: str
    finish_reason: str
    completion_tokens: int
    completion_token_ids: list[int]
    completion_logprobs: list[float | None] | None = None


class GenerateResponse(BaseModel):
    text: str
    model_version: int
    model_repo_id: str
    model_digest: str | None
    replica_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float | None
    completion_token_ids: list[int]  # exactly the tokens generated (a trainer computes log-probs on them)
    # With logprobs: each generated token's log-probability in the distribution it was drawn from (temperature,
    # top-k, top-p applied; greedy: the raw one), null where it is not a finite number.
    completion_logprobs: list[float | None] | None = None
    choices: list[GenerateChoiceResponse] | None = None  # with n > 1: every answer, the first one also above


class UpdateModelRequest(_StrictBody):
    """POST /update-model (the seed's): any model reference."""

    model_repo_id: StrictStr = Field(min_length=1, max_length=1024)


class StageRequest(_StrictBody):
    """POST /admin/stage: load ``model`` as ``version`` beside the serving model."""

    model: StrictStr = Field(min_length=1, max_length=1024)
    version: Version
    digest: Digest | None = None
    check_only: StrictBool = False  # only say whether the model exists and may be loaded here (no staging)
    rollout: StrictStr | None = Field(None, min_length=1, max_length=64)  # both versions stay resident
    peers: list[Annotated[StrictStr, Field(min_length=1, max_length=2048)]] = Field(
        default_factory=list, max_length=16, description="replicas to ask first for the version's chunks, nearest "
        "first; the origin is the fallback")


class CommitRequest(_StrictBody):
    """POST /admin/commit: flip to the staged ``version`` at ``activate_at`` (wall clock; now when omitted)."""

    version: Version
    activate_at: WallTime | None = Field(None, description=f"at most {MAX_ACTIVATE_AHEAD_S:g} s after the replica's "
                                         "clock; a time in the past flips at once")


class SplitRequest(_StrictBody):
    """POST /admin/split: from ``activate_at``, ``share`` percent of new requests to the staged ``version``."""

    rollout: StrictStr = Field(min_length=1, max_length=64)
    version: Version
    model: StrictStr = Field(min_length=1, max_length=1024)
    share: Number = Field(ge=0, le=100)
    step: StrictInt = Field(ge=0, le=MAX_ROLLOUT_STEP)
    activate_at: WallTime | None = None
    shadow: Number = Field(0, ge=0, le=100)
    pins: list[Annotated[StrictStr, Field(min_length=PIN_CHARS, max_length=PIN_CHARS)]] = Field(
        default_factory=list, max_length=MAX_PINS)
    pins_step: StrictInt | None = Field(None, ge=0, le=MAX_ROLLOUT_STEP)


class AbortRequest(_StrictBody):
    """POST /admin/abort: drop what is staged (only ``version`` when given)."""

    version: Version | None = None
