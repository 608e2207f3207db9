"""The staleness bound: which answers an update may use, judged from their version tags alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockstep.core.clock import SYSTEM_CLOCK, FakeClock
from lockstep.core.errors import BadRequest
from lockstep.trainer.runs.fleet_rollouts import (
    AsyncRollouts,
    Collector,
    Group,
    Sampling,
    Schedule,
    TaskReward,
    judge,
    step_prompts,
    trl_batch,
)
from lockstep.trainer.runs.releases import Evaluator, Releases
from lockstep.trainer.runs.rollouts import GenRequest, Rollout, RolloutClient
from lockstep.trainer.runs.staleness import Freshness, SampleBook, VersionWindow
from lockstep.trainer.runs.tasks import digits_reward, get_task
from lockstep.trainer.runs.trl_trainer import check_scheduler, check_trl_args, grpo_config, run_callback
from lockstep.trainer.server.schemas import FinetuneParams
from tests.support.cluster import wait_for


def group(version: int | None, *, size: int = 2, prompt: str = "Numbers for a b c:",
          logprobs: list[float | None] | None = None) -> Group:
    request = GenRequest(prompt, 4, 1.0)
    return Group(prompt, tuple(Rollout(request, "http://r", text="12", version=version, body_version=version,
                                       token_ids=[5, 6], logprobs=logprobs) for _ in range(size)))


def test_staleness_counts_this_runs_versions_published_since_the_producer() -> None:
    window = VersionWindow([3], max_staleness=1)
    for v in (5, 9):  # someone else published 4, 6, 7, 8
        window.published(v)
    assert [window.staleness(v) for v in (9, 5, 3)] == [0, 1, 2]
    assert window.staleness(4) is None and window.staleness(None) is None
    assert [window.judge(v) for v in (9, 5, 3, 4)] == [Freshness.FRESH, Freshness.FRESH, Freshness.STALE,
                                                       Freshness.FOREIGN]
    window.publishing_started()  # the policy's next checkpoint: every version is one further behind
    assert [window.staleness(v) for v in (9, 5)] == [1, 2] and window.judge(5) is Freshness.STALE
    window.publishing_ended(None)  # it failed: nothing changed
    assert window.staleness(9) == 0
    with pytest.raises(ValueError):
        VersionWindow([1], max_staleness=-1)


def test_a_group_is_used_whole_or_dropped_whole_and_counted() -> None:
    window, book = VersionWindow([1, 2, 3], max_staleness=1), SampleBook()
    assert judge(group(3), window, book) and judge(group(2), window, book)
    mixed = Group("p", group(3).rollouts + group(1).rollouts)
    assert not judge(mixed, window, book)  # one member too old: the whole group goes
    assert not judge(group(7), window, book)  # another publisher's version
    step = book.take_step()
    assert step.used == 4 and step.staleness == {"0": 2, "1": 2} and step.versions == {"3": 2, "2": 2}
    assert step.dropped_stale == 4 and step.foreign == 2
    assert book.take_step().used == 0  # a new count per step
    assert book.take_version().used == 4  # and per version, independently


def test_a_batch_trained_on_again_counts_again_at_the_staleness_it_was_judged_at() -> None:
    window, book = VersionWindow([1, 2], max_staleness=1), SampleBook()
    assert judge(group(2), window, book) and judge(group(1), window, book)
    first = book.take_step()
    book.reuse_last_batch()  # TRL's num_iterations: the next step trains on the same answers
    again = book.take_step()
    assert again.model_dump() == {**first.model_dump(), "dropped_stale": 0, "foreign": 0}
    assert book.take_version().used == 2 * first.used == 8


@settings(max_examples=200, deadline=None)
@given(bound=st.integers(0, 3), events=st.lists(st.one_of(st.just("publish"), st.integers(0, 12)), max_size=40))
def test_no_used_sample_is_ever_further_behind_than_the_bound(bound: int, events: list[str | int]) -> None:
    window, book = VersionWindow([0], max_staleness=bound), SampleBook()
    next_version = 1
    for event in events:
        if event == "publish":  # commits the publish in flight, or one that starts and commits now
            if not window.publishing:
                window.publishing_started()
            window.publishing_ended(next_version)
            next_version += 1
            continue
        if event == 12:  # a publish starts; it commits at the next "publish"
            if not window.publishing:
                window.publishing_started()
            continue
        assert isinstance(event, int)
        if judge(group(event), window, book):
            known = window.known
            assert event in known and len(known) - 1 - known.index(event) + window.publishing <= bound
    counted = book.take_version()
    assert all(int(k) <= bound for k in counted.staleness)


def test_async_rollouts_hand_trl_only_fresh_groups_with_their_tags() -> None:
    client = RolloutClient(lambda: [])
    try:
        window, book = VersionWindow([1, 2, 3], max_staleness=1), SampleBook()
        collector = Collector(client, Sampling(2, 4, 1.0, 0, 0), get_task("digits"), 2, book, window, capacity=8)
        for version in (1, 2, 1, 3, 9):  # waiting in the queue, oldest first
            collector.put(group(version))
        rollouts = AsyncRollouts(collector, 2, window, book, _Tokenizer(), check_stop=lambda: None,
                                 clock=SYSTEM_CLOCK)
        batch = rollouts(["p", "p", "q", "q"], trainer=None)
        assert batch["lockstep_version"] == [2, 2, 3, 3]
        assert batch["completion_ids"] == [[5, 6]] * 4 and batch["logprobs"] is None
        assert book.take_step().dropped_stale == 4  # both v1 groups (two answers each) were too old
    finally:
        client.close()


def test_trl_gets_the_replicas_logprobs_only_when_every_answer_has_them_for_its_tokens() -> None:
    with_logprobs = [group(2, logprobs=[-0.25, None]), group(3, logprobs=[-1.0, -2.0])]
    assert trl_batch(with_logprobs, _Tokenizer())["logprobs"] == [[-0.25, None]] * 2 + [[-1.0, -2.0]] * 2
    assert trl_batch([*with_logprobs, group(3)], _Tokenizer())["logprobs"] is None
    assert all(r.logprobs for r in Sampling(4, 8, 1.0, 0, 0).requests(["p", "q"], 1))  # the run asks for them


def test_a_full_collector_drops_the_groups_a_publish_pushed_beyond_the_bound_and_goes_on() -> None:
    """Answers no update may use never hold the fleet back: the collector drops them to make room, counted as stale
    (or foreign), and keeps the usable ones in order."""
    client = RolloutClient(lambda: [])
    try:
        window, book = VersionWindow([1, 2], max_staleness=1), SampleBook()
        collector = Collector(client, Sampling(2, 4, 1.0, 0, 0), get_task("digits"), 2, book, window, capacity=3)
        for version in (1, 2, 1):
            collector.put(group(version))
        window.publishing_started()  # v1 is now two behind the policy; v2 one
        collector.put(group(2, prompt="fresh"))  # returns at once: both v1 groups make room
        taken = [collector.take(timeout_s=0) for _ in range(3)]
        assert [g.prompt if g else None for g in taken] == ["Numbers for a b c:", "fresh", None]
        step = book.take_step()
        assert (step.dropped_stale, step.used) == (4, 0)  # two groups of two, dropped at the collector
    finally:
        client.close()


def test_the_reward_scores_the_text_the_replica_wrote_for_the_prompt_it_was_asked() -> None:
    reward = TaskReward(digits_reward, "builtin:digits")
    assert reward(["dataset prompt"], ["decoded"], lockstep_prompt=["asked"], lockstep_text=["1234"]) == [1.0]
    assert reward(["p"], ["ab12"]) == [0.5]


def test_trl_options_are_checked_before_a_run_exists(tmp_path: object) -> None:
    assert check_trl_args({"epsilon_high": 0.28, "warmup_steps": 2, "mask_truncated_completions": True}) == {
        "epsilon_high": 0.28, "warmup_steps": 2.0, "mask_truncated_completions": True}
    for bad, message in [({"use_vllm": True}, "not a TRL option"), ({"epsilon_high": "wide"}, "valid number"),
                         ({"mask_truncated_completions": 1}, "valid boolean"),
                         ({"delta": float("inf")}, "finite"), ({"delta": -3}, "delta: .*greater than 1"),
                         ({"importance_sampling_level": "bogus"}, "'token' or 'sequence'"),
                         ({"adam_beta1": 5.0}, "adam_beta1: .*less than 1"), ({"adam_epsilon": -1}, "adam_epsilon"),
                         ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg"),
                         ({"top_entropy_quantile": 7}, "top_entropy_quantile"),
                         ({"entropy_coef": -1e6}, "entropy_coef"),
                         ({"off_policy_mask_threshold": -1}, "off_policy_mask_threshold")]:
        with pytest.raises(BadRequest, match=message):
            check_trl_args(bad)
    with pytest.raises(BadRequest, match="TRL refuses"):
        grpo_config(FinetuneParams(trl_args={"lr_scheduler_type": "sideways"}), tmp_path)  # type: ignore[arg-type]
    # Names TRL takes whose schedule needs options a run cannot pass: refused when the run is created, not
    # once it has started.
    for name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"):
        params = FinetuneParams(trl_args={"lr_scheduler_type": name})  # type: ignore[arg-type]
        with pytest.raises(BadRequest, match=f"lr_scheduler_type '{name}' cannot run"):
            check_scheduler(grpo_config(params, tmp_path), params.steps)
    params = FinetuneParams(trl_args={"lr_scheduler_type": "cosine", "warmup_steps": 0.1})  # type: ignore[arg-type]
    check_scheduler(grpo_config(params, tmp_path), params.steps)
    config = grpo_config(FinetuneParams.model_validate({"async": True, "max_staleness": 2, "beta": 0.04,
                                                        "loss_type": "dr_grpo"}), tmp_path)  # type: ignore[arg-type]
    assert (config.beta, config.loss_type, config.num_generations, config.save_steps) == (0.04, "dr_grpo", 4, 3)
    assert config.per_device_train_batch_size == 32 and config.temperature == 1.0
    assert not config.bf16  # float32 unless the run asks for bfloat16 mixed precision
    assert grpo_config(FinetuneParams(precision="bf16"), tmp_path).bf16  # type: ignore[arg-type]


class _Tokenizer:
    """Encodes one id per character, as far as the batch builder needs."""

    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


class _Recording(RolloutClient):
    """A client with no replicas that remembers every round it was asked for (each answer fails at once)."""

    def __init__(self) -> None:
        super().__init__(lambda: [], no_replica_wait_s=0)  # every answer fails; the collector asks again
        self.asked: list[list[GenRequest]] = []

    def generate(self, requests: list[GenRequest]) -> list[Rollout]:
        self.asked.append(requests)
        return super().generate(requests)


def test_the_collector_asks_for_the_prompts_and_samples_a_synchronous_run_asks_for_at_each_step() -> None:
    """Round r of an asynchronous run is step r of a synchronous one with the same parameters: the two modes train
    on the same stream, and a resumed run goes on from its step instead of starting the stream again."""
    task, sampling = get_task("digits"), Sampling(2, 4, 1.0, 0, seed=7)
    client = _Recording()
    collector = Collector(client, sampling, task, 3, SampleBook(), VersionWindow([0], 1), capacity=3, first_round=5)
    try:
        collector.start()
        wait_for(lambda: len(client.asked) >= 2, 30, 0.05, "two rounds")
    finally:
        collector.stop()
        client.close()
    for step, asked in zip((5, 6), client.asked, strict=False):
        assert asked == sampling.requests(step_prompts(task, 3, 7, step), step)
    assert step_prompts(task, 3, 7, 5) != step_prompts(task, 3, 7, 6)


def test_the_collector_starts_no_round_while_a_publish_of_the_run_is_in_flight() -> None:
    """A round started during a publish would be answered by the version about to be replaced, beyond a bound of
    0 once it commits: the collector waits for the new version, and the first round after the publish is the next
    one of the stream."""
    task, sampling = get_task("digits"), Sampling(2, 4, 1.0, 0, seed=7)
    window, client = VersionWindow([0], 0), _Recording()
    window.publishing_started()
    collector = Collector(client, sampling, task, 3, SampleBook(), window, capacity=6)
    try:
        collector.start()
        time.sleep(0.5)  # an idle collector with room asks at once: nothing may be asked while v1 publishes
        assert client.asked == []
        window.publishing_ended(1)
        wait_for(lambda: client.asked, 30, 0.05, "the first round after the publish")
    finally:
        collector.stop()
        client.close()
    assert client.asked[0] == sampling.requests(step_prompts(task, 3, 7, 1), 1)


class _Answering(_Recording):
    """A client whose every answer comes back whole from version 0."""

    def generate(self, requests: list[GenRequest]) -> list[Rollout]:
        self.asked.append(requests)
        return [Rollout(r, "http://replica", text="12", version=0, body_version=0, replica_id="r", token_ids=[1])
                for r in requests for _ in range(r.n)]


def test_during_a_publish_the_collector_waits_while_a_step_of_groups_does_and_goes_on_when_the_updates_run_dry(
) -> None:
    """With max_staleness 1, answers of the version being replaced stay usable once the publish commits: when
    fewer than a step of groups wait (publishes back to back, as with publish_every 1), a round goes ahead rather
    than leave the updates and the fleet idle."""
    task, sampling = get_task("digits"), Sampling(2, 4, 1.0, 0, seed=7)
    window, client = VersionWindow([0], 1), _Answering()
    collector = Collector(client, sampling, task, 3, SampleBook(), window, capacity=6)
    try:
        collector.start()
        wait_for(lambda: len(client.asked) == 2, 30, 0.05, "two rounds filling the buffer")
        window.publishing_started()
        for _ in range(3):  # one step's groups are used; another step's wait
            assert collector.take(timeout_s=5) is not None
        time.sleep(0.5)
        assert len(client.asked) == 2  # there is room, but a step of groups waits: the new version goes first
        assert collector.take(timeout_s=5) is not None  # fewer than a step wait now
        wait_for(lambda: len(client.asked) == 3, 30, 0.05, "a round during the publish")
    finally:
        collector.stop()
        client.close()
    assert client.asked[2] == sampling.requests(step_prompts(task, 3, 7, 3), 3)


@pytest.mark.parametrize("bound", [0, 1])
def test_the_collector_starts_no_round_whose_update_comes_after_more_publishes_than_the_bound_allows(
        bound: int) -> None:
    """A publish follows every step here. The round for step s is answered by the version serving when it starts;
    by step s the run has published s - 1 checkpoints. So the collector asks for step s only once the run has
    started publishing checkpoint s - 1 - bound and, for bound 0, once that publish has committed: the round is
    answered by the version a synchronous run asks at step s, and nothing generated is dropped."""
    task, sampling = get_task("digits"), Sampling(2, 4, 1.0, 0, seed=7)
    window, client = VersionWindow([0], bound), _Answering()
    collector = Collector(client, sampling, task, 3, SampleBook(), window, capacity=9,
                          schedule=Schedule(batch_size=3, num_iterations=1, publish_every=1))
    try:
        collector.start()
        wait_for(lambda: len(client.asked) == 1 + bound, 30, 0.05, "the rounds within reach")
        time.sleep(0.5)
        assert len(client.asked) == 1 + bound  # room for more, but their updates come after more publishes
        for _ in range(3):  # step 1 uses its groups; its checkpoint is published
            assert collector.take(timeout_s=5) is not None
            collector.mark_used()
        window.publishing_started()
        time.sleep(0.5)
        assert len(client.asked) == 1 + bound  # with bound 0, v0's answers would be a version old at step 2
        window.publishing_ended(1)
        wait_for(lambda: len(client.asked) == 2 + bound, 30, 0.05, "the round the committed version reaches")
    finally:
        collector.stop()
        client.close()
    assert client.asked[-1] == sampling.requests(step_prompts(task, 3, 7, 2 + bound), 2 + bound)


def test_a_schedule_maps_groups_to_the_steps_that_use_them_and_counts_the_publishes_before() -> None:
    fresh = Schedule(batch_size=4, num_iterations=1, publish_every=3)
    assert [fresh.step_of(g) for g in (0, 3, 4, 11, 12)] == [1, 1, 2, 3, 4]
    assert [fresh.publishes_before(s) for s in (1, 3, 4, 6, 7)] == [0, 0, 1, 1, 2]
    # TRL trains each batch twice; a run resumed from its step-6 checkpoint (published before the collector)
    resumed = Schedule(batch_size=4, num_iterations=2, publish_every=6, start_step=6)
    assert [resumed.step_of(g) for g in (0, 4, 8)] == [7, 9, 11]
    assert [resumed.publishes_before(s) for s in (7, 12, 13)] == [0, 0, 1]


def test_the_collector_starts_no_round_while_the_run_says_other_work_goes_first() -> None:
    """The held-out evaluation of a version just served goes before the next round (``wait_turn``)."""
    task, sampling = get_task("digits"), Sampling(2, 4, 1.0, 0, seed=7)
    client, evaluated = _Recording(), threading.Event()
    collector = Collector(client, sampling, task, 3, SampleBook(), VersionWindow([0], 1), capacity=6,
                          wait_turn=evaluated.wait)
    try:
        collector.start()
        time.sleep(0.5)
        assert client.asked == [] and not collector.first_round_in.is_set()
        evaluated.set()
        wait_for(collector.first_round_in.is_set, 30, 0.05, "the first round")
    finally:
        collector.stop()
        client.close()
    assert client.asked[0] == sampling.requests(step_prompts(task, 3, 7, 1), 1)


def test_a_stopped_collector_releases_whoever_waits_for_its_first_round() -> None:
    client = _Recording()
    window = VersionWindow([0], 1)
    window.publishing_started()  # no round can start
    collector = Collector(client, Sampling(2, 4, 1.0, 0, seed=7), get_task("digits"), 3, SampleBook(), window,
                          capacity=6)
    collector.start()
    collector.stop()
    client.close()
    assert collector.first_round_in.is_set() and client.asked == []


class _RecordingEvaluator:
    """Stands in for ``Evaluator``: records what it evaluated, in order."""

    def __init__(self) -> None:
        self.evaluated: list[int] = []

    def evaluate(self, version: int, step: int, *, converged: bool) -> None:
        self.evaluated.append(version)


def test_the_baseline_evaluation_waits_for_what_it_is_told_to_follow() -> None:
    """An asynchronous run evaluates its start version after the collector's first round, which the first update
    waits for."""
    evaluator, first_round = _RecordingEvaluator(), threading.Event()
    releases = Releases(cast(Any, None), FinetuneParams(), VersionWindow([0], 1), SampleBook(),
                        cast(Any, evaluator), reward_name="builtin:digits", background=True)
    releases.evaluate_behind(0, 0, True, after=first_round)
    time.sleep(0.3)
    assert evaluator.evaluated == []
    first_round.set()
    releases.wait_evaluated()
    assert evaluator.evaluated == [0] and releases.wait_measured(0)


class _WatchedClock(FakeClock):
    """A fake clock that says when it was read."""

    def __init__(self) -> None:
        super().__init__()
        self.read = threading.Event()

    def monotonic(self) -> float:
        self.read.set()
        return super().monotonic()


class _TimedReleases(Releases):
    """Releases whose publish of the step-3 checkpoint takes 1.5 s of the fake clock, once ``go`` is set."""

    go: threading.Event

    def _release(self, checkpoint: Path, step: int, stats: dict[str, Any], samples: Any) -> None:
        if step == 3:
            self.go.wait(10)
            self.ctx.clock.advance(1.5)
        self.window.publishing_ended(step)


@pytest.mark.parametrize("background", [False, True])
def test_the_step_records_say_how_long_the_updates_stood_still_for_publishing(background: bool) -> None:
    """Synchronously the whole publish; asynchronously only the wait for a publish still in flight when the next
    checkpoint comes."""
    clock = _WatchedClock()
    releases = _TimedReleases(cast(Any, SimpleNamespace(clock=clock)), FinetuneParams(), VersionWindow([0], 1),
                              SampleBook(), cast(Any, _RecordingEvaluator()), reward_name="builtin:digits",
                              background=background)
    releases.go = threading.Event()
    if not background:
        releases.go.set()
        releases.release(Path("checkpoint-3"), 3, {})
        assert releases.take_publish_wait() == 1.5 and releases.take_publish_wait() == 0.0
        return
    releases.release(Path("checkpoint-3"), 3, {})  # in flight, waiting for go: the updates go on
    assert releases.take_publish_wait() == 0.0
    clock.read.clear()
    next_checkpoint = threading.Thread(target=releases.release, args=(Path("checkpoint-6"), 6, {}))
    next_checkpoint.start()
    assert clock.read.wait(10)  # the next checkpoint has come and waits for the publish in flight
    releases.go.set()
    next_checkpoint.join(10)
    releases.wait_published()
    assert releases.take_publish_wait() == 1.5


def test_the_window_says_when_no_publish_is_in_flight() -> None:
    window = VersionWindow([0], 1)
    assert window.wait_settled(timeout_s=0)
    window.publishing_started()
    assert not window.wait_settled(timeout_s=0)
    window.publishing_ended(None)  # a failed publish settles it too
    assert window.wait_settled(timeout_s=0) and window.latest == 0


def test_a_stop_during_the_last_step_still_publishes_it_and_one_before_ends_the_loop() -> None:
    """Before, a stop that came during the last step left it unpublished and the finished run 'stopped'."""
    from transformers import TrainerControl

    ctx = SimpleNamespace(progress=lambda *_: None, stopping=lambda: True)
    callback = run_callback(cast(Any, ctx), FinetuneParams(steps=7), VersionWindow([0], 1), SampleBook(),
                            cast(Any, None))
    last, earlier = TrainerControl(), TrainerControl()
    callback.on_step_end(None, SimpleNamespace(global_step=7), last)
    callback.on_step_end(None, SimpleNamespace(global_step=4), earlier)
    assert last.should_save and not last.should_training_stop
    assert earlier.should_training_stop and not earlier.should_save


class _Published(Exception):
    """Raised by the stand-in publisher with the metadata it was given."""


def test_a_version_records_its_parents_own_reward_or_none_while_that_is_still_measured(tmp_path: Path) -> None:
    """Before, an asynchronous run's MANIFEST took the newest reward measured, which could be an older
    version's while the parent's evaluation was still running."""

    def publish_dir(folder: Path, **kw: Any) -> None:
        raise _Published(kw["metadata"])

    ctx = SimpleNamespace(run_id="r", publisher=SimpleNamespace(publish_dir=publish_dir), progress=lambda *_: None,
                          clock=SYSTEM_CLOCK,
                          record=SimpleNamespace(progress=SimpleNamespace(step=0)))
    evaluator = Evaluator(cast(Any, SimpleNamespace(clock=SYSTEM_CLOCK)), FinetuneParams(), get_task("digits"),
                          digits_reward, "builtin:digits", cast(Any, None))
    evaluator.remember([{"type": "eval", "version": 40, "reward": 0.026}])  # v40 measured; v41, the parent, not
    window = VersionWindow([40, 41], 1)
    releases = Releases(cast(Any, ctx), FinetuneParams(), window, SampleBook(), evaluator,
                        reward_name="builtin:digits", background=False)
    (tmp_path / "checkpoint-6").mkdir()
    for reward in (None, 0.265):
        if reward is not None:
            evaluator.rewards[41] = reward  # its evaluation ended
        with pytest.raises(_Published) as published:
            releases.release(tmp_path / "checkpoint-6", 6, {})
        window.publishing_ended(None)
        assert published.value.args[0]["parent"] == 41
        assert published.value.args[0]["eval_reward_parent"] == reward
