"""Every request schema of the three servers, under hostile JSON (property-based).

For any JSON value a client could send, validation either raises pydantic's ``ValidationError`` (the servers
map it to 400) or gives an object whose numeric fields are finite and inside the bounds the schema states
(the ones ``/openapi.json`` shows); never another exception. And every numeric field states both bounds, so
no value "at the edge of its type" reaches the engine or the trainer.
"""

from __future__ import annotations

import importlib
import inspect
import math
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from pydantic import BaseModel, ValidationError

from tests.security.strategies import BOUNDED, any_body, non_finite_floats_in

SCHEMA_MODULES = ("lockstep.inference.schemas", "lockstep.inference.openai_api", "lockstep.trainer.server.schemas",
                  "lockstep.ui.schemas")
EXAMPLES = 50  # per schema and property; ~25 schemas, pure validation


def request_models() -> list[type[BaseModel]]:
    """The request bodies (and their parts) each schema module defines; responses are not inputs."""
    found: dict[str, type[BaseModel]] = {}
    for name in SCHEMA_MODULES:
        module: ModuleType = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == module.__name__
                    and not attr.startswith("_") and not attr.endswith("Response")):
                found[f"{module.__name__.split('.')[-2]}.{attr}"] = obj
    return [found[k] for k in sorted(found)]


MODELS = request_models()
IDS = [f"{m.__module__.split('.')[-2]}.{m.__name__}" for m in MODELS]


def _numeric_branches(prop: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    """The parts of a property's schema that accept a JSON number (the property itself, or anyOf branches)."""
    if "$ref" in prop:
        prop = defs.get(prop["$ref"].split("/")[-1], {})
    branches = prop.get("anyOf", [prop])
    return [b for b in branches if b.get("type") in ("integer", "number")]


def numeric_fields(model: type[BaseModel]) -> dict[str, list[dict[str, Any]]]:
    """Field name → its numeric schema branches, from the model's JSON schema (what /openapi.json shows)."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    out = {}
    for name, prop in schema.get("properties", {}).items():
        branches = _numeric_branches(prop, defs)
        if branches:
            out[name] = branches
    return out


def within(value: float, branch: dict[str, Any]) -> bool:
    if "minimum" in branch and not value >= branch["minimum"]:
        return False
    if "exclusiveMinimum" in branch and not value > branch["exclusiveMinimum"]:
        return False
    if "maximum" in branch and not value <= branch["maximum"]:
        return False
    return not ("exclusiveMaximum" in branch and not value < branch["exclusiveMaximum"])


def check_validated(obj: BaseModel) -> list[str]:
    """What is wrong with a validated object: non-finite or out-of-bounds numbers, nested models included."""
    problems = []
    fields = numeric_fields(type(obj))
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if isinstance(value, bool):
            pass
        elif isinstance(value, (int, float)) and name in fields:
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{type(obj).__name__}.{name} = {value!r} is not finite")
            elif not any(within(value, b) for b in fields[name]):
                problems.append(f"{type(obj).__name__}.{name} = {value!r} is outside {fields[name]}")
        for inner in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(inner, BaseModel):
                problems += check_validated(inner)
    return problems


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_any_json_validates_to_finite_bounded_numbers_or_raises_a_validation_error(model: type[BaseModel]) -> None:
    """Free-form parts (metadata, params, logit_bias, tools...) included: NaN/inf are refused everywhere,
    since what passes is written to JSON files (MANIFEST metadata, run params) or forwarded."""
    schema = model.model_json_schema()

    @settings(BOUNDED, max_examples=EXAMPLES)
    @given(body=any_body(schema))
    def check(body: Any) -> None:
        try:
            obj = model.model_validate(body)
        except ValidationError:
            return
        problems = check_validated(obj)
        assert not problems, f"{model.__name__} accepted {body!r}: " + "; ".join(problems)
        bad = non_finite_floats_in(obj.model_dump())
        assert not bad, f"{model.__name__} accepted non-finite numbers at {bad} in {body!r}"

    check()


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_every_numeric_field_states_both_bounds(model: type[BaseModel]) -> None:
    """A number with no upper bound is a number "at the edge of its type" waiting to overflow somewhere."""
    unbounded = []
    for name, branches in numeric_fields(model).items():
        for branch in branches:
            low = "minimum" in branch or "exclusiveMinimum" in branch
            high = "maximum" in branch or "exclusiveMaximum" in branch
            if not (low and high):
                missing = " and ".join(w for w, ok in (("lower", low), ("upper", high)) if not ok)
                odd = sorted(k for k in ("gt", "ge", "lt", "le") if k in branch)
                note = f"; its bounds are given as non-standard {odd} keys that JSON Schema tools ignore" if odd else ""
                unbounded.append(f"{name} ({branch.get('type')}, no {missing} bound{note})")
    assert not unbounded, f"{model.__name__}: " + ", ".join(unbounded)


def test_the_suite_sees_every_schema_module() -> None:
    """A module that lost its request models (renamed, moved) would silently drop out of the tests above."""
    names = {m.__name__ for m in MODELS}
    assert {"GenerateRequest", "StageRequest", "CommitRequest", "ChatRequest", "CompletionRequest",
            "PublishRequest", "RunRequest", "FinetuneParams", "PublishForm", "PlaygroundRequest"} <= names, names
