"""Hypothesis strategies for hostile JSON: any value, values at the edges of their types, and objects shaped
like a schema with some fields replaced by such values."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

# Deterministic (CI sees the same examples every run), no example database, no deadline on a busy machine.
BOUNDED = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                   phases=[Phase.explicit, Phase.generate, Phase.shrink],
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                          HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])

# Numbers at the edges of what JSON, Python floats and int64 hold.
EDGE_NUMBERS: list[Any] = [
    0, -1, 1, 2, 255, 256, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400,
    0.0, -0.0, 0.5, 1.0000001, 2.0000001, 5e-324, -5e-324, 1e-300, 1e308, -1e308, 1.7976931348623157e308,
    math.nan, math.inf, -math.inf, True, False,
]
HOSTILE_STRINGS: list[str] = [
    "", " ", "\x00", "../../etc/passwd", "/etc", "NaN", "Infinity", "-1", "1e999", "builtin:tiny",
    "versions/1", "http://169.254.169.254/latest/meta-data/", "a" * 2000, "\u202e\ud7ff", "😀" * 10,
]

edge_numbers = st.sampled_from(EDGE_NUMBERS)
hostile_strings = st.sampled_from(HOSTILE_STRINGS)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), edge_numbers, hostile_strings,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return root.get("$defs", {}).get(ref.split("/")[-1], {})
    return schema


def plausible(schema: dict[str, Any], root: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values of the type a (pydantic) JSON schema names, often just inside or just outside its bounds."""
    schema = _resolve(schema, root)
    if depth > 3:
        return json_scalars
    if "anyOf" in schema:
        return st.one_of([plausible(s, root, depth + 1) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        near: list[Any] = [v for v in (low, high) if v is not None]
        near += [v + d for v in near for d in (-1, 1)] + [v * 2 for v in near if v]
        ints = st.integers(min_value=int(low) if low is not None else -(2**64),
                           max_value=int(high) if high is not None else 2**64)
        options: list[st.SearchStrategy[Any]] = [ints, edge_numbers]
        if near:
            options.append(st.sampled_from(near))
        if kind == "number":
            options.append(st.floats(min_value=low, max_value=high, allow_nan=False)
                           if low is not None and high is not None else st.floats())
        return st.one_of(options)
    if kind == "string":
        pattern = schema.get("pattern")
        options = [st.text(max_size=int(schema.get("maxLength", 40)) + 2), hostile_strings]
        if pattern:
            options.append(st.from_regex(pattern, fullmatch=True).filter(lambda s: len(s) <= 600))
        return st.one_of(options)
    if kind == "boolean":
        return st.one_of(st.booleans(), edge_numbers)
    if kind == "array":
        items = schema.get("items", {})
        return st.lists(plausible(items, root, depth + 1) if items else json_values,
                        max_size=min(int(schema.get("maxItems", 6)) + 2, 12))
    if kind == "object" and "properties" in schema:
        return shaped_like(schema, root, depth + 1)
    if kind == "object":
        extra = schema.get("additionalProperties")
        values = plausible(extra, root, depth + 1) if isinstance(extra, dict) and extra else json_values
        return st.dictionaries(st.text(max_size=10) | st.sampled_from(["steps", "rounds", "temperature", "seed"]),
                               values, max_size=5)
    return json_values


def shaped_like(schema: dict[str, Any], root: dict[str, Any] | None = None, depth: int = 0) -> st.SearchStrategy[Any]:
    """Objects with the schema's fields: required ones usually present, each value plausible or hostile, and
    now and then an unknown field."""
    root = root or schema
    schema = _resolve(schema, root)
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))

    def value(prop: dict[str, Any]) -> st.SearchStrategy[Any]:
        return st.one_of(plausible(prop, root, depth), edge_numbers, json_values)

    shaped = st.fixed_dictionaries({k: value(v) for k, v in props.items() if k in required},
                                   optional={k: value(v) for k, v in props.items() if k not in required})
    extra = st.dictionaries(st.sampled_from(["extra", "__proto__", "constructor", "model_config"]), json_values,
                            max_size=1)
    return st.builds(lambda a, b: {**b, **a}, shaped, extra)


def any_body(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """What a hostile client may send for this schema: shaped like it (mostly), or any JSON value at all."""
    return st.one_of(shaped_like(schema), shaped_like(schema), shaped_like(schema), json_values)


def non_finite_floats_in(value: Any, where: str = "") -> list[str]:
    """Paths of NaN/inf floats anywhere inside ``value`` (dicts, lists, tuples)."""
    found: list[str] = []
    if isinstance(value, float) and not math.isfinite(value):
        found.append(where or "(top)")
    elif isinstance(value, dict):
        for k, v in value.items():
            found += non_finite_floats_in(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += non_finite_floats_in(v, f"{where}[{i}]")
    return found
