"""Field types every server's request bodies share, so that a number means the same thing on each of them."""

from __future__ import annotations

from typing import Annotated

from pydantic import AllowInfNan, StrictFloat

# A JSON number: finite (Python's json reads NaN and Infinity, which no field accepts), never a string or a
# boolean; integers are accepted where a float is expected. Strict types rather than a validator keep each
# field's bounds visible in /openapi.json.
Number = Annotated[StrictFloat, AllowInfNan(False)]
