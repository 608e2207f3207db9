"""Reward plug-ins: ``package.module:function`` taking ``(prompt, completion)`` and returning a float.

Importing a module runs its code, so only modules the operator allows are imported:
``LOCKSTEP_REWARD_PLUGINS`` lists module prefixes (``*`` allows any importable module).
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any

from lockstep.core.errors import BadRequest
from lockstep.trainer.runs.tasks import RewardFn

_SPEC = re.compile(r"^(?P<module>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):"
                   r"(?P<attr>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)$")


class RewardError(Exception):
    """A reward plug-in raised or returned something that is not a finite number."""


def allowed_prefixes(setting: str) -> list[str]:
    return [p.strip() for p in setting.split(",") if p.strip()]


def _allowed(module: str, prefixes: list[str]) -> bool:
    return any(p == "*" or module == p or module.startswith(p + ".") for p in prefixes)


def load_reward(spec: str, allowed: str) -> RewardFn:
    """Import ``package.module:function``; BadRequest says what is wrong (format, not allowed, not found)."""
    match = _SPEC.match(spec.strip())
    if match is None:
        raise BadRequest(f"reward {spec!r} is not a plug-in path; write 'package.module:function' (a "
                         "function "
                         "taking (prompt, completion) and returning a float)")
    module_name, attr = match["module"], match["attr"]
    prefixes = allowed_prefixes(allowed)
    if not _allowed(module_name, prefixes):
        shown = ", ".join(prefixes) or "none"
        raise BadRequest(f"reward module {module_name!r} is not allowed (allowed prefixes: {shown}); the "
                         "operator allows plug-ins with LOCKSTEP_REWARD_PLUGINS=package[,package...] or '*'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own code failing
        raise BadRequest(f"cannot import reward module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadRequest(f"reward module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadRequest(f"reward {spec!r} is not callable; it must be a function (prompt, completion) -> "
                         "float")
    return obj  # type: ignore[no-any-return]


def score(reward: RewardFn, prompt: str, completion: str, name: str) -> float:
    """Call ``reward``; RewardError names the plug-in, the exception and the prompt it failed on."""
    try:
        value = reward(prompt, completion)
    except Exception as exc:
        raise RewardError(f"reward {name} raised {type(exc).__name__}: {exc} (prompt {prompt[:80]!r}, "
                          f"completion {completion[:80]!r})") from exc
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise RewardError(f"reward {name} returned {value!r} for prompt {prompt[:80]!r}; it must return a "
                          "finite number")
    return float(value)
