"""``LockstepPublishCallback``: a transformers ``TrainerCallback`` that publishes every saved checkpoint.

    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=[LockstepPublishCallback(shared_dir="/models")])

Without the shared folder, ``LockstepPublishCallback(trainer_url="http://trainer:8090", token=...)`` uploads
each checkpoint to the trainer, which publishes it.

Each ``on_save`` publishes ``<output_dir>/checkpoint-<step>`` (its safetensors weights, config and tokenizer)
as the next version with ``step``, ``epoch`` and the last logged ``loss`` in its MANIFEST, then (by default)
waits until every replica serves it. A publish that is aborted leaves the cluster on its committed version;
training goes on unless ``raise_on_failure`` is set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import Conflict, LockstepError
from lockstep.core.settings import CommitPolicy, Settings
from lockstep.sync.coordinator import PublishResult
from lockstep.trainer.client.publishing import publish, wait_until_serving

log = logging.getLogger(__name__)


class LockstepPublishCallback(TrainerCallback):  # type: ignore[misc]
    """Publishes each checkpoint the Trainer saves; ``results`` lists what each publish did."""

    def __init__(self, shared_dir: str | Path | None = None, *, tokenizer: Any = None,
                 settings: Settings | None = None, metadata: dict[str, Any] | None = None,
                 wait_serving: bool = True, serving_timeout_s: float = 120.0,
                 policy: CommitPolicy | None = None, timeout_s: float | None = None,
                 raise_on_failure: bool = False, trainer_url: str | None = None, token: str | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.shared_dir = shared_dir
        self.trainer_url = trainer_url
        self.token = token
        self.tokenizer = tokenizer
        self.settings = settings
        self.metadata = dict(metadata or {})
        self.wait_serving = wait_serving
        self.serving_timeout_s = serving_timeout_s
        self.policy = policy
        self.timeout_s = timeout_s
        self.raise_on_failure = raise_on_failure
        self.clock = clock
        self.results: list[PublishResult] = []

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return  # one process publishes
        checkpoint = Path(args.output_dir or ".") / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not checkpoint.is_dir():
            log.warning("no checkpoint folder at %s; nothing published", checkpoint)
            return
        losses = [e["loss"] for e in state.log_history if "loss" in e]
        metadata = {"step": state.global_step, "epoch": state.epoch, "loss": losses[-1] if losses else None,
                    "source": "transformers.Trainer", **self.metadata}
        tokenizer = self.tokenizer or kwargs.get("processing_class") or kwargs.get("tokenizer")
        try:
            result = publish(checkpoint, tokenizer, shared_dir=self.shared_dir, settings=self.settings,
                             metadata=metadata, policy=self.policy, timeout_s=self.timeout_s,
                             label=f"{checkpoint} (transformers.Trainer step {state.global_step})",
                             trainer_url=self.trainer_url, token=self.token, clock=self.clock)
        except LockstepError as exc:
            log.error("publishing %s failed: %s", checkpoint, exc)
            if self.raise_on_failure:
                raise
            return
        self.results.append(result)
        if not result.ok:
            log.error("checkpoint %s was not published: %s", checkpoint, result.summary())
            if self.raise_on_failure:
                raise Conflict(f"checkpoint {checkpoint} was not published: {result.summary()}")
            return
        log.info("checkpoint %s is v%d (%s)", checkpoint, result.version, result.outcome)
        if self.wait_serving and result.outcome == "committed":
            wait_until_serving(result.version, shared_dir=self.shared_dir, settings=self.settings,
                               timeout_s=self.serving_timeout_s, trainer_url=self.trainer_url, token=self.token,
                               clock=self.clock)
