"""Run kind ``finetune``: rollouts from the replicas, rewards, policy-gradient updates on the trainer's own
copy, and every ``publish_every`` steps a checkpoint published as the next version that every replica flips
to."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from lockstep.core.errors import BadRequest, Conflict, LockstepError
from lockstep.core.settings import Settings
from lockstep.store import ModelStore
from lockstep.trainer.runs.checkpoint import MODEL_DIR, restore_optimizer, write_checkpoint
from lockstep.trainer.runs.context import RunContext
from lockstep.trainer.runs.policy import Policy, Scored
from lockstep.trainer.runs.record import Checkpoint
from lockstep.trainer.runs.rewards import RewardError, load_reward, score
from lockstep.trainer.runs.rollouts import GenRequest, Rollout, RolloutClient
from lockstep.trainer.runs.tasks import RewardFn, get_task
from lockstep.trainer.server.publish_jobs import check_ref
from lockstep.trainer.server.schemas import FinetuneParams

log = logging.getLogger(__name__)

COLLECT_TRIES = 10  # rollout rounds per step before giving up (each waits a second for replicas to catch up)
CONVERGE_TIMEOUT_S = 120.0  # seconds to wait for every replica to serve a new version before evaluating


class RunFailed(LockstepError):
    """A run cannot go on; the message says why (the cluster keeps serving its committed version)."""

    status_code = 500
    code = "run_failed"


def sample_seed(seed: int, step: int, group: int, index: int) -> int:
    """A per-request sampling seed: the same run parameters ask for the same samples."""
    digest = hashlib.sha256(f"{seed}:{step}:{group}:{index}".encode()).digest()
    return int.from_bytes(digest[:7], "little")  # < 2**56: inside the replica's seed range


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

    def execute(self, ctx: RunContext, params: FinetuneParams) -> None:
        loop = _Loop(ctx, params)
        try:
            loop.run()
        finally:
            loop.client.close()


class _Loop:
    """One finetune run from its first (or resumed) step to its last."""

    def __init__(self, ctx: RunContext, params: FinetuneParams) -> None:
        self.ctx = ctx
        self.p = params
        self.task = get_task(params.task)
        self.reward, self.reward_name = reward_function(params, ctx.settings)
        self.client = RolloutClient(self._rollout_urls)
        self.policy: Policy | None = None
        self.step = 0
        self.latest = 0  # the version the replicas serve: the run's newest
        self.known: list[int] = []  # versions this run's policy produced, oldest first
        self.version_started = time.monotonic()
        self.eval_first: float | None = None
        self.eval_last: float | None = None
        self.last_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def _rollout_urls(self) -> list[str]:
        """Ready replicas from the heartbeats; else the load-balanced service URL when one is set."""
        urls = self.ctx.cluster.snapshot(probe=False, discover=False).ready_urls()
        service = self.ctx.settings.inference_service_url
        return urls or ([service] if service else [])

    def _hyper(self) -> dict[str, Any]:
        return {"learning_rate": self.p.learning_rate, "weight_decay": self.p.weight_decay,
                "max_grad_norm": self.p.max_grad_norm}

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

    def _start(self) -> None:
        ctx, record = self.ctx, self.ctx.record
        if ctx.resume and record.checkpoint is not None:
            folder = ctx.files.folder / record.checkpoint.path
            ctx.progress(record.checkpoint.step, self.p.steps, f"resuming from step {record.checkpoint.step}")
            self.policy = Policy.load(str(folder / MODEL_DIR), ctx.settings, ctx.coordinator.store,
                                      **self._hyper())
            restore_optimizer(folder, self.policy)
            self.step = record.checkpoint.step
            self.known = [v for v in [record.start_version, *record.versions] if v is not None]
            committed, _ = self._served_model()
            self.latest = record.checkpoint.version if record.checkpoint.version is not None else committed
            if committed != self.latest:  # someone published meanwhile: put the checkpoint back in front
                self._publish(folder / MODEL_DIR, note="resumed checkpoint")
            evals = [m["reward"] for m in ctx.files.metrics()
                     if m.get("type") == "eval" and m.get("reward") is not None]
            self.eval_first = evals[0] if evals else None
            self.eval_last = evals[-1] if evals else None
            self.ctx.metric({"type": "resume", "step": self.step, "version": self.latest})
            return
        if ctx.resume:
            ctx.metric({"type": "resume", "step": 0, "version": None})
            record.versions = []
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
        self.policy = Policy.load(ref, ctx.settings, ctx.coordinator.store, **self._hyper())
        self.latest = version
        self.known = [version]
        record.start_version = version
        ctx.save()
        self._evaluate(converged=self._converge(version))

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        self._start()
        assert self.policy is not None
        while self.step < self.p.steps:
            self.ctx.check_stop()
            self.step += 1
            self.ctx.progress(self.step - 1, self.p.steps, f"step {self.step}/{self.p.steps}: rollouts from "
                              f"v{self.latest}")
            t0 = time.monotonic()
            samples, counts = self._collect()
            t1 = time.monotonic()
            stats = self.policy.step(samples, self.p.algorithm)
            t2 = time.monotonic()
            mean_reward = sum(s.reward for s in samples) / len(samples)
            self.last_stats = {"loss": round(stats.loss, 6), "reward": round(mean_reward, 6)}
            self.ctx.metric({"type": "step", "step": self.step, "loss": stats.loss, "reward": mean_reward,
                             "version": self.latest, "samples": len(samples), "weighted": stats.samples,
                             "tokens": stats.tokens, "nll": stats.nll, "grad_norm": stats.grad_norm,
                             "retokenized_mismatch": stats.retokenized_mismatch, **counts,
                             "rollout_s": round(t1 - t0, 3), "train_s": round(t2 - t1, 3)})
            if self.step % self.p.publish_every == 0 or self.step == self.p.steps:
                self.ctx.check_stop()
                self._checkpoint_and_publish()
        published = len(self.ctx.record.versions)
        self.ctx.progress(self.step, self.p.steps, f"done: {published} versions published")
        self.ctx.record.summary = {"eval_reward_first": self.eval_first, "eval_reward_last": self.eval_last,
                                   "versions": list(self.ctx.record.versions), "steps": self.step,
                                   "reward": self.reward_name}

    def _fresh(self, version: int | None) -> str:
        """'ok', 'stale' (older than max_staleness allows) or 'foreign' (not produced by this run)."""
        if version is None or version not in self.known:
            return "foreign"
        behind = self.known.index(self.latest) - self.known.index(version)
        return "ok" if behind <= self.p.max_staleness else "stale"

    def _collect(self) -> tuple[list[Scored], dict[str, int]]:
        """One batch of scored rollouts from versions fresh enough; retries while replicas catch up."""
        prompts = self.task.prompts(self.p.batch_size, seed=self.p.seed * 1_000_003 + self.step,
                                    held_out=False)
        requests = [GenRequest(prompt, self.p.max_new_tokens, self.p.temperature,
                               seed=sample_seed(self.p.seed, self.step, g, i), top_k=self.p.top_k, group=g)
                    for g, prompt in enumerate(prompts) for i in range(self.p.group_size)]
        counts = {"errors": 0, "mislabeled": 0, "stale": 0, "foreign": 0}
        problems: list[str] = []
        for attempt in range(COLLECT_TRIES):
            self.ctx.check_stop()
            rollouts = self.client.generate(requests)
            usable: list[Rollout] = []
            for r in rollouts:
                if not r.ok:
                    counts["errors"] += 1
                    problems.append(f"{r.url or 'no replica'}: {r.error}")
                elif r.mislabeled:
                    counts["mislabeled"] += 1
                    problems.append(f"{r.replica_id}: header v{r.version} but body v{r.body_version}")
                else:
                    verdict = self._fresh(r.version)
                    if verdict == "ok":
                        usable.append(r)
                    else:
                        counts[verdict] += 1
            by_group: dict[int, list[Rollout]] = {}
            for r in usable:
                by_group.setdefault(r.request.group, []).append(r)
            kept = [r for members in by_group.values() if len(members) >= 2 for r in members]
            if kept:
                return [self._score(r) for r in kept], counts
            log.warning("run %s step %d: no usable rollouts (try %d): %s", self.ctx.run_id, self.step,
                        attempt + 1, counts)
            self.ctx.clock.sleep(1.0)
        why = "; ".join(problems[-3:]) or ("every answer came from a version this run did not produce or "
                                           "that is too old for max_staleness")
        raise RunFailed(f"no usable rollouts at step {self.step} after {COLLECT_TRIES} tries ({counts}); "
                        f"last problems: {why}")

    def _score(self, r: Rollout) -> Scored:
        value = score(self.reward, r.request.prompt, r.text, self.reward_name)
        assert r.version is not None
        return Scored(r.request.prompt, r.text, value, r.request.group, r.version, r.finish_reason,
                      r.completion_tokens, r.token_ids)

    # ------------------------------------------------------------------ publishing and evaluating
    def _checkpoint_and_publish(self) -> None:
        assert self.policy is not None
        ctx = self.ctx
        ctx.progress(self.step, self.p.steps, f"step {self.step}: writing a checkpoint")
        folder = write_checkpoint(ctx.files.checkpoints, self.policy, self.step,
                                  {"run_id": ctx.run_id, "parent": self.latest, **self.last_stats})
        self._publish(folder / MODEL_DIR, note=f"step {self.step}")
        ctx.record.checkpoint = Checkpoint(step=self.step, path=str(folder.relative_to(ctx.files.folder)),
                                           version=self.latest)
        ctx.save()
        self._evaluate(converged=self._converge(self.latest))

    def _publish(self, model_dir: Any, note: str) -> None:
        ctx = self.ctx
        ctx.progress(self.step, self.p.steps, f"step {self.step}: publishing ({note})")
        metadata = {"run_id": ctx.run_id, "step": self.step, "parent": self.latest, "task": self.p.task,
                    "reward_fn": self.reward_name, "algorithm": self.p.algorithm,
                    "learning_rate": self.p.learning_rate, "eval_reward_parent": self.eval_last,
                    **self.last_stats}
        label = f"lockstep-trainer run {ctx.run_id} step {self.step}"
        result = ctx.publisher.publish_dir(model_dir, label=label, metadata=metadata, run_id=ctx.run_id,
                                           policy=self.p.policy, timeout_s=self.p.timeout_s)
        if not result.ok:
            raise RunFailed(f"publishing step {self.step} as v{result.version} was {result.outcome}: "
                            f"{result.reason}; the cluster keeps serving v{self.latest}")
        self.latest = result.version
        if result.version not in self.known:
            self.known.append(result.version)
        ctx.record.versions.append(result.version)
        ctx.save()

    def _converge(self, version: int) -> bool:
        """Wait until every live replica serves ``version``; False (logged) when they do not in time."""
        try:
            self.ctx.wait_until_serving(version, CONVERGE_TIMEOUT_S)
            return True
        except Conflict as exc:
            log.warning("run %s: %s", self.ctx.run_id, exc)
            return False

    def _evaluate(self, *, converged: bool) -> None:
        """Greedy answers of the replicas to the held-out prompts: the reward of the version they serve."""
        ctx, p = self.ctx, self.p
        seconds = round(time.monotonic() - self.version_started, 3)
        self.version_started = time.monotonic()
        if p.eval_prompts == 0:
            return
        ctx.progress(self.step, p.steps, f"step {self.step}: evaluating v{self.latest} on held-out prompts")
        prompts = self.task.prompts(p.eval_prompts, seed=p.seed, held_out=True)
        requests = [GenRequest(q, p.max_new_tokens, 0.0, group=i) for i, q in enumerate(prompts)]
        rollouts = self.client.generate(requests)
        answered = [r for r in rollouts if r.ok and not r.mislabeled and r.version == self.latest]
        rewards = [score(self.reward, r.request.prompt, r.text, self.reward_name) for r in answered]
        mean = sum(rewards) / len(rewards) if rewards else None
        replicas = sorted({r.replica_id or r.url for r in answered})
        serving = {b.replica_id: b.serving.version if b.serving else None
                   for b in ctx.coordinator.live_replicas()}
        ctx.metric({"type": "eval", "step": self.step, "version": self.latest, "reward": mean,
                    "converged": converged,
                    "answered": len(answered), "asked": len(prompts), "replicas": replicas,
                    "other_version": sum(1 for r in rollouts if r.ok and r.version != self.latest),
                    "errors": sum(1 for r in rollouts if not r.ok), "seconds": seconds, "serving": serving})
        for r, value in list(zip(answered, rewards, strict=True))[: p.samples_per_version]:
            ctx.sample({"version": self.latest, "step": self.step, "prompt": r.request.prompt,
                        "answer": r.text, "reward": value, "replica_id": r.replica_id})
        if mean is not None:
            self.eval_first = mean if self.eval_first is None else self.eval_first
            self.eval_last = mean
