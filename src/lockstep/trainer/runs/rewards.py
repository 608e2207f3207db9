"""Reward plug-ins: ``package.module:function`` taking ``(prompt, completion)`` and returning a float.

Importing a module runs its code, so only modules the operator allows are imported:
``LOCKSTEP_REWARD_PLUGINS`` lists module prefixes (``*`` allows any importable module).
"""

from __future__ import annotations

import importlib
import math
import re
import types
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
        if isinstance(obj, types.ModuleType):  # 'allowed:os.rename' would reach any module the allowed one imports
            raise BadRequest(f"reward {spec!r} leads into module {obj.__name__!r}; name a function of the module "
                             "itself: 'package.module:function'")
    if not callable(obj):
        raise BadRequest(f"reward {spec!r} is not callable; it must be a function (prompt, completion) -> "
                         "float")
    # Defined where the operator allows plug-ins from, not merely imported there ('allowed:rename' after a
    # 'from os import rename'); a callable object counts by its class.
    named = isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, type))
    defined_in = getattr(obj, "__module__", None) if named else type(obj).__module__
    if not isinstance(defined_in, str) or not _allowed(defined_in, prefixes):
        raise BadRequest(f"reward {spec!r} is defined in module {defined_in!r}, which is not allowed (allowed "
                         f"prefixes: {', '.join(prefixes) or 'none'}); plug-ins are functions of allowed modules")
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
