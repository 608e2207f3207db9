"""Trainer tests: one cluster of two real replicas for the whole package, and trainer processes beside it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import LocalCluster, Proc, free_port, local_cluster, spawn, wait_for

READY_S = 120.0  # generous bounds for a shared, loaded 2-core machine; every loop below is bounded by them
RUN_S = 300.0


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> Iterator[LocalCluster]:
    """Two replicas sharing a folder; tests on it compare against the state they find, not a fresh one."""
    with local_cluster(tmp_path_factory.mktemp("trainer-cluster"), builtin_dir, replicas=2) as c:
        yield c


def start_trainer(cluster: LocalCluster, name: str, *, extra_urls: tuple[str, ...] = (), **env: str) -> Proc:
    """``python -m lockstep trainer`` on the cluster's folder; static discovery of its replicas (+ extras)."""
    port = free_port()
    urls = ",".join([r.url for r in cluster.replicas] + list(extra_urls))
    proc = spawn(name, ["trainer", "--port", str(port)],
                 cluster.env(INFERENCE_URLS=urls, LOCKSTEP_REWARD_PLUGINS="tests.trainer.plugins",
                             LOCKSTEP_DISCOVERY="static", **env),
                 cluster.root / "logs", port)
    cluster.others.append(proc)
    wait_for(lambda: proc.get("/ready").status_code == 200, READY_S, 0.2,
             f"{name} ready (log: {proc.log()[-2000:]})")
    return proc


@pytest.fixture(scope="session")
def ghost_url() -> str:
    """A replica URL that discovery lists but nothing answers at (no heartbeat either)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def trainer(cluster: LocalCluster, ghost_url: str) -> Iterator[Proc]:
    """The package's trainer process (a test that kills a trainer starts its own)."""
    proc = start_trainer(cluster, "trainer", extra_urls=(ghost_url,))
    yield proc
    if proc.alive():
        proc.process.terminate()
        proc.process.wait(timeout=30)


def wait_run(trainer: Proc, run_id: str, timeout: float = RUN_S) -> dict[str, Any]:
    """Poll ``GET /runs/{id}`` until the run is no longer active; returns its last body."""
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = trainer.get(f"/runs/{run_id}").json()
        return None if body["active"] else body

    result: dict[str, Any] = wait_for(done, timeout, 0.5,
                                      f"run {run_id} to end (log: {trainer.log()[-3000:]})")
    return result
