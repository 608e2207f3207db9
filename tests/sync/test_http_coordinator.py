"""The two phases over HTTP, for clusters without a shared volume: real replicas, no shared folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lockstep.core.clock import SYSTEM_CLOCK
from lockstep.core.settings import CommitPolicy, Settings
from lockstep.sync.http_coordinator import HttpCoordinator
from tests.support.cluster import Proc, base_env, free_port, spawn, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def replicas(builtin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    logs = tmp_path_factory.mktemp("http-replicas")
    procs = []
    for i in range(2):
        port = free_port()
        procs.append(spawn(f"r{i}", ["serve", "--port", str(port)], base_env(builtin_dir, LOCKSTEP_REPLICA_ID=f"r{i}"),
                           logs, port))
    try:
        for p in procs:
            wait_for(p.ready, 120, 0.1, f"{p.name} ready ({p.log()[-1000:]})")
        yield procs
    finally:
        for p in procs:
            p.kill()


def test_stage_then_commit_flips_every_replica_to_the_same_version(replicas: list[Proc]) -> None:
    settings = Settings(poll_interval_s=0.05, stage_timeout_s=120)
    result = HttpCoordinator(settings, [p.url for p in replicas], clock=SYSTEM_CLOCK).publish("builtin:tiny-s1")
    assert result.outcome == "committed", result.summary()
    assert {r.outcome for r in result.replicas} == {"serving"}
    assert len({r.weights_digest for r in result.replicas}) == 1
    for p in replicas:
        wait_for(lambda p=p: p.status()["serving_version"] == result.version, 30, 0.05, f"{p.name} flipped")
        answer = p.post("/generate", json={"prompt": "The cat", "max_new_tokens": 4, "temperature": 0})
        assert answer.headers["x-model-version"] == str(result.version)


def test_a_replica_that_cannot_stage_aborts_a_strict_publish_for_all(replicas: list[Proc], tmp_path: Path) -> None:
    before = [p.status()["serving_version"] for p in replicas]
    missing = tmp_path / "not-a-model"
    missing.mkdir()  # exists (so the reference parses) but holds no weights: staging fails on every replica
    settings = Settings(poll_interval_s=0.05, stage_timeout_s=60, commit_policy=CommitPolicy.STRICT)
    result = HttpCoordinator(settings, [p.url for p in replicas], clock=SYSTEM_CLOCK).publish(str(missing))
    assert result.outcome == "aborted" and result.reason and "did not stage" in result.reason
    assert [p.status()["serving_version"] for p in replicas] == before
    assert all(p.ready() for p in replicas)


def test_stage_and_commit_need_the_token_when_one_is_configured(builtin_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = spawn("guarded", ["serve", "--port", str(port)], base_env(builtin_dir, LOCKSTEP_API_TOKEN="s3cret"),
                 tmp_path, port)
    try:
        wait_for(proc.ready, 120, 0.1, "guarded replica ready")
        body = {"model": "builtin:tiny-s1", "version": 1}
        assert httpx.post(proc.url + "/admin/stage", json=body).status_code == 401
        assert httpx.post(proc.url + "/admin/commit", json={"version": 1}).status_code == 401
        ok = httpx.post(proc.url + "/admin/stage", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 202
    finally:
        proc.kill()
