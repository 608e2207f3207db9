"""A fine-tune run's parameters: what is refused when given, and a run's own record read back at a resume."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lockstep.trainer.server.schemas import FinetuneParams


@pytest.mark.parametrize("given", [{"algorithm": "grpo"}, {"algorithm": "reinforce"}, {"algorithm": "sft_best"},
                                   {"algorithm": "grpo", "async": True, "max_staleness": 2}])
def test_a_runs_record_is_read_back_at_a_resume(given: dict[str, Any]) -> None:
    """The record stores every parameter, defaults included; options refused only when given by hand (GRPO's on
    sft_best) must not refuse the resume. Before, every sft_best run failed to resume."""
    stored = FinetuneParams.model_validate(given).model_dump(mode="json", by_alias=True)
    again = FinetuneParams.model_validate(stored, context={"stored": True})
    assert again.model_dump(mode="json", by_alias=True) == stored


def test_reinforce_refuses_scale_rewards_and_its_record_says_it_never_scales() -> None:
    with pytest.raises(ValidationError, match="never scales rewards"):
        FinetuneParams.model_validate({"algorithm": "reinforce", "scale_rewards": "group"})
    assert FinetuneParams.model_validate({"algorithm": "reinforce"}).scale_rewards == "none"
    assert FinetuneParams.model_validate({"algorithm": "grpo"}).scale_rewards == "group"


def test_sft_best_refuses_async_and_grpo_options_given_by_hand() -> None:
    with pytest.raises(ValidationError, match="sft_best is synchronous"):
        FinetuneParams.model_validate({"algorithm": "sft_best", "async": True})
    with pytest.raises(ValidationError, match="beta: GRPO options"):
        FinetuneParams.model_validate({"algorithm": "sft_best", "beta": 0.1})
