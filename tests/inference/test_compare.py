"""compare(): token agreement and next-token KL between two versions, on the real built-in tiny models."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from lockstep.core.errors import NotReady
from lockstep.inference import compare as compare_module
from lockstep.inference.compare import Comparison, IncompatibleModels, coarse_kl, compare
from lockstep.inference.slot import ModelSlot
from lockstep.models.loader import LoadedModel
from tests.inference.rollout_slots import PROMPTS, encode, greedy_answer, load, perturbed, slot
from tests.support.vllm import needs_vllm


@pytest.fixture(scope="module")
def tiny0(builtin_dir: Path) -> LoadedModel:
    return load(builtin_dir, "tiny-s0")


@pytest.fixture(scope="module")
def versions(builtin_dir: Path, tiny0: LoadedModel) -> dict[str, ModelSlot]:
    """The stable version, itself loaded again, two noised copies of it and another tiny model (seed 1)."""
    return {"stable": slot(1, tiny0), "same": slot(2, load(builtin_dir, "tiny-s0")),
            "slightly": slot(2, perturbed(tiny0, 0.05)), "much": slot(2, perturbed(tiny0, 0.5)),
            "other": slot(2, load(builtin_dir, "tiny-s1"))}


def served(stable: ModelSlot, prompt: str) -> tuple[list[int], list[int]]:
    ids = encode(stable, prompt)
    return ids, greedy_answer(stable.loaded.model, ids)


def exact_kl_and_agreement(stable: ModelSlot, candidate: ModelSlot, prompt: list[int], answer: list[int]
                           ) -> tuple[float, float]:
    """An independent reference: whole-sequence logits of each model, KL with torch's kl_div, float64."""
    ids = torch.tensor([prompt + answer])
    with torch.inference_mode():
        rows = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
        log_p = torch.log_softmax(stable.loaded.model(input_ids=ids).logits[0, rows].double(), -1)
        log_q = torch.log_softmax(candidate.loaded.model(input_ids=ids).logits[0, rows].double(), -1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum").item() / len(answer)
    agreement = (log_q.argmax(-1) == torch.tensor(answer)).double().mean().item()
    return kl, agreement


def test_a_version_against_itself_agrees_fully_with_no_divergence(versions: dict[str, ModelSlot]) -> None:
    stable = versions["stable"]
    for candidate in (stable, versions["same"]):
        for prompt in PROMPTS:
            ids, answer = served(stable, prompt)
            teacher_forced = compare(stable, candidate, ids, answer)
            assert teacher_forced.agreement == 1.0 and teacher_forced.positions == len(answer)
            assert teacher_forced.kl == pytest.approx(0.0, abs=1e-6) and not teacher_forced.approximate
            own = compare(stable, candidate, ids, answer, candidate_answer_ids=greedy_answer(candidate.loaded.model,
                                                                                              ids))
            assert own.agreement == 1.0 and own.kl == pytest.approx(0.0, abs=1e-6)


def test_the_further_a_version_is_the_lower_its_agreement_and_the_higher_its_kl(
        versions: dict[str, ModelSlot]) -> None:
    stable = versions["stable"]
    mean: dict[str, tuple[float, float]] = {}
    for name in ("same", "slightly", "much", "other"):
        results = [compare(stable, versions[name], *served(stable, p)) for p in PROMPTS]
        mean[name] = (sum(r.agreement for r in results) / len(results), sum(r.kl for r in results) / len(results))
    assert mean["same"][0] == 1.0 and mean["same"][1] < 1e-6
    assert 1e-6 < mean["slightly"][1] < mean["much"][1]
    assert mean["much"][1] > 0.01 and mean["other"][1] > 0.01
    assert mean["much"][0] < 1.0 and mean["other"][0] < 1.0
    assert mean["slightly"][0] >= mean["much"][0]


def test_kl_and_agreement_match_an_independent_computation(versions: dict[str, ModelSlot]) -> None:
    stable, candidate = versions["stable"], versions["much"]
    for prompt in PROMPTS:
        ids, answer = served(stable, prompt)
        got = compare(stable, candidate, ids, answer)
        kl, agreement = exact_kl_and_agreement(stable, candidate, ids, answer)
        assert got.kl == pytest.approx(kl, rel=1e-3, abs=1e-6)
        assert got.agreement == pytest.approx(agreement)


def test_canary_traffic_measures_the_stable_versions_argmax_on_the_candidates_answer(
        versions: dict[str, ModelSlot]) -> None:
    stable, candidate = versions["stable"], versions["other"]
    ids = encode(stable, PROMPTS[1])
    answer = greedy_answer(candidate.loaded.model, ids)  # the candidate served it
    got = compare(stable, candidate, ids, answer, served_by="candidate")
    kl, _ = exact_kl_and_agreement(stable, candidate, ids, answer)
    _, stable_agreement = exact_kl_and_agreement(candidate, stable, ids, answer)  # the stable model's argmax
    assert got.kl == pytest.approx(kl, rel=1e-3)  # KL(stable || candidate) whoever served
    assert got.agreement == pytest.approx(stable_agreement)
    assert compare(candidate, candidate, ids, answer, served_by="candidate").agreement == 1.0
    with pytest.raises(ValueError, match="shadowed"):
        compare(stable, candidate, ids, answer, answer, served_by="candidate")


def test_agreement_of_the_candidates_own_answer_is_over_the_served_length(versions: dict[str, ModelSlot]) -> None:
    stable = versions["stable"]
    ids, answer = served(stable, PROMPTS[0])
    assert len(answer) == 8
    other = [*answer[:3], (answer[3] + 1) % 2048, *answer[4:6]]  # one differs, and two tokens short
    assert compare(stable, stable, ids, answer, other).agreement == 5 / 8
    assert compare(stable, stable, ids, answer, [*answer, 5, 6]).agreement == 1.0  # longer: the served length
    assert compare(stable, stable, ids, [], []) == Comparison(agreement=1.0, kl=0.0, positions=0)
    assert compare(stable, stable, ids, [], [3]).agreement == 0.0


def test_versions_with_different_vocabularies_are_refused(versions: dict[str, ModelSlot], tiny0: LoadedModel) -> None:
    import copy

    model = copy.deepcopy(tiny0.model)
    model.resize_token_embeddings(model.config.vocab_size + 64)
    wider = slot(2, dataclasses.replace(tiny0, model=model))
    ids, answer = served(versions["stable"], PROMPTS[0])
    with pytest.raises(IncompatibleModels, match="vocabulary of 2048 tokens and v2 of 2112"):
        compare(versions["stable"], wider, ids, answer)


def test_bad_input_and_a_freed_version_are_errors(versions: dict[str, ModelSlot], tiny0: LoadedModel) -> None:
    stable = versions["stable"]
    ids, answer = served(stable, PROMPTS[0])
    with pytest.raises(ValueError, match="prompt is empty"):
        compare(stable, stable, [], answer)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        compare(stable, stable, ids, [*answer, 5000])
    freed = slot(2, dataclasses.replace(tiny0))
    freed.free()
    with pytest.raises(NotReady, match="freed"):
        compare(stable, freed, ids, answer)


def test_coarse_kl_is_a_lower_bound_and_exact_on_whole_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        log_p = torch.log_softmax(torch.randn(50, generator=gen, dtype=torch.float64) * 3, -1)
        log_q = torch.log_softmax(torch.randn(50, generator=gen, dtype=torch.float64) * 3, -1)
        exact = float((log_p.exp() * (log_p - log_q)).sum())
        whole_p, whole_q = dict(enumerate(log_p.tolist())), dict(enumerate(log_q.tolist()))
        assert coarse_kl(whole_p, whole_q) == pytest.approx(exact, rel=1e-9, abs=1e-12)
        top_p = {t: whole_p[t] for t in log_p.topk(5).indices.tolist()}
        top_q = {t: whole_q[t] for t in log_q.topk(5).indices.tolist()}
        served_token = int(torch.randint(50, (1,), generator=gen))
        top_p[served_token], top_q[served_token] = whole_p[served_token], whole_q[served_token]
        assert 0.0 <= coarse_kl(top_p, top_q) <= exact + 1e-12
    assert coarse_kl({1: -0.1, 2: -3.0}, {1: -0.1, 2: -3.0}) == pytest.approx(0.0, abs=1e-12)
    assert coarse_kl({1: math.nan}, {1: -1.0}) == math.inf
    assert coarse_kl({1: -1.0}, {1: -math.inf}) == math.inf


def test_the_top_k_path_used_with_vllm_bounds_the_exact_kl(versions: dict[str, ModelSlot]) -> None:
    """vLLM gives top-k prompt logprobs only; the same path on the built-in models stays below the exact KL."""
    stable, candidate = versions["stable"], versions["much"]
    for prompt in PROMPTS:
        ids, answer = served(stable, prompt)
        exact = compare(stable, candidate, ids, answer)
        approx = compare_module._compare_top_k(stable, candidate, ids, answer, None, "stable")
        assert approx.approximate and approx.agreement == exact.agreement
        assert 0.0 < approx.kl <= exact.kl * (1 + 1e-4)
        itself = compare_module._compare_top_k(stable, stable, ids, answer, None, "stable")
        assert itself.agreement == 1.0 and itself.kl == pytest.approx(0.0, abs=1e-6)


def test_non_finite_logits_give_an_infinite_kl(versions: dict[str, ModelSlot], tiny0: LoadedModel) -> None:
    import copy

    model = copy.deepcopy(tiny0.model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    broken = slot(2, dataclasses.replace(tiny0, model=model))
    ids, answer = served(versions["stable"], PROMPTS[0])
    assert compare(versions["stable"], broken, ids, answer).kl == math.inf


@needs_vllm
@pytest.mark.e2e
@pytest.mark.timeout(1200)  # one vLLM engine start: 1-3 min on 2 busy cores
def test_vllm_versions_are_compared_from_top_k_prompt_logprobs(versions: dict[str, ModelSlot],
                                                                tiny_dirs: dict[int, Path], tiny0: LoadedModel) -> None:
    from lockstep.engine.vllm import VllmConfig, VllmEngine

    eng = VllmEngine(VllmConfig(tiny_dirs[0], dtype="float32", enforce_eager=True, kv_cache_gib=0.25,
                                max_context=512, shutdown_timeout_s=2.0)).start()
    try:
        on_vllm = slot(1, dataclasses.replace(tiny0, model=None, tokenizer=eng.tokenizer), eng)
        stable, other = versions["stable"], versions["other"]  # built-in tiny-s0 (what vLLM serves) and tiny-s1
        for prompt in PROMPTS[:2]:
            ids, answer = served(stable, prompt)
            itself = compare(on_vllm, on_vllm, ids, answer)
            assert itself.approximate and itself.positions == len(answer)
            assert itself.agreement == 1.0 and itself.kl == pytest.approx(0.0, abs=1e-5)
            exact = compare(stable, other, ids, answer)
            for mixed in (compare(on_vllm, other, ids, answer), compare(stable, other, ids, answer)):
                assert mixed.agreement == exact.agreement
            mixed = compare(on_vllm, other, ids, answer)
            assert mixed.approximate and 0.0 < mixed.kl <= exact.kl * 1.001 + 1e-5
            reverse = compare(other, on_vllm, ids, answer, served_by="candidate")
            assert reverse.approximate and reverse.agreement == compare(other, stable, ids, answer,
                                                                         served_by="candidate").agreement
        # No room for vLLM's one generated token past the context: the answer is compared as far as it fits.
        long_prompt = (ids * 200)[:506]
        assert compare(on_vllm, on_vllm, long_prompt, answer).positions == 512 - 1 - 506
    finally:
        eng.close()
