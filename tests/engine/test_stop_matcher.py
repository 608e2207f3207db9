"""Stop strings: emitted text never contains a stop string and nothing before it is withheld at the end."""

from __future__ import annotations

from lockstep.engine.stop_matcher import StopMatcher


def run(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    out = [matcher.feed(p) for p in pieces]
    if not matcher.matched:
        out.append(matcher.flush())
    return out, matcher.matched


def test_cut_before_a_stop_split_across_pieces() -> None:
    out, matched = run(("END",), ["hello E", "N", "D and more"])
    assert matched and "".join(out) == "hello "
    assert out[0] == "hello "  # "E" is held back: it may start "END"


def test_false_start_is_released() -> None:
    out, matched = run(("END",), ["a E", "Nx", "y"])
    assert not matched and "".join(out) == "a ENxy"
    assert out[1] == "ENx"


def test_earliest_of_several_stops_wins() -> None:
    out, matched = run(("world", "lo"), ["hello world"])
    assert matched and "".join(out) == "hel"


def test_held_tail_is_flushed_at_the_end() -> None:
    out, matched = run(("\n\n",), ["line\n"])
    assert not matched and out == ["line", "\n"]


def test_no_stops_passes_through() -> None:
    assert run((), ["a", "b"]) == (["a", "b", ""], False)
