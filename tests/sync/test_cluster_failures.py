"""Crashes and failures at every step of a publish (docs/protocol.md §4, invariant 6), with real replicas under load.

One cluster for the module; the tests run in file order and each leaves the cluster serving a committed
version. ``finish()`` checks that no request failed, every answer is labelled and worded by the version that
produced it, no stale replica answered ``/ready`` 200 past ``activate_at`` + 250 ms, and none went back to an
older version.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from lockstep.core.settings import CommitPolicy
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
    # The victim is said to be lost, not left out of the report, and it does not stop the commit. ("behind" when
    # the kill came just after it reported the stage: it was committed, then never served.)
    outcomes = {r.replica_id: r.outcome for r in result.replicas}
    assert outcomes[survivor.name] == "serving" and outcomes[victim.name] in ("lost", "behind"), result.summary()
    assert len(outcomes) == 2
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


def test_a_command_line_rollout_stopped_by_sigterm_is_rolled_back_as_on_ctrl_c(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    """Before, only Ctrl-C rolled it back: a closed terminal, a dropped `kubectl exec` or a stopped pod left the
    candidate's share in force, orphaned, until someone aborted it by hand."""
    s = scenario
    if s.committed_version() == 0:  # run alone: a version to go back to
        assert s.publish(str(tiny_dirs[1])).outcome == "committed"
        cluster.wait_all_serving(s.committed_version())
    s.close()  # no load: a step then holds until it is told otherwise
    before = s.state()
    committed = s.committed_version()
    rollout = s.start_cli("rollout-terminated", "publish", str(tiny_dirs[(committed + 1) % 3]), "--canary", "50",
                          "--step-seconds", "600", "--min-requests", "1000000", "--gate", "latency_p99=off",
                          "--gate", "kl_divergence=off", "--gate", "token_agreement=off")
    s.wait_state(lambda state: state.get("split") is not None and state["split"]["share"] == 50
                 and state["generation"] > before["generation"], "the candidate's step", timeout=120)
    rollout.send_signal(signal.SIGTERM)
    assert rollout.wait(timeout=120) != 0
    ended = s.state()
    assert ended["committed"] == before["committed"] and ended.get("split") is None
    assert ended["pending"]["phase"] == "abort" and "was stopped" in ended["pending"]["reason"]
    newest = sorted((cluster.shared / "history").glob("*.json"))[-1]
    assert json.loads(newest.read_text())["outcome"] == "rolled back"
    cluster.wait_all_serving(committed)


def test_a_coordinator_killed_after_prepare_is_completed_by_the_next_one_with_a_third_replica_that_joined(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    s = scenario
    while s.committed_version() < 3:  # the cluster grows after three versions (run alone: publish them)
        assert s.publish(str(tiny_dirs[(s.committed_version() + 1) % 3])).outcome == "committed"
    cluster.wait_all_serving(3)
    before = s.state()
    committed = before["committed"]["version"]
    coordinator = s.start_cli("publish-killed-after-prepare", "publish", str(tiny_dirs[1]),
                              "--timeout", "120", LOCKSTEP_LEASE_TTL_S=LEASE_TTL)
    prepared = s.wait_state(_pending("prepare", before), "the prepare", timeout=120)
    coordinator.kill()
    coordinator.wait()
    version = prepared["pending"]["version"]
    assert s.state()["committed"] == before["committed"]  # nothing committed: every replica keeps serving

    # 2 → 3 replicas in the middle of the abandoned update. The new one boots straight into the committed
    # version (not the initial model, not the pending one) and is ready only then. It updates in place
    # (memory-tight), which the last test of the module relies on.
    joiner = cluster.add_replica("replica-3", wait=False, LOCKSTEP_UPDATE_MODE="inplace")
    seen: list[tuple[int | None, bool]] = []

    def ready() -> bool:
        status = joiner.status()
        seen.append((status["serving_version"], status["ready"]))
        return bool(status["ready"])

    wait_for(ready, 120, 0.02, f"replica-3 ready (log: {joiner.log()[-2000:]})")
    assert {v for v, _ in seen} <= {None, committed}, seen
    assert all(v == committed for v, r in seen if r), seen
    assert "loaded builtin:tiny " not in joiner.log()
    s.serve(joiner)

    s.wait_lease_free()  # the dead coordinator's lease expires; the next one takes it over
    with caplog.at_level(logging.INFO, logger="lockstep"):
        result = s.publish(f"versions/{version}")
    assert "takes over stale lease 'coordinator' from cli@" in caplog.text
    assert f"superseding the unfinished prepare of v{version}" in caplog.text
    assert result.outcome == "committed", result.summary()
    assert sorted((r.replica_id, r.outcome) for r in result.replicas) == [
        (r.name, "serving") for r in sorted(_live(cluster), key=lambda r: r.name)]
    assert len(result.replicas) == 3
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


def fewer_layers(src: Path, dst: Path, layers: int) -> Path:
    """A copy of the model in ``src`` with only its first ``layers`` decoder layers: another architecture."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(dst / "model.safetensors")
    keep = {k: v for k, v in tensors.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(keep, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_replica_that_cannot_stage_aborts_a_strict_publish_and_lags_behind_a_quorum_one(
        scenario: UpdateScenario, cluster: LocalCluster, builtin_dir: Path, tmp_path: Path) -> None:
    s = scenario
    version = s.committed_version()
    inplace = next(r for r in _live(cluster) if r.status()["update_mode"] == "inplace")
    three_layers = fewer_layers(builtin_dir / "tiny-s2", tmp_path / "tiny-s2-3-layers", 3)

    # An in-place replica cannot take another architecture: strict aborts for everyone.
    result = s.publish(str(three_layers))
    assert result.outcome == "aborted", result.summary()
    outcomes = {r.replica_id: r.outcome for r in result.replicas}
    assert outcomes.pop(inplace.name) == "failed" and set(outcomes.values()) <= {"staged", "timeout"}
    assert "same architecture" in next(r.error for r in result.replicas if r.replica_id == inplace.name)
    assert s.committed_version() == version
    for r in _live(cluster):
        assert r.status()["serving_version"] == version and r.ready()
    def dropped(r: Proc) -> bool:
        return (r.status()["staged"] or {}).get("state") in (None, "failed")
    wait_for(lambda: all(dropped(r) for r in _live(cluster)), 60, 0.05, "the abort to drop what was staged")

    # Quorum: two of three staged, so it commits; the in-place replica is unready until it has caught up.
    result = s.publish(f"versions/{result.version}", commit_policy=CommitPolicy.QUORUM)
    assert result.outcome == "committed", result.summary()
    assert {r.replica_id: r.outcome for r in result.replicas}[inplace.name] == "failed"
    cluster.wait_all_serving(result.version)
    assert any(x.status != 200 for x in s.watch.samples_of(inplace.name) if x.sent > result.started_at)

    # Now all replicas have three layers: the in-place replica stages the next one like the others.
    result = s.publish(str(fewer_layers(builtin_dir / "tiny-s1", tmp_path / "tiny-s1-3-layers", 3)))
    assert result.outcome == "committed", result.summary()
    assert {r.outcome for r in result.replicas} == {"serving"}, result.summary()
    cluster.wait_all_serving(result.version)
    s.finish()
