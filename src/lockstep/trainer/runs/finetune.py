"""Run kind ``finetune``: TRL's GRPO on the trainer's copy of the model, with rollouts from the fleet, and every
``publish_every`` steps a checkpoint published as the next version that every replica flips to.

Synchronous (default): each step asks the fleet for TRL's prompts and waits; each release waits until every
replica serves the new version. Asynchronous (``"async": true``): a collector keeps the fleet generating, the
releases run behind the updates, and a sample is used only when the version that wrote it (its version tag) is
at most ``max_staleness`` of this run's versions behind the newest (``staleness``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lockstep.core.errors import BadRequest
from lockstep.core.heap import freeze_long_lived
from lockstep.core.settings import Settings
from lockstep.models import loader
from lockstep.store import ModelStore
from lockstep.trainer.runs.context import RunContext, RunStopped
from lockstep.trainer.runs.fleet_rollouts import (
    AsyncRollouts,
    Collector,
    RunFailed,
    Sampling,
    Schedule,
    SyncRollouts,
    TaskReward,
    step_prompts,
)
from lockstep.trainer.runs.releases import Evaluator, Releases, model_files
from lockstep.trainer.runs.rewards import RewardError, load_reward, score
from lockstep.trainer.runs.rollouts import RolloutClient
from lockstep.trainer.runs.sft import train_sft
from lockstep.trainer.runs.staleness import SampleBook, VersionWindow
from lockstep.trainer.runs.tasks import RewardFn, get_task
from lockstep.trainer.runs.trl_trainer import check_scheduler, grpo_config, quiet, run_callback
from lockstep.trainer.server.publish_jobs import check_ref
from lockstep.trainer.server.schemas import FinetuneParams

log = logging.getLogger(__name__)

__all__ = ["FinetuneKind", "RunFailed"]



def reward_function(params: FinetuneParams, settings: Settings) -> tuple[RewardFn, str]:
    """The plug-in when one is named, else the task's built-in reward."""
    if params.reward:
        return load_reward(params.reward, settings.reward_plugins), params.reward
    task = get_task(params.task)
    return task.reward, f"builtin:{task.name}"


class FinetuneKind:
    """``POST /runs {"kind": "finetune", "params": {...}}``."""

    name = "finetune"
    params_model = FinetuneParams

    def check(self, params: FinetuneParams, settings: Settings, store: ModelStore) -> None:
        """Refuse what cannot work before a run is created (400/404 with the reason)."""
        task = get_task(params.task)
        reward, name = reward_function(params, settings)
        probe = task.prompts(1, seed=params.seed, held_out=False)[0]
        try:
            score(reward, probe, "42 is a number", name)
        except RewardError as exc:
            raise BadRequest(f"the reward plug-in fails on a test call: {exc}") from exc
        if params.model:
            check_ref(params.model, settings, store)
        if params.eval_prompts and params.samples_per_version > params.eval_prompts:
            raise BadRequest(f"samples_per_version ({params.samples_per_version}) cannot exceed eval_prompts "
                             f"({params.eval_prompts})")
        config = grpo_config(params, Path(tempfile.gettempdir()))  # TRL's own checks of the options; no files
        check_scheduler(config, params.steps)

    def execute(self, ctx: RunContext, params: FinetuneParams) -> None:
        run = _FinetuneRun(ctx, params)
        try:
            run.run()
        finally:
            run.close()


