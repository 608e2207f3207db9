"""A model version held in memory with the engine that serves it."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from lockstep.engine import RequestHandle, SamplingParams
from lockstep.models.loader import LoadedModel


class ServingEngine(Protocol):
    """What a replica uses of an engine: the built-in ``Engine`` and ``VllmEngine`` both are one."""

    def submit(self, prompt_ids: Iterable[int], params: SamplingParams | None = None) -> RequestHandle: ...

    max_queue: int  # requests that may wait at once; the answers of one request are admitted together
    max_context: int  # prompt and generated tokens one request may hold (the model's context window)

    @property
    def queue_depth(self) -> int: ...

    @property
    def running(self) -> int: ...

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...


class FreedEngine:
    """Stands in for the engine of a slot that was freed: nothing runs, and a submit says why."""

    def __init__(self, version: int) -> None:
        self.version = version

    def submit(self, prompt_ids: Iterable[int], params: SamplingParams | None = None) -> RequestHandle:
        raise RuntimeError(f"v{self.version} was freed; requests are admitted on the serving slot")

    max_queue = 0
    max_context = 0
    queue_depth = 0
    running = 0

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass


@dataclass
class ModelSlot:
    """One version in memory. Requests pin the slot they were admitted on, so their labels are true."""

    version: int
    model_ref: str
    digest: str | None  # content digest from the MANIFEST (None for an unpublished initial model)
    loaded: LoadedModel
    engine: ServingEngine
    serving_since: float | None = None
    # The weights this slot answers with, fixed when it is made: an in-place flip rewrites the LoadedModel the
    # old and the new slot share, and an answer of the old one must not carry the new digest.
    weights_digest: str = ""
    _pins: int = 0
    _pins_zero: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.weights_digest = self.weights_digest or self.loaded.weights_digest

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def free(self) -> None:
        """Drop the engine and the model (after the engine stopped), so their memory can be returned."""
        self.engine = FreedEngine(self.version)
        self.loaded.model = None

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
