"""Request bodies of the trainer API and the parameters of each run kind (bounds name what is allowed)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, model_validator

from lockstep.core.settings import CommitPolicy


def _no_bool(value: Any) -> Any:
    # JSON true/false must not pass as 1/0 for numeric fields.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Number = Annotated[float, BeforeValidator(_no_bool)]
ModelRefText = Annotated[StrictStr, Field(min_length=1, max_length=1024)]
TimeoutS = Annotated[Number, Field(gt=0, le=86_400)]  # seconds a publish waits for every replica to stage


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunRequest(_Strict):
    """``POST /runs``."""

    kind: StrictStr = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)


class PublishRequest(_Strict):
    """``POST /publish``: any model reference."""

    model: ModelRefText
    policy: CommitPolicy | None = None
    timeout_s: TimeoutS | None = None


class UploadPublishRequest(_Strict):
    """``POST /store/uploads/{id}/publish``: the uploaded folder becomes the next version."""

    label: StrictStr | None = Field(None, min_length=1, max_length=1024)  # MANIFEST "source" (default: the upload)
    metadata: dict[str, Any] = Field(default_factory=dict)  # into MANIFEST.json: step, loss, reward...
    policy: CommitPolicy | None = None
    timeout_s: TimeoutS | None = None


class RollbackRequest(_Strict):
    """``POST /rollback``: ``to`` a published version (default: the one before the committed version)."""

    to: StrictInt | None = Field(None, ge=0)
    policy: CommitPolicy | None = None
    timeout_s: TimeoutS | None = None


class SimulationParams(_Strict):
    """The seed's simulation: switch between two models, round after round, and check every replica."""

    rounds: StrictInt = Field(4, ge=1, le=1000)
    interval_s: Number = Field(0.0, ge=0, le=3600)  # pause between rounds, seconds
    initial_model: ModelRefText | None = None  # default INITIAL_MODEL
    substitute_model: ModelRefText | None = None  # default SUBSTITUTE_MODEL
    requests_per_replica: StrictInt = Field(4, ge=0, le=1000)  # sent to each replica after it converged
    background_load: bool = True  # keep requests flowing during each switch (none may fail)
    max_new_tokens: StrictInt = Field(8, ge=1, le=1024)
    converge_timeout_s: Number = Field(60.0, gt=0, le=3600)
    policy: CommitPolicy | None = None
    timeout_s: TimeoutS | None = None


class FinetuneParams(_Strict):
    """Real training on the trainer's own copy, with rollouts from the replicas."""

    task: StrictStr = "digits"
    reward: StrictStr | None = Field(None, max_length=300)  # plug-in 'package.module:function'
    model: ModelRefText | None = None  # default: what the cluster serves
    steps: StrictInt = Field(30, ge=1, le=100_000)
    publish_every: StrictInt = Field(3, ge=1, le=100_000)
    batch_size: StrictInt = Field(8, ge=1, le=1024)  # prompts per step
    group_size: StrictInt = Field(4, ge=2, le=64)  # samples per prompt (the group baseline needs two)
    max_new_tokens: StrictInt = Field(16, ge=1, le=1024)
    temperature: Number = Field(1.0, gt=0, le=2)
    top_k: StrictInt = Field(0, ge=0, le=1_000_000)
    learning_rate: Number = Field(3e-3, gt=0, le=1)
    weight_decay: Number = Field(0.0, ge=0, le=1)
    max_grad_norm: Number = Field(1.0, gt=0, le=1e6)
    algorithm: Literal["grpo", "reinforce", "sft_best"] = "grpo"
    max_staleness: StrictInt = Field(0, ge=0, le=1000)  # versions; 0 = strictly on-policy
    eval_prompts: StrictInt = Field(16, ge=0, le=1024)
    samples_per_version: StrictInt = Field(4, ge=0, le=64)
    seed: StrictInt = Field(0, ge=0, lt=2**31)
    policy: CommitPolicy | None = None
    timeout_s: TimeoutS | None = None

    @model_validator(mode="after")
    def _rollouts_per_step(self) -> FinetuneParams:
        if self.batch_size * self.group_size > 4096:
            total = self.batch_size * self.group_size
            raise ValueError(f"batch_size × group_size = {total} rollouts per step; "
                             "at most 4096 are allowed")
        return self
