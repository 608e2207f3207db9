"""Request bodies of the trainer API and the parameters of each run kind (bounds name what is allowed).

Every number has both bounds and must be finite, every string and collection a maximum length; ``/openapi.json``
shows them, the run kinds' parameters included.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from lockstep.core.fields import Number, encodable
from lockstep.core.settings import CommitPolicy
from lockstep.store.chunks import ChunkEntry
from lockstep.store.manifest import MAX_FILE_BYTES, MAX_MANIFEST_CHUNKS

METADATA_KEYS = 64  # entries of a version's metadata (step, loss, reward...)
METADATA_CHARS = 16_384  # its size as JSON
METADATA_DEPTH = 4  # nesting of lists and objects in it
SAFE_INT = 2**53  # larger integers lose precision in JavaScript (the UI)


ModelRefText = Annotated[StrictStr, Field(min_length=1, max_length=1024)]
# seconds a publish waits for every replica to stage
TimeoutS = Annotated[Number, Field(gt=0, le=86_400)]


def _check_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata goes into MANIFEST.json as it is: plain JSON, small, finite numbers, shallow, Unicode."""
    def unicode(text: str, where: str) -> None:
        try:  # a lone surrogate would make a MANIFEST.json that no replica can read
            encodable(text)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def walk(value: Any, depth: int, where: str) -> None:
        if depth > METADATA_DEPTH:
            raise ValueError(f"{where} is nested deeper than {METADATA_DEPTH} levels")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where} is {value}; only finite numbers are allowed")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > SAFE_INT:
            raise ValueError(f"{where} is beyond ±2^53")
        if isinstance(value, str):
            unicode(value, where)
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in children:
            if isinstance(key, str):
                unicode(key, f"a key of {where}")
            walk(child, depth + 1, f"{where}.{key}")

    for key, value in metadata.items():
        unicode(key, "a metadata key")
        if not key or len(key) > 128:
            raise ValueError(f"metadata key {key[:40]!r}... must be 1 to 128 characters")
        walk(value, 1, key)
    if len(json.dumps(metadata)) > METADATA_CHARS:
        raise ValueError(f"metadata is over {METADATA_CHARS} characters as JSON; keep it to a few figures")
    return metadata


