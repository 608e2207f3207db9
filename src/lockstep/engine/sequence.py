"""One request inside the engine: its tokens, decoding state, slot and lifecycle."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import torch

from lockstep.core.clock import Clock
from lockstep.engine.detokenizer import IncrementalDetokenizer
from lockstep.engine.event import FinalEvent, FinishReason, TokenEvent
from lockstep.engine.request_handle import RequestHandle
from lockstep.engine.sampling_params import SamplingParams
from lockstep.engine.stop_matcher import StopMatcher


class SequenceStatus(Enum):
    """Lifecycle: WAITING (queued) → RUNNING (holds a batch slot) → FINISHED."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request's state. Touched by the engine thread only, except ``handle`` (thread-safe)."""

    def __init__(
        self,
        request_id: int,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Any,
        eos_ids: frozenset[int],
        generator: torch.Generator | None,
        handle: RequestHandle,
        clock: Clock,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = generator  # None for greedy requests
        self.handle = handle
        self.status = SequenceStatus.WAITING
        self.slot = -1  # batch row / KV-cache slot while RUNNING
        self.output_ids: list[int] = []
        self.output_logprobs: list[float] | None = [] if params.logprobs else None
        self.num_cached = 0  # positions of this sequence in the KV cache (the engine sets it per forward)
        self._clock = clock
        self.submitted_at = clock.monotonic()  # seconds
        self.first_token_at: float | None = None
        self._eos_ids = frozenset() if params.ignore_eos else eos_ids
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = StopMatcher(params.stop)
        self._text: list[str] = []
        self.finish_reason: FinishReason | None = None

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def append(self, token_id: int, logprob: float | None = None) -> bool:
        """Record a sampled token (and its log-probability, when asked), stream its text; return True when the
        sequence is now finished."""
        now = self._clock.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        self.output_ids.append(token_id)
        if self.output_logprobs is not None:
            self.output_logprobs.append(math.nan if logprob is None else logprob)
        reason: FinishReason | None = None
        if token_id in self._eos_ids:
            reason = FinishReason.STOP
            text = self._stop.feed(self._detok.flush())
        else:
            text = self._stop.feed(self._detok.add(token_id))
        if self._stop.matched:
            reason = FinishReason.STOP
        elif reason is None and len(self.output_ids) >= self.params.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is not None and not self._stop.matched:
            text += self._stop.feed(self._detok.flush())
            text += self._stop.flush()
            if self._stop.matched:
                reason = FinishReason.STOP
        self._text.append(text)
        self.handle._push(TokenEvent((token_id,), text,
                                     None if self.output_logprobs is None else (self.output_logprobs[-1],)))
        if reason is not None:
            self.finish(reason)
            return True
        return False

    def finish(self, reason: FinishReason, error: str | None = None, *, engine_failed: bool = False) -> None:
        """End the request once and deliver its final event."""
        if self.status is SequenceStatus.FINISHED:
            return
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        now = self._clock.monotonic()
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted_at
        self.handle._push(
            FinalEvent(
                finish_reason=reason,
                text="".join(self._text),
                token_ids=tuple(self.output_ids),
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(self.output_ids),
                ttft_s=ttft,
                latency_s=now - self.submitted_at,
                error=error,
                logprobs=None if self.output_logprobs is None else tuple(self.output_logprobs),
                engine_failed=engine_failed,
            )
        )
