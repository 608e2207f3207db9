"""A replica killed (-9) while it stages or while it flips: the others commit, it comes back at the committed version."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.cluster import local_cluster, wait_for
from tests.support.load import UpdateScenario

pytestmark = pytest.mark.e2e


def _pending(state: dict, phase: str, version: int) -> bool:
    pending = state.get("pending") or {}
    return pending.get("phase") == phase and pending.get("version") == version


def test_a_replica_killed_while_staging_or_flipping_rejoins_at_the_committed_version(
        tmp_path: Path, builtin_dir: Path, tiny_dirs: dict[int, Path]) -> None:
    with local_cluster(tmp_path, builtin_dir, replicas=2) as cluster:
        s = UpdateScenario(cluster)
        r1, r2 = cluster.replicas

        # kill -9 replica-2 in the middle of loading v1: once its heartbeat is stale, replica-1 alone commits
        publish = s.start_cli("publish-v1", "publish", str(tiny_dirs[1]), "--timeout", "60")
        wait_for(lambda: (r2.status().get("staged") or {}).get("state") == "staging", 60, 0.01,
                 "replica-2 staging v1")
        s.kill(r2)
        assert publish.wait(120) == 0, cluster.others[-1].log()[-3000:]
        assert s.committed_version() == 1
        cluster.wait_all_serving(1)
        r2 = cluster.add_replica("replica-2")  # boots straight into the committed v1
        assert r2.status()["serving_version"] == 1
        s.serve(r2)

        # kill -9 replica-1 at the very moment it is to flip to v2
        publish = s.start_cli("publish-v2", "publish", str(tiny_dirs[2]), "--timeout", "60")
        state = s.wait_state(lambda st: _pending(st, "commit", 2), "the commit of v2")
        time.sleep(max(0.0, state["pending"]["activate_at"] - time.time()))
        s.kill(r1)
        assert publish.wait(120) == 0, cluster.others[-1].log()[-3000:]
        cluster.wait_all_serving(2)
        r1 = cluster.add_replica("replica-1")
        assert r1.status()["serving_version"] == 2
        s.serve(r1)

        # and the next publish goes through on both
        result = cluster.publish(str(tiny_dirs[0]))
        assert result.returncode == 0, result.stderr[-3000:]
        cluster.wait_all_serving(3)
        s.finish()
