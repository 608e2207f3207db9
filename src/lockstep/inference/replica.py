"""The replica: which model version it serves, what it has staged, and the one place that moves them.

Swap mode holds two slots while staging and flips a pointer; requests keep the slot they were admitted
on, the old slot drains and is freed. In-place mode copies new weights into the live model while admission
is paused (running requests finish first), for memory-tight GPUs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import Conflict, LoadError, LockstepError, NotReady, VerificationError
from lockstep.core.settings import EngineKind, Settings, UpdateMode
from lockstep.engine import FinalEvent, SamplingParams
from lockstep.engine.batch_size import host_available_bytes
from lockstep.engine.vllm import VllmEngine
from lockstep.inference import engines
from lockstep.inference.checkpoint_files import CheckpointFiles
from lockstep.inference.inplace import InplaceWeights, PartialCopy
from lockstep.inference.metrics import ReplicaMetrics, VllmMetrics
from lockstep.inference.rollout_stats import RolloutStats
from lockstep.inference.routing import Route, Router, SessionTable
from lockstep.inference.shadow import Shadow
from lockstep.inference.slot import ModelSlot, ServingEngine
from lockstep.models import loader
from lockstep.store import VersionSource
from lockstep.store.version_cache import VersionCache
from lockstep.sync.protocol import (
    ReplicaState,
    RolloutReport,
    ServingInfo,
    Split,
    SplitApplied,
    StagedInfo,
    StageState,
    TransferReport,
)

log = logging.getLogger(__name__)

EngineFactory = Callable[[loader.LoadedModel, Settings], ServingEngine]
# During a canary step (no shadow asked for), this percent of the candidate's answers are compared with the
# committed version's next-token distributions: the token agreement and KL gates need samples, soonest at a small
# share. The shadow's bound (one comparison at a time, two queued, started only when neither engine runs or queues a
# request) keeps the cost to idle capacity.
CANARY_COMPARE_PERCENT = 100.0


def default_engine_factory(loaded: loader.LoadedModel, settings: Settings) -> ServingEngine:
    """A started batching engine for one loaded model."""
    from lockstep.engine import Engine

    chunk = settings.prefill_chunk_tokens
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=settings.max_batch_size,
                    max_queue=settings.max_queue, max_context=loaded.max_context,
                    step_prefill_tokens=settings.step_prefill_tokens or None,
                    interleave_prefill=settings.interleave_prefill,
                    prefill_chunk_tokens=None if chunk == 0 else max(chunk, 0))  # 0: by device; -1: off
    engine.start()
    return engine


def canary(loaded: loader.LoadedModel) -> None:
    """A short greedy generation on a staged model: it must run and give finite logits."""
    tok = loaded.tokenizer
    ids = tok("The canary checks", return_tensors="pt")["input_ids"].to(loaded.device)
    if ids.numel() == 0:
        ids = torch.tensor([[tok.bos_token_id or 0]], device=loaded.device)
    with torch.inference_mode():
        for _ in range(4):
            logits = loaded.model(input_ids=ids).logits[:, -1, :]
            if not torch.isfinite(logits).all():
                raise VerificationError(f"canary generation on {loaded.resolved.ref.raw!r} produced non-finite "
                                        "logits; the weights are corrupt or overflow in this dtype")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)


def check_room(resolved: loader.ResolvedModel, version: int) -> None:
    """``LoadError`` when the weights of ``resolved`` cannot fit in the memory still free beside the serving model."""
    need = sum(p.stat().st_size for p in resolved.path.glob("*.safetensors"))
    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
        where = "GPU memory"
    else:
        free = host_available_bytes()
        where = "RAM"
    if need > free:
        raise LoadError(f"this replica cannot hold v{version} beside the version it serves: its weights take "
                        f"{need / 2**30:.2f} GiB and {free / 2**30:.2f} GiB of {where} is free; give the replica more "
                        "memory, or update in place (LOCKSTEP_UPDATE_MODE=inplace) without a rollout")


@dataclass
class StagedPlan:
    """What is staged: a full slot (swap) or verified weights to copy in (in-place)."""

    version: int
    model_ref: str
    digest: str | None
    weights_digest: str
    slot: ModelSlot | None = None
    inplace: InplaceWeights | CheckpointFiles | None = None  # built-in engine | vLLM


class Replica:
    """One inference replica's model state; thread-safe; HTTP and sync drive it."""

    def __init__(self, settings: Settings, *, store: VersionSource | None = None, clock: Clock = SYSTEM_CLOCK,
                 metrics: ReplicaMetrics | None = None, engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.metrics = metrics or ReplicaMetrics()
        self._engine_factory = engine_factory or default_engine_factory
        # An injected factory is a built-in engine's (tests); otherwise LOCKSTEP_ENGINE decides, once.
        self.engine_kind = EngineKind.BUILTIN if engine_factory is not None else engines.pick_engine(settings)
        if self.engine_kind is EngineKind.VLLM:
            engines.check_vllm_options(settings)  # an option vLLM lacks stops the replica now, not at each load
            self.metrics.registry.register(VllmMetrics(lambda: self.serving))
        self._lock = threading.RLock()  # guards the fields below
        self._load_lock = threading.Lock()  # one model load at a time: boot, stage and catch-up are one operation
        self._admission = threading.Event()  # cleared during an in-place copy
        self._admission.set()
        self.serving: ModelSlot | None = None
        self._staged: StagedPlan | None = None
        self._retiring: list[ModelSlot] = []  # slots no longer serving whose admitted requests still run
        self.stage_info: StagedInfo | None = None
        self.state = ReplicaState.STARTING
        self._committed_version: int | None = None
        self.committed_version = None  # what the cluster committed; None: no cluster (the gauge says -1)
        self.committed_digest: str | None = None
        self.last_error: str | None = None
        self._stage_error: str | None = None  # the last stage's failure, while it is last_error
        self.started_at = clock.time()
        self.metrics.queue_capacity.set(settings.max_queue)
        if isinstance(store, VersionCache):  # its transfers feed this replica's metrics
            store.on_fetched = lambda source, n: self.metrics.stage_bytes_fetched.labels(source=source).inc(n)
            store.on_bad_chunk = lambda reason: self.metrics.stage_bad_chunks.labels(reason=reason).inc()
            store.on_transfer = self.metrics.stage_duration.observe
            store.in_use = self.versions_in_use
        # A rollout's split: the candidate (the staged slot) answers a share of new requests beside the serving one.
        self.router = Router(SessionTable(capacity=settings.session_table_size, ttl_s=settings.session_ttl_s,
                                          clock=clock), pin_wait_s=settings.session_pin_wait_s)
        self.rollout_stats = RolloutStats()
        self._split: Split | None = None  # the split applied (its candidate resident, unless split_missing)
        self.split_missing = False  # a split with a share is in force and its candidate is not resident here
        self._shadow: Shadow | None = None  # compares the two versions' answers while both are resident
        self.splits: deque[SplitApplied] = deque(maxlen=16)  # the steps put in force: their flip skew
        self._applied_key: tuple[str, int, float] | None = None

    # ------------------------------------------------------------------ serving
    def versions_in_use(self) -> set[int]:
        """The versions this replica serves, has staged or still finishes requests on (its cache keeps them).

        Read without the lock: the cache asks while it assembles, and a field read is atomic."""
        staged = self._staged
        slots = [self.serving, *list(self._retiring), staged.slot if staged is not None else None]
        return {s.version for s in slots if s is not None} | ({staged.version} if staged is not None else set())

    @property
    def ready(self) -> bool:
        """Serving the committed version (or, without a cluster, serving anything), and admitting requests."""
        self.notice_engine_failure()
        with self._lock:
            if self.serving is None or self.state in (ReplicaState.STARTING, ReplicaState.FAILED):
                return False
            if not self._admission.is_set():
                # An in-place flip is draining the old version and copying in the new one (it began at
                # activate_at): nothing is admitted, and what still runs is the version no longer committed.
                return False
            if self.split_missing:  # the fleet answers a share with the candidate, and this replica cannot
                return False
            return self.committed_version is None or self.serving.version == self.committed_version

    def notice_engine_failure(self) -> None:
        """A serving engine that died (its loop crashed; vLLM's engine process was killed) answers nothing again:
        the replica drops it and goes unready with the reason, and the committed version is loaded afresh
        (catch-up), as after an in-place copy that failed part-way. Checked wherever readiness is read."""
        with self._lock:
            slot = self.serving
            failure = getattr(slot.engine, "failure", None) if slot is not None else None
            if slot is None or failure is None:
                return
            message = f"the engine serving v{slot.version} failed: {failure}; unready until it is loaded again"
            self.serving, self.last_error, self.state = None, message, ReplicaState.FAILED
        log.error("%s", message)
        self.metrics.ready.set(0)
        threading.Thread(target=self._retire, args=(slot,), name=f"retire-v{slot.version}", daemon=True).start()

    def admission_open(self) -> bool:
        return self._admission.is_set()

    def wait_admission(self, timeout: float = 30.0) -> bool:
        """Block while an in-place copy has admission paused."""
        return self._admission.wait(timeout=timeout)

    @contextlib.contextmanager
    def pinned(self, wait_s: float = 30.0, session: str | None = None, version: int | None = None
               ) -> Iterator[ModelSlot]:
        """Pin the slot that answers one request (the serving one, or during a split the one the router picks);
        its engine will not stop until unpinned. ``session``: the request's session key, if any; ``version``: a
        resident version the caller chose (the serving one, or the one staged beside it), else ``Conflict``."""
        deadline = time.monotonic() + wait_s
        while True:
            if not self._admission.wait(timeout=max(0.0, deadline - time.monotonic())):  # in-place copy (short)
                raise NotReady("the replica is applying an update and admission is paused; retry shortly")
            with self._lock:
                candidate = None if version is not None else self._candidate()
            # Outside the lock: a session in a step's new band may wait here for the fleet's pins.
            route = self.router.choose(session) if candidate is not None else None
            with self._lock:
                # Checked again under the lock that the in-place flip clears it under: a request that passed
                # the wait just before the pause must not pin the slot whose weights are being overwritten.
                if not self._admission.is_set():
                    continue
                slot = self.serving
                if slot is None:
                    raise NotReady("no model is loaded yet; wait until GET /ready answers 200")
                if version is not None:
                    slot = self._resident(version)
                elif route is Route.CANDIDATE and (now := self._candidate()) is not None:
                    slot = now  # still resident: a rollback or abort since the choice sends it to the serving one
                elif route is None:
                    self.router.record(session, slot.version)  # the first step must know who answered it
                slot.pin()
                break
        try:
            yield slot
        finally:
            slot.unpin()

    # ------------------------------------------------------------------ loading
    def _load_slot(self, model_ref: str, version: int) -> ModelSlot:
        """Resolve, verify, load, canary and start an engine; the single load path of a replica."""
        started = time.monotonic()
        resolved = loader.resolve(model_ref, self.settings, self.store)
        if self.serving is not None and self.engine_kind is EngineKind.BUILTIN:
            check_room(resolved, version)  # beside the serving model: say so instead of dying of OOM
        engine: ServingEngine
        if self.engine_kind is EngineKind.VLLM:
            loaded, engine = engines.start_vllm(resolved, self.settings, version)
        else:
            loaded = loader.load(resolved, self.settings)
            canary(loaded)
            engine = self._engine_factory(loaded, self.settings)
        self.metrics.model_load.observe(time.monotonic() - started)
        return ModelSlot(version=version, model_ref=model_ref, digest=resolved.content_digest, loaded=loaded,
                         engine=engine)

    def boot(self, model_ref: str, version: int, digest: str | None = None) -> None:
        """Load the first model (or catch up to the committed one) and serve it; unready until done."""
        with self._load_lock:
            with self._lock:
                if self.serving is not None:
                    self.state = ReplicaState.BEHIND
            try:
                slot = self._load_slot(model_ref, version)
                if digest and slot.digest and slot.digest != digest:
                    raise VerificationError(f"{model_ref} has digest {slot.digest[:12]}, sync_state names "
                                            f"{digest[:12]}")
            except LockstepError as exc:
                self._record_failure(f"loading {model_ref} as v{version} failed: {exc}")
                raise
            except Exception as exc:  # torch/transformers errors of every kind
                self._record_failure(f"loading {model_ref} as v{version} failed: {exc}")
                raise LoadError(str(exc)) from exc
            self._install(slot, flip=False)

    def _record_failure(self, message: str) -> None:
        log.error("%s", message)
        self.metrics.swap_failures.inc()
        with self._lock:
            self.last_error = message
            if self.serving is None:
                self.state = ReplicaState.FAILED

    # ------------------------------------------------------------------ two phases
    def stage(self, model_ref: str, version: int, digest: str | None = None, *, resident: bool = False
              ) -> StagedInfo:
        """Prepare ``version`` beside the serving model; keep serving. Blocking; reports staged or the error.

        ``resident``: for a rollout, as a whole second model even in in-place mode (both versions answer)."""
        with self._lock:
            if self._staged is not None and self._staged.version == version and self._staged.model_ref == model_ref:
                assert self.stage_info is not None
                return self.stage_info
        self._drop_staged()
        started = time.monotonic()
        info = StagedInfo(version=version, model=model_ref, state=StageState.STAGING, digest=digest)
        with self._lock:
            self.stage_info = info
        with self._load_lock:
            try:
                plan = self._prepare(model_ref, version, digest, resident)
            except Exception as exc:
                message = f"staging {model_ref} as v{version} failed: {exc}"
                if resident and self.settings.update_mode is UpdateMode.INPLACE:
                    message += ("; a rollout keeps both versions resident, which this replica (update mode inplace) "
                                "may not have the memory for: roll out without --canary/--shadow, or in swap mode")
                log.error("%s", message)
                self.metrics.swap_failures.inc()
                failed = info.model_copy(update={"state": StageState.FAILED, "error": message,
                                                 "seconds": time.monotonic() - started})
                with self._lock:
                    self.stage_info, self.last_error, self._stage_error = failed, message, message
                return failed
        staged = info.model_copy(update={"state": StageState.STAGED, "digest": plan.digest,
                                         "weights_digest": plan.weights_digest,
                                         "seconds": time.monotonic() - started})
        with self._lock:
            if self.stage_info is not info:  # aborted or superseded while loading
                self._release_plan(plan)
                return self.stage_info or staged
            self._staged, self.stage_info = plan, staged
            self._clear_stage_error()
        self.metrics.staged_version.set(version)
        log.info("staged v%d (%s) in %.2fs", version, model_ref, staged.seconds or 0.0)
        return staged

    def _prepare(self, model_ref: str, version: int, digest: str | None, resident: bool) -> StagedPlan:
        in_place = self.settings.update_mode is UpdateMode.INPLACE and self.serving is not None and not resident
        if in_place:
            started = time.monotonic()
            resolved = loader.resolve(model_ref, self.settings, self.store)
            assert self.serving is not None
            live = self.serving.loaded
            weights: InplaceWeights | CheckpointFiles
            if self.engine_kind is EngineKind.VLLM:  # verified bytes in a private folder vLLM reloads from
                loader.check_safe_files(resolved.path, self.settings)
                weights = CheckpointFiles.read(resolved, live.dtype, like=live.extra["checkpoint"], keep_copy=True)
            else:
                weights = InplaceWeights.load(resolved, live, self.settings)  # a host-RAM copy
            self.metrics.model_load.observe(time.monotonic() - started)
            plan = StagedPlan(version, model_ref, resolved.content_digest, weights.weights_digest, inplace=weights)
        else:
            slot = self._load_slot(model_ref, version)
            plan = StagedPlan(version, model_ref, slot.digest, slot.weights_digest, slot=slot)
        if digest and plan.digest and plan.digest != digest:
            self._release_plan(plan)
            raise VerificationError(f"{model_ref} has content digest {plan.digest[:12]} but the coordinator "
                                    f"published {digest[:12]}")
        return plan

    def flip(self, version: int) -> None:
        """Serve the staged ``version`` from now on; requests already admitted finish on the old model."""
        with self._lock:
            plan = self._staged
            if plan is None or plan.version != version:
                have = "nothing" if plan is None else f"v{plan.version}"
                raise Conflict(f"cannot flip to v{version}: {have} is staged")
            self._staged = None
            self._end_split()  # the candidate becomes the serving version: it answers everything
        started = time.monotonic()
        if plan.inplace is not None:
            self._flip_inplace(plan)
        else:
            assert plan.slot is not None
            self._install(plan.slot, flip=True)
        self.metrics.swap_duration.observe(time.monotonic() - started)
        self.metrics.staged_version.set(-1)
        with self._lock:
            self.stage_info = None

    def _clear_stage_error(self) -> None:
        """An earlier stage's failure no longer says what is wrong once a later stage worked. Holds ``_lock``."""
        if self.last_error is not None and self.last_error == self._stage_error:
            self.last_error = None
        self._stage_error = None

    def refuse_stage(self, version: int, model_ref: str, reason: str) -> StagedInfo:
        """Report the stage of ``version`` as failed without loading anything: the request itself was refused."""
        self._drop_staged()
        log.error("%s", reason)
        self.metrics.swap_failures.inc()
        failed = StagedInfo(version=version, model=model_ref, state=StageState.FAILED, error=reason, seconds=0.0)
        with self._lock:
            self.stage_info, self.last_error, self._stage_error = failed, reason, reason
        return failed

    def refuse_commit(self, version: int, digest: str | None, reason: str) -> None:
        """The cluster committed ``version`` and this replica cannot apply it: unready (unless it serves it), why."""
        log.error("%s", reason)
        self.metrics.swap_failures.inc()
        with self._lock:
            self.last_error = reason
        self.set_committed(version, digest)

    def abort(self, version: int | None = None) -> bool:
        """Drop what was staged (only ``version`` when given); True if something was dropped."""
        with self._lock:
            if version is not None and self.stage_info is not None and self.stage_info.version != version:
                return False
        return self._drop_staged()

    def _drop_staged(self) -> bool:
        with self._lock:
            plan, self._staged = self._staged, None
            if plan is not None and self._split is not None and self._split.version == plan.version:
                self._end_split()  # nothing more goes to it; what it already admitted finishes before it is freed
            had = plan is not None or self.stage_info is not None
            self.stage_info = None
        if plan is not None:
            self._release_plan(plan)
        self.metrics.staged_version.set(-1)
        return had

    def _release_plan(self, plan: StagedPlan) -> None:
        if plan.slot is not None:
            self._retire(plan.slot)
        if isinstance(plan.inplace, CheckpointFiles):
            plan.inplace.release()
        plan.slot = plan.inplace = None

    # ------------------------------------------------------------------ flips
    def _install(self, slot: ModelSlot, *, flip: bool) -> None:
        """Atomically make ``slot`` the serving one; retire the previous slot in the background."""
        with self._lock:
            old, self.serving = self.serving, slot
            slot.serving_since = self.clock.time()
            # Only a flip (a commit told it to) moves what counts as committed. A boot or catch-up load that
            # ends after the cluster committed something newer must leave the replica behind and unready.
            if flip and self.committed_version is not None:
                self.committed_version = slot.version
            if self.committed_version in (None, slot.version):
                self.last_error = None  # it serves what it should: an older refusal or failure no longer applies
            self._update_state()
            if old is not None and old is not slot:
                self._retiring.append(old)  # still counted by engine_load from this moment on
        self.metrics.serving_version.set(slot.version)
        log.info("serving v%d (%s)", slot.version, slot.model_ref)
        if old is not None and old is not slot:
            threading.Thread(target=self._retire, args=(old,), name=f"retire-v{old.version}", daemon=True).start()

    def _flip_inplace(self, plan: StagedPlan) -> None:
        """Pause admission, let every admitted request finish, copy the staged weights, resume.

        A copy refused before it began leaves the old weights serving (the caller marks the commit refused);
        one that failed part-way leaves weights nobody committed, so the slot is dropped: unready, FAILED,
        ``last_error`` set, and the committed version is loaded afresh (catch-up).
        """
        assert plan.inplace is not None
        with self._lock:
            old = self.serving
        assert old is not None
        paused = time.monotonic()
        with self._lock:  # pinned() tests the flag under this lock: no pin can slip in after this
            self._admission.clear()
        try:
            old.wait_unpinned()
            while old.engine.queue_depth + old.engine.running > 0:  # drain: one response, one version
                time.sleep(0.001)
            try:
                if isinstance(plan.inplace, CheckpointFiles):  # vLLM pauses too, then reloads from the copy
                    assert isinstance(old.engine, VllmEngine), "checkpoint files are staged for vLLM only"
                    plan.inplace.apply(old.engine, plan.version)
                else:
                    plan.inplace.copy_into(old.loaded.model)
            except PartialCopy as exc:
                message = f"in-place flip to v{plan.version} failed part-way; the live weights are mixed: {exc}"
                log.error("%s", message)
                self.metrics.swap_failures.inc()
                with self._lock:
                    self.serving, self.last_error, self.state = None, message, ReplicaState.FAILED
                    if self.committed_version is not None:
                        self.committed_version = plan.version  # what it must load, afresh, to be ready
                self.metrics.ready.set(0)
                threading.Thread(target=self._retire, args=(old,), name=f"retire-v{old.version}", daemon=True).start()
                if isinstance(plan.inplace, CheckpointFiles):
                    plan.inplace.release()
                raise
            old.loaded.weights_digest = plan.weights_digest
            if isinstance(plan.inplace, CheckpointFiles):
                previous = old.loaded.extra.get("checkpoint")
                old.loaded.extra["checkpoint"] = plan.inplace  # vLLM now points at this copy
                if isinstance(previous, CheckpointFiles):
                    previous.release()
            new_slot = ModelSlot(version=plan.version, model_ref=plan.model_ref, digest=plan.digest,
                                 weights_digest=plan.weights_digest,
                                 loaded=old.loaded, engine=old.engine)
            with self._lock:
                self.serving = new_slot
                new_slot.serving_since = self.clock.time()
                if self.committed_version is not None:
                    self.committed_version = new_slot.version
                self._update_state()
        finally:
            self._admission.set()
        self.metrics.inplace_pause.observe(time.monotonic() - paused)
        self.metrics.serving_version.set(plan.version)
        log.info("serving v%d in place (%s), admission paused %.1f ms", plan.version, plan.model_ref,
                 1000 * (time.monotonic() - paused))

    def _retire(self, slot: ModelSlot) -> None:
        """Let the old slot's admitted requests finish, then free it."""
        with self._lock:
            if not any(s is slot for s in self._retiring):
                self._retiring.append(slot)
        slot.wait_unpinned()
        try:
            slot.engine.stop(drain=True)
            slot.engine.close()
        except Exception:  # retiring must never take the replica down
            log.exception("error while retiring v%d", slot.version)
        slot.free()
        with self._lock:
            self._retiring = [s for s in self._retiring if s is not slot]
        files = slot.loaded.extra.get("checkpoint")
        if isinstance(files, CheckpointFiles):
            files.release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("freed v%d (%s)", slot.version, slot.model_ref)

    # ------------------------------------------------------------------ rollouts
    def _candidate(self) -> ModelSlot | None:
        """The staged slot while a split with a share is in force (caller holds the lock)."""
        split = self._split
        return self._resident_candidate() if split is not None and split.share > 0 else None

    def _resident(self, version: int) -> ModelSlot:
        """The slot of ``version``: serving, or staged beside it (caller holds the lock); else ``Conflict``."""
        plan = self._staged
        if self.serving is not None and self.serving.version == version:
            return self.serving
        if plan is not None and plan.slot is not None and plan.version == version:
            return plan.slot
        have = [f"v{s.version}" for s in (self.serving, plan.slot if plan else None) if s is not None]
        raise Conflict(f"v{version} is not resident on this replica (it has {', '.join(have) or 'nothing'})")

    def _resident_candidate(self) -> ModelSlot | None:
        """The split's candidate, staged beside the serving slot (caller holds the lock)."""
        split, plan = self._split, self._staged
        if split is None or plan is None or plan.slot is None or plan.version != split.version:
            return None
        return plan.slot

    def apply_split(self, split: Split | None) -> None:
        """Put a rollout step in force (None: end it); a split whose candidate is not staged here makes it unready."""
        with self._lock:
            if split is None:
                self._end_split()
                return
            serving = self.serving
            new_rollout = self._split is None or self._split.rollout != split.rollout
            self._split = split
            resident = self._resident_candidate() is not None
            self.split_missing = (split.share > 0 or split.shadow > 0) and not resident
            self.router.apply(split if resident else None, serving.version if serving else None)
            if self._split_key_of(split) != self._applied_key:  # pins arriving for the step change no share
                self.splits.append(SplitApplied(rollout=split.rollout, version=split.version, step=split.step,
                                                share=split.share, at=self.clock.time()))
                self._applied_key = self._split_key_of(split)
            if new_rollout:
                self.rollout_stats.reset(split.rollout)
            if resident:
                canary = split.shadow if split.shadow > 0 else CANARY_COMPARE_PERCENT
                if self._shadow is None:
                    self._shadow = Shadow(split.shadow, self.rollout_stats, canary_percent=canary)
                else:
                    self._shadow.set_percent(split.shadow, canary)
            self._update_state()
        self.metrics.set_shares({} if self.split_missing or serving is None else
                                {split.version: split.share, serving.version: 100 - split.share})
        if self.split_missing:
            log.error("the fleet answers %.1f%% with v%d and this replica has not staged it; unready until it has",
                      split.share, split.version)
        else:
            log.info("rollout %s step %d: v%d answers %.1f%% of new requests%s", split.rollout, split.step,
                     split.version, split.share, " (session pins complete)" if split.pins_step == split.step else "")

    @staticmethod
    def _split_key_of(split: Split) -> tuple[str, int, float]:
        return split.rollout, split.step, split.share

    def _end_split(self) -> None:
        """No split any more (caller holds the lock)."""
        if self._split is None and not self.split_missing:
            return
        self._split, self.split_missing, self._applied_key = None, False, None
        self.router.apply(None, None)
        if self._shadow is not None:
            self._shadow.set_percent(0, 0)
            self._shadow.clear()
        self._update_state()
        self.metrics.set_shares({})

    def split_applied(self) -> tuple[Split | None, bool]:
        """The split in force, and whether its candidate is missing here."""
        with self._lock:
            return self._split, self.split_missing

    def step_pins(self) -> tuple[str, int, list[str]] | None:
        """(rollout, step, pins) of the step in force: the sessions the committed version answered before it."""
        with self._lock:
            split = self._split
        if split is None:
            return None
        pins = self.router.frozen_pins(split.rollout, split.step)
        return None if pins is None else (split.rollout, split.step, pins)

    def answered(self, slot: ModelSlot, prompt_ids: list[int], params: SamplingParams, final: FinalEvent) -> None:
        """An answer finished: during a rollout, maybe compare it with the other resident version (off the path)."""
        with self._lock:
            shadow, serving, candidate = self._shadow, self.serving, self._resident_candidate()
        if shadow is None or serving is None or candidate is None:
            return
        if slot is candidate:
            shadow.offer_canary(serving, candidate, prompt_ids, final)
        elif slot is serving:
            shadow.offer(serving, candidate, prompt_ids, params, final)

    def transfer_report(self) -> TransferReport | None:
        """The last version assembled from chunks here: its progress while it stages, where its bytes came from."""
        transfer = self.store.transfer if isinstance(self.store, VersionCache) else None
        return None if transfer is None else TransferReport.model_validate(transfer.report())

    def rollout_report(self) -> RolloutReport | None:
        """The split in force and what each version answered since the rollout began (None: no split)."""
        with self._lock:
            split, serving = self._split, self.serving
        if split is None:
            return None
        versions = [split.version] + ([serving.version] if serving is not None else [])
        return RolloutReport(rollout=split.rollout, version=split.version, step=split.step, share=split.share,
                             pins_step=split.pins_step, held=self.router.held,
                             stats=self.rollout_stats.snapshot(versions))

    # ------------------------------------------------------------------ cluster view
    @property
    def committed_version(self) -> int | None:
        """What the cluster committed (None: no cluster); ``lockstep_committed_version`` follows every change."""
        return self._committed_version

    @committed_version.setter
    def committed_version(self, version: int | None) -> None:
        self._committed_version = version
        self.metrics.committed_version.set(-1 if version is None else version)

    def set_committed(self, version: int | None, digest: str | None = None) -> None:
        """Record what the cluster committed; readiness follows."""
        with self._lock:
            self.committed_version, self.committed_digest = version, digest
            self._update_state()

    def _update_state(self) -> None:
        if self.serving is None:
            return
        behind = self.committed_version is not None and self.serving.version != self.committed_version
        self.state = ReplicaState.BEHIND if behind else ReplicaState.SERVING
        self.metrics.ready.set(0 if behind else 1)

    def staged_plan_version(self) -> int | None:
        with self._lock:
            return None if self._staged is None else self._staged.version

    def serving_info(self) -> ServingInfo | None:
        with self._lock:
            s = self.serving
            if s is None:
                return None
            return ServingInfo(version=s.version, model=s.model_ref, digest=s.digest,
                               weights_digest=s.weights_digest, since=s.serving_since)

    def engine_load(self) -> tuple[int, int]:
        """(queue depth, running batch size) over every resident engine: serving, a staged candidate, and old
        versions still draining the requests admitted before a flip."""
        with self._lock:
            plan = self._staged
            slots = [self.serving, plan.slot if plan is not None else None, *self._retiring]
        engines_seen: dict[int, ServingEngine] = {}
        for slot in slots:
            if slot is not None:
                engines_seen.setdefault(id(slot.engine), slot.engine)  # an in-place flip keeps the one engine
        return (sum(int(e.queue_depth) for e in engines_seen.values()),
                sum(int(e.running) for e in engines_seen.values()))

    def close(self) -> None:
        """Stop every engine (drains admitted requests)."""
        if self._shadow is not None:
            self._shadow.close()
        self._drop_staged()
        with self._lock:
            slot, self.serving = self.serving, None
        if slot is not None:
            self._retire(slot)
