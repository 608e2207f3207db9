"""SamplingParams validates on construction (types strict, every number bounded) and stays hashable."""

from __future__ import annotations

import dataclasses

import pytest

from lockstep.core.errors import BadRequest
from lockstep.engine import SamplingParams
from lockstep.engine.sampling_params import (
    MAX_NEW_TOKENS,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
)


def test_defaults_are_greedy_and_frozen() -> None:
    params = SamplingParams()
    assert params.greedy and params.temperature == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 1.0  # type: ignore[misc]


def test_stop_list_becomes_a_tuple() -> None:
    params = SamplingParams(stop=["a", "bc"])  # type: ignore[arg-type]
    assert params.stop == ("a", "bc")
    assert SamplingParams(stop="x").stop == ("x",)  # type: ignore[arg-type]
    hash(params)


def test_top_k_one_counts_as_greedy() -> None:
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -3}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"max_new_tokens": 8.0}, "max_new_tokens"),
        ({"max_new_tokens": MAX_NEW_TOKENS + 1}, "max_new_tokens"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": MAX_TEMPERATURE * 2}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": "1"}, "top_p"),
        ({"top_k": MAX_TOP_K + 1}, "top_k"),
        ({"top_k": 2**64}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"seed": 2**63}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
        ({"stop": ["x" * (MAX_STOP_CHARS + 1)]}, "stop"),
        ({"stop": [7]}, "stop"),
        ({"stop": 7}, "stop"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_invalid_values_are_bad_requests(kwargs: dict, field: str) -> None:
    with pytest.raises(BadRequest, match=field):
        SamplingParams(**kwargs)


def test_the_bounds_themselves_are_accepted() -> None:
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=MAX_TEMPERATURE, top_p=5e-324, top_k=MAX_TOP_K,
                            seed=MAX_SEED, stop=("s" * MAX_STOP_CHARS,) * MAX_STOP_STRINGS)
    assert not params.greedy and len(params.stop) == MAX_STOP_STRINGS
