"""From checkpoint to served version: publish it, wait until every replica serves it, evaluate it on the fleet.

Synchronous runs release inline (training waits). Asynchronous runs release on one background thread, so the
updates go on while the version stages and commits; at most one release is in flight, and a failed one fails
the run at the next checkpoint or at the end. In both, the held-out evaluation of a served version runs on its
own thread: measuring a version never holds back the next update or the next publish. It goes before the
asynchronous collector's next round (``wait_measured``): a round generated beside it would slow it down, and the
updates have the groups already collected to go on with.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from lockstep.core.errors import Conflict
from lockstep.trainer.runs.context import RunContext
from lockstep.trainer.runs.fleet_rollouts import RunFailed
from lockstep.trainer.runs.record import Checkpoint
from lockstep.trainer.runs.rewards import score
from lockstep.trainer.runs.rollouts import GenRequest, RolloutClient
from lockstep.trainer.runs.staleness import SampleBook, VersionSamples, VersionWindow
from lockstep.trainer.runs.tasks import RewardFn, Task
from lockstep.trainer.server.schemas import FinetuneParams

log = logging.getLogger(__name__)

CONVERGE_TIMEOUT_S = 120.0  # seconds to wait for every replica to serve a new version before evaluating
# What transformers.Trainer adds to a checkpoint folder for resuming: kept there, never published.
TRAINER_STATE = ("trainer_state.json", "*.pt", "*.pth", "*.bin")


def model_files(checkpoint: Path) -> Path:
    """``<checkpoint>/model``: hard links to the weights, config and tokenizer, without the optimizer state."""
    folder = checkpoint / "model"
    folder.mkdir(exist_ok=True)
    state = {p.name for pattern in TRAINER_STATE for p in checkpoint.glob(pattern)}
    for path in checkpoint.iterdir():
        if path.is_file() and path.name not in state and not (folder / path.name).exists():
            (folder / path.name).hardlink_to(path)
    return folder


class Evaluator:
    """Greedy answers of the fleet to held-out prompts: the reward of the version it serves."""

    def __init__(self, ctx: RunContext, params: FinetuneParams, task: Task, reward: RewardFn, reward_name: str,
                 client: RolloutClient) -> None:
        self.ctx, self.p, self.task, self.reward, self.reward_name = ctx, params, task, reward, reward_name
        self.client = client
        self.first: float | None = None
        self.last: float | None = None
        self.rewards: dict[int, float | None] = {}  # version → its held-out reward, once evaluated
        self._since = ctx.clock.monotonic()

    def remember(self, evals: list[dict[str, Any]]) -> None:
        """A resumed run keeps the rewards its first life measured (its ``eval`` metric points)."""
        for point in evals:
            if isinstance(point.get("version"), int):
                self.rewards[point["version"]] = point.get("reward")
        measured = [p["reward"] for p in evals if p.get("reward") is not None]
        if measured:
            self.first, self.last = measured[0], measured[-1]

    def evaluate(self, version: int, step: int, *, converged: bool) -> None:
        ctx, p = self.ctx, self.p
        seconds = round(ctx.clock.monotonic() - self._since, 3)
        self._since = ctx.clock.monotonic()
        if p.eval_prompts == 0:
            return
        # Updates may have gone on since the step that made this version: the run's progress does not go back.
        ctx.progress(max(step, ctx.record.progress.step), p.steps,
                     f"evaluating v{version} (step {step}) on held-out prompts")
        prompts = self.task.prompts(p.eval_prompts, seed=p.seed, held_out=True)
        rollouts = self.client.generate([GenRequest(q, p.max_new_tokens, 0.0, group=i)
                                         for i, q in enumerate(prompts)])
        answered = [r for r in rollouts if r.ok and not r.mislabeled and r.version == version]
        rewards = [score(self.reward, r.request.prompt, r.text, self.reward_name) for r in answered]
        mean = sum(rewards) / len(rewards) if rewards else None
        serving = {b.replica_id: b.serving.version if b.serving else None
                   for b in ctx.coordinator.live_replicas()}
        ctx.metric({"type": "eval", "step": step, "version": version, "reward": mean, "converged": converged,
                    "answered": len(answered), "asked": len(prompts),
                    "replicas": sorted({r.replica_id or r.url for r in answered}),
                    "other_version": sum(1 for r in rollouts if r.ok and r.version != version),
                    "errors": sum(1 for r in rollouts if not r.ok),
                    "mislabeled": sum(1 for r in rollouts if r.mislabeled), "seconds": seconds,
                    "serving": serving})
        for r, value in list(zip(answered, rewards, strict=True))[: p.samples_per_version]:
            ctx.sample({"version": version, "step": step, "prompt": r.request.prompt, "answer": r.text,
                        "reward": value, "replica_id": r.replica_id})
        self.rewards[version] = mean
        if mean is not None:
            self.first = mean if self.first is None else self.first
            self.last = mean


class Releases:
    """Publishes each checkpoint as the run's next version, then waits for the fleet and evaluates it."""

    def __init__(self, ctx: RunContext, params: FinetuneParams, window: VersionWindow, book: SampleBook,
                 evaluator: Evaluator, *, reward_name: str, background: bool) -> None:
        self.ctx, self.p, self.window, self.book, self.evaluator = ctx, params, window, book, evaluator
        self.reward_name = reward_name
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._evaluation: threading.Thread | None = None
        self._evaluation_error: BaseException | None = None
        self._lock = threading.Lock()  # the run record, between the update thread and the release thread
        self._measuring = threading.Condition()
        self._unmeasured = 0  # versions committed whose evaluation has not ended yet
        self._publish_wait_s = 0.0  # seconds the updates stood still for publishing, since take_publish_wait

    def release(self, checkpoint: Path, step: int, stats: dict[str, Any]) -> None:
        """Publish ``checkpoint`` (a transformers checkpoint folder) as the next version.

        The updates stand still meanwhile: for the whole publish when synchronous; asynchronously only while the
        previous publish is still in flight (``take_publish_wait``)."""
        started = self.ctx.clock.monotonic()
        try:
            self.wait_published()
            samples = self.book.take_version()  # what trained it: counted up to this checkpoint, not later
            self.window.publishing_started()
            if not self.background:
                self._release(checkpoint, step, stats, samples)
                return
            self._thread = threading.Thread(target=self._guarded, args=(checkpoint, step, stats, samples),
                                            name=f"release-step-{step}", daemon=True)
            self._thread.start()
        finally:
            self._publish_wait_s += self.ctx.clock.monotonic() - started

    def take_publish_wait(self) -> float:
        """Seconds the updates stood still for publishing since the last call; starts a new count."""
        waited, self._publish_wait_s = self._publish_wait_s, 0.0
        return waited

    def wait_published(self) -> None:
        """Until no release is in flight; a failed one (or a failed evaluation) fails the run here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        self._raise_evaluation_error()

    def finish(self) -> None:
        """Until every release is served and evaluated: the run's last figures are in before it ends."""
        try:
            self.wait_published()
        finally:
            self.wait_evaluated()

    def wait_evaluated(self) -> None:
        """Until no evaluation is in flight; a failed one fails the run here."""
        if self._evaluation is not None:
            self._evaluation.join()
            self._evaluation = None
        self._raise_evaluation_error()

    def _raise_evaluation_error(self) -> None:
        if self._evaluation_error is not None:
            error, self._evaluation_error = self._evaluation_error, None
            raise error

    def wait_measured(self, timeout_s: float) -> bool:
        """Until no version this run committed is still waiting for its evaluation (True), or ``timeout_s``."""
        with self._measuring:
            return self._measuring.wait_for(lambda: self._unmeasured == 0, timeout=timeout_s)

    def _measured(self) -> None:
        with self._measuring:
            self._unmeasured -= 1
            self._measuring.notify_all()

    def evaluate_behind(self, version: int, step: int, converged: bool, *, after: threading.Event | None = None,
                        unmeasured: bool = False) -> None:
        """Evaluate ``version`` on its own thread, one evaluation at a time; once ``after`` is set, when given.

        The next publish may start meanwhile: its flip comes after it stages, long after these requests were
        admitted, and a replica finishes admitted requests on the version that admitted them. Only answers tagged
        ``version`` count in any case (``Evaluator.evaluate``). ``unmeasured``: a release counted ``version`` as
        not yet measured (``wait_measured``); the evaluation's end counts it measured.
        """
        self.wait_evaluated()

        def evaluate() -> None:
            try:
                if after is not None:
                    after.wait()
                self.evaluator.evaluate(version, step, converged=converged)
            except BaseException as exc:  # handed to the update thread, which fails the run with it
                log.error("run %s: evaluating v%d failed: %s", self.ctx.run_id, version, exc)
                self._evaluation_error = exc
            finally:
                if unmeasured:
                    self._measured()

        self._evaluation = threading.Thread(target=evaluate, name=f"evaluate-v{version}", daemon=True)
        self._evaluation.start()

    def _guarded(self, checkpoint: Path, step: int, stats: dict[str, Any], samples: VersionSamples) -> None:
        try:
            self._release(checkpoint, step, stats, samples)
        except BaseException as exc:  # handed to the update thread, which fails the run with it
            log.error("run %s: releasing step %d failed: %s", self.ctx.run_id, step, exc)
            self._error = exc

    def _release(self, checkpoint: Path, step: int, stats: dict[str, Any], samples: VersionSamples) -> None:
        ctx, parent = self.ctx, self.window.latest
        ctx.progress(max(step, ctx.record.progress.step), self.p.steps, f"publishing step {step}")
        metadata = {"run_id": ctx.run_id, "step": step, "parent": parent, "task": self.p.task,
                    "reward_fn": self.reward_name, "algorithm": self.p.algorithm,
                    "learning_rate": self.p.learning_rate, "precision": self.p.precision,
                    # The parent's own reward; None while its evaluation (on a thread of its own) has not ended.
                    "eval_reward_parent": self.evaluator.rewards.get(parent),
                    "async": self.p.async_mode, "max_staleness": self.p.max_staleness,
                    "samples": samples.model_dump(), **stats}
        committed: int | None = None
        try:
            result = ctx.publisher.publish_dir(model_files(checkpoint), label=f"lockstep-trainer run "
                                               f"{ctx.run_id} step {step}", metadata=metadata, run_id=ctx.run_id,
                                               policy=self.p.policy, timeout_s=self.p.timeout_s)
            committed = result.version if result.ok else None
        finally:
            if committed is not None:
                with self._measuring:  # before the collector hears of the new version: its evaluation goes first
                    self._unmeasured += 1
            self.window.publishing_ended(committed)  # in one move: no moment where the bound is looser
        if not result.ok:
            raise RunFailed(f"publishing step {step} as v{result.version} was {result.outcome}: {result.reason}; "
                            f"the cluster keeps serving v{parent}")
        try:
            with self._lock:
                record = ctx.record
                if result.version not in record.versions:
                    record.versions.append(result.version)
                record.version_samples[str(result.version)] = samples
                record.checkpoint = Checkpoint(step=step, path=str(checkpoint.relative_to(ctx.files.folder)),
                                               version=result.version)
                ctx.save()
            self.evaluate_behind(result.version, step, self.converge(result.version), unmeasured=True)
        except BaseException:  # no evaluation started: nothing else will count the version measured
            self._measured()
            raise

    def converge(self, version: int) -> bool:
        """Wait until every live replica serves ``version``; False (logged) when they do not in time."""
        try:
            self.ctx.wait_until_serving(version, CONVERGE_TIMEOUT_S)
            return True
        except Conflict as exc:
            log.warning("run %s: %s", self.ctx.run_id, exc)
            return False
