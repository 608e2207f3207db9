"""The ``finetune`` run's updates on TRL: a ``GRPOTrainer`` whose rollouts come from the fleet and whose saved
checkpoints become versions, through TRL's own extension points (``rollout_func``, reward functions, callbacks).

Lockstep sets what ties TRL to the run: batch = ``batch_size`` × ``group_size``, ``num_generations`` =
``group_size``, the sampling temperature, float32 weights on the trainer's device, and a checkpoint every
``publish_every`` steps. The run's parameters name TRL's loss and KL options, and ``trl_args`` passes the
tuning options in ``TRL_TUNABLE`` through, each within its bounds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictStr, TypeAdapter, ValidationError

from lockstep.core.errors import BadRequest
from lockstep.core.fields import Number
from lockstep.trainer.runs.context import RunContext
from lockstep.trainer.runs.releases import Releases
from lockstep.trainer.runs.staleness import SampleBook, VersionWindow
from lockstep.trainer.server.schemas import FinetuneParams

log = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2  # transformers checkpoints per run: the newest is what a resume starts from
# GRPOConfig options a run may set in params.trl_args, each with the values it may take (TRL checks little of
# them itself: a zero SAPO temperature trains NaN weights, an Adam beta of 5 fails only in the first step).
# Everything else is either set by Lockstep (batch, generations, checkpoints, devices) or belongs to training
# infrastructure (vLLM, hubs, distributed back-ends) that a run on the trainer does not choose.
Ratio = Annotated[Number, Field(ge=0, lt=1)]
Temperature = Annotated[Number, Field(ge=0.01, le=100)]
TRL_TUNABLE: dict[str, Any] = {
    "epsilon_high": Annotated[Number, Field(gt=0, le=10)],  # like epsilon
    "delta": Annotated[Number, Field(gt=1, le=1000)],  # two-sided clipping: TRL recommends > 1 + epsilon
    "importance_sampling_level": Literal["token", "sequence"],
    "mask_truncated_completions": StrictBool,
    "top_entropy_quantile": Annotated[Number, Field(gt=0, le=1)],
    "lr_scheduler_type": Annotated[StrictStr, Field(min_length=1, max_length=64)],  # transformers names them
    "warmup_steps": Annotated[Number, Field(ge=0, le=1_000_000)],  # below 1: a fraction of the steps
    "adam_beta1": Ratio,
    "adam_beta2": Ratio,
    "adam_epsilon": Annotated[Number, Field(gt=0, le=1)],
    "entropy_coef": Annotated[Number, Field(ge=-1, le=1)],
    "off_policy_mask_threshold": Annotated[Number, Field(ge=0, le=1000)],
    "use_bias_correction_kl": StrictBool,
    "sapo_temperature_neg": Temperature,
    "sapo_temperature_pos": Temperature,
}
_CHECKERS = {name: TypeAdapter(kind) for name, kind in TRL_TUNABLE.items()}


def check_trl_args(args: dict[str, Any]) -> dict[str, Any]:
    """The options checked against their bounds (400 naming the option and what it may be), values as TRL takes
    them (floats where a number is expected)."""
    checked: dict[str, Any] = {}
    for key, value in args.items():
        checker = _CHECKERS.get(key)
        if checker is None:
            raise BadRequest(f"params.trl_args.{key} is not a TRL option a run may set; allowed: "
                             f"{', '.join(sorted(TRL_TUNABLE))} (the others are set by the run's own parameters)")
        try:
            checked[key] = checker.validate_python(value)
        except ValidationError as exc:
            raise BadRequest(f"params.trl_args.{key}: {exc.errors()[0]['msg']}") from None
    return checked


def grpo_config(p: FinetuneParams, output_dir: Path) -> Any:
    """TRL's ``GRPOConfig`` for the run; a bad ``trl_args`` value is a 400 with TRL's own message."""
    from trl import GRPOConfig

    trl_args = check_trl_args(p.trl_args)
    try:
        return GRPOConfig(
            output_dir=str(output_dir), max_steps=p.steps, per_device_train_batch_size=p.batch_size * p.group_size,
            num_generations=p.group_size, max_completion_length=p.max_new_tokens, temperature=p.temperature,
            top_k=p.top_k, loss_type=p.loss_type, beta=p.beta, epsilon=p.epsilon, scale_rewards=p.scale_rewards,
            num_iterations=p.num_iterations, save_strategy="steps", save_steps=p.publish_every,
            save_total_limit=CHECKPOINTS_KEPT, seed=p.seed, data_seed=p.seed, shuffle_dataset=False,
            **training_args(p, lr_scheduler_type=trl_args.pop("lr_scheduler_type", "constant")), **trl_args)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"TRL refuses the run's options: {exc}") from exc


def check_scheduler(config: Any, steps: int) -> None:
    """Build the run's learning-rate schedule as its trainer will, on a stand-in optimizer: transformers does
    so only inside ``train()``, and a schedule that needs options a run cannot pass (``cosine_with_min_lr``
    wants a minimum) would fail the run after it was accepted."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    try:
        get_scheduler(config.lr_scheduler_type, optimizer=optimizer,
                      num_warmup_steps=config.get_warmup_steps(steps), num_training_steps=steps,
                      scheduler_specific_kwargs=config.lr_scheduler_kwargs)
    except (TypeError, ValueError) as exc:
        name = getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)
        raise BadRequest(f"params.trl_args.lr_scheduler_type {str(name)!r} cannot run with the options a run may "
                         f"set: {exc}") from None


