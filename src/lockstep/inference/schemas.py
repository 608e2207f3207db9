"""Request and response bodies of the replica's seed-compatible API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr


def _no_bool(value: Any) -> Any:
    # JSON true/false must not pass as 1/0 for numeric fields.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Number = Annotated[float, BeforeValidator(_no_bool)]


class GenerateRequest(BaseModel):
    """POST /generate (the seed's)."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(min_length=1)
    max_new_tokens: StrictInt = Field(64, ge=1)
    temperature: Number = Field(0.7, ge=0.0, le=2.0)
    system_prompt: StrictStr | None = None
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    stop: list[StrictStr] | None = Field(None, max_length=8)


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


class UpdateModelRequest(BaseModel):
    """POST /update-model (the seed's): any model reference."""

    model_config = ConfigDict(extra="forbid")

    model_repo_id: StrictStr = Field(min_length=1, max_length=1024)


class StageRequest(BaseModel):
    """POST /admin/stage: load ``model`` as ``version`` beside the serving model."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1, max_length=1024)
    version: StrictInt = Field(ge=0)
    digest: StrictStr | None = None
    check_only: StrictBool = False  # only say whether the model exists and may be loaded here (no staging)


class CommitRequest(BaseModel):
    """POST /admin/commit: flip to the staged ``version`` at ``activate_at`` (wall clock; now when omitted)."""

    model_config = ConfigDict(extra="forbid")

    version: StrictInt = Field(ge=0)
    activate_at: Number | None = None


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: StrictInt | None = Field(None, ge=0)
