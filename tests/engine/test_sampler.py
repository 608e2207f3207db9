"""Sampling: filters keep the right tokens; each row draws from its own generator; rows never fail each other."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lockstep.engine import SamplingParams
from lockstep.engine.sampler import bad_rows, filter_logits, inverse_cdf, sample
from lockstep.engine.sampling_params import MAX_TEMPERATURE, MAX_TOP_K


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
        draws = sample(logits.clone(), [greedy, sampled, sampled], gens)
        assert draws.errors == {}
        return draws.tokens

    first = run(5)
    assert first[0] == int(logits[0].argmax())
    assert first == run(5)
    draws = {tuple(run(s)[1:]) for s in range(20)}
    assert len(draws) > 5  # the seed matters


def test_bad_rows() -> None:
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [float("inf"), 0.0], [float("-inf")] * 2,
                           [float("-inf"), 0.0]])
    assert bad_rows(logits).tolist() == [False, True, True, True, False]


SPECIALS = st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -1e38, 3.4e38])


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(st.one_of(SPECIALS, st.floats(-1e4, 1e4, width=32)), min_size=1, max_size=12),
                     min_size=1, max_size=6).filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_bad_rows_is_any_nan_or_inf_or_nothing_finite(rows: list[list[float]]) -> None:
    logits = torch.tensor(rows, dtype=torch.float32)
    expected = [any(math.isnan(x) or x == math.inf for x in row) or all(x == -math.inf for x in row) for row in rows]
    assert bad_rows(logits).tolist() == expected


# Settings valid for SamplingParams whose float32 arithmetic underflows or saturates.
EDGE_PARAMS = [
    SamplingParams(temperature=5e-324),  # the smallest float: 0 in float32, logits / 0
    SamplingParams(temperature=1e-40, top_k=3),  # a float32 denormal: logits / t overflows to inf
    SamplingParams(temperature=1.0, top_p=5e-324),  # top_p 0 in float32
    SamplingParams(temperature=1e-30, top_p=1e-30, top_k=MAX_TOP_K),
    SamplingParams(temperature=MAX_TEMPERATURE, top_k=MAX_TOP_K, seed=2**63 - 1),
]


@pytest.mark.parametrize("edge", EDGE_PARAMS, ids=[repr(p) for p in EDGE_PARAMS])
def test_settings_at_the_edge_of_their_range_sample_without_failing_their_neighbours(edge: SamplingParams) -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 50) * 30
    normal = SamplingParams(temperature=0.8, seed=4)
    params = [SamplingParams(), edge, normal]

    def gens() -> list[torch.Generator | None]:
        seed = edge.seed if edge.seed is not None else 1
        return [None, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(4)]

    draws = sample(logits.clone(), params, gens())
    assert draws.errors == {}
    assert draws.tokens[0] == int(logits[0].argmax())
    assert 0 <= draws.tokens[1] < 50
    alone = sample(logits[2:].clone(), [normal], [torch.Generator().manual_seed(4)])
    assert draws.tokens[2] == alone.tokens[0]  # the neighbour's draw is what it draws alone
    if edge.temperature < 1e-20:  # the limit of a vanishing temperature is the argmax
        assert draws.tokens[1] == int(logits[1].argmax())


def test_a_row_whose_draw_fails_is_reported_alone() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 20)
    sampled = SamplingParams(temperature=1.0, seed=1)
    broken: object = "not a generator"  # what a bug in one request's state looks like to torch
    draws = sample(logits, [sampled, sampled, SamplingParams()],
                   [torch.Generator().manual_seed(1), broken, None])  # type: ignore[list-item]
    assert set(draws.errors) == {1} and "sampling failed" in draws.errors[1]
    assert draws.tokens[0] == sample(logits[:1], [sampled], [torch.Generator().manual_seed(1)]).tokens[0]
    assert draws.tokens[2] == int(logits[2].argmax())


def test_top_p_that_underflows_keeps_the_top_token() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    probs = filter_logits(logits, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.0]))
    assert probs[0].tolist() == [0.0, 1.0, 0.0]


def test_chosen_logprobs_are_those_of_the_distribution_each_row_draws_from() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 40)
    params = [SamplingParams(logprobs=True),  # greedy: the raw distribution (temperature counted as 1)
              SamplingParams(temperature=0.7, top_k=5, seed=3, logprobs=True),
              SamplingParams(temperature=1.3, top_p=0.6, seed=4, logprobs=True),
              SamplingParams(temperature=1.0, seed=5)]  # did not ask
    gens = [None, *(torch.Generator().manual_seed(s) for s in (3, 4, 5))]
    draws = sample(logits.clone(), params, gens)
    assert set(draws.logprobs) == {0, 1, 2}
    t = draws.tokens
    assert draws.logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[t[0]]), abs=1e-5)
    kept = logits[1] / 0.7
    kept = kept.masked_fill(kept < kept.topk(5).values[-1], float("-inf"))
    assert draws.logprobs[1] == pytest.approx(float(torch.log_softmax(kept, -1)[t[1]]), abs=1e-5)
    probs = torch.softmax(logits[2] / 1.3, -1)
    order = probs.argsort(descending=True)
    nucleus = order[: int(((probs[order].cumsum(0) - probs[order]) < 0.6).sum())]
    assert int(t[2]) in nucleus.tolist()
    expected = probs[t[2]] / probs[nucleus].sum()
    assert draws.logprobs[2] == pytest.approx(float(expected.log()), abs=1e-5)


def test_asking_for_logprobs_does_not_change_the_draw() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 30)

    def tokens(logprobs: bool) -> list[int]:
        params = [SamplingParams(temperature=1.0, seed=9, logprobs=logprobs), SamplingParams(logprobs=logprobs)]
        return sample(logits.clone(), params, [torch.Generator().manual_seed(9), None]).tokens

    assert tokens(True) == tokens(False)


def test_draws_follow_each_rows_distribution_and_never_pick_a_token_without_mass() -> None:
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    logits = probs.log().expand(3, -1).clone()  # -inf where there is no mass
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(3)]
    counts = torch.zeros(6)
    for seed in range(1000):
        gens = [torch.Generator().manual_seed(seed * 3 + i) for i in range(3)]
        for token in sample(logits, params, gens).tokens:
            counts[token] += 1
    assert counts[[0, 2, 5]].tolist() == [0, 0, 0]
    share = counts / counts.sum()
    torch.testing.assert_close(share, probs, atol=0.03, rtol=0)  # 3000 draws: about 4 standard deviations


def test_a_rows_draw_is_the_same_alone_and_in_any_batch() -> None:
    torch.manual_seed(3)
    logits = torch.randn(8, 300) * 3
    params = [SamplingParams(temperature=1.0, top_k=k, seed=k) for k in range(8)]
    batched = sample(logits.clone(), params, [torch.Generator().manual_seed(k) for k in range(8)]).tokens
    alone = [sample(logits[k:k + 1].clone(), [params[k]], [torch.Generator().manual_seed(k)]).tokens[0]
             for k in range(8)]
    assert batched == alone


def test_a_point_at_the_very_end_of_the_mass_takes_the_last_token_that_has_any() -> None:
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert inverse_cdf(probs, [0.0, 0.0]) == [0, 2]
    assert inverse_cdf(probs, [0.2499, 0.5]) == [0, 2]
    assert inverse_cdf(probs, [math.nextafter(1.0, 0.0), math.nextafter(1.0, 0.0)]) == [1, 2]
