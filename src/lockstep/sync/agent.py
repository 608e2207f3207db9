"""The replica's side of the two phases as pure functions: what it knows and sees in, actions out.

Both transports feed it: ``SyncWatcher`` reads ``sync_state.json``; over HTTP the trainer's ``/admin/stage``,
``/admin/commit`` and ``/admin/abort`` arrive as a prepare, a commit and an abort. ``ReplicaAgent`` (in
lockstep.sync.replica_agent) carries the actions out and reports each outcome back through ``loaded`` and ``fired``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from lockstep.sync.protocol import Committed, Phase, Split, SyncState, activate_at_problem, reference_problem

CATCH_UP_RETRY_S = 5.0  # seconds between attempts to load a committed version that failed to load
# After staging, poll at ``commit_poll_interval_s`` for this long while the commit is expected: long enough
# for the other replicas to finish their loads, short enough that a coordinator that died after prepare
# does not leave every replica reading the shared folder fifty times a second until the deadline.
COMMIT_POLL_WINDOW_S = 15.0


class Transport(Enum):
    """Who tells the replica what to do, and so what it does on its own."""

    FOLDER = "folder"  # anyone who may write the file: published versions only; the replica catches up itself
    HTTP = "http"  # the authenticated trainer: any model; a commit acts once, on arrival; it catches replicas up


class Progress(Enum):
    """Where the committed version stands on this replica."""

    NONE = "none"
    STAGING = "staging"  # loading beside the serving version
    CATCHING_UP = "catching up"  # loading it to serve it, unready meanwhile
    STAGED = "staged"
    FLIP_SCHEDULED = "flip scheduled"
    SERVING = "serving"
    REFUSED = "refused"  # its reference or activate_at cannot be applied


@dataclass(frozen=True)
class Rules:
    """What one replica's agent goes by."""

    transport: Transport
    initial_model: str  # served as v0 while the shared folder commits nothing


@dataclass(frozen=True)
class Load:
    """A model to load in the background."""

    version: int
    model: str
    digest: str | None


@dataclass(frozen=True)
class Stage(Load):
    """Load ``version`` beside the serving one, in the background; ``resident``: as a whole second model (rollouts)."""

    resident: bool = False


class CatchUp(Load):
    """Load ``version`` and serve it, in the background (booting is the same operation)."""


@dataclass(frozen=True)
class RefuseStage:
    """Report the stage of ``version`` failed, loading nothing."""

    version: int
    model: str
    reason: str


@dataclass(frozen=True)
class Abort:
    """Drop what is staged for ``version``."""

    version: int
    reason: str


@dataclass(frozen=True)
class SetCommitted:
    """Record the version the cluster committed (ready only while serving it); ``reason``: it is refused."""

    version: int
    digest: str | None
    reason: str | None = None


@dataclass(frozen=True)
class Timer:
    """Something to do at a wall-clock time."""

    version: int
    digest: str | None
    at: float  # wall clock


class FlipAt(Timer):
    """At ``at``, serve the staged ``version``."""


class MarkBehindAt(Timer):
    """At ``at``, go unready unless the flip to ``version`` happened: never serve stale as ready."""


@dataclass(frozen=True)
class SplitAt(Timer):
    """At ``at``, answer ``split.share`` percent of new requests with the staged ``version`` (0: none)."""

    split: Split


@dataclass(frozen=True)
class EndSplit:
    """No split is in force any more: every new request goes to the serving version."""


@dataclass(frozen=True)
class Beat:
    """Write the heartbeat now: a coordinator waits on what changed."""


Action = Stage | CatchUp | RefuseStage | Abort | SetCommitted | FlipAt | MarkBehindAt | SplitAt | EndSplit | Beat
SplitKey = tuple[str, int, int, float, int | None]  # (rollout, version, step, share, pins_step): a split as applied


@dataclass(frozen=True)
class Snapshot:
    """What the replica says of itself at one instant: the truth for what is loaded."""

    serving: int | None = None
    serving_digest: str | None = None
    staging: int | None = None  # the version its stage info names (staging, staged or failed)
    staged: int | None = None  # the version loaded beside the serving one, ready to flip
    committed: int | None = None  # the committed version it believes
    split: SplitKey | None = None  # the split it applies
    split_missing: bool = False  # a split with a share is in force but the candidate is not resident here


@dataclass(frozen=True)
class Memory:
    """What the agent remembers between steps; replaced whole, never changed in place."""

    view: SyncState | None = None  # the last good state seen
    applicable: Committed | None = None  # the last commit seen that it could apply: "back" is measured from it
    tried: frozenset[tuple[int, str, int]] = frozenset()  # prepares acted on: (version, model, generation)
    load: Load | None = None  # the one load in progress
    flip: int | None = None  # the version a flip is scheduled for
    behind: int | None = None  # the version a mark-behind is scheduled for
    early: int | None = None  # the committed version staged before its activate_at
    refused: tuple[int, int, str] | None = None  # (generation, version, model) of the commit refused
    acted: Committed | None = None  # over HTTP, the commit acted on
    failed_at: float | None = None  # when the last catch-up failed
    poll: tuple[int, float] | None = None  # (version, until): staged, polling fast for its commit
    split: SplitKey | None = None  # the split a timer is set for


