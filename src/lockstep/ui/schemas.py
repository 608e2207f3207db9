"""What the page may send: each form is checked here again before it reaches the trainer or a replica."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    field_validator,
)

from lockstep.core.fields import Number

# An id the trainer gave a run or a publish; never a path: no '/', no '..', no spaces.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# A model reference: repo id, a folder on the trainer's side, versions/N or builtin:*; no spaces or controls.
REF_PATTERN = r"^[A-Za-z0-9_./:@~+-]+$"
# A replica as the page names it: its id or the URL the trainer lists for it.
REPLICA_PATTERN = r"^[A-Za-z0-9_.:/\[\]@-]{1,300}$"
PARAM_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


class _Form(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


# The trainer's bounds on a rollout (lockstep.trainer.server.schemas.PublishRequest, lockstep.sync.rollout): the
# order of the shares and each gate's own range are left to the trainer, whose refusal names what is allowed.
MAX_CANARY_STEPS = 20
MAX_GATES = 32
MAX_GATE_THRESHOLD = 1e9  # the widest gate range is "finite, at least 0"; an upper bound keeps it a plain number
MAX_COUNT = 10**9
GATE_SETTING_HELP = ('a gate takes a threshold (a number), an object {"threshold": x, "min_samples": n}, '
                     "or null to turn it off")

Share = Annotated[Number, Field(gt=0, le=100)]
GateThreshold = Annotated[Number, Field(ge=0, le=MAX_GATE_THRESHOLD)]


class GateForm(_Form):
    """One gate's threshold and the answers it needs before it may fail (the default for what is left out)."""

    threshold: GateThreshold | None = None
    min_samples: Annotated[StrictInt, Field(ge=1, le=MAX_COUNT)] | None = None


def _gate_kind(value: Any) -> str | None:
    # Which form a gate setting takes; None (true/false, strings, lists) gets GATE_SETTING_HELP as its error.
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return "threshold"
    if isinstance(value, dict | GateForm):
        return "object"
    return None


GateSetting = Annotated[
    Annotated[GateThreshold, Tag("threshold")] | Annotated[GateForm, Tag("object")],
    Discriminator(_gate_kind, custom_error_type="gate_setting", custom_error_message=GATE_SETTING_HELP)]
GateName = Annotated[StrictStr, Field(max_length=64, pattern=PARAM_NAME_PATTERN)]


class PublishForm(_Form):
    """POST /api/publish: a model reference to publish to every replica; with canary or shadow, a rollout."""

    model: StrictStr = Field(min_length=1, max_length=500, pattern=REF_PATTERN,
                             description="repo id, versions/N, builtin:tiny-sN or a folder the trainer reads")
    policy: Literal["strict", "quorum"] | None = None
    timeout_s: Annotated[Number, Field(gt=0, le=3600)] | None = Field(
        None, description="seconds to wait for every replica to stage")
    canary: list[Share] | None = Field(None, min_length=1, max_length=MAX_CANARY_STEPS,
                                       description="the steps' shares in percent, increasing, like [5, 25, 100]")
    step_seconds: Annotated[Number, Field(ge=0, le=86_400)] | None = (
        Field(None, description="seconds each step holds at least (trainer default 60)"))
    min_requests: Annotated[StrictInt, Field(ge=0, le=MAX_COUNT)] | None = Field(
        None, description="candidate answers each step needs before it may advance (trainer default 100)")
    shadow: Annotated[Number, Field(ge=0, le=100)] | None = Field(
        None, description="percent of the committed version's prompts also run on the candidate, unanswered")
    gates: dict[GateName, GateSetting | None] | None = Field(
        None, max_length=MAX_GATES, description="gate name → threshold, {threshold, min_samples}, or null (off)")



class RollbackForm(_Form):
    """POST /api/rollback: commit an earlier version again (the one before the committed one by default)."""

    to: Annotated[StrictInt, Field(ge=0, le=10**12)] | None = None  # a version number (at most 12 digits)
    policy: Literal["strict", "quorum"] | None = None


ParamValue = StrictBool | StrictInt | Number | Annotated[StrictStr, Field(max_length=500)]


class RunForm(_Form):
    """POST /api/runs: a simulation or fine-tune run and its parameters."""

    kind: Literal["simulation", "finetune"]
    params: dict[str, ParamValue] = Field(default_factory=dict, max_length=32)

    @field_validator("params")
    @classmethod
    def _names(cls, params: dict[str, ParamValue]) -> dict[str, ParamValue]:
        for name in params:
            if not re.fullmatch(PARAM_NAME_PATTERN, name):
                raise ValueError(f"parameter name {name!r} is not allowed: use lower_snake_case "
                                 "letters and digits")
        return params


class PlaygroundRequest(_Form):
    """POST /api/playground: one prompt, streamed back with the version and replica that answered it."""

    prompt: StrictStr = Field(min_length=1, max_length=8000)
    max_tokens: StrictInt = Field(64, ge=1, le=1024)
    temperature: Number = Field(0.7, ge=0.0, le=2.0)
    replica: StrictStr | None = Field(None, pattern=REPLICA_PATTERN,
                                      description="replica id or URL from the cluster; none: round robin")

    @field_validator("replica", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class LoginForm(_Form):
    """POST /api/login: the operator's API token, exchanged for a session cookie."""

    token: StrictStr = Field(min_length=1, max_length=4096, description="LOCKSTEP_API_TOKEN")
