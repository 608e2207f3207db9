"""The model-execution interface the engine drives, and the choice between the two implementations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from lockstep.core.errors import BadRequest
from lockstep.engine import llama_runner
from lockstep.engine.hf_runner import HFRunner
from lockstep.engine.llama_runner import LlamaRunner

BACKENDS = ("auto", "llama", "hf")


class Runner(Protocol):
    """Slot-addressed model execution: running sequences occupy slots ``0..B-1`` in batch order."""

    name: str
    device: torch.device

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Cache the prompts in their slots; float32 logits of each prompt's last token [N, V]."""

    def prefill_chunk(self, tokens: list[int], slot: int, start: int) -> torch.Tensor:
        """Cache ``tokens`` at positions ``start..`` of ``slot``, after the ``start`` already cached there;
        float32 logits of the last one [1, V]."""

    def decode(self, tokens: list[int], positions: list[int],
               interleave: Callable[[], None] | None = None) -> torch.Tensor:
        """Advance slots ``0..B-1`` by one token at the given positions; float32 logits [B, V].

        ``interleave`` is called at points inside the step (before each layer or sequence) where work on
        slots ``>= B`` may run, e.g. prefilling requests that arrived after the step began."""

    def step(self, tokens: list[int], positions: list[int], prompts: list[list[int]],
             slots: list[int]) -> torch.Tensor:
        """``decode(tokens, positions)`` for slots ``0..B-1`` and ``prefill(prompts, slots)`` (slots ``>= B``) in
        one pass where the runner can; float32 logits [B + N, V], the decode rows first."""

    def decode_one(self, token: int, position: int, slot: int) -> torch.Tensor:
        """One sequence's decode step alone, in any slot: float32 logits [1, V]. Repeatable after a failed
        ``decode`` (it rewrites that position), so the engine can retry a failed step sequence by sequence."""

    def reserve(self, slot: int, tokens: int) -> bool:
        """Set aside cache room for a sequence of up to ``tokens`` positions admitted to ``slot``; False when
        there is none now (it waits until running sequences finish)."""

    def move(self, src: int, dst: int, length: int) -> None:
        """Move the first ``length`` cached positions from slot ``src`` to slot ``dst``."""

    def release(self, slot: int, dirty: bool) -> None:
        """Free a slot; ``dirty`` when its contents may be non-finite."""

    def close(self) -> None:
        """Free the cache and drop the model reference."""


def make_runner(model: Any, max_batch_size: int, max_context: int, backend: str = "auto",
                kv_tokens: int | None = None) -> Runner:
    """The batched Llama-family runner when the model fits it (or is asked for), else the generic one.

    ``kv_tokens``: positions the batched runner's paged KV cache holds (default: every slot at full context)."""
    if backend not in BACKENDS:
        raise BadRequest(f"engine backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    fits = llama_runner.supports(model, max_context)
    if backend == "llama" and not fits:
        raise BadRequest(
            f"backend 'llama' needs a Llama-family model "
            f"({', '.join(sorted(llama_runner.SUPPORTED_MODEL_TYPES))}) without a sliding window below "
            f"{max_context} tokens; use backend 'auto' or 'hf'"
        )
    if backend == "hf" or not fits:
        return HFRunner(model, max_batch_size, max_context)
    return LlamaRunner(model, max_batch_size, max_context, kv_tokens)
