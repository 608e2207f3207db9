"""Incremental detokenization: deltas join to the full decode and never split a UTF-8 character."""

from __future__ import annotations

from lockstep.engine.detokenizer import IncrementalDetokenizer

from . import encode, tokenizer

TEXT = "Emoji 😀 and 🚀, kanji 日本語, café and жизнь."


def test_deltas_never_carry_a_broken_character() -> None:
    tok = tokenizer()
    ids = encode(TEXT)
    # The byte-level tokenizer really does split characters across tokens here.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok, encode("Prompt:"))
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_incomplete_bytes_are_flushed_at_the_end() -> None:
    tok = tokenizer()
    ids = encode("😀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids[0]) == ""
    assert detok.flush() == "\ufffd"  # the bytes never completed: shown as U+FFFD, not dropped


def test_special_tokens_add_no_text() -> None:
    tok = tokenizer()
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(tok.eos_token_id) == ""
    assert "".join(detok.add(i) for i in encode("fox")) + detok.flush() == "fox"
