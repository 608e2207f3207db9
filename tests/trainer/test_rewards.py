"""Reward plug-ins: only allowed modules are imported; a failing plug-in is reported with what it failed
on."""

from __future__ import annotations

import math

import pytest

from lockstep.core.errors import BadRequest
from lockstep.trainer.runs.rewards import RewardError, load_reward, score
from lockstep.trainer.runs.tasks import digits_reward

ALLOWED = "tests.trainer.plugins"


def test_an_allowed_plug_in_is_imported_and_scores() -> None:
    fn = load_reward("tests.trainer.plugins:length", ALLOWED)
    assert score(fn, "p", "x" * 32, "length") == pytest.approx(0.5)
    assert load_reward("lockstep.trainer.runs.tasks:digits_reward", "lockstep.trainer") is digits_reward
    assert load_reward("lockstep.trainer.runs.tasks:digits_reward", "*") is digits_reward


@pytest.mark.parametrize(("spec", "allowed", "message"), [
    ("not a path", ALLOWED, "package.module:function"),
    ("tests.trainer.plugins", ALLOWED, "package.module:function"),
    ("os:system", ALLOWED, "not allowed"),
    ("tests.trainer.pluginsx:length", ALLOWED, "not allowed"),
    ("tests.trainer.plugins:length", "", "LOCKSTEP_REWARD_PLUGINS"),
    ("tests.trainer.plugins:missing", ALLOWED, "no attribute"),
    ("tests.trainer.plugins:_calls", ALLOWED, "not callable"),
    ("tests.trainer.nothing_here:f", "tests", "cannot import"),
    # The allow-list names modules: a path may not walk from one into the modules it imported ...
    ("json:codecs.open", "json", "leads into module 'codecs'"),
    ("tests.trainer.plugins:itertools.count", ALLOWED, "leads into module 'itertools'"),
    # ... nor name a function the allowed module imported from elsewhere.
    ("json.decoder:scanstring", "json.decoder", "defined in module '_json'"),
])
def test_bad_plug_ins_are_refused_with_the_reason(spec: str, allowed: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        load_reward(spec, allowed)


def test_a_plug_in_that_raises_or_returns_no_number_is_a_reward_error() -> None:
    with pytest.raises(RewardError, match="ValueError: this reward is broken"):
        score(load_reward("tests.trainer.plugins:always_raises", ALLOWED), "the prompt", "x", "broken")
    with pytest.raises(RewardError, match="finite number"):
        score(load_reward("tests.trainer.plugins:not_a_number", ALLOWED), "p", "x", "nan")
    with pytest.raises(RewardError, match="finite number"):
        score(lambda p, c: math.nan, "p", "x", "nan")
    with pytest.raises(RewardError, match="finite number"):
        score(lambda p, c: True, "p", "x", "bool")