def training_args(p: FinetuneParams, lr_scheduler_type: str = "constant") -> dict[str, Any]:
    """What every TRL trainer of a run shares: the optimizer settings, the precision on the trainer's device, a
    log entry per step and no reporting elsewhere (the run's metrics carry it)."""
    import torch

    cuda = bool(torch.cuda.is_available()) and os.environ.get("CUDA_VISIBLE_DEVICES") != ""
    return {"learning_rate": p.learning_rate, "weight_decay": p.weight_decay, "max_grad_norm": p.max_grad_norm,
            "lr_scheduler_type": lr_scheduler_type, "logging_steps": 1, "report_to": [], "disable_tqdm": True,
            "use_cpu": not cuda, "bf16": p.precision == "bf16", "fp16": False, "gradient_checkpointing": False,
            "dataloader_num_workers": 0}


def quiet(trainer: Any) -> None:
    """transformers prints every log line to stdout; the run's metrics already carry them."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)


def run_callback(ctx: RunContext, p: FinetuneParams, window: VersionWindow, book: SampleBook,
                 releases: Releases) -> Any:
    """The ``TrainerCallback`` that ties TRL's loop to the run: metrics, stop, and a release per checkpoint."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class RunCallback(TrainerCallback):  # type: ignore[misc]
        """Step metrics with the version tags of the samples, stop on request, publish every checkpoint."""

        last: dict[str, Any] = {}

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **_: Any) -> None:
            if not logs or "loss" not in logs:
                return
            if (state.global_step - 1) % p.num_iterations:  # TRL trains on the last step's answers again
                book.reuse_last_batch()
            used = book.take_step()
            self.last = {"loss": round(float(logs["loss"]), 6), "reward": round(float(logs.get("reward", 0)), 6)}
            ctx.metric({"type": "step", "step": state.global_step, **self.last, "version": window.latest,
                        "publishing": window.publishing, "samples": used.used, "stale": used.dropped_stale,
                        "foreign": used.foreign, "errors": used.errors, "mislabeled": used.mislabeled,
                        "staleness": used.staleness, "sample_versions": used.versions,
                        "rollout_wait_s": round(book.take_wait(), 3),
                        "publish_wait_s": round(releases.take_publish_wait(), 3),
                        **{k.replace("/", "_"): v for k, v in logs.items()
                           if k in ("reward_std", "grad_norm", "entropy", "kl", "clip_ratio/region_mean",
                                    "completions/mean_length", "step_time")}})

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            ctx.progress(state.global_step, p.steps, f"step {state.global_step}/{p.steps} "
                         f"(fleet on v{window.latest})")
            if state.global_step >= p.steps:
                control.should_save = True  # the last step is always published, a stop during it or not
            elif ctx.stopping():
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            releases.release(checkpoint, state.global_step, dict(self.last))

    return RunCallback()
