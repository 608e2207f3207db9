"""What a request handle delivers: token events while generating, then one final event."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FinishReason(StrEnum):
    """Why a request ended; compares equal to its string value."""

    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # handle.cancel() or engine stopped without draining
    ERROR = "error"  # the step that served it failed (exception, NaN logits)


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of one step and the text they completed (may be empty while UTF-8 or a stop is pending)."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...] | None = None  # one per token, when the request asked (``SamplingParams.logprobs``)


NONFINITE_LOGITS = "the model produced non-finite logits (NaN or inf)"  # FinalEvent.error when that ended it


@dataclass(frozen=True)
class FinalEvent:
    """The end of a request: why, the whole text (the concatenation of every TokenEvent.text) and timings."""

    finish_reason: FinishReason
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None  # submit → first token (seconds); None when no token was produced
    latency_s: float  # submit → final (seconds)
    error: str | None = None  # set when finish_reason is "error"
    logprobs: tuple[float, ...] | None = None  # one per token of ``token_ids``, when the request asked
    engine_failed: bool = False  # the error is the engine's (it died), not this request's


Event = TokenEvent | FinalEvent
