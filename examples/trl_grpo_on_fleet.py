"""Point an existing TRL GRPO script at a Lockstep fleet: the replicas write the rollouts, every checkpoint is
published to them, and each answer carries the version that wrote it.

    lockstep up --shared var/shared &
    python examples/trl_grpo_on_fleet.py --trainer http://127.0.0.1:8090 --steps 9 --save-steps 3

Two additions to a plain GRPOTrainer script:

- ``rollout_func`` asks the fleet (``POST /generate``) instead of generating locally, and keeps only answers from
  the version this script published last (``X-Model-Version``): on-policy by the tag, not by timing;
- ``LockstepPublishCallback`` uploads each saved checkpoint to the trainer, which publishes it to every replica
  at one instant and waits until they all serve it.

It starts from the version the fleet serves, downloaded from the trainer (or ``--model``).
The trainer's own ``finetune`` run kind does the same with more care (retries, asynchronous rollouts with a
staleness bound, resume, evaluation): docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import httpx
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from lockstep.core.settings import load_settings
from lockstep.models import loader
from lockstep.store.remote import RemoteStore
from lockstep.trainer.client import LockstepPublishCallback
from lockstep.trainer.runs.tasks import digits_reward, get_task


class FleetRollouts:
    """TRL's ``rollout_func``: answers from the replicas, each from the version this script published last."""

    def __init__(self, urls: list[str], tokenizer: Any, callback: LockstepPublishCallback, start_version: int,
                 max_new_tokens: int) -> None:
        self.urls, self.tokenizer, self.callback = urls, tokenizer, callback
        self.start_version, self.max_new_tokens = start_version, max_new_tokens
        self.http = httpx.Client(timeout=120)

    def newest(self) -> int:
        published = [r.version for r in self.callback.results if r.ok]
        return published[-1] if published else self.start_version

    def __call__(self, prompts: list[str], trainer: Any) -> dict[str, Any]:
        wanted, out = self.newest(), {"prompt_ids": [], "completion_ids": [], "logprobs": [], "text": []}
        for prompt in prompts:
            for _ in range(10):  # a replica may still serve the version before: ask again
                answer = self.http.post(random.choice(self.urls) + "/generate", json={
                    "prompt": prompt, "max_new_tokens": self.max_new_tokens, "temperature": 1.0,
                    "seed": random.getrandbits(48), "logprobs": True})
                answer.raise_for_status()
                if int(answer.headers["X-Model-Version"]) == wanted:
                    break
            else:
                raise RuntimeError(f"no replica answered with v{wanted}")
            body = answer.json()
            out["prompt_ids"].append(self.tokenizer(prompt)["input_ids"])  # as /generate encodes it
            out["completion_ids"].append(body["completion_token_ids"])  # exactly the tokens it sampled
            out["logprobs"].append(body["completion_logprobs"])  # what they had under the version that drew them
            out["text"].append(body["text"])
        return out


def reward(prompts: list[str], completions: list[str], text: list[str], **_: Any) -> list[float]:
    """The digits task's reward, on the text the replica wrote."""
    return [digits_reward(p, t) for p, t in zip(prompts, text, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainer", default="http://127.0.0.1:8090")
    parser.add_argument("--fleet", default=None, help="replica URLs, comma-separated (default: the trainer's "
                        "ready replicas)")
    parser.add_argument("--model", default=None, help="the start model (default: what the fleet serves, "
                        "downloaded from the trainer)")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--save-steps", type=int, default=3)
    parser.add_argument("--output", default="var/trl-grpo")
    args = parser.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental by TRL
    settings = load_settings()
    headers = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    cluster = httpx.get(args.trainer + "/cluster", headers=headers, timeout=30).json()
    urls = args.fleet.split(",") if args.fleet else [r["url"] for r in cluster["replicas"] if r.get("ready")]
    start_version = int(cluster["convergence"]["version"])

    model = args.model or (f"versions/{start_version}" if start_version else settings.initial_model_repo_id)
    store = RemoteStore(args.trainer, Path(tempfile.gettempdir()) / "lockstep-versions", token=settings.api_token)
    try:  # versions/N comes from the trainer's store API, every file checked against its MANIFEST
        loaded = loader.load(loader.resolve(model, settings, store), settings, dtype=torch.float32)
    finally:
        store.close()
    callback = LockstepPublishCallback(trainer_url=args.trainer, token=settings.api_token, tokenizer=loaded.tokenizer)
    config = GRPOConfig(output_dir=args.output, max_steps=args.steps, save_steps=args.save_steps,
                        per_device_train_batch_size=32, num_generations=4, max_completion_length=16,
                        learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, shuffle_dataset=False)
    prompts = get_task("digits").prompts(args.steps * 8, seed=0, held_out=False)
    trainer = GRPOTrainer(model=loaded.model, reward_funcs=[reward], args=config, processing_class=loaded.tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          rollout_func=FleetRollouts(urls, loaded.tokenizer, callback, start_version, 16),
                          callbacks=[callback])
    trainer.train()
    for result in callback.results:
        print(result.summary())


if __name__ == "__main__":
    main()
