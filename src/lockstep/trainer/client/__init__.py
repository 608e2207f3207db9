"""Publishing from your own training code: ``publish``, ``wait_until_serving``, the transformers callback and
``TrainerClient`` (the trainer's HTTP API). Imports nothing of the trainer's server.

    from lockstep.trainer.client import publish, wait_until_serving
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lockstep.sync.coordinator import PublishResult
from lockstep.trainer.client.http import TrainerClient
from lockstep.trainer.client.publishing import model_files, publish, wait_until_serving

if TYPE_CHECKING:
    from lockstep.trainer.client.callback import LockstepPublishCallback

__all__ = ["LockstepPublishCallback", "PublishResult", "TrainerClient", "model_files", "publish",
           "wait_until_serving"]


def __getattr__(name: str) -> Any:
    # The callback imports transformers (seconds): only who asks for it pays, not `lockstep publish`.
    if name == "LockstepPublishCallback":
        from lockstep.trainer.client.callback import LockstepPublishCallback

        return LockstepPublishCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
