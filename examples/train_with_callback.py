"""Train with transformers' ``Trainer`` and publish every checkpoint to a running Lockstep cluster.

A few steps of causal-LM training of the built-in tiny model on the shipped corpus; each saved checkpoint
becomes the next version, and every replica flips to it before training goes on.

    lockstep up --shared var/shared &                 # or any replicas sharing var/shared
    python examples/train_with_callback.py --shared var/shared --steps 20 --save-steps 10

Without access to the shared folder (another machine, a cluster without ReadWriteMany storage), name the
trainer instead; each checkpoint is uploaded to it (token: LOCKSTEP_API_TOKEN):

    python examples/train_with_callback.py --trainer http://127.0.0.1:8090 --steps 20 --save-steps 10

Swap ``--model`` for any model reference (``versions/N``, a local folder, a repo id).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from lockstep.core.settings import load_settings
from lockstep.models import loader
from lockstep.models.tiny import corpus_text
from lockstep.trainer.client import LockstepPublishCallback


class CorpusBlocks(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The corpus cut into fixed-length blocks of token ids (labels = inputs: causal LM)."""

    def __init__(self, tokenizer: object, block: int) -> None:
        ids = tokenizer(corpus_text())["input_ids"]  # type: ignore[operator]
        self.blocks = [ids[i:i + block] for i in range(0, len(ids) - block, block)]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.blocks[i])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--shared", help="the cluster's shared folder")
    where.add_argument("--trainer", metavar="URL", help="publish through the trainer at URL (files uploaded)")
    parser.add_argument("--model", default="builtin:tiny", help="model reference to start from")
    parser.add_argument("--output", default=None,
                        help="checkpoints (default: <shared>/../callback-run, or ./callback-run with --trainer)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    settings = load_settings(shared_dir=Path(args.shared) if args.shared else None)
    files = loader.resolve(args.model, settings).path  # builds builtin:* offline on first use
    tokenizer = AutoTokenizer.from_pretrained(files)
    model = AutoModelForCausalLM.from_pretrained(files, dtype=torch.float32)
    default_output = Path(args.shared).resolve().parent / "callback-run" if args.shared else Path("callback-run")
    output = Path(args.output) if args.output else default_output

    training = TrainingArguments(
        output_dir=str(output), max_steps=args.steps, save_strategy="steps", save_steps=args.save_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, logging_steps=1,
        report_to="none", use_cpu=True, dataloader_num_workers=0, save_total_limit=2,
    )
    callback = LockstepPublishCallback(settings=settings, metadata={"example": "train_with_callback"},
                                       trainer_url=args.trainer, token=settings.api_token)
    trainer = Trainer(model=model, args=training, train_dataset=CorpusBlocks(tokenizer, 64),
                      processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    for result in callback.results:
        print(result.summary())
    return 0 if callback.results and all(r.ok for r in callback.results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
