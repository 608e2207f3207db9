"""Built-in tasks: rewards computed from the text alone, deterministic prompts, held-out words kept apart."""

from __future__ import annotations

import re

import pytest

from lockstep.core.errors import BadRequest
from lockstep.trainer.runs.tasks import TASKS, digits_reward, get_task, target_word_reward


@pytest.mark.parametrize(("completion", "expected"), [
    ("", 0.0), ("   ", 0.0), ("abc", 0.0), ("123", 1.0), (" 12 34 ", 1.0), ("a1", 0.5), ("x 9 y z", 0.25),
])
def test_digits_reward_is_the_share_of_digits_among_non_space_characters(completion: str,
                                                                         expected: float) -> None:
    assert digits_reward("any prompt", completion) == pytest.approx(expected)


def test_target_word_reward_needs_the_whole_word_named_in_the_prompt() -> None:
    prompt = "Say the word 'river':"
    assert target_word_reward(prompt, "the River is wide") == 1.0
    assert target_word_reward(prompt, "rivers and lakes") == 0.0
    assert target_word_reward(prompt, "nothing here") == 0.0
    assert target_word_reward("no target in this prompt", "river") == 0.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_prompts_are_deterministic_and_held_out_words_never_appear_in_training_prompts(name: str) -> None:
    task = get_task(name)
    train = task.prompts(200, seed=3, held_out=False)
    assert train == task.prompts(200, seed=3, held_out=False)
    assert train != task.prompts(200, seed=4, held_out=False)
    held = task.prompts(50, seed=3, held_out=True)
    words = lambda prompts: {w for p in prompts for w in re.findall(r"[a-z]{3,}", p)}  # noqa: E731
    template = words(task.prompts(1, seed=0, held_out=False)) & words(task.prompts(1, seed=0, held_out=True))
    assert words(train) & words(held) <= template  # only the template's own words are shared


def test_an_unknown_task_is_refused_naming_the_built_in_ones() -> None:
    with pytest.raises(BadRequest, match="digits"):
        get_task("chess")
