"""A replica without a shared folder that its trainer does not drive still catches up with each commit."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from lockstep.inference import runtime as runtime_module
from tests.inference.conftest import replica_settings, served, wait_serving
from tests.support.cluster import serving, wait_for

WAIT_S = 120.0


def test_a_commit_the_trainer_never_pushed_makes_the_replica_unready_then_it_loads_it(
        builtin_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The trainer drives only the replicas in its INFERENCE_URLS (or found by discovery). One started with
    LOCKSTEP_COORDINATOR_URL but not listed boots into the committed version and was then never told of the next:
    it stayed ready on the old one. It must notice (GET /sync/committed, the trainer's own answer), go unready
    saying why, and load the committed version."""
    monkeypatch.setattr(runtime_module, "COMMITTED_POLL_S", 0.1)
    monkeypatch.setattr(runtime_module, "UNTOLD_GRACE_S", 0.5)
    answer: dict[str, Any] = {"committed": {"version": 2, "model": "builtin:tiny-s1"}, "generation": 4, "peers": []}
    trainer = FastAPI()
    trainer.get("/sync/committed")(lambda: answer)  # what the trainer answers; this replica gets no pushes
    with serving(trainer) as trainer_url:
        settings = replica_settings(builtin_dir, coordinator_url=trainer_url, initial_model_repo_id="builtin:tiny")
        with served(settings) as srv:
            assert wait_serving(srv.url, 2)["ready"]
            with caplog.at_level(logging.WARNING, logger="lockstep.inference.runtime"):
                answer["committed"] = {"version": 5, "model": "builtin:tiny-s2"}  # a commit pushed to others only
                status = wait_serving(srv.url, 5)
            # It said why while it was behind (last_error, cleared once it serves v5 again; and the log).
            assert "the trainer committed v5 and never told this replica" in caplog.text
            assert status["committed_version"] == 5
            wait_for(lambda: httpx.get(srv.url + "/ready", timeout=5).status_code == 200, WAIT_S, 0.05, "ready")
            answer_v = httpx.post(srv.url + "/generate", json={"prompt": "hi", "max_new_tokens": 2},
                                  timeout=WAIT_S)
            assert answer_v.headers["X-Model-Version"] == "5"

            # An update of this replica alone moves it on purpose: the trainer did not change, nothing is undone.
            local = httpx.post(srv.url + "/update-model", json={"model_repo_id": "builtin:tiny-s0"}, timeout=WAIT_S)
            assert local.status_code == 202, local.text
            wait_serving(srv.url, 6)
            time.sleep(2.0)  # four grace periods of polls
            status = srv.status()
            assert status["serving_version"] == 6 and "never told" not in (status.get("last_error") or ""), status
