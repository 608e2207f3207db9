"""TRL's rollout function: groups of answers from the Lockstep fleet, each tagged with the version that wrote it.

``SyncRollouts`` asks the fleet for the prompts TRL hands it and waits for the answers (on-policy: the run
publishes, waits for every replica to serve the new version, then asks again). ``AsyncRollouts`` takes whole
groups a ``Collector`` thread keeps gathering while the updates and publishes go on; groups too far behind
(``staleness.VersionWindow``) are dropped at the moment the update would use them.

A group is usable only whole: TRL's advantages compare ``group_size`` answers to one prompt, so a group with a
failed, mislabeled, stale or foreign member is not used (and each member is counted under its reason).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lockstep.core.clock import Clock
from lockstep.core.errors import LockstepError
from lockstep.trainer.runs.rewards import score
from lockstep.trainer.runs.rollouts import GenRequest, Rollout, RolloutClient
from lockstep.trainer.runs.staleness import Freshness, SampleBook, VersionWindow
from lockstep.trainer.runs.tasks import RewardFn, Task

log = logging.getLogger(__name__)

COLLECT_TRIES = 10  # sync: rounds per step before giving up (each waits a second for replicas to catch up)
STARVED_S = 300.0  # async: seconds without one usable group before the run fails


class RunFailed(LockstepError):
    """A run cannot go on; the message says why (the cluster keeps serving its committed version)."""

    status_code = 500
    code = "run_failed"


@dataclass(frozen=True)
class Sampling:
    """How answers are asked for (from the run's parameters)."""

    group_size: int
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int

    def requests(self, prompts: list[str], step: int) -> list[GenRequest]:
        """One request per prompt for its whole group: one version writes every answer of a group."""
        return [GenRequest(prompt, self.max_new_tokens, self.temperature, top_k=self.top_k, group=g,
                           seed=sample_seed(self.seed, step, g), n=self.group_size, logprobs=True)
                for g, prompt in enumerate(prompts)]


def sample_seed(seed: int, step: int, group: int) -> int:
    """A group's sampling seed (its answer i samples with it + i): the same run parameters ask for the same
    samples."""
    digest = hashlib.sha256(f"{seed}:{step}:{group}".encode()).digest()
    return int.from_bytes(digest[:7], "little")  # < 2**56: the replica's seed range, with room for + i


@dataclass(frozen=True)
class Group:
    """``group_size`` answers to one prompt; every one answered, correctly labelled."""

    prompt: str
    rollouts: tuple[Rollout, ...]


def whole_groups(rollouts: list[Rollout], book: SampleBook) -> tuple[dict[int, Group], list[str]]:
    """The groups whose every answer came back correctly labelled; failures are counted and described."""
    by_group: dict[int, list[Rollout]] = {}
    for r in rollouts:
        by_group.setdefault(r.request.group, []).append(r)
    groups: dict[int, Group] = {}
    problems: list[str] = []
    for g, members in by_group.items():
        failed = [r for r in members if not r.ok]
        mislabeled = [r for r in members if r.mislabeled]
        book.failed(errors=len(failed), mislabeled=len(mislabeled))
        problems += [f"{r.url or 'no replica'}: {r.error}" for r in failed]
        problems += [f"{r.replica_id}: header v{r.version} but body v{r.body_version}" for r in mislabeled]
        if not failed and not mislabeled:
            groups[g] = Group(members[0].request.prompt, tuple(members))
    return groups, problems


def verdicts(group: Group, window: VersionWindow) -> list[Freshness]:
    """What the bound says of each answer of ``group`` now."""
    return [window.judge(r.version) for r in group.rollouts]


def judge(group: Group, window: VersionWindow, book: SampleBook) -> bool:
    """Use the group (counted by staleness) when every answer is within the bound; else count why not."""
    said = verdicts(group, window)
    if all(v is Freshness.FRESH for v in said):
        for r in group.rollouts:
            assert r.version is not None
            book.used(r.version, window.staleness(r.version) or 0)
        return True
    count_dropped(said, book)
    return False


def count_dropped(said: list[Freshness], book: SampleBook) -> None:
    for v in said:
        # A fresh member of a dropped group is dropped because of its siblings: count it as stale.
        book.dropped(Freshness.FOREIGN if v is Freshness.FOREIGN else Freshness.STALE)


def completion_ids(tokenizer: Any, r: Rollout) -> list[int]:
    """The tokens the replica generated; re-tokenized from the text only when it did not return them."""
    if r.token_ids is not None:
        return list(r.token_ids)
    ids = list(tokenizer(r.text, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if r.finish_reason == "stop" and eos is not None:
        ids.append(int(eos))  # the model chose to stop: that choice is part of the sample
    return ids


def trl_batch(groups: list[Group], tokenizer: Any) -> dict[str, Any]:
    """What TRL's ``rollout_func`` returns: token ids, the log-probabilities the replicas drew them with (TRL's
    off-policy options compare them with the policy being updated), and the prompt, text and version each reward
    needs."""
    rollouts = [r for g in groups for r in g.rollouts]
    aligned = all(r.token_ids is not None and r.logprobs is not None for r in rollouts)
    return {
        "prompt_ids": [list(tokenizer(r.request.prompt)["input_ids"]) for r in rollouts],  # as /generate encodes
        "completion_ids": [completion_ids(tokenizer, r) for r in rollouts],
        # Only when every answer has them for exactly its tokens: re-tokenized text has no log-probabilities.
        "logprobs": [r.logprobs for r in rollouts] if aligned else None,
        "lockstep_prompt": [r.request.prompt for r in rollouts],
        "lockstep_text": [r.text for r in rollouts],
        "lockstep_version": [r.version for r in rollouts],
    }


class TaskReward:
    """A task's reward as a TRL reward function, scored on the text the replica wrote for the prompt it got."""

    def __init__(self, fn: RewardFn, name: str) -> None:
        self.fn = fn
        self.name = name
        self.__name__ = "reward"  # TRL logs rewards/<__name__>/mean

    def __call__(self, prompts: list[Any], completions: list[Any], lockstep_prompt: list[str] | None = None,
                 lockstep_text: list[str] | None = None, **_: Any) -> list[float]:
        asked = lockstep_prompt if lockstep_prompt is not None else [str(p) for p in prompts]
        texts = lockstep_text if lockstep_text is not None else [str(c) for c in completions]
        return [score(self.fn, p, t, self.name) for p, t in zip(asked, texts, strict=True)]


def unique_prompts(prompts: list[Any], group_size: int) -> list[str]:
    """TRL repeats each prompt ``group_size`` times in a row; the prompts once each."""
    unique = [str(p) for p in prompts[::group_size]]
    if [p for p in unique for _ in range(group_size)] != [str(p) for p in prompts]:
        raise RunFailed(f"TRL handed over prompts not in groups of {group_size}; the run needs "
                        "num_generations = group_size and whole groups per batch")
    return unique


class SyncRollouts:
    """Asks the fleet for TRL's prompts now, retrying groups until they are whole and fresh."""

    def __init__(self, client: RolloutClient, sampling: Sampling, window: VersionWindow, book: SampleBook,
                 tokenizer: Any, *, check_stop: Callable[[], None], clock: Clock) -> None:
        self.client, self.sampling, self.window, self.book = client, sampling, window, book
        self.tokenizer = tokenizer
        self.check_stop = check_stop
        self.clock = clock

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        asked = unique_prompts(prompts, self.sampling.group_size)
        started = self.clock.monotonic()
        groups = self.groups(asked, int(trainer.state.global_step) + 1)
        self.book.waited(self.clock.monotonic() - started)
        return trl_batch(groups, self.tokenizer)

    def groups(self, asked: list[str], step: int) -> list[Group]:
        """A whole, fresh group for each prompt of ``asked``, in order."""
        done: dict[int, Group] = {}
        problems: list[str] = []
        for attempt in range(COLLECT_TRIES):
            self.check_stop()
            pending = [g for g in range(len(asked)) if g not in done]
            requests = [r for r in self.sampling.requests(asked, step) if r.group in pending]
            groups, trouble = whole_groups(self.client.generate(requests), self.book)
            problems += trouble
            done.update({g: group for g, group in groups.items() if judge(group, self.window, self.book)})
            if len(done) == len(asked):
                return [done[g] for g in range(len(asked))]
            log.warning("step %d: %d of %d groups usable (try %d)", step, len(done), len(asked), attempt + 1)
            self.clock.sleep(1.0)
        why = "; ".join(problems[-3:]) or ("answers came from a version this run did not produce or that is "
                                           "too old for max_staleness")
        raise RunFailed(f"no whole group of fresh rollouts for every prompt at step {step} after "
                        f"{COLLECT_TRIES} tries; last problems: {why}")


def step_prompts(task: Task, batch_size: int, seed: int, step: int) -> list[str]:
    """The prompts of step ``step`` (from 1) of a run: the same for the same parameters, whatever the mode."""
    return task.prompts(batch_size, seed=seed * 1_000_003 + step, held_out=False)


@dataclass(frozen=True)
class Schedule:
    """When the run's updates use the groups a collector gathers, and when the run publishes."""

    batch_size: int  # groups per call of the rollout function
    num_iterations: int  # update steps per call (TRL trains each batch of answers that many times)
    publish_every: int  # a publish follows every publish_every-th step
    start_step: int = 0  # steps done before the collector started (a resumed run's checkpoint)

    def step_of(self, position: int) -> int:
        """The step that first uses the group at ``position`` (0-based, counting from the collector's start)."""
        return self.start_step + (position // self.batch_size) * self.num_iterations + 1

    def publishes_before(self, step: int) -> int:
        """The run's publishes that start after the collector's start and before ``step`` begins."""
        return (step - 1) // self.publish_every - self.start_step // self.publish_every


class Collector:
    """A thread that keeps asking the fleet for groups while updates run; at most ``capacity`` wait unused.

    Round r asks for step r's prompts and samples (``step_prompts``, ``Sampling.requests``), as a synchronous run
    would at step r; rounds whose groups are dropped move the stream on. A resumed run starts at ``first_round``.
    A round starts only when the buffer has room for all of it: answers generated ahead and then held would be
    older when used, and the version serving when the round starts is the newest one it can get. For the same
    reason no round starts while a publish of the run is in flight: it would be answered by the version about to be
    replaced, and the replicas stage and drain faster without it, so the next round gets the new version sooner;
    unless fewer than a step of groups wait and those answers stay within the bound (``starving``). Nor while
    ``wait_turn`` says other work of the run goes first (the held-out evaluation of a version just served:
    ``Releases.wait_measured``). Nor when the update that will use the round comes after more publishes than the
    bound allows (``within_reach``, from the run's ``schedule``): the answers of the version serving now would be
    dropped, so the round waits for the checkpoint it needs. With ``max_staleness`` 0 every round is then answered
    by the version a synchronous run would have asked at that step, and none is dropped.
    When the waiting groups leave no room, those a publish has pushed beyond the bound are dropped (and counted),
    so the fleet goes on generating instead of holding answers no update may use.
    """

    def __init__(self, client: RolloutClient, sampling: Sampling, task: Task, batch_size: int,
                 book: SampleBook, window: VersionWindow, *, capacity: int, first_round: int = 1,
                 wait_turn: Callable[[float], bool] | None = None, schedule: Schedule | None = None) -> None:
        self.client, self.sampling, self.task, self.book, self.window = client, sampling, task, book, window
        self.batch_size = batch_size
        self.capacity = capacity
        self.first_round = first_round
        self.wait_turn = wait_turn
        self.schedule = schedule  # None: no publish is foreseen (each round is judged by the bound alone)
        self._publishes_at_start = window.started
        self._used = 0  # groups the updates took and used
        self.problems: list[str] = []
        # Set once the first round's answers are in, or the collector stopped: the run's baseline evaluation
        # waits for it, since until then the updates have nothing to train on.
        self.first_round_in = threading.Event()
        self._waiting: deque[Group] = deque()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-collector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.first_round_in.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        round_ = self.first_round - 1
        while self.wait_for_room(min(self.batch_size, self.capacity)) and self.wait_for_turn():
            round_ += 1
            prompts = step_prompts(self.task, self.batch_size, self.sampling.seed, round_)
            try:
                rollouts = self.client.generate(self.sampling.requests(prompts, round_))
            except RuntimeError:  # the client was closed under us: the run is ending
                return
            groups, trouble = whole_groups(rollouts, self.book)
            self.problems = (self.problems + trouble)[-3:]
            for g in sorted(groups):
                self.put(groups[g])
            self.first_round_in.set()
            if not groups:
                self._stop.wait(1.0)  # nothing answered: give the replicas a moment

    def wait_for_room(self, groups: int) -> bool:
        """Until ``groups`` more fit in the buffer (dropping those beyond the bound first); False once stopped."""
        with self._changed:
            while len(self._waiting) + groups > self.capacity and not self._stop.is_set():
                if not self._drop_beyond_bound():
                    self._changed.wait(0.2)
            return not self._stop.is_set()

    def wait_for_turn(self) -> bool:
        """Until no publish of the run is in flight, or the updates are running dry (``starving``), and nothing
        that goes first is (``wait_turn``); False once stopped."""
        while not self._stop.is_set():
            if not self.within_reach():
                self._stop.wait(0.02)  # until the updates reach the publish the round needs
            elif ((self.window.wait_settled(timeout_s=0.05) or self.starving())
                    and (self.wait_turn is None or self.wait_turn(0.2))):
                return not self._stop.is_set()
        return False

    def within_reach(self) -> bool:
        """Whether answers of the version serving now stay within the bound until the update that will use them:
        the publishes in flight plus those the run starts before that update, at most ``max_staleness``."""
        behind = self.window.staleness(self.window.latest) or 0
        if self.schedule is None:
            return behind <= self.window.max_staleness
        with self._changed:
            position = self._used + len(self._waiting)
        foreseen = (self.schedule.publishes_before(self.schedule.step_of(position))
                    - (self.window.started - self._publishes_at_start))
        return behind + max(foreseen, 0) <= self.window.max_staleness

    def mark_used(self) -> None:
        """An update used a group it took: the stream's next rounds are that much nearer their updates."""
        with self._changed:
            self._used += 1

    def starving(self) -> bool:
        """Fewer than a step of groups wait, and answers of the version serving now stay within the bound once the
        publishes in flight commit. Then a round goes ahead during a publish: with publishes back to back (as with
        ``publish_every: 1``) waiting for a settled window would leave the fleet idle and the updates waiting."""
        with self._changed:
            short = len(self._waiting) < self.batch_size
        return short and self.window.judge(self.window.latest) is Freshness.FRESH

    def put(self, group: Group) -> None:
        """Queue ``group``; while the buffer is full, wait (generating further ahead only makes staler answers)."""
        self.wait_for_room(1)
        with self._changed:
            self._waiting.append(group)
            self._changed.notify_all()

    def _drop_beyond_bound(self) -> int:
        """Drop (and count) the waiting groups that are no longer usable; how many went. Holds ``_changed``."""
        kept: deque[Group] = deque()
        for group in self._waiting:
            said = verdicts(group, self.window)
            if all(v is Freshness.FRESH for v in said):
                kept.append(group)
            else:  # staleness only grows (a publish that fails fails the run): no update could use it later
                count_dropped(said, self.book)
        dropped = len(self._waiting) - len(kept)
        self._waiting = kept
        return dropped

    def take(self, timeout_s: float) -> Group | None:
        """The oldest waiting group, or None when none came within ``timeout_s``."""
        with self._changed:
            if not self._changed.wait_for(lambda: bool(self._waiting), timeout=timeout_s):
                return None
            group = self._waiting.popleft()
            self._changed.notify_all()
            return group


class AsyncRollouts:
    """Hands TRL whole groups from the collector, each within ``max_staleness`` of the newest version."""

    def __init__(self, collector: Collector, group_size: int, window: VersionWindow, book: SampleBook,
                 tokenizer: Any, *, check_stop: Callable[[], None], clock: Clock) -> None:
        self.collector, self.group_size, self.window, self.book = collector, group_size, window, book
        self.tokenizer = tokenizer
        self.check_stop = check_stop
        self.clock = clock

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        # With max_staleness 0 this waits, after each checkpoint, for answers of the version it becomes: the
        # synchronous behaviour, reached by the bound alone.
        wanted = len(prompts) // self.group_size
        used: list[Group] = []
        started = last_use = self.clock.monotonic()
        while len(used) < wanted:
            self.check_stop()
            group = self.collector.take(timeout_s=1.0)
            if group is not None and judge(group, self.window, self.book):
                used.append(group)
                self.collector.mark_used()
                last_use = self.clock.monotonic()
            elif self.clock.monotonic() - last_use > STARVED_S:
                why = "; ".join(self.collector.problems) or (
                    f"every answer was more than max_staleness={self.window.max_staleness} versions behind "
                    f"v{self.window.latest} or came from another publisher")
                raise RunFailed(f"no usable rollout group for {STARVED_S:.0f} s; last problems: {why}")
        self.book.waited(self.clock.monotonic() - started)
        return trl_batch(used, self.tokenizer)
