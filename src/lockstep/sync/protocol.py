"""What replicas and coordinators say to each other: the shapes of ``sync_state.json``, heartbeats and ``/status``.

Readers are tolerant (unknown fields ignored; a torn, unparsable or out-of-range file keeps the last good
state; a heartbeat from the future or with a malformed URL is ignored with a logged reason); writers are
strict (always the full schema, replaced atomically).
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, model_validator

from lockstep.core.errors import BadModelRef
from lockstep.models.refs import RefKind, parse_ref
from lockstep.store.manifest import MAX_FILE_BYTES, VersionNumber, WallTime
from lockstep.sync.tolerant import wall_time_problem

log = logging.getLogger(__name__)

FORMAT = 1
MAX_GENERATION = 2**53 - 1  # +1 per write: never reached; beyond it JSON numbers lose precision
MAX_NAME_CHARS = 256

# A schedule the writer chose: any float parses, so a replica can see the commit and refuse it by name
# (unready, with the reason) instead of dropping the whole state and staying ready on the old version.
AnyTime = float | None
Count = Annotated[int, Field(ge=0, le=MAX_GENERATION)]
Rate = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]


class Phase(str, Enum):
    """Where a pending version is in the two phases."""

    PREPARE = "prepare"
    COMMIT = "commit"
    ABORT = "abort"
    CANARY = "canary"  # staged everywhere and serving the share ``SyncState.split`` names; then commit or abort


class ReplicaState(str, Enum):
    """A replica's serving lifecycle; only ``Replica`` moves it."""

    STARTING = "starting"  # booting, nothing served yet
    SERVING = "serving"  # serving the committed version (ready)
    BEHIND = "behind"  # serving something, but not the committed version (unready, catching up)
    FAILED = "failed"  # nothing can be served (unready)


class StageState(str, Enum):
    """A replica's staging lifecycle."""

    IDLE = "idle"
    STAGING = "staging"
    STAGED = "staged"
    FAILED = "failed"


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore")


class VersionRef(_Tolerant):
    """A version as the cluster names it: its number, the model reference and the content digest."""

    version: VersionNumber
    model: str
    digest: str | None = None


class Committed(VersionRef):
    """The version every ready replica serves; ``activate_at`` is when replicas flip to it (wall clock)."""

    activate_at: AnyTime = None  # checked by the replica (``activate_at_problem``), which refuses a bad one
    committed_at: WallTime | None = None
    rollback: bool = False  # committed through a rollback: may be lower than the version before it


class Pending(VersionRef):
    """A version on its way: staged by replicas (prepare), then committed or aborted."""

    phase: Phase
    coordinator: str | None = None
    started_at: WallTime | None = None
    deadline: WallTime | None = None  # wall-clock; a prepare past it is dropped by replicas
    activate_at: AnyTime = None  # informational: replicas flip at the committed one
    rollback: bool = False  # a rollback may commit a lower version than the one served
    reason: str | None = None  # why it was aborted
    rollout: str | None = Field(None, max_length=64)  # staged for a rollout: both versions stay resident


MAX_PINS = 50_000  # session pins one split carries: under 1 MB of JSON
PIN_CHARS = 16  # a pin is the first 16 hex digits of sha256(session key): no user's key in the shared state
Share = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]


class Split(_Tolerant):
    """A rollout step: from ``activate_at`` the pending version (staged beside the committed one on every replica)
    answers ``share`` percent of new requests; the committed version answers the rest (and ``shadow`` percent of
    its prompts are run on the candidate too, compared, never returned).

    Requests with a session key go by its hash (``lockstep.inference.routing``), and ``pins`` keeps on the committed
    version the sessions it answered before this step whose hash the larger share now covers (collected from every
    replica after ``activate_at``; ``pins_step`` says for which step the list is complete). Share 0 is a rollback.
    """

    rollout: str = Field(min_length=1, max_length=64)  # salts the session hash: each rollout draws anew
    version: VersionNumber  # the candidate: the pending version
    share: Share
    step: Count
    activate_at: AnyTime = None
    shadow: Share = 0  # percent of the committed version's answers also run on the candidate, off the response path
    pins: list[Annotated[str, Field(min_length=PIN_CHARS, max_length=PIN_CHARS)]] = Field(
        default_factory=list, max_length=MAX_PINS)
    pins_step: Count | None = None


class SessionPins(_Tolerant):
    """``pins/<replica>.json``: the sessions the committed version answered on one replica before a step."""

    replica_id: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    rollout: str = Field(min_length=1, max_length=64)
    step: Count
    pins: list[Annotated[str, Field(min_length=PIN_CHARS, max_length=PIN_CHARS)]] = Field(
        default_factory=list, max_length=MAX_PINS)