def target(rules: Rules, state: SyncState | None) -> Committed | None:
    """What this replica must serve: the committed version; over the shared folder, else the initial model."""
    if state is not None and state.committed is not None:
        return state.committed
    return Committed(version=0, model=rules.initial_model) if rules.transport is Transport.FOLDER else None


def _reference_problem(rules: Rules, version: int, model: str) -> str | None:
    if rules.transport is Transport.HTTP:
        return None  # the trainer authenticated, and the runtime checked the reference before staging
    return reference_problem(version, model, rules.initial_model)


def commit_problem(rules: Rules, committed: Committed) -> str | None:
    """Why this replica cannot apply ``committed`` (a raw path, an activate_at that is no time), or None."""
    return _reference_problem(rules, committed.version, committed.model) or activate_at_problem(committed)


def observe(rules: Rules, mem: Memory, state: SyncState) -> tuple[Memory, str | None]:
    """Memory after seeing ``state``, or the same memory and why ``state`` is ignored."""
    last, applicable = mem.view, mem.applicable
    # A commit this replica refused was never served: going "back" from it is no flip-flop, so the rules
    # below compare with the last commit it could apply.
    if last is not None:
        if state.generation < last.generation:
            return mem, f"sync_state generation {state.generation} is lower than {last.generation}; ignored"
        if (state.committed and applicable and state.committed.version < applicable.version
                and not state.committed.rollback):
            return mem, (f"sync_state commits v{state.committed.version} below v{applicable.version} without a "
                         "rollback; ignored (use lockstep rollback)")
        if state.committed is None and applicable is not None:  # would mean "serve the initial model"
            return mem, (f"sync_state has no committed version but v{applicable.version} was committed; ignored "
                         "(use lockstep rollback --to 0)")
    if state.committed is not None and commit_problem(rules, state.committed) is None:
        applicable = state.committed
    return replace(mem, view=state, applicable=applicable), None


def decide(rules: Rules, mem: Memory, seen: Snapshot, now: float) -> tuple[Memory, list[Action]]:
    """The actions that bring this replica to what it saw, and the memory after them."""
    state, acts = mem.view, list[Action]()
    pending, staged, folder = state.pending if state else None, seen.staged, rules.transport is Transport.FOLDER
    if state is not None and pending is not None:
        v = pending.version
        canary = pending.phase is Phase.CANARY
        if (pending.phase is Phase.PREPARE and not (pending.deadline is not None and now > pending.deadline)) or (
                canary and staged != v and seen.staging != v):  # a replica that joins mid-rollout stages too
            key = (v, pending.model, -1 if canary else state.generation)
            # Over the shared folder a booting replica loads the committed version first, then stages.
            if key not in mem.tried and not (folder and seen.serving in (None, v)):
                if (problem := _reference_problem(rules, v, pending.model)) is not None:
                    mem = replace(mem, tried=mem.tried | {key})  # a failed stage: the coordinator aborts at once
                    acts += [RefuseStage(v, pending.model, f"refusing the prepare of v{v} in sync_state.json: "
                                         f"{problem}"), Beat()]
                elif mem.load is None:  # one load at a time: tried again once the running one ends
                    acts.append(load := Stage(v, pending.model, pending.digest, resident=pending.rollout is not None))
                    mem = replace(mem, tried=mem.tried | {key}, load=load)
        elif pending.phase not in (Phase.COMMIT, Phase.CANARY) and seen.staging == v:  # aborted, or expired
            acts.append(Abort(v, pending.reason or "prepare expired"))
            staged = None if staged == v else staged
    if mem.poll and (now >= mem.poll[1] or not pending or pending.phase is not Phase.PREPARE
                     or pending.version != mem.poll[0]):
        mem = replace(mem, poll=None)
        acts.append(Beat())  # say so now: the coordinator sizes the commit margin from it

    mem = _split(mem, acts, state, seen, staged, now)
    goal = target(rules, state)
    if goal is None or (not folder and goal == mem.acted):
        return mem, acts
    mem = mem if folder else replace(mem, acted=goal)
    v, at, problem = goal.version, goal.activate_at or now, commit_problem(rules, goal)
    progress = _progress(mem, seen, staged, goal, problem)
    if progress is Progress.FLIP_SCHEDULED:
        pass
    elif progress is Progress.SERVING:
        if seen.committed != v:
            acts.append(SetCommitted(v, goal.digest))
    elif progress is Progress.REFUSED:
        refusal = (state.generation if state else 0, v, goal.model)
        if mem.refused != refusal or seen.committed != v:  # said once; the file is read ten times a second
            why = (f"refusing the commit of v{v} in sync_state.json: {problem}; unready until a valid commit "
                   "replaces it") if folder else (f"commit of v{v} failed: {problem}; unready until the trainer "
                                                  "catches this replica up")
            mem = replace(mem, refused=refusal)
            acts += [SetCommitted(v, goal.digest, why), Beat()]
    elif progress is Progress.STAGED:
        mem = replace(mem, flip=v)
        acts.append(FlipAt(v, goal.digest, at))
    elif not folder:  # not staged: unready at once, until the trainer catches this replica up
        if seen.committed != v:
            acts.append(SetCommitted(v, goal.digest))
    elif progress is not Progress.NONE:  # loading it: unready from activate_at unless it flipped by then
        if seen.committed != v:
            mem = _behind(mem, acts, goal, at, now)
    elif seen.serving is not None and now < at:
        # Committed but not staged here (a quorum commit, or this replica joined late). Until activate_at the
        # served version stays right: stage beside it once, flip at activate_at if that worked in time.
        if mem.early != v and mem.load is None:
            early = Stage(v, goal.model, goal.digest)
            acts.append(early)
            mem = replace(mem, early=v, load=early)
        mem = _behind(mem, acts, goal, at, now)
    elif mem.failed_at is None or now - mem.failed_at >= CATCH_UP_RETRY_S:
        # Not staged and not loading: go unready and load it (the boot path is the same operation).
        acts += [SetCommitted(v, goal.digest)] if seen.committed != v else []
        if mem.load is None:
            catch_up = CatchUp(v, goal.model, goal.digest)
            acts += [catch_up, Beat()]
            mem = replace(mem, load=catch_up)
    return mem, acts


