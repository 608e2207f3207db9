"""One generation request on a replica: admit on the serving slot, stream events, record metrics."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lockstep.core.errors import BadRequest, NotReady, Overloaded
from lockstep.engine import FinalEvent, RequestHandle, SamplingParams, TokenEvent
from lockstep.engine.event import NONFINITE_LOGITS
from lockstep.engine.sampling_params import MAX_SEED
from lockstep.inference.replica import Replica
from lockstep.inference.slot import ModelSlot

log = logging.getLogger(__name__)

PromptBuilder = Callable[[Any], list[int]]  # tokenizer → prompt token ids


@dataclass
class Admitted:
    """A request admitted on one slot: the version that will produce every token of it."""

    slot: ModelSlot
    handle: RequestHandle
    started: float
    prompt_ids: list[int]
    params: SamplingParams
    targeted: bool = False  # the caller chose the version (X-Lockstep-Version): not traffic a rollout counts

    @property
    def version(self) -> int:
        return self.slot.version

    @property
    def model_ref(self) -> str:
        return self.slot.model_ref


class TokenRate:
    """Generated tokens per second over a sliding window."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int, now: float | None = None) -> None:
        self._events.append((time.monotonic() if now is None else now, tokens))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
        return sum(n for _, n in self._events) / self.window_s


async def admit(replica: Replica, build_prompt: PromptBuilder, params: SamplingParams, session: str | None = None,
                version: int | None = None) -> Admitted:
    """Pin the serving slot (during a rollout, the one the split picks for ``session``), tokenize with *its*
    tokenizer and submit to *its* engine. ``version``: the resident version the caller chose instead.

    All of it runs in a worker thread: tokenizing the longest allowed prompt or chat, or waiting out an in-place
    weight copy, never holds up the event loop (and with it /healthz and every other request)."""
    [admitted] = await admit_choices(replica, build_prompt, params, 1, session, version)
    return admitted


async def admit_choices(replica: Replica, build_prompt: PromptBuilder, params: SamplingParams, n: int,
                        session: str | None = None, version: int | None = None, *,
                        fit_context: bool = False) -> list[Admitted]:
    """``n`` answers to one prompt, admitted together on one slot, so one version writes all of them (``admit``).

    With a seed, answer i samples with seed + i: answer i of (seed s, n) is the answer of (seed s + i, n = 1).
    ``fit_context``: the client sent no length, so the default one is cut to the room the prompt leaves."""
    work = asyncio.ensure_future(asyncio.to_thread(_admit_blocking, replica, build_prompt, params, n, session,
                                                   version, fit_context))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        work.add_done_callback(_cancel_orphans)  # the client left while admitting: free the slots once submitted
        raise


def json_logprobs(logprobs: Sequence[float] | None) -> list[float | None] | None:
    """Token log-probabilities as JSON holds them: a non-finite one (an underflowed row) is null."""
    if logprobs is None:
        return None
    return [x if math.isfinite(x) else None for x in logprobs]


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The sampling of answer ``index`` of a request (its seed shifted by the index)."""
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=(params.seed + index) % (MAX_SEED + 1))


def fit_to_context(params: SamplingParams, prompt_tokens: int, max_context: int) -> SamplingParams:
    """``params`` with its answer length cut to the room ``prompt_tokens`` leave in the context window."""
    room = max_context - prompt_tokens
    if room < 1:
        raise BadRequest(f"the prompt ({prompt_tokens} tokens) fills the context limit of {max_context} tokens and "
                         "leaves no room for an answer; shorten the prompt")
    return params if params.max_new_tokens <= room else replace(params, max_new_tokens=room)


def check_choices(n: int, max_queue: int) -> None:
    """A 400 for more answers than the engine's queue can ever hold at once: retrying could never succeed."""
    if n > max_queue:
        raise BadRequest(f"n={n} answers are more than this replica can take at once: its queue holds at most "
                         f"{max_queue} requests (LOCKSTEP_MAX_QUEUE) and the n answers are admitted together; "
                         f"ask for at most {max_queue}, or send several requests")


def _admit_blocking(replica: Replica, build_prompt: PromptBuilder, params: SamplingParams, n: int,
                    session: str | None, version: int | None, fit_context: bool = False) -> list[Admitted]:
    admitted: list[Admitted] = []
    with replica.pinned(session=session, version=version) as slot:
        check_choices(n, slot.engine.max_queue)
        ids = build_prompt(slot.tokenizer)
        if fit_context:
            params = fit_to_context(params, len(ids), slot.engine.max_context)  # each engine knows its own
        try:
            for index in range(n):
                own = choice_params(params, index)
                admitted.append(Admitted(slot=slot, handle=slot.engine.submit(ids, own), started=time.monotonic(),
                                         prompt_ids=ids, params=own, targeted=version is not None))
        except BaseException as exc:
            for earlier in admitted:  # all of them or none: a partial answer is no answer
                earlier.handle.cancel()
            if isinstance(exc, Overloaded):
                replica.metrics.rejected.inc()
            raise
    return admitted


