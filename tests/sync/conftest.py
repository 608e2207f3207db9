"""Fixtures of the sync tests: one local cluster per module, a watched and loaded scenario per test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import LocalCluster, local_cluster
from tests.support.load import UpdateScenario


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> Iterator[LocalCluster]:
    """Two replicas sharing a folder for a module's tests; each leaves it serving a committed version."""
    with local_cluster(tmp_path_factory.mktemp("cluster"), builtin_dir, replicas=2) as c:
        yield c


@pytest.fixture
def scenario(cluster: LocalCluster) -> Iterator[UpdateScenario]:
    """The cluster under load with its readiness watched; the test ends with ``finish()``, which checks."""
    path = cluster.shared / "sync_state.json"
    committed = json.loads(path.read_text())["committed"]["version"] if path.exists() else 0
    cluster.wait_all_serving(committed)  # start settled, whatever the previous test did
    s = UpdateScenario(cluster)
    yield s
    s.close()


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """An empty folder standing in for the shared volume."""
    path = tmp_path / "shared"
    path.mkdir()
    return path