class _FinetuneRun:
    """One finetune run from its first (or resumed) step to its last."""

    def __init__(self, ctx: RunContext, params: FinetuneParams) -> None:
        self.ctx = ctx
        self.p = params
        self.task = get_task(params.task)
        self.reward, self.reward_name = reward_function(params, ctx.settings)
        self.client = RolloutClient(self._rollout_urls)
        # Its own connections: held-out prompts are not queued behind the rollouts in flight.
        self.eval_client = RolloutClient(self._rollout_urls)
        self.book = SampleBook()
        self.window: VersionWindow | None = None
        self.collector: Collector | None = None
        self.releases: Releases | None = None

    def close(self) -> None:
        if self.collector is not None:
            self.collector.stop()
        if self.releases is not None:
            try:  # a publish in flight ends (commits or aborts) before the run does: it cannot be cut short
                self.releases.finish()
            except Exception as exc:  # the run already ends with its own reason
                log.warning("run %s: the last publish or evaluation failed as the run ended: %s",
                            self.ctx.run_id, exc)
        self.client.close()
        self.eval_client.close()

    def _rollout_urls(self) -> list[str]:
        """Ready replicas from the heartbeats; else the load-balanced service URL when one is set."""
        urls = self.ctx.cluster.snapshot(probe=False, discover=False).ready_urls()
        service = self.ctx.settings.inference_service_url
        return urls or ([service] if service else [])

    def _served_model(self) -> tuple[int, str]:
        """The version every replica serves and a reference the trainer can load it from."""
        state = self.ctx.coordinator.read_state()
        if state.committed is not None:
            return state.committed.version, state.committed.model
        # Version 0 is each replica's initial model; the heartbeats say which reference that was.
        beats = self.ctx.coordinator.live_replicas()
        models = {b.serving.model for b in beats if b.serving is not None and b.serving.version == 0}
        if len(models) > 1:
            raise RunFailed(f"replicas serve different initial models as v0 ({', '.join(sorted(models))}); "
                            "publish one model first, or name it in params.model")
        return 0, models.pop() if models else self.ctx.settings.initial_model_repo_id

    # ------------------------------------------------------------------ start or resume
    def _start(self, evaluator: Evaluator) -> tuple[str, str | None]:
        """The reference to load and the checkpoint to resume from (None: a fresh start)."""
        ctx, record = self.ctx, self.ctx.record
        checkpoint = record.checkpoint
        if ctx.resume:  # the rewards its first life measured
            evaluator.remember([m for m in ctx.files.metrics() if m.get("type") == "eval"])
        if ctx.resume and checkpoint is not None:
            ctx.progress(checkpoint.step, self.p.steps, f"resuming from step {checkpoint.step}")
            self.window = VersionWindow([v for v in [record.start_version, *record.versions] if v is not None],
                                        self.p.max_staleness)
            ctx.metric({"type": "resume", "step": checkpoint.step, "version": self.window.latest})
            folder = str(ctx.files.folder / checkpoint.path)
            return str(model_files(ctx.files.folder / checkpoint.path)), folder
        if ctx.resume:
            ctx.metric({"type": "resume", "step": 0, "version": None})
            record.versions = []
            record.version_samples = {}
        ctx.progress(0, self.p.steps, "loading the model")
        if self.p.model:
            result = ctx.publisher.publish_ref(self.p.model, run_id=record.id, policy=self.p.policy,
                                               timeout_s=self.p.timeout_s,
                                               metadata={"run_id": record.id, "step": 0, "role": "start"})
            if not result.ok:
                raise RunFailed(f"publishing the start model {self.p.model} was {result.outcome}: "
                                f"{result.reason}")
            version, ref = result.version, result.model
        else:
            version, ref = self._served_model()
        self.window = VersionWindow([version], self.p.max_staleness)
        record.start_version = version
        ctx.save()
        return ref, None

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        from datasets import Dataset
        from trl import GRPOTrainer

        freeze_long_lived()  # TRL's train() collects garbage at its start: walk only what this run creates

        ctx, p = self.ctx, self.p
        evaluator = Evaluator(ctx, p, self.task, self.reward, self.reward_name, self.eval_client)
        ref, resume_from = self._start(evaluator)
        assert self.window is not None
        window = self.window
        releases = self.releases = Releases(ctx, p, window, self.book, evaluator, reward_name=self.reward_name,
                                            background=p.async_mode)
        # The version the run starts from is evaluated once: a resumed run's first life may have done it.
        evaluated = ({m.get("version") for m in ctx.files.metrics() if m.get("type") == "eval"}
                     if ctx.resume else set())
        evaluate_first = window.latest not in evaluated
        if resume_from is not None and self._served_model()[0] != window.latest:
            # Someone published while the run was away: put its checkpoint back in front, so the fleet answers
            # with this run's policy again (another publisher's answers are never used).
            checkpoint = ctx.record.checkpoint
            assert checkpoint is not None
            # Nothing new trained it: its samples are those of the version it was first published as.
            releases.release(ctx.files.folder / checkpoint.path, checkpoint.step,
                             {"note": "resumed checkpoint", "republishes": checkpoint.version})
            releases.wait_published()
            evaluate_first = False  # the release evaluates the version it became
        # Else a resumed run that stopped while its newest version was evaluated, or before, evaluates it now: the
        # fleet still serves it (older ones cannot be: no replica serves them any more).
        sampling = Sampling(p.group_size, p.max_new_tokens, p.temperature, p.top_k, p.seed)
        if p.async_mode and p.algorithm != "sft_best":
            # Collecting starts as soon as the fleet serves the policy, while the trainer loads it and builds TRL.
            # Two steps of groups: the updates go on with them while a publish is in flight and the collector
            # waits for the version it becomes, and while that version is evaluated.
            resumed_at = ctx.record.checkpoint.step if resume_from and ctx.record.checkpoint else 0
            self.collector = Collector(self.client, sampling, self.task, p.batch_size, self.book, window,
                                       capacity=2 * p.batch_size, first_round=resumed_at + 1,
                                       wait_turn=releases.wait_measured,
                                       schedule=Schedule(p.batch_size, p.num_iterations, p.publish_every,
                                                         resumed_at))
            self.collector.start()
        if evaluate_first:  # the baseline (or the resumed version), beside the first
            # steps; after the collector's first round, which the first update waits for
            step = ctx.record.checkpoint.step if resume_from is not None and ctx.record.checkpoint else 0
            releases.evaluate_behind(window.latest, step, releases.converge(window.latest),
                                     after=self.collector.first_round_in if self.collector is not None else None)
        loaded = loader.load(loader.resolve(ref, ctx.settings, ctx.coordinator.store), ctx.settings,
                             dtype=torch.float32)  # float32 training, whatever the replicas serve
        tokenizer = loaded.tokenizer
        if p.algorithm == "sft_best":
            train_sft(ctx, p, loaded.model, tokenizer, task=self.task, reward=self.reward,
                      reward_name=self.reward_name,
                      rollouts=SyncRollouts(self.client, sampling, window, self.book, tokenizer,
                                            check_stop=ctx.check_stop, clock=ctx.clock),
                      window=window, book=self.book, releases=releases,
                      start_step=ctx.record.checkpoint.step if resume_from and ctx.record.checkpoint else 0,
                      resume_from=resume_from)
            releases.finish()
            self._finish(evaluator)
            return
        rollout_func: Any
        if self.collector is not None:
            rollout_func = AsyncRollouts(self.collector, p.group_size, window, self.book, tokenizer,
                                         check_stop=ctx.check_stop, clock=ctx.clock)
        else:
            rollout_func = SyncRollouts(self.client, sampling, window, self.book, tokenizer,
                                        check_stop=ctx.check_stop, clock=ctx.clock)
        # TRL takes the batches in order (shuffle_dataset off): step n asks for the same prompts on every run
        # with these parameters. Asynchronous runs take the collector's, which asks for the same stream.
        prompts = [q for step in range(1, p.steps + 1) for q in step_prompts(self.task, p.batch_size, p.seed, step)]
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is documented as experimental
        trainer = GRPOTrainer(model=loaded.model, reward_funcs=[TaskReward(self.reward, self.reward_name)],
                              args=grpo_config(p, ctx.files.checkpoints),
                              train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                              rollout_func=rollout_func,
                              callbacks=[run_callback(ctx, p, window, self.book, releases)])
        quiet(trainer)
        trainer.train(resume_from_checkpoint=resume_from)
        if self.collector is not None:
            self.collector.stop()  # no update will use another round: the last publish and evaluation go alone
        releases.finish()
        if trainer.state.global_step < p.steps:  # a stop ended TRL's loop early: the run is stopped
            ctx.check_stop()
            raise RunStopped(f"run {ctx.run_id} ended at step {trainer.state.global_step} of {p.steps}")
        self._finish(evaluator)  # every step ran and was published: a stop that came during the last is moot

    def _finish(self, evaluator: Evaluator) -> None:
        ctx, p = self.ctx, self.p
        ctx.progress(p.steps, p.steps, f"done: {len(ctx.record.versions)} versions published")
        ctx.record.summary = {"eval_reward_first": evaluator.first, "eval_reward_last": evaluator.last,
                              "versions": list(ctx.record.versions), "steps": p.steps, "reward": self.reward_name,
                              "async": p.async_mode, "max_staleness": p.max_staleness,
                              "samples_used": sum(s.used for s in ctx.record.version_samples.values()),
                              "samples_dropped_stale": sum(s.dropped_stale
                                                           for s in ctx.record.version_samples.values())}

