"""Field types every server's request bodies share, so that a number means the same thing on each of them."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, AllowInfNan, StrictFloat, StrictStr

# A JSON number: finite (Python's json reads NaN and Infinity, which no field accepts), never a string or a
# boolean; integers are accepted where a float is expected. Strict types rather than a validator keep each
# field's bounds visible in /openapi.json.
Number = Annotated[StrictFloat, AllowInfNan(False)]


def encodable(text: str) -> str:
    """``text`` when UTF-8 can encode it; ``ValueError`` naming a lone surrogate (JSON's "\\ud83d" escape alone)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text holds a lone surrogate ({text[exc.start]!r} at character {exc.start}), which is "
                         "no Unicode character: send the pair whole, or the character itself") from None
    return text


# Text a model reads: a JSON string that is Unicode. JSON's "\ud83d" escape alone decodes to a lone surrogate,
# which the tokenizers refuse (pydantic lets it through a plain str field, and only refuses it under a length bound).
Text = Annotated[StrictStr, AfterValidator(encodable)]
