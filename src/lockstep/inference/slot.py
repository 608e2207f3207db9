"""A model version held in memory with the engine that serves it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from lockstep.models.loader import LoadedModel


@dataclass
class ModelSlot:
    """One version in memory. Requests pin the slot they were admitted on, so their labels are true."""

    version: int
    model_ref: str
    digest: str | None  # content digest from the MANIFEST (None for an unpublished initial model)
    loaded: LoadedModel
    engine: Any  # lockstep.engine.Engine
    serving_since: float | None = None
    _pins: int = 0
    _pins_zero: threading.Condition = field(default_factory=threading.Condition)

    @property
    def weights_digest(self) -> str:
        return self.loaded.weights_digest

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def pin(self) -> None:
        with self._pins_zero:
            self._pins += 1

    def unpin(self) -> None:
        with self._pins_zero:
            self._pins -= 1
            if self._pins == 0:
                self._pins_zero.notify_all()

    def wait_unpinned(self, timeout: float | None = None) -> bool:
        """Block until no request is between admission and engine submission."""
        with self._pins_zero:
            return self._pins_zero.wait_for(lambda: self._pins == 0, timeout=timeout)
