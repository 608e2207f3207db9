"""``algorithm: sft_best``: TRL's ``SFTTrainer`` on the best answer of each group the fleet wrote.

For each version the run asks the fleet for ``publish_every`` steps of groups (synchronously, within the
staleness bound), keeps each group's best answer when it beats the group's mean reward, and trains
``publish_every`` SFT steps on those prompt–completion pairs (the loss on the completion only). The AdamW state
carries over from version to version and into the checkpoint, so a resumed run continues with it.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from lockstep.trainer.runs.context import RunContext
from lockstep.trainer.runs.fleet_rollouts import Group, SyncRollouts, step_prompts
from lockstep.trainer.runs.releases import Releases
from lockstep.trainer.runs.rewards import score
from lockstep.trainer.runs.staleness import SampleBook, VersionWindow
from lockstep.trainer.runs.tasks import RewardFn, Task
from lockstep.trainer.runs.trl_trainer import quiet, training_args
from lockstep.trainer.server.schemas import FinetuneParams

OPTIMIZER_FILE = "optimizer.pt"  # torch.save of the AdamW state dict (the trainer's own file, never published)


def best_answers(groups: list[Group], rewards: list[list[float]]) -> list[tuple[str, str]]:
    """(prompt, answer) of each group whose best answer scores above the group's mean (``rewards``: per answer)."""
    pairs = []
    for group, values in zip(groups, rewards, strict=True):
        best, text = max(zip(values, (r.text for r in group.rollouts), strict=True))
        if best > sum(values) / len(values):  # only an answer better than its siblings is worth imitating
            pairs.append((group.prompt, text))
    return pairs


def train_sft(ctx: RunContext, p: FinetuneParams, model: Any, tokenizer: Any, *, task: Task, reward: RewardFn,
              reward_name: str, rollouts: SyncRollouts, window: VersionWindow, book: SampleBook,
              releases: Releases, start_step: int, resume_from: str | None) -> None:
    """Segments of ``publish_every`` SFT steps, each on answers of the version the previous one published."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    optimizer = torch.optim.AdamW(model.parameters(), lr=p.learning_rate, weight_decay=p.weight_decay)
    if resume_from is not None and (Path(resume_from) / OPTIMIZER_FILE).exists():
        optimizer.load_state_dict(torch.load(Path(resume_from) / OPTIMIZER_FILE, weights_only=True))
    step = start_step
    while step < p.steps:
        segment = range(step + 1, min(step + p.publish_every, p.steps) + 1)
        pairs: list[tuple[str, str]] = []
        points = []
        for n in segment:
            ctx.progress(n - 1, p.steps, f"step {n}/{p.steps}: rollouts from v{window.latest}")
            asked = step_prompts(task, p.batch_size, p.seed, n)
            groups = rollouts.groups(asked, n)
            rewards = [[score(reward, r.request.prompt, r.text, reward_name) for r in g.rollouts] for g in groups]
            best = best_answers(groups, rewards)
            pairs += best
            used = book.take_step()
            mean = sum(map(sum, rewards)) / max(1, sum(map(len, rewards)))
            points.append({"type": "step", "step": n, "reward": round(mean, 6), "version": window.latest,
                           "publishing": window.publishing, "samples": used.used, "imitated": len(best),
                           "stale": used.dropped_stale, "foreign": used.foreign, "errors": used.errors,
                           "mislabeled": used.mislabeled, "staleness": used.staleness,
                           "sample_versions": used.versions,
                           "publish_wait_s": round(releases.take_publish_wait(), 3)})
        loss = None
        if pairs:
            args = SFTConfig(output_dir=str(ctx.files.checkpoints / "sft"), max_steps=len(segment),
                             per_device_train_batch_size=math.ceil(len(pairs) / len(segment)),
                             save_strategy="no", seed=p.seed + step, **training_args(p))
            trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                                 train_dataset=Dataset.from_dict({"prompt": [q for q, _ in pairs],
                                                                  "completion": [a for _, a in pairs]}),
                                 optimizers=(optimizer, None))
            quiet(trainer)
            trainer.train()
            losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            for point, value in zip(points, losses, strict=False):
                point["loss"] = round(float(value), 6)
            loss = losses[-1] if losses else None
        for point in points:
            ctx.metric(point)
        ctx.check_stop()
        step = segment[-1]
        checkpoint = ctx.files.checkpoints / f"checkpoint-{step}"
        model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
        torch.save(optimizer.state_dict(), checkpoint / OPTIMIZER_FILE)
        releases.release(checkpoint, step, {"loss": loss, "reward": points[-1]["reward"], "imitated": len(pairs)})
        for old in sorted(ctx.files.checkpoints.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))[:-2]:
            shutil.rmtree(old, ignore_errors=True)  # the newest two are kept, as for GRPO runs
