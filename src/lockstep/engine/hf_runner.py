"""Generic path for any causal LM: the model's own forward and cache, one sequence at a time."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch


class HFRunner:
    """Correct for every architecture, unbatched: each slot keeps the HF cache object of its sequence."""

    name = "hf"

    def __init__(self, model: Any, max_batch_size: int, max_context: int) -> None:
        self._model = model
        self.device = next(model.parameters()).device
        # transformers 5 renamed the argument to `cache` (the old name now raises under warnings-as-errors).
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Only the last position's logits are needed: skip the [prompt_len, vocab] projection where possible.
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._caches: list[Any] = [None] * max_batch_size

    def _forward(self, ids: list[int], cache: Any) -> tuple[torch.Tensor, Any]:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        out = self._model(input_ids=x, use_cache=True, **kwargs, **self._extra)
        new_cache = out.get("cache", None)
        if new_cache is None:
            new_cache = out.get("past_key_values", None)
        return out.logits[0, -1].float(), new_cache

    def prefill_chunk(self, tokens: list[int], slot: int, start: int) -> torch.Tensor:
        """Continue ``slot``'s cache (``start`` tokens in it) with ``tokens``; logits of the last [1, V]."""
        logits, self._caches[slot] = self._forward(tokens, self._caches[slot] if start else None)
        return logits.unsqueeze(0)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Run each prompt alone; keep its cache in its slot; return last-token logits [N, V]."""
        rows = []
        for prompt, slot in zip(prompts, slots, strict=True):
            logits, self._caches[slot] = self._forward(prompt, None)
            rows.append(logits)
        return torch.stack(rows)

    def decode(self, tokens: list[int], positions: list[int],
               interleave: Callable[[], None] | None = None) -> torch.Tensor:
        """One token per slot ``0..B-1``, each through its own cache; return logits [B, V].

        ``interleave`` runs before each sequence (it may fill slots ``>= B``, which this step never reads)."""
        rows = []
        for slot, token in enumerate(tokens):
            if interleave is not None:
                interleave()
            logits, self._caches[slot] = self._forward([token], self._caches[slot])
            rows.append(logits)
        return torch.stack(rows)

    def step(self, tokens: list[int], positions: list[int], prompts: list[list[int]],
             slots: list[int]) -> torch.Tensor:
        """The decode step, then the prompts, each through its own cache (nothing to share here)."""
        rows = [self.decode(tokens, positions)] if tokens else []
        return torch.cat(rows + [self.prefill(prompts, slots)]) if prompts else torch.cat(rows)

    def decode_one(self, token: int, position: int, slot: int) -> torch.Tensor:
        """``token`` at ``position`` of ``slot`` alone; logits [1, V]. A failed batched step may already have
        appended this position to some layers of the slot's cache: cut back to ``position`` first."""
        cache = self._caches[slot]
        if cache is not None and int(cache.get_seq_length()) > position:  # layers run in order: layer 0 first
            _cut_back(cache, position)
        logits, self._caches[slot] = self._forward([token], cache)
        return logits.unsqueeze(0)

    def reserve(self, slot: int, tokens: int) -> bool:
        """Always room: each sequence's HF cache grows as it goes."""
        return True

    def move(self, src: int, dst: int, length: int) -> None:
        self._caches[dst], self._caches[src] = self._caches[src], None

    def release(self, slot: int, dirty: bool) -> None:
        self._caches[slot] = None

    def close(self) -> None:
        self._caches = []
        self._model = None


def _cut_back(cache: Any, position: int) -> None:
    """Drop every cached position from ``position`` on, in each layer (a failed step appended to some)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers 4: crop to an absolute length, every layer
        cache.crop(position)
        return
    for layer in layers:  # transformers 5: one object per layer; crop(-n) removes its last n positions
        excess = int(layer.get_seq_length()) - position
        if excess > 0:
            layer.crop(-excess)
        if int(layer.get_seq_length()) > position:
            raise RuntimeError(f"this model's cache ({type(layer).__name__}) cannot be rolled back to position "
                               f"{position} after a failed step")