class SyncState(_Tolerant):
    """The whole of ``sync_state.json``."""

    format: int = FORMAT
    generation: Count = 0  # +1 on every write
    committed: Committed | None = None
    pending: Pending | None = None
    split: Split | None = None  # a rollout step in progress (pending in phase canary)
    updated_at: WallTime | None = None
    writer: str | None = None


class LegacyRequest(_Tolerant):
    """The seed's single-line format: prepare and commit this model as the next version."""

    desired_model_repo_id: str


class StagedInfo(_Tolerant):
    """What a replica has staged, and whether it worked."""

    version: VersionNumber
    model: str
    state: StageState
    digest: str | None = None  # MANIFEST content digest verified before loading
    weights_digest: str | None = None  # sha256 of the weights actually in memory
    error: str | None = None
    seconds: Seconds | None = None


class ServingInfo(_Tolerant):
    version: VersionNumber
    model: str
    digest: str | None = None
    weights_digest: str | None = None
    since: WallTime | None = None


LATENCY_BUCKETS_S = tuple(round(0.001 * 1.25 ** i, 6) for i in range(72))  # 1 ms … ~9 min, 25% apart


class VersionStats(_Tolerant):
    """What one replica's answers of one version looked like since the rollout began; sums merge across replicas.

    ``latency`` counts answers per bucket of ``LATENCY_BUCKETS_S`` (the last bucket holds everything longer).
    The comparison fields are filled on the candidate from shadowed or canary prompts: the candidate's tokens
    against the served ones, and the KL divergence of its next-token distributions from the committed version's.
    """

    version: VersionNumber
    requests: Count = 0  # answers finished (any outcome)
    errors: Count = 0  # answers that ended in an error
    empty: Count = 0  # answers with no token generated (not errors)
    nonfinite: Count = 0  # answers whose logits were not finite
    output_tokens: Count = 0
    latency: list[Count] = Field(default_factory=list, max_length=len(LATENCY_BUCKETS_S) + 1)
    compared: Count = 0  # shadowed or canary prompts compared with the other version
    agreement_sum: Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)] = 0.0  # token agreement, 0..1 each
    kl_sum: Annotated[float, Field(ge=0, le=1e15, allow_inf_nan=False)] = 0.0  # nats per token, summed per prompt
    shadow_dropped: Count = 0  # prompts sampled for shadowing but skipped: the bound was reached


class RolloutReport(_Tolerant):
    """A replica's view of the rollout in progress: the split it applies and what each version answered."""

    rollout: str = Field(min_length=1, max_length=64)
    version: VersionNumber  # the candidate
    step: Count
    share: Share
    pins_step: Count | None = None
    held: Count = 0  # requests that waited for the step's pins
    stats: list[VersionStats] = Field(default_factory=list, max_length=2)


class SplitApplied(_Tolerant):
    """When a replica put a rollout step in force (its clock): the flip skew of a step, or of a rollback."""

    rollout: str = Field(min_length=1, max_length=64)
    version: VersionNumber
    step: Count
    share: Share
    at: WallTime


class TransferReport(_Tolerant):
    """A version's bytes arriving on a replica at stage (chunks from its disk, its peers, the origin)."""

    version: VersionNumber
    total_bytes: int = Field(ge=0, le=MAX_FILE_BYTES)
    done_bytes: int = Field(ge=0, le=MAX_FILE_BYTES)
    bytes_by_source: dict[Literal["local", "peer", "origin"], Annotated[int, Field(ge=0, le=MAX_FILE_BYTES)]] = Field(
        default_factory=dict)
    avoided_peers: Count = 0  # peers that sent bad bytes, or none, and were not asked again
    finished: bool = False
    failed: str | None = None  # why the assembly stopped short, if it did


class Heartbeat(_Tolerant):
    """``replicas/<replica>.json``: what a replica serves and stages, written every heartbeat interval."""

    replica_id: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    url: str | None = None  # checked by the reader (``url_problem``): a bad one is dropped, the beat kept
    pid: Count | None = None
    state: ReplicaState
    ready: bool
    serving: ServingInfo | None = None
    staged: StagedInfo | None = None
    last_error: str | None = None
    generation_seen: Count | None = None
    update_mode: str | None = None
    queue_depth: Count = 0
    running: Count = 0
    tokens_per_s: Rate = 0.0
    time: WallTime
    started_at: WallTime | None = None
    # A replica that staged the pending version polls every ``commit_poll_s`` until ``commit_poll_until``
    # (wall clock) while it waits for the commit; the coordinator sizes the commit margin from these.
    commit_poll_s: float | None = Field(None, gt=0, le=60, allow_inf_nan=False)  # Settings' poll bounds
    commit_poll_until: WallTime | None = None
    rollout: RolloutReport | None = None  # while a rollout's split is applied
    transfer: TransferReport | None = None  # the last version assembled from chunks (progress while it stages)