Metadata = Annotated[dict[str, Any], Field(max_length=METADATA_KEYS), AfterValidator(_check_metadata)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


GateValue = Annotated[Number, Field(ge=0, le=1e9)]  # gates check more


class GateOverride(_Strict):
    """One gate's threshold and the answers it needs before it may fail."""

    threshold: GateValue | None = None
    min_samples: Annotated[StrictInt, Field(ge=1, le=10**9)] | None = None


Share = Annotated[Number, Field(gt=0, le=100)]  # percent of requests


ROLLOUT_ONLY = frozenset({"step_seconds", "min_requests", "gates", "task", "task_prompts"})


class RolloutFields(_Strict):
    """A publish's rollout: with ``canary`` or ``shadow`` it is staged everywhere, then given its shares step by step
    (docs/api.md, Rollouts)."""

    canary: list[Share] | None = Field(
        None, min_length=1, max_length=20, description="shares in percent, increasing, like [5, 25, 100]")
    step_seconds: Annotated[Number, Field(ge=0, le=86_400)] = 60.0
    min_requests: Annotated[StrictInt, Field(ge=0, le=10**9)] = 100
    shadow: Annotated[Number, Field(ge=0, le=100)] = 0.0
    gates: dict[Annotated[str, Field(max_length=64)], GateValue | GateOverride | None] | None = Field(
        None, max_length=32, description="gate name → threshold, {threshold, min_samples}, or null to turn it off")
    task: Literal["digits", "target_word"] | None = Field(
        None, description="score the candidate on this built-in task's held-out prompts before the first step "
        "(the task_score gate)")
    task_prompts: Annotated[StrictInt, Field(ge=1, le=256)] = 16

    @property
    def is_rollout(self) -> bool:
        return self.canary is not None or self.shadow > 0

    @model_validator(mode="after")
    def _rollout_fields_need_a_rollout(self) -> RolloutFields:
        # Without canary or shadow the publish commits at once: a gate or a hold asked for would be ignored.
        given = sorted(self.model_fields_set & ROLLOUT_ONLY)
        if given and not self.is_rollout:
            raise ValueError(f"{', '.join(given)} belong to a rollout (task scores its candidate before the first "
                             "step): add canary (shares, like [5, 25, 100]) or shadow, or leave them out")
        return self

    def gate_specs(self) -> dict[str, Any] | None:
        if self.gates is None:
            return None
        return {name: g.model_dump(exclude_none=True) if isinstance(g, GateOverride) else g
                for name, g in self.gates.items()}


class PublishRequest(RolloutFields):
    """``POST /publish``: any model reference; with ``canary`` or ``shadow``, a rollout."""

    model: ModelRefText
    policy: CommitPolicy | None = None
    timeout_s: TimeoutS | None = None


class UploadPublishRequest(RolloutFields):
    """``POST /store/uploads/{id}/publish``: the uploaded folder becomes the next version."""

    label: StrictStr | None = Field(None, min_length=1, max_length=1024)  # MANIFEST "source" (default: the upload)
    metadata: Metadata = Field(default_factory=dict)  # into MANIFEST.json: step, loss, reward...
    policy: CommitPolicy | None = None
    timeout_s: TimeoutS | None = None


class ChunkedFile(_Strict):
    """``PUT /store/uploads/{id}/chunked/{path}``: a file of an upload as its size, sha256 and chunks, in order."""

    size: StrictInt = Field(ge=0, le=MAX_FILE_BYTES)
    sha256: StrictStr = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")
    chunks: list[ChunkEntry] = Field(max_length=MAX_MANIFEST_CHUNKS)

    @field_validator("chunks", mode="before")
    @classmethod
    def _integer_ranges(cls, chunks: Any) -> Any:
        # ChunkEntry also reads MANIFESTs, tolerantly; in a request, "5" or true is no byte count.
        for i, chunk in enumerate(chunks if isinstance(chunks, list) else ()):
            for key in ("offset", "size"):
                value = chunk.get(key) if isinstance(chunk, dict) else None
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ValueError(f"chunks[{i}].{key} must be an integer number of bytes, got {value!r:.40}")
        return chunks


class RollbackRequest(_Strict):
    """``POST /rollback``: ``to`` a published version (default: the one before the committed version)."""

    to: StrictInt | None = Field(None, ge=0, le=10**12)  # a version number (they have at most 12 digits)
    policy: CommitPolicy | None = None
    timeout_s: TimeoutS | None = None


class SimulationParams(_Strict):
    """The seed's simulation: switch between two models, round after round, and check every replica."""

    rounds: StrictInt = Field(4, ge=1, le=1000)
    interval_s: Number = Field(0.0, ge=0, le=3600)  # pause between rounds, seconds
    initial_model: ModelRefText | None = None  # default INITIAL_MODEL
    substitute_model: ModelRefText | None = None  # default SUBSTITUTE_MODEL
    requests_per_replica: StrictInt = Field(4, ge=0, le=1000)  # sent to each replica after it converged
    background_load: StrictBool = True  # keep requests flowing during each switch (none may fail)
    max_new_tokens: StrictInt = Field(8, ge=1, le=1024)
    converge_timeout_s: Number = Field(60.0, gt=0, le=3600)
    policy: CommitPolicy | None = None
    timeout_s: TimeoutS | None = None


MAX_RUN_PROMPTS = 1_000_000  # steps × batch_size
# What only the GRPO updates (grpo, reinforce) read: an sft_best run given one of them would silently ignore it.
GRPO_ONLY = frozenset({"loss_type", "beta", "epsilon", "scale_rewards", "num_iterations", "trl_args"})


class FinetuneParams(_Strict):
    """Training on the trainer's own copy with TRL (GRPO), with rollouts from the replicas."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    task: StrictStr = Field("digits", min_length=1, max_length=64)
    reward: StrictStr | None = Field(None, min_length=1, max_length=300)  # plug-in 'package.module:function'
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
    # The updates' arithmetic: float32, or bfloat16 mixed precision (TRL's bf16: matrix products in bfloat16, the
    # weights, gradients and optimizer state in float32, so checkpoints stay float32).
    precision: Literal["float32", "bf16"] = "float32"
    # grpo: TRL's GRPO (loss_type, scale_rewards); reinforce: the same with the group mean as the only baseline;
    # sft_best: TRL's SFT on the best answer of each group (synchronous only).
    algorithm: Literal["grpo", "reinforce", "sft_best"] = "grpo"
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"] = "dapo"  # TRL's loss formulation
    beta: Number = Field(0.0, ge=0, le=10)  # KL coefficient against the start model (0: no reference model)
    epsilon: Number = Field(0.2, gt=0, le=10)  # clipping range of the importance ratio
    scale_rewards: Literal["group", "batch", "none"] = "group"  # how advantages are normalized
    num_iterations: StrictInt = Field(1, ge=1, le=16)  # updates per batch of rollouts (TRL's μ)
    trl_args: dict[str, Any] = Field(default_factory=dict, max_length=32)  # more GRPOConfig tuning options
    async_mode: StrictBool = Field(False, alias="async")  # collect rollouts continuously beside the updates
    max_staleness: StrictInt = Field(0, ge=0, le=64)  # versions a sample's producer may be behind; 0 = on-policy
    eval_prompts: StrictInt = Field(16, ge=0, le=1024)
    samples_per_version: StrictInt = Field(4, ge=0, le=64)
    seed: StrictInt = Field(0, ge=0, lt=2**31)
    policy: CommitPolicy | None = None
    timeout_s: TimeoutS | None = None

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> FinetuneParams:
        # A run's record stores every parameter, defaults included: read back (context "stored", at a resume),
        # none of them was given by hand, and options refused only when given must not refuse the resume.
        given = set() if (info.context or {}).get("stored") else self.model_fields_set
        if self.batch_size * self.group_size > 4096:
            total = self.batch_size * self.group_size
            raise ValueError(f"batch_size × group_size = {total} rollouts per step; "
                             "at most 4096 are allowed")
        if self.steps * self.batch_size > MAX_RUN_PROMPTS:  # the run's prompt list is built before its first step
            raise ValueError(f"steps × batch_size = {self.steps * self.batch_size} prompts; a run takes at most "
                             f"{MAX_RUN_PROMPTS}: start a new run from this one's last version to go on")
        if self.publish_every % self.num_iterations:
            # TRL trains each batch of answers num_iterations times; a publish inside that would make a reused
            # answer one version older than when it was judged against max_staleness.
            raise ValueError(f"publish_every ({self.publish_every}) must be a multiple of num_iterations "
                             f"({self.num_iterations}), so that no publish falls between two updates on one batch")
        if self.algorithm == "sft_best":
            ignored = sorted(GRPO_ONLY & given)
            if ignored:
                raise ValueError(f"{', '.join(ignored)}: GRPO options, which algorithm sft_best does not use "
                                 "(it imitates the best answer of each group); leave them out, or use grpo")
            if self.async_mode:
                raise ValueError("algorithm sft_best is synchronous: set async to false, or use grpo or reinforce")
        if self.algorithm == "reinforce":
            if "scale_rewards" in given:
                raise ValueError("scale_rewards: reinforce takes the group mean as its only baseline and never "
                                 "scales rewards; leave it out, or use grpo")
            self.scale_rewards = "none"  # what it does, and so what its record says
        return self


# What the trainer sets in a job's container itself (k8s/training/job.yaml): params.env may not name them.
JOB_ENV = ("LOCKSTEP_RUN_ID", "LOCKSTEP_JOB_MODEL", "LOCKSTEP_JOB_TASK", "LOCKSTEP_JOB_STEPS",
           "LOCKSTEP_JOB_SAVE_STEPS", "LOCKSTEP_JOB_LEARNING_RATE", "LOCKSTEP_JOB_BATCH_SIZE")
EnvName = Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Word = Annotated[StrictStr, Field(max_length=4096)]  # one element of a container's command or args, one env value


class JobParams(_Strict):
    """Training as a Kubernetes Job from a template; its pods publish through the upload API."""

    # <LOCKSTEP_JOB_TEMPLATE_DIR>/<template>.yaml
    template: StrictStr = Field("job", min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    image: StrictStr | None = Field(None, min_length=1, max_length=512)  # the first container's, instead
    command: list[Word] | None = Field(None, max_length=64)  # the first container's, instead
    args: list[Word] | None = Field(None, max_length=256)  # the first container's, instead
    env: dict[EnvName, Word] = Field(default_factory=dict, max_length=64)  # added to the first container's
    model: ModelRefText | None = None  # default: what the fleet serves
    task: StrictStr = Field("digits", min_length=1, max_length=64)
    steps: StrictInt = Field(40, ge=1, le=1_000_000)
    save_steps: StrictInt = Field(10, ge=1, le=1_000_000)  # a checkpoint, so a published version, every N steps
    learning_rate: Number = Field(5e-4, gt=0, le=1)
    batch_size: StrictInt = Field(8, ge=1, le=4096)
    backoff_limit: StrictInt | None = Field(None, ge=0, le=20)  # the Job's retries (default: the template's)
    deadline_s: StrictInt | None = Field(None, ge=10, le=30 * 86_400)  # its activeDeadlineSeconds (default: ditto)

    @model_validator(mode="after")
    def _trainer_env(self) -> JobParams:
        taken = sorted(set(self.env) & set(JOB_ENV))
        if taken:
            raise ValueError(f"env {', '.join(taken)}: set by the trainer from the run's parameters (model, task, "
                             "steps, save_steps, learning_rate, batch_size); set those instead")
        return self


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its definitions inlined: it is embedded in another model's schema."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                merged = {**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}}
                return resolve(merged)
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    inlined: dict[str, Any] = resolve(schema)
    return inlined


# The parameters are checked against their kind's model when the run is created (RunManager: it names the kind
# in its errors); the schema says the same for clients and /openapi.json.
RunParams = Annotated[dict[str, Any], WithJsonSchema({
    "title": "Params", "description": "the parameters of the run's kind: SimulationParams for 'simulation', "
    "FinetuneParams for 'finetune', JobParams for 'job' (unset ones take their defaults)",
    "anyOf": [_inline(SimulationParams), _inline(FinetuneParams), _inline(JobParams)]})]


class RunRequest(_Strict):
    """``POST /runs``."""

    kind: Literal["simulation", "finetune", "job"]
    params: RunParams = Field(default_factory=dict)
