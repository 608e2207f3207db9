"""Sampling: filters keep the right tokens; each row draws from its own generator."""

from __future__ import annotations

import torch

from lockstep.engine import SamplingParams
from lockstep.engine.sampler import bad_rows, filter_logits, sample


def test_top_k_keeps_the_k_best() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    probs = filter_logits(logits, torch.tensor([1.0, 1.0]), torch.tensor([2, 0]), torch.tensor([1.0, 1.0]))
    assert (probs[0] > 0).tolist() == [False, True, True, False]
    assert (probs[1] > 0).all()  # top_k 0 is off
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs_in = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    probs = filter_logits(probs_in.log(), torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.8]))
    # 0.5 + 0.3 reaches 0.8: the third token is dropped.
    assert (probs[0] > 0).tolist() == [True, True, False, False]
    torch.testing.assert_close(probs[0, :2], torch.tensor([0.625, 0.375]))


def test_temperature_sharpens() -> None:
    logits = torch.tensor([[0.0, 1.0]])
    cold = filter_logits(logits, torch.tensor([0.1]), torch.tensor([0]), torch.tensor([1.0]))
    hot = filter_logits(logits, torch.tensor([10.0]), torch.tensor([0]), torch.tensor([1.0]))
    assert cold[0, 1] > 0.99 and 0.5 < hot[0, 1] < 0.6


def test_greedy_rows_take_argmax_and_sampled_rows_follow_their_seed() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    greedy, sampled = SamplingParams(), SamplingParams(temperature=2.0, seed=5)

    def run(seed: int) -> list[int]:
        gens = [None, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)]
        return sample(logits.clone(), [greedy, sampled, sampled], gens).tolist()

    first = run(5)
    assert first[0] == int(logits[0].argmax())
    assert first == run(5)
    draws = {tuple(run(s)[1:]) for s in range(20)}
    assert len(draws) > 5  # the seed matters


def test_bad_rows() -> None:
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [float("inf"), 0.0], [float("-inf")] * 2,
                           [float("-inf"), 0.0]])
    assert bad_rows(logits).tolist() == [False, True, True, True, False]
