"""Integers read from text that anyone may have written: headers, file names, small files."""

from __future__ import annotations


def parse_decimal(text: str | None, *, max_digits: int = 18) -> int | None:
    """The integer that ``text``, ASCII digits and nothing else, spells; else None.

    ``str.isdigit`` alone is not enough: it accepts ``'²'`` and other digits that ``int()`` refuses, so a header
    or a file name made of them would raise where the caller expected a None. Nothing is stripped: a header
    such as Content-Length must be read exactly as every proxy before this server read it.
    """
    if text is None:
        return None
    if not text or len(text) > max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)
