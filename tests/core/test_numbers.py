"""Integers read from text anyone may have written: only ASCII digits count, and nothing raises."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lockstep.core.numbers import parse_decimal


def test_ascii_digits_are_read_and_everything_else_is_none() -> None:
    assert parse_decimal("42") == 42
    assert parse_decimal("000012") == 12
    for text in (None, "", " ", " 7", "7\n", "-1", "+1", "1.0", "1e3", "0x10", "²", "¹²", "٣", "1 2", "9" * 19):
        assert parse_decimal(text) is None, text
    assert parse_decimal("9" * 19, max_digits=19) == int("9" * 19)


@given(st.text())
def test_any_text_gives_an_integer_or_none_and_never_raises(text: str) -> None:
    value = parse_decimal(text)
    assert value is None or (value >= 0 and str(value) == text.lstrip("0").rjust(1, "0"))


@given(st.integers(min_value=0, max_value=10**18 - 1))
def test_every_non_negative_integer_round_trips(n: int) -> None:
    assert parse_decimal(str(n)) == n
