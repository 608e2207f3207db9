"""How one request is decoded: length, temperature, nucleus/top-k filtering, seed and stop strings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lockstep.core.errors import BadRequest


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

    def __post_init__(self) -> None:
        # Accept any iterable of strings (a list from JSON) but store a tuple, so the object stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise BadRequest(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise BadRequest(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise BadRequest(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise BadRequest(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise BadRequest(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1