class ReplicaStatus(Heartbeat):
    """``GET /status``: the heartbeat, and what only a direct caller needs; one shape for every reader.

    The flat ``serving_version``/``model``/``digest``... fields are the nested ``serving`` repeated for callers
    that read them (the trainer reads ``serving``; an older replica that sends only the flat ones is read too).
    """

    committed_version: VersionNumber | None = None
    splits: list[SplitApplied] = Field(default_factory=list, max_length=16)  # the last steps put in force, oldest first
    engine: str | None = None
    uptime_s: Seconds | None = None
    shared_dir: str | None = None
    coordinator_url: str | None = None  # the trainer it follows over HTTP (LOCKSTEP_COORDINATOR_URL)

    @model_validator(mode="before")
    @classmethod
    def _serving_from_flat_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("serving") is None and data.get("serving_version") is not None:
            data = {**data, "serving": {"version": data["serving_version"], "model": data.get("model") or "",
                                        "digest": data.get("digest"), "weights_digest": data.get("weights_digest"),
                                        "since": data.get("serving_since")}}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def serving_version(self) -> int | None:
        return self.serving.version if self.serving else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def model(self) -> str | None:
        return self.serving.model if self.serving else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def model_repo_id(self) -> str | None:
        return self.model

    @computed_field  # type: ignore[prop-decorator]
    @property
    def digest(self) -> str | None:
        return self.serving.digest if self.serving else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def weights_digest(self) -> str | None:
        return self.serving.weights_digest if self.serving else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def serving_since(self) -> float | None:
        return self.serving.since if self.serving else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def loading(self) -> bool:
        """Loading a version: booting, or staging one."""
        return self.state is ReplicaState.STARTING or bool(self.staged and self.staged.state is StageState.STAGING)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def updating(self) -> bool:
        """A version is on its way: staging or staged."""
        return bool(self.staged and self.staged.state in (StageState.STAGING, StageState.STAGED))


def activate_at_problem(committed: Committed) -> str | None:
    """Why a replica cannot flip at ``committed.activate_at`` (not a finite wall-clock time), or None."""
    if committed.activate_at is None:
        return None
    return wall_time_problem(committed.activate_at, f"the commit of v{committed.version} has activate_at")


def reference_problem(version: int, model: str, initial_model: str) -> str | None:
    """Why the shared folder may not name ``model`` as ``version``, or None.

    Anyone who can write ``sync_state.json`` writes this, so it may only point at what the store verifies: a
    published version (``versions/N``, whose files are checked against its MANIFEST) or, as version 0, the
    initial model; never a raw path on the replica's disk.
    """
    if version == 0 and model == initial_model:
        return None
    try:
        ref = parse_ref(model, allow_directories=False)
    except BadModelRef as exc:
        return f"v{version} names {model[:200]!r}, which is not a published version: {exc}"
    if version == 0:
        if ref.kind in (RefKind.REPO, RefKind.BUILTIN):
            return None  # downloaded or built by name, like the initial model
        return f"v0 names {model[:200]!r}; version 0 is the initial model, a repo id or a built-in"
    if ref.kind is not RefKind.VERSION or ref.version != version:
        return (f"v{version} names {model[:200]!r} instead of the published version versions/{version:06d}; "
                "the shared folder may only commit published versions (with a MANIFEST)")
    return None


def legacy_problem(model: str) -> str | None:
    """Why the seed's one-line request may not name ``model`` (a path on the replica's disk), or None."""
    try:
        parse_ref(model, allow_directories=False)
    except BadModelRef as exc:
        return f"the legacy sync_state names {model[:200]!r}, which a replica does not publish from its disk: {exc}"
    return None


def parse_sync_state(raw: Any) -> SyncState | LegacyRequest:
    """Validate parsed JSON as either format; raises ``ValueError`` naming what is wrong."""
    if isinstance(raw, dict) and "desired_model_repo_id" in raw and "generation" not in raw:
        try:
            return LegacyRequest.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"legacy sync_state is malformed: {exc.errors()[0]['msg']}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"sync_state must be a JSON object, got {type(raw).__name__}")
    try:
        return SyncState.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"sync_state field {where!r}: {first['msg']}") from None