def _cancel_orphans(work: asyncio.Future[list[Admitted]]) -> None:
    """Cancel the requests admitted for a caller that is gone."""
    if not work.cancelled() and work.exception() is None:
        for admitted in work.result():
            admitted.handle.cancel()


async def events(replica: Replica, admitted: Admitted, rate: TokenRate, endpoint: str
                 ) -> AsyncIterator[TokenEvent | FinalEvent]:
    """Stream the request's events; a consumer that stops early (client gone) cancels it."""
    final: FinalEvent | None = None
    streamed = 0  # tokens generated so far: they count even when the client leaves before the end
    try:
        async for event in admitted.handle.aiter():
            if isinstance(event, FinalEvent):
                final = event
            else:
                streamed += len(event.token_ids)
            yield event
    finally:
        if final is None:
            admitted.handle.cancel()
            record_tokens(replica, streamed, rate)
        else:
            record(replica, admitted, final, rate, endpoint)


async def final_event(replica: Replica, admitted: Admitted, rate: TokenRate, endpoint: str,
                      is_disconnected: Callable[[], Any]) -> FinalEvent:
    """Wait for the whole answer; a client that hangs up meanwhile cancels the request (frees its slot)."""
    [final] = await final_events(replica, [admitted], rate, endpoint, is_disconnected)
    return final


async def final_events(replica: Replica, admitted: list[Admitted], rate: TokenRate, endpoint: str,
                       is_disconnected: Callable[[], Any]) -> list[FinalEvent]:
    """Wait for every answer, in order; a client that hangs up meanwhile cancels them all (frees their slots)."""

    def cancel_all() -> None:
        for a in admitted:
            a.handle.cancel()

    async def watch() -> None:
        while not all(a.handle.done for a in admitted):
            if await is_disconnected():
                cancel_all()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        # One wake-up per answer, not one per token.
        finals = list(await asyncio.gather(*(a.handle.aresult() for a in admitted)))
    except BaseException:
        cancel_all()  # this caller is gone (cancelled): free the slots
        raise
    finally:
        watcher.cancel()
    for a, final in zip(admitted, finals, strict=True):
        record(replica, a, final, rate, endpoint)
    return finals


def raise_failed(finals: list[FinalEvent]) -> None:
    """A 400 with the reason when any answer failed inside the engine because of the request (a request answers
    whole or not at all); a 503 when the engine itself died under it (the replica goes unready and reloads)."""
    failed = next((f for f in finals if f.finish_reason.value == "error"), None)
    if failed is not None and failed.engine_failed:
        raise NotReady(f"the replica's engine failed while generating ({failed.error}); it goes unready and "
                       "reloads its model: retry, another replica answers meanwhile")
    if failed is not None:
        raise BadRequest(f"generation failed: {failed.error}")


def record_tokens(replica: Replica, tokens: int, rate: TokenRate) -> None:
    """Count generated tokens, those of an answer its client left included."""
    replica.metrics.generated_tokens.inc(tokens)
    rate.add(tokens)


def record(replica: Replica, admitted: Admitted, final: FinalEvent, rate: TokenRate, endpoint: str) -> None:
    """An answer's metrics and rollout statistics; the request itself is counted by its HTTP status
    (``inference.request_count``)."""
    m = replica.metrics
    m.request_latency.labels(endpoint=endpoint).observe(final.latency_s)
    if final.ttft_s is not None:
        m.ttft.observe(final.ttft_s)
    record_tokens(replica, final.completion_tokens, rate)
    m.tokens_per_request.observe(final.completion_tokens)
    if not admitted.targeted:
        replica.rollout_stats.record_answer(admitted.version, final, nonfinite=final.error == NONFINITE_LOGITS)
        replica.answered(admitted.slot, admitted.prompt_ids, admitted.params, final)
    sampled_by = {version for version, _, _ in getattr(final, "weight_versions", ())}
    if sampled_by - {str(admitted.version)}:  # the engine's own account contradicts the label
        m.version_mismatches.inc()
        log.error("an answer labelled v%d was sampled by weight versions %s", admitted.version, sorted(sampled_by))
