"""Shadow traffic: a sample of served prompts also runs on the candidate, off the response path, on idle capacity.

Each sampled prompt becomes a job for one worker thread: a shadow job runs the served prompt and answer through the
candidate, teacher-forced (or, with ``generate``, has the candidate write its own answer, never returned to anyone),
and compares it with the stable version; a canary job compares an answer the candidate served with the stable
version the same way. Results go to ``RolloutStats``.

The bound: one job in flight (the single worker) and at most ``queue_size`` waiting. A job runs only once neither
engine is running or queueing a served request (it waits up to ``idle_wait_s`` for that); a sampled job that finds
the queue full, or no idle moment, is dropped and counted (``VersionStats.shadow_dropped``). Shadowing takes idle
capacity only: on a saturated replica it drops nearly everything, and the gates it feeds wait.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from lockstep.engine import FinalEvent, FinishReason, RequestHandle, SamplingParams
from lockstep.inference.compare import Comparison, compare
from lockstep.inference.rollout_stats import RolloutStats
from lockstep.inference.slot import ModelSlot

log = logging.getLogger(__name__)

QUEUE_SIZE = 2  # jobs waiting beside the one in flight
IDLE_WAIT_S = 1.0  # how long a job waits for both engines to be idle before it is dropped
IDLE_POLL_S = 0.002
ANSWER_TIMEOUT_S = 600.0  # a candidate answer that takes longer is cancelled and the job counted as failed
CompareFn = Callable[..., Comparison]


def _check_percent(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 100.0):
        raise ValueError(f"{name} must be a number in [0, 100], got {value!r}")
    return value


class Sampler:
    """Picks ``percent`` of offers deterministically: 10 picks exactly every 10th, 50 every 2nd, 0 none."""

    def __init__(self, percent: float) -> None:
        self._percent = _check_percent("percent", percent)
        self._credit = 0.0  # percent points carried over; an offer is picked when it reaches 100

    @property
    def percent(self) -> float:
        """The share of offers picked, 0..100."""
        return self._percent

    @percent.setter
    def percent(self, value: float) -> None:
        self._percent = _check_percent("percent", value)

    def take(self) -> bool:
        """Count one offer; True when it is picked."""
        self._credit += self._percent
        if self._credit >= 100.0:
            self._credit -= 100.0
            return True
        return False


@dataclass
class ShadowCounters:
    """What the shadow did since it was created (the stats hold the per-rollout view)."""

    offered: int = 0  # finished answers offered (shadow and canary)
    sampled: int = 0  # picked by the percentage
    dropped: int = 0  # picked but skipped: the queue was full or an engine had requests waiting
    compared: int = 0  # comparisons recorded
    failed: int = 0  # jobs that raised or whose candidate answer did not finish


@dataclass(frozen=True)
class _Job:
    kind: Literal["shadow", "canary"]
    stable: ModelSlot
    candidate: ModelSlot
    prompt_ids: list[int]
    params: SamplingParams | None  # the served request's, for a shadow job's own generation
    served: FinalEvent


def _comparable(served: FinalEvent) -> bool:
    # An error, a cancelled request or an empty answer says nothing about the model's next-token choices.
    return served.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and bool(served.token_ids)


class Shadow:
    """Runs a sample of served prompts on the candidate too, bounded and off the response path; thread-safe."""

    def __init__(self, percent: float, stats: RolloutStats, *, canary_percent: float | None = None,
                 queue_size: int = QUEUE_SIZE, answer_timeout_s: float = ANSWER_TIMEOUT_S,
                 compare_fn: CompareFn = compare, start: bool = True, generate: bool = False,
                 idle_wait_s: float = IDLE_WAIT_S) -> None:
        """``percent`` of answers served by the stable version are shadowed; ``canary_percent`` (default: the
        same) of those served by the candidate are compared. ``start=False`` leaves the worker stopped until
        ``start()`` (jobs only queue meanwhile). ``generate``: a shadowed prompt gets the candidate's own answer
        (``max_new_tokens`` decode steps) instead of one teacher-forced pass over the served answer."""
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.stats = stats
        self.queue_size = queue_size
        self.answer_timeout_s = answer_timeout_s
        self.generate, self.idle_wait_s = generate, idle_wait_s
        self._compare = compare_fn
        self._shadow_sampler = Sampler(percent)
        self._canary_sampler = Sampler(percent if canary_percent is None else canary_percent)
        self._cond = threading.Condition()  # guards everything below
        self._queue: deque[_Job] = deque()
        self._in_flight: _Job | None = None
        self._handle: RequestHandle | None = None  # the in-flight shadow generation, cancelled by close()
        self._counters = ShadowCounters()
        self._closed = False
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        """Start the worker (once)."""
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name="lockstep-shadow", daemon=True)
            self._thread.start()

    def set_percent(self, percent: float, canary_percent: float | None = None) -> None:
        """Change the shares sampled from now on (``canary_percent`` None: the same as ``percent``)."""
        with self._cond:
            self._shadow_sampler.percent = percent
            self._canary_sampler.percent = percent if canary_percent is None else canary_percent

    def clear(self) -> int:
        """Forget the queued jobs (a rollout ended: they would count toward the next one); returns how many."""
        with self._cond:
            n = len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            return n

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the worker: queued jobs are forgotten, an in-flight generation is cancelled."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            handle = self._handle
            self._cond.notify_all()
            thread = self._thread
        if handle is not None:
            handle.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or in flight; False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._in_flight is None, timeout=timeout)

    @property
    def counters(self) -> ShadowCounters:
        """A copy of the counters."""
        with self._cond:
            return replace(self._counters)

    @property
    def alive(self) -> bool:
        """True while the worker thread runs."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def pending(self) -> int:
        """Jobs queued or in flight."""
        with self._cond:
            return len(self._queue) + (self._in_flight is not None)

    # ------------------------------------------------------------------ offers (request path: cheap, never blocks)
    def offer(self, stable: ModelSlot, candidate: ModelSlot, prompt_ids: Sequence[int], params: SamplingParams,
              served: FinalEvent) -> bool:
        """An answer the stable version served finished: maybe shadow it on the candidate. True when queued."""
        return self._offer(_Job("shadow", stable, candidate, list(prompt_ids), params, served))

    def offer_canary(self, stable: ModelSlot, candidate: ModelSlot, prompt_ids: Sequence[int],
                     served: FinalEvent) -> bool:
        """An answer the candidate served (canary traffic) finished: maybe compare it with the stable version.

        The job teacher-forces both versions on the candidate's answer (no generation): agreement is how often the
        stable version's argmax matches the candidate's tokens, KL is KL(P_stable || P_candidate) as for shadowed
        prompts (``compare(..., served_by="candidate")``). True when queued."""
        return self._offer(_Job("canary", stable, candidate, list(prompt_ids), None, served))

    def _offer(self, job: _Job) -> bool:
        with self._cond:
            if self._closed or not job.prompt_ids or not _comparable(job.served):
                return False
            c = self._counters
            c.offered += 1
            sampler = self._shadow_sampler if job.kind == "shadow" else self._canary_sampler
            if not sampler.take():
                return False
            c.sampled += 1
            full = len(self._queue) >= self.queue_size
            if full:
                c.dropped += 1
            else:
                self._queue.append(job)
                self._cond.notify_all()
        if full:
            self.stats.record_shadow_dropped(job.candidate.version)
        return not full

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or bool(self._queue))
                if self._closed:
                    return
                job = self._in_flight = self._queue.popleft()
            try:
                self._do(job)
            except Exception:  # a bug here must not end the worker: later jobs would only pile up
                log.exception("the shadow worker failed on a %s job of v%d", job.kind, job.candidate.version)
            finally:
                with self._cond:
                    self._in_flight = None
                    self._handle = None
                    self._cond.notify_all()

    def _idle(self, job: _Job) -> bool:
        """Wait (up to ``idle_wait_s``) until neither engine runs or queues anything; False if they stay busy."""
        deadline = time.monotonic() + self.idle_wait_s
        engines = (job.candidate.engine, job.stable.engine)
        while any(e.queue_depth > 0 or e.running > 0 for e in engines):
            if self._closed or time.monotonic() >= deadline:
                return False
            time.sleep(IDLE_POLL_S)
        return True

    def _do(self, job: _Job) -> None:
        if not self._idle(job):
            # Served requests run or wait: shadow work would only slow them (CPU, GIL, memory bandwidth).
            with self._cond:
                self._counters.dropped += 1
            self.stats.record_shadow_dropped(job.candidate.version)
            return
        try:
            result = self._shadow(job) if job.kind == "shadow" else self._compare(
                job.stable, job.candidate, job.prompt_ids, job.served.token_ids, None, served_by="candidate")
        except Exception as exc:
            with self._cond:
                self._counters.failed += 1
            log.warning("%s comparison of v%d with v%d failed: %s: %s", job.kind, job.candidate.version,
                        job.stable.version, type(exc).__name__, exc)
            return
        if result is None:
            return
        self.stats.record_comparison(job.candidate.version, result.agreement, result.kl)
        with self._cond:
            self._counters.compared += 1

    def _shadow(self, job: _Job) -> Comparison | None:
        """Compare the candidate with the served answer: teacher-forced, or from its own generated answer
        (``generate``); None when that answer did not finish."""
        if not self.generate:
            return self._compare(job.stable, job.candidate, job.prompt_ids, job.served.token_ids, None)
        assert job.params is not None
        handle = job.candidate.engine.submit(job.prompt_ids, job.params)
        with self._cond:
            if self._closed:
                handle.cancel()
                return None
            self._handle = handle
        try:
            final = handle.result(timeout=self.answer_timeout_s)
        except TimeoutError:
            handle.cancel()
            raise
        if final.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            with self._cond:
                if self._closed:
                    return None  # close() cancelled it: nothing failed
            raise RuntimeError(f"the candidate's answer ended with {final.finish_reason.value}"
                               + (f": {final.error}" if final.error else ""))
        return self._compare(job.stable, job.candidate, job.prompt_ids, job.served.token_ids, final.token_ids)
