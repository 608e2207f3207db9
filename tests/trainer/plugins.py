"""Reward plug-ins the tests name as ``tests.trainer.plugins:<function>`` (the trainer imports them)."""

from __future__ import annotations

import itertools

_calls = itertools.count()


def always_raises(prompt: str, completion: str) -> float:
    raise ValueError("this reward is broken on purpose")


def raises_after_first_call(prompt: str, completion: str) -> float:
    """Passes the trainer's test call when the run is created, then fails on the first real answer."""
    if next(_calls) > 0:
        raise RuntimeError("the reward service is unreachable")
    return 0.0


def not_a_number(prompt: str, completion: str) -> str:
    return "high"


def length(prompt: str, completion: str) -> float:
    """A working plug-in: longer answers score higher (capped at 1)."""
    return min(1.0, len(completion) / 64)
