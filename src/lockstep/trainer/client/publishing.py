"""Publishing from your own training code: a model folder or an in-memory model becomes the next version,
and every replica flips to it together.

    from lockstep.trainer.client import publish, wait_until_serving

    result = publish(model, tokenizer, shared_dir="/models", metadata={"step": 100, "loss": 1.9})
    if result.ok:
        wait_until_serving(result.version, shared_dir="/models")

Without the shared folder (another machine, a cluster without ReadWriteMany storage), pass
``trainer_url="http://trainer:8090"`` (and ``token=`` when the trainer has one) to both instead: the files
are uploaded to the trainer, which publishes them.

Only model files are published (config, safetensors weights, tokenizer files); a Trainer checkpoint's
optimizer and RNG state (pickles) stay behind. Weights must be safetensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.core.errors import BadModelRef, BadRequest
from lockstep.core.settings import CommitPolicy, Settings, load_settings
from lockstep.models.loader import save_kwargs
from lockstep.store import ModelStore
from lockstep.sync.coordinator import Coordinator, PublishResult, Source, with_lease_wait
from lockstep.sync.protocol import Heartbeat
from lockstep.sync.rollout import make_plan
from lockstep.trainer.client.http import TrainerClient
from lockstep.trainer.client.model_files import model_files

log = logging.getLogger(__name__)

__all__ = ["PublishResult", "model_files", "publish", "wait_until_serving"]



def _settings(shared_dir: str | Path | None, settings: Settings | None) -> Settings:
    if settings is None:
        settings = load_settings(shared_dir=Path(shared_dir) if shared_dir is not None else None)
    elif shared_dir is not None:
        settings = settings.model_copy(update={"shared_dir": Path(shared_dir)})
    if settings.shared_dir is None:
        raise BadRequest("publishing needs the shared folder (pass shared_dir= or set LOCKSTEP_SHARED_DIR) or "
                         "the trainer (pass trainer_url=)")
    return settings


def _stage_folder(path_or_model: Any, tokenizer: Any, tmp: Path) -> Path:
    """A folder holding only what gets published (weights, config, tokenizer)."""
    if hasattr(path_or_model, "save_pretrained") and not isinstance(path_or_model, (str, Path)):
        path_or_model.save_pretrained(tmp, **save_kwargs(path_or_model.save_pretrained))
    else:
        src = Path(path_or_model)
        if not src.is_dir():
            raise BadModelRef(f"{src} is not a model folder")
        files = model_files(src)
        if not any(f.endswith(".safetensors") for f in files):
            raise BadModelRef(f"{src} has no *.safetensors weights (only safetensors are published; with "
                              "transformers < 5 set save_safetensors=True)")
        for name in files:
            shutil.copy2(src / name, tmp / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if not any((tmp / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise BadRequest("the model has no tokenizer files, and replicas need them: pass tokenizer= (or give "
                         "the Trainer a processing_class so checkpoints include it)")
    # Files the replicas must not load: anything written by save_pretrained that is not a model file.
    for extra in set(p.name for p in tmp.iterdir()) - set(model_files(tmp)):
        path = tmp / extra
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return tmp


@contextlib.contextmanager
def _upload_bar(trainer_url: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (when it is a terminal) for an upload: ``progress(sent, total)``."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"uploading to {trainer_url}", total=None)
        yield lambda sent, total: bar.update(task, completed=sent, total=total)


def publish(path_or_model: str | Path | Any, tokenizer: Any = None, *, shared_dir: str | Path | None = None,
            metadata: dict[str, Any] | None = None, settings: Settings | None = None,
            policy: CommitPolicy | None = None, timeout_s: float | None = None, label: str | None = None,
            trainer_url: str | None = None, token: str | None = None, rollout: dict[str, Any] | None = None,
            clock: Clock = SYSTEM_CLOCK) -> PublishResult:
    """Publish a model folder (or a ``PreTrainedModel`` + tokenizer) as the next version, in two phases.

    Blocks until every live replica staged it and it was committed (``result.outcome == "committed"``), or
    it was aborted (``result.reason`` says why; the cluster keeps its committed version). ``metadata`` goes
    into the version's MANIFEST.json (step, loss, reward...). With ``trainer_url`` the files are uploaded to
    that trainer (``token``: its LOCKSTEP_API_TOKEN), which publishes them; no shared folder is needed.
    ``rollout`` (``canary``, ``step_seconds``, ``min_requests``, ``shadow``, ``gates``, ``task``; docs/api.md,
    Rollouts): staged everywhere, then given its shares step by step; ``outcome`` is ``rolled back`` when a gate
    or a person stopped it.
    """
    plan = None
    if rollout and not trainer_url:  # checked before anything is copied
        unknown = set(rollout) - {"canary", "step_seconds", "min_requests", "shadow", "gates"}
        if unknown:
            raise BadRequest(f"rollout takes canary, step_seconds, min_requests, shadow and gates over a shared "
                             f"folder (task needs trainer_url); got {sorted(unknown)}")
        plan = make_plan(rollout.get("canary"), step_seconds=rollout.get("step_seconds", 60.0),
                         min_requests=rollout.get("min_requests", 100), shadow=rollout.get("shadow", 0.0),
                         gate_specs=rollout.get("gates"))
    owner = f"publish-api@{socket.gethostname()}:{os.getpid()}"
    origin = label or (str(Path(path_or_model).resolve()) if isinstance(path_or_model, (str, Path))
                       else f"{type(path_or_model).__name__} from {owner}")
    coordinator = None if trainer_url else Coordinator(_settings(shared_dir, settings), clock=clock, owner=owner)
    with tempfile.TemporaryDirectory(prefix="lockstep-publish-") as tmp:
        folder = _stage_folder(path_or_model, tokenizer, Path(tmp))
        if coordinator is None:
            assert trainer_url is not None
            with TrainerClient(trainer_url, token=token) as client, _upload_bar(trainer_url) as progress:
                result = client.publish_folder(folder, label=origin, metadata=metadata, policy=policy,
                                               timeout_s=timeout_s, progress=progress, rollout=rollout)
            log.info("published %s through %s: %s", origin, trainer_url, result.summary())
            return result
        state = coordinator.read_state()
        parent = state.committed.version if state.committed else 0
        meta = {**(metadata or {}), "parent": parent}  # the version committed before: not the caller's to say
        manifest = coordinator.store.publish_dir(folder, source=origin, parent=parent, metadata=meta,
                                                 allow_pickle=coordinator.settings.allow_pickle)
    ref = ModelStore.ref(manifest.version)
    source = Source(manifest.version, ref, manifest.digest)
    if plan is not None:
        result = with_lease_wait(lambda: coordinator.rollout(ref, plan, source=source, timeout_s=timeout_s), clock)
    else:
        result = with_lease_wait(lambda: coordinator.publish(ref, source=source, policy=policy,
                                                             timeout_s=timeout_s), clock)
    log.info("published %s: %s", origin, result.summary())
    return result


def wait_until_serving(version: int, *, shared_dir: str | Path | None = None,
                       settings: Settings | None = None, timeout_s: float = 60.0, min_replicas: int = 1,
                       trainer_url: str | None = None, token: str | None = None,
                       clock: Clock = SYSTEM_CLOCK) -> list[Heartbeat] | list[dict[str, Any]]:
    """Block until every live replica (at least ``min_replicas``) serves ``version``; else Conflict.

    Reads the heartbeats in the shared folder, or (with ``trainer_url``) the trainer's ``GET /cluster``."""
    if trainer_url is not None:
        with TrainerClient(trainer_url, token=token) as client:
            return client.wait_until_serving(version, timeout_s=timeout_s, min_replicas=min_replicas)
    coordinator = Coordinator(_settings(shared_dir, settings), clock=clock, owner="wait-until-serving")
    return coordinator.wait_until_serving(version, timeout_s=timeout_s, min_replicas=min_replicas)