def wanted_split(state: SyncState | None) -> Split | None:
    """The split ``state`` puts in force: the rollout step of the pending version, while it is in phase canary."""
    if state is None or state.split is None or state.pending is None:
        return None
    if state.pending.phase is not Phase.CANARY or state.pending.version != state.split.version:
        return None
    return state.split


def split_key(split: Split | None) -> SplitKey | None:
    return None if split is None else (split.rollout, split.version, split.step, split.share, split.pins_step)


def _split(mem: Memory, acts: list[Action], state: SyncState | None, seen: Snapshot, staged: int | None,
           now: float) -> Memory:
    """Apply the split in force at its ``activate_at``; again once the candidate is staged, if it was missing."""
    want = wanted_split(state)
    key = split_key(want)
    if want is None:
        pending = state.pending if state else None
        promoted = (pending is not None and pending.phase is Phase.COMMIT and seen.split is not None
                    and pending.version == seen.split[1])
        if seen.split is not None and not promoted:  # a promotion ends the split with the flip, at activate_at
            acts.append(EndSplit())
        return replace(mem, split=None) if mem.split is not None else mem
    if mem.split == key:
        return mem  # its timer is set
    retry = seen.split == key and seen.split_missing and staged == want.version
    if seen.split != key or retry:
        at = now if retry or want.activate_at is None else want.activate_at
        acts.append(SplitAt(want.version, None, at, want))
        return replace(mem, split=key)
    return mem


def _progress(mem: Memory, seen: Snapshot, staged: int | None, goal: Committed, problem: str | None) -> Progress:
    if seen.serving == goal.version and (not goal.digest or not seen.serving_digest
                                         or seen.serving_digest == goal.digest):
        return Progress.SERVING
    if mem.flip == goal.version:
        return Progress.FLIP_SCHEDULED
    if problem is not None:
        return Progress.REFUSED
    if staged == goal.version:
        return Progress.STAGED
    if mem.load is not None and mem.load.version == goal.version:
        return Progress.STAGING if isinstance(mem.load, Stage) else Progress.CATCHING_UP
    return Progress.NONE


def _behind(mem: Memory, acts: list[Action], goal: Committed, at: float, now: float) -> Memory:
    """Unready from ``at`` unless the flip to ``goal`` happened by then (at once when ``at`` is past)."""
    if at <= now:
        acts.append(SetCommitted(goal.version, goal.digest))
    elif mem.behind != goal.version:
        acts.append(MarkBehindAt(goal.version, goal.digest, at))
        return replace(mem, behind=goal.version)
    return mem


def loaded(mem: Memory, load: Load, ok: bool, now: float) -> Memory:
    """Memory after ``load`` ended; ``ok``: the version is staged (a stage) or served (a catch-up)."""
    mem = replace(mem, load=None) if mem.load == load else mem
    if isinstance(load, CatchUp):
        return replace(mem, failed_at=None if ok else now)
    return replace(mem, poll=(load.version, now + COMMIT_POLL_WINDOW_S)) if ok else mem  # the commit may come now


def fired(mem: Memory, timer: Timer) -> Memory:
    """Memory after a timed flip or mark-behind ran."""
    if isinstance(timer, FlipAt):
        return replace(mem, flip=None) if mem.flip == timer.version else mem
    if isinstance(timer, SplitAt):
        return replace(mem, split=None) if mem.split == split_key(timer.split) else mem
    return replace(mem, behind=None) if mem.behind == timer.version else mem
