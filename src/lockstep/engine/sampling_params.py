"""How one request is decoded: length, temperature, nucleus/top-k filtering, seed and stop strings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lockstep.core.errors import BadRequest

# The engine's own bounds: what the sampler and the stop matcher handle without overflow or unbounded work,
# whoever calls it. The HTTP schemas state tighter ones (temperature <= 2, at most 4 or 8 stop strings).
MAX_NEW_TOKENS = 1 << 20  # the context window is the real limit; this keeps the arithmetic small
MAX_TEMPERATURE = 100.0  # beyond it every distribution is flat to float32 precision
MAX_TOP_K = 1_000_000  # above any vocabulary; the sampler clamps to the model's
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # the matcher's work per token grows with the square of a stop string's length


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but True is not a token count or a seed.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request; validated on construction (``BadRequest`` when invalid)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]; 1 = off
    top_k: int = 0  # tokens kept; 0 = off
    seed: int | None = None  # per-request generator seed; None = unseeded
    stop: tuple[str, ...] = field(default_factory=tuple)  # output is cut before the first of these
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks: fixed lengths)
    logprobs: bool = False  # report each generated token's log-probability (``sampler.chosen_logprobs``)

    def __post_init__(self) -> None:
        # Accept any iterable of strings (a list from JSON) but store a tuple, so the object stays hashable.
        stop: Any = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:
            raise BadRequest(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        object.__setattr__(self, "stop", stop)
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise BadRequest(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not (math.isfinite(self.temperature)
                                                   and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise BadRequest(f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                             f"got {self.temperature!r}")
        if not _is_real(self.top_p) or not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise BadRequest(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise BadRequest(f"top_k must be an integer in [0, {MAX_TOP_K}] (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise BadRequest(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise BadRequest(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not isinstance(self.logprobs, bool):
            raise BadRequest(f"logprobs must be true or false, got {self.logprobs!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings are accepted, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                shown = s[:40] + "..." if isinstance(s, str) and len(s) > 40 else s
                raise BadRequest(f"stop strings must be non-empty strings of at most {MAX_STOP_CHARS} characters, "
                                 f"got {shown!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1
