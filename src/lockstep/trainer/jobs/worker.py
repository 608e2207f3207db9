"""The default training of a job run: TRL's ``SFTTrainer`` on a built-in task, each checkpoint published to the
fleet through the trainer's upload API.

It is also the example of an existing TRL script pointed at a Lockstep fleet. Two parts are Lockstep's: where
the model comes from (``starting_model``: the version the fleet serves, downloaded from the trainer) and the
callback that publishes every checkpoint (``LockstepPublishCallback``, with the run's id in the metadata so that
the trainer lists the version on the run). The rest is plain TRL.

    torchrun --standalone --nproc-per-node=1 -m lockstep.trainer.jobs.worker

Its settings come from the environment the Job gives its container (k8s/training/job.yaml, and what the trainer
adds for the run): TRAINER_URL, LOCKSTEP_API_TOKEN, LOCKSTEP_RUN_ID and LOCKSTEP_JOB_* (model, task, steps,
save steps, learning rate, batch size); flags override them. It trains on the GPU when the pod has one.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("lockstep.trainer.jobs.worker")

MAX_EXAMPLES = 20_000  # prompt-completion pairs at most; longer runs go over them again


def completion(task: str, prompt: str, rng: random.Random) -> str:
    """What a good answer to a built-in task's prompt looks like (the reward's ideal)."""
    if task == "digits":
        return " " + " ".join(str(rng.randrange(10)) for _ in range(rng.randint(3, 8)))
    if task == "target_word":
        match = re.search(r"the word '([^']+)'", prompt)
        return f" {match.group(1)}" if match else ""
    raise ValueError(f"task {task!r} has no supervised completions; built-in tasks: digits, target_word")


def examples(task: str, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` prompt-completion pairs (TRL's prompt-completion format) from the task's training prompts."""
    from lockstep.trainer.runs.tasks import get_task

    prompts = get_task(task).prompts(count, seed=seed, held_out=False)
    rng = random.Random(f"{task}:{seed}:completions")
    return [{"prompt": p, "completion": completion(task, p, rng)} for p in prompts]


def starting_model(ref: str, trainer_url: str, token: str | None) -> Path:
    """A folder holding ``ref``: versions/N downloaded from the trainer's store API (checked against its
    MANIFEST), a built-in model built here, or a repo id from the Hugging Face Hub."""
    from lockstep.core.settings import load_settings
    from lockstep.models import loader
    from lockstep.store.remote import RemoteStore

    settings = load_settings()  # the pod's HF_HOME, LOCKSTEP_BUILTIN_DIR, HF_HUB_OFFLINE
    store = RemoteStore(trainer_url, Path(tempfile.gettempdir()) / "lockstep-versions", token=token)
    try:
        return loader.resolve(ref, settings, store).path
    finally:
        store.close()


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Fine-tune the fleet's model with TRL and publish each "
                                     "checkpoint through the Lockstep trainer.")
    parser.add_argument("--trainer-url", default=env("TRAINER_URL"), help="the trainer (TRAINER_URL)")
    parser.add_argument("--run-id", default=env("LOCKSTEP_RUN_ID"), help="the run (LOCKSTEP_RUN_ID)")
    parser.add_argument("--model", default=env("LOCKSTEP_JOB_MODEL", "builtin:tiny"),
                        help="versions/N, builtin:..., or a repo id (LOCKSTEP_JOB_MODEL)")
    parser.add_argument("--task", default=env("LOCKSTEP_JOB_TASK", "digits"))
    parser.add_argument("--steps", type=int, default=int(env("LOCKSTEP_JOB_STEPS", "40")))
    parser.add_argument("--save-steps", type=int, default=int(env("LOCKSTEP_JOB_SAVE_STEPS", "10")),
                        help="a checkpoint, so a published version, every N steps (and at the end)")
    parser.add_argument("--learning-rate", type=float, default=float(env("LOCKSTEP_JOB_LEARNING_RATE", "5e-4")))
    parser.add_argument("--batch-size", type=int, default=int(env("LOCKSTEP_JOB_BATCH_SIZE", "8")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=str(Path(tempfile.gettempdir()) / "lockstep-job"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.trainer_url or not args.run_id:
        _parser().error("the trainer's URL and the run id are needed (TRAINER_URL, LOCKSTEP_RUN_ID): the trainer "
                        "sets them in the Job it creates for a job run")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lockstep.trainer.client import LockstepPublishCallback

    datasets.disable_progress_bars()  # the log is copied into the run: lines, not progress bars
    transformers.utils.logging.disable_progress_bar()

    token = os.environ.get("LOCKSTEP_API_TOKEN") or None
    path = starting_model(args.model, args.trainer_url, token)
    log.info("run %s: training %s (%s) on %s for %d steps, publishing every %d", args.run_id, args.model, path,
             args.task, args.steps, args.save_steps)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    data = datasets.Dataset.from_list(examples(args.task, min(args.steps * args.batch_size, MAX_EXAMPLES), args.seed))
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.steps, save_strategy="steps", save_steps=args.save_steps,
        save_only_model=True,  # what gets published; a retried pod starts from the version the fleet serves
        save_total_limit=2, per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
        logging_steps=1, seed=args.seed, report_to="none", disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    # Each checkpoint becomes the fleet's next version; a publish the trainer refuses or aborts ends the job
    # with the reason (the fleet keeps serving its committed version).
    publish = LockstepPublishCallback(trainer_url=args.trainer_url, token=token, raise_on_failure=True,
                                      metadata={"run_id": args.run_id, "task": args.task})
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[publish])
    trainer.train()
    published = [r.version for r in publish.results if r.ok]
    log.info("run %s: done; published %s", args.run_id, ", ".join(f"v{v}" for v in published) or "nothing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
