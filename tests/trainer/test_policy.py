"""The trainer's update: group baselines, token alignment with what a replica generated, and a real step on
the built-in tiny model that makes a rewarded answer more likely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lockstep.core.settings import load_settings
from lockstep.trainer.runs.policy import Policy, Scored, advantages


def scored(reward: float, group: int = 0, completion: str = " 12 34", **kw: object) -> Scored:
    return Scored(prompt="Numbers for cat dog:", completion=completion, reward=reward, group=group, version=0,
                  **kw)  # type: ignore[arg-type]


def test_grpo_normalizes_within_each_group_and_ignores_groups_without_spread() -> None:
    samples = [scored(1.0, 0), scored(0.0, 0), scored(0.5, 1), scored(0.5, 1)]
    adv = advantages(samples, "grpo")
    assert adv[0] == pytest.approx(1.0, abs=1e-3) and adv[1] == pytest.approx(-1.0, abs=1e-3)
    assert adv[2] == adv[3] == 0.0


def test_reinforce_centres_on_the_group_mean() -> None:
    assert advantages([scored(1.0), scored(0.0), scored(0.5)], "reinforce") == pytest.approx([0.5, -0.5, 0.0])


def test_sft_best_imitates_only_an_answer_better_than_its_siblings() -> None:
    assert advantages([scored(0.2), scored(0.9), scored(0.1)], "sft_best") == [0.0, 1.0, 0.0]
    assert advantages([scored(0.3), scored(0.3)], "sft_best") == [0.0, 0.0]


@pytest.fixture(scope="module")
def policy(builtin_dir: Path) -> Policy:
    settings = load_settings(builtin_dir=builtin_dir, device="cpu")
    return Policy.load("builtin:tiny", settings, None, learning_rate=3e-3)


def test_prompt_and_completion_tokens_follow_what_the_replica_generated(policy: Policy) -> None:
    ids, matches = policy.completion_ids(scored(1.0, completion=" 12 34", completion_tokens=None))
    assert policy.tokenizer.decode(ids) == " 12 34" and matches
    _, matches = policy.completion_ids(scored(1.0, completion=" 12 34", completion_tokens=len(ids) + 1))
    assert not matches  # the replica sampled another segmentation of the same text
    stopped, _ = policy.completion_ids(scored(1.0, completion=" 12", finish_reason="stop"))
    assert stopped[-1] == policy.tokenizer.eos_token_id  # choosing to stop is part of the sample
    given, matches = policy.completion_ids(scored(1.0, completion="ignored", token_ids=[7, 8, 9]))
    assert given == [7, 8, 9] and matches
    prompt = "Numbers for cat dog:"
    assert policy.prompt_ids(prompt) == list(policy.tokenizer(prompt)["input_ids"])


def _mean_logprob(policy: Policy, s: Scored) -> float:
    with torch.no_grad():
        ids, _ = policy.completion_ids(s)
        return float(policy._mean_logprobs([(policy.prompt_ids(s.prompt), ids, 1.0)])[0])


def test_a_step_makes_the_rewarded_answer_likelier_and_the_other_less_likely(policy: Policy) -> None:
    good, bad = scored(1.0, completion=" 12 34 56"), scored(0.0, completion=" the cat sat")
    before = _mean_logprob(policy, good), _mean_logprob(policy, bad)
    stats = policy.step([good, bad], "grpo")
    after = _mean_logprob(policy, good), _mean_logprob(policy, bad)
    assert after[0] > before[0] and after[1] < before[1]
    assert stats.samples == 2 and stats.tokens > 0 and stats.grad_norm > 0


def test_a_batch_without_reward_spread_changes_nothing(policy: Policy) -> None:
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    stats = policy.step([scored(0.5), scored(0.5)], "grpo")
    assert stats.samples == 0
    assert all(torch.equal(before[k], v) for k, v in policy.model.state_dict().items())
