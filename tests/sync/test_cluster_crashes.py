"""Crashes at every step of a publish (DESIGN.md §3, invariant 6), with real replica processes under load.

One cluster for the module; each test leaves it serving a committed version, and ``finish()`` checks that no
request failed, every answer is labelled and worded by the version that produced it, no stale replica
answered ``/ready`` 200 past ``activate_at`` + 250 ms, and no replica went back to an older version.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import LocalCluster, Proc, wait_for
from tests.support.load import UpdateScenario

pytestmark = pytest.mark.e2e

LEASE_TTL = "2"  # seconds: a killed coordinator's lease expires quickly


def _pending(phase: str, after: dict[str, Any]) -> Any:
    """A predicate on sync_state: a pending version in ``phase``, written after the state ``after``."""
    def check(state: dict[str, Any]) -> bool:
        pending = state.get("pending") or {}
        return pending.get("phase") == phase and state["generation"] > after["generation"]
    return check


def _live(cluster: LocalCluster) -> list[Proc]:
    return [r for r in cluster.replicas if r.alive()]


def _staged_state(proc: Proc) -> str | None:
    return (proc.status().get("staged") or {}).get("state")


def test_a_replica_killed_while_it_stages_comes_back_at_the_version_the_others_committed(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    s = scenario
    survivor, victim = _live(cluster)
    publish = s.publish_in_background(str(tiny_dirs[1]))
    wait_for(lambda: _staged_state(victim) == "staging", 60, 0.01, f"{victim.name} staging")
    s.kill(victim)

    result = publish.result(timeout=120)  # the victim's heartbeat goes stale; the survivor alone is live
    assert result.outcome == "committed", result.summary()
    assert [(r.replica_id, r.outcome) for r in result.replicas] == [(survivor.name, "serving")]
    cluster.wait_all_serving(result.version)

    back = cluster.add_replica(victim.name)  # boots straight into the committed version, ready only then
    assert back.status()["serving_version"] == result.version
    s.serve(back)
    assert s.publish(str(tiny_dirs[2])).outcome == "committed"  # the next publish involves both
    cluster.wait_all_serving(result.version + 1)
    s.finish()


def test_a_replica_killed_as_it_flips_does_not_stop_the_others(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    s = scenario
    victim, survivor = _live(cluster)
    before = s.state()
    publish = s.publish_in_background(str(tiny_dirs[0]))
    state = s.wait_state(_pending("commit", before), "the commit")
    time.sleep(max(0.0, state["committed"]["activate_at"] - time.time()))
    s.kill(victim)

    result = publish.result(timeout=120)
    assert result.outcome == "committed", result.summary()
    assert dict((r.replica_id, r.outcome) for r in result.replicas)[survivor.name] == "serving"
    cluster.wait_all_serving(result.version)
    back = cluster.add_replica(victim.name)
    assert back.status()["serving_version"] == result.version
    s.serve(back)
    s.finish()


def test_a_coordinator_killed_after_prepare_is_completed_by_the_next_one_while_a_replica_joins(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    s = scenario
    before = s.state()
    coordinator = s.start_cli("publish-killed-after-prepare", "publish", str(tiny_dirs[1]), "--timeout", "120",
                              LOCKSTEP_LEASE_TTL_S=LEASE_TTL)
    prepared = s.wait_state(_pending("prepare", before), "the prepare", timeout=120)
    coordinator.kill()
    coordinator.wait()
    version = prepared["pending"]["version"]
    assert s.state()["committed"] == before["committed"]  # nothing committed: every replica keeps serving

    # A replica started now, in the middle of the abandoned update, serves the committed version.
    joiner = cluster.add_replica("replica-3")
    assert joiner.status()["serving_version"] == before["committed"]["version"]
    s.serve(joiner)

    s.wait_lease_free()  # the dead coordinator's lease expires; the next one takes it over
    result = s.publish(f"versions/{version}")
    assert result.outcome == "committed", result.summary()
    assert sorted(r.replica_id for r in result.replicas) == sorted(r.name for r in _live(cluster))
    assert result.generation > prepared["generation"]  # it went on from sync_state.json
    cluster.wait_all_serving(version)
    s.finish()


def test_a_coordinator_killed_after_commit_still_flips_everyone_then_rollback_and_status_work(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    s = scenario
    start = s.state()
    before = start["committed"]["version"]
    coordinator = s.start_cli("publish-killed-after-commit", "publish", str(tiny_dirs[0]),
                              LOCKSTEP_LEASE_TTL_S=LEASE_TTL)
    committed = s.wait_state(_pending("commit", start), "the commit", timeout=120)
    coordinator.kill()
    coordinator.wait()
    version = committed["committed"]["version"]
    cluster.wait_all_serving(version)  # replicas flip at activate_at on their own

    s.wait_lease_free()
    status = cluster.run_cli("status")
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"committed: v{version} " in status.stdout
    for proc in _live(cluster):
        assert proc.name in status.stdout

    rollback = cluster.run_cli("rollback")  # the version before the committed one, through both phases
    assert rollback.returncode == 0, rollback.stdout[-2000:] + rollback.stderr[-2000:]
    state = s.state()
    assert state["committed"]["version"] == before and state["committed"]["rollback"] is True
    assert state["pending"]["phase"] == "commit" and state["generation"] == committed["generation"] + 2
    cluster.wait_all_serving(before)
    s.finish()
