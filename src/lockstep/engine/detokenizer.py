"""Incremental detokenization that never splits a UTF-8 character across deltas (byte-level BPE safe)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens decoded as left context: tokenizers whose pieces carry a leading-space marker
# (SentencePiece "▁") decode a lone token differently from the same token in context.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"  # what decode() yields for an incomplete UTF-8 byte sequence


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation is the decoded completion.

    Two offsets bound the work per token to a short window: ``_prefix`` starts the text already
    emitted as context, ``_read`` ends it. Text whose tail is an incomplete character is held back.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the new complete text (possibly "")."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return any held-back text (with replacement characters if the bytes never completed)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if not final and (len(after) <= len(before) or after.endswith(_REPLACEMENT)):
            return ""  # a character is still incomplete: wait for the next token
        delta = after[len(before) :]
        self._prefix = self._read
        self._read = len(self._ids)
        return delta
