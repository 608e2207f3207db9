"""SamplingParams validates on construction and stays hashable."""

from __future__ import annotations

import dataclasses

import pytest

from lockstep.core.errors import BadRequest
from lockstep.engine import SamplingParams


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
    ],
)
def test_invalid_values_are_bad_requests(kwargs: dict, field: str) -> None:
    with pytest.raises(BadRequest, match=field):
        SamplingParams(**kwargs)
