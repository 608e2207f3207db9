"""The replica's request schemas refuse oversized collections before validating their items (one error, not
thousands), refuse NaN and infinities inside free-form fields, and cap what the engine may be asked."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from lockstep.inference.openai_api import MAX_CHAT_MESSAGES, MAX_CONTENT_PARTS, ChatRequest, CompletionRequest
from lockstep.inference.schemas import (
    MAX_BODY_FIELDS,
    MAX_FREE_JSON_ITEMS,
    CommitRequest,
    GenerateRequest,
    StageRequest,
)

CHAT: dict[str, Any] = {"model": "lockstep", "messages": [{"role": "user", "content": "hi"}]}
NOT_A_MESSAGE = {"role": 7, "content": None}  # invalid in two ways: validating it would cost two errors


def refusal(model: type[BaseModel], body: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    return err.value.errors()  # type: ignore[return-value]


def test_too_many_messages_is_one_error_before_any_message_is_validated() -> None:
    errors = refusal(ChatRequest, {**CHAT, "messages": [NOT_A_MESSAGE] * (MAX_CHAT_MESSAGES + 1)})
    assert len(errors) == 1 and f"at most {MAX_CHAT_MESSAGES}" in errors[0]["msg"]
    assert "LOCKSTEP_MAX_CHAT_MESSAGES" in errors[0]["msg"]


def test_too_many_content_parts_over_all_messages_is_one_error() -> None:
    per_message = MAX_CONTENT_PARTS // 4 + 1
    message = {"role": "user", "content": [{"type": 7}] * per_message}
    errors = refusal(ChatRequest, {**CHAT, "messages": [message] * 4})
    assert len(errors) == 1 and f"{4 * per_message} content parts" in errors[0]["msg"]


def test_unknown_fields_beyond_the_cap_are_one_error_naming_the_supported_ones() -> None:
    body = {"prompt": "hi", **{f"x{i}": 0 for i in range(MAX_BODY_FIELDS)}}
    errors = refusal(GenerateRequest, body)
    assert len(errors) == 1 and "max_new_tokens" in errors[0]["msg"]
    assert len(refusal(StageRequest, {"model": "m", "version": 1, "typo": 1})) == 1  # a few: each named


def test_logit_bias_over_its_size_is_refused_before_its_values() -> None:
    errors = refusal(CompletionRequest, {"model": "m", "prompt": "x", "logit_bias": {str(i): "x" for i in range(301)}})
    assert len(errors) == 1 and "at most 300" in errors[0]["msg"]


@pytest.mark.parametrize("field", ["tools", "response_format"])
def test_free_form_fields_refuse_nan_anywhere_and_stay_small(field: str) -> None:
    nested: Any = [1, {"deep": [2, {"deeper": float("nan")}]}]
    value = [nested] if field == "tools" else {"type": "json_object", "schema": nested}
    assert "NaN" in refusal(ChatRequest, {**CHAT, field: value})[0]["msg"]
    big = [0] * (MAX_FREE_JSON_ITEMS + 1)
    value = [big] if field == "tools" else {"schema": big}
    assert f"more than {MAX_FREE_JSON_ITEMS} values" in refusal(ChatRequest, {**CHAT, field: value})[0]["msg"]


def test_a_valid_chat_with_text_parts_and_the_no_op_values_passes() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = {**CHAT, "messages": [{"role": "developer", "content": parts}], "n": 1, "presence_penalty": 0,
            "logit_bias": {}, "response_format": {"type": "text"}, "seed": 0}
    request = ChatRequest.model_validate(body)
    assert request.messages[0].text() == "ab" and request.unsupported() == []


@pytest.mark.parametrize(("model", "body"), [
    (CommitRequest, {"version": 1, "activate_at": float("nan")}),
    (CommitRequest, {"version": 1, "activate_at": float("inf")}),
    (GenerateRequest, {"prompt": "x", "top_p": float("nan")}),
    (CompletionRequest, {"model": "m", "prompt": "x", "frequency_penalty": float("-inf")}),
    (CompletionRequest, {"model": "m", "prompt": "x", "logit_bias": {"1": float("nan")}}),
])
def test_non_finite_numbers_are_refused(model: type[BaseModel], body: dict[str, Any]) -> None:
    assert refusal(model, body)[0]["type"] == "finite_number"
