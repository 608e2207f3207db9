"""Growing the cluster and replicas that cannot stage, with real replica processes under load (DESIGN.md §3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lockstep.core.settings import CommitPolicy
from tests.support.cluster import LocalCluster, Proc, wait_for
from tests.support.load import UpdateScenario

pytestmark = pytest.mark.e2e


def _live(cluster: LocalCluster) -> list[Proc]:
    return [r for r in cluster.replicas if r.alive()]


def fewer_layers(src: Path, dst: Path, layers: int) -> Path:
    """A copy of the model in ``src`` keeping only its first ``layers`` decoder layers: another architecture."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(dst / "model.safetensors")
    keep = {k: v for k, v in tensors.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(keep, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_replica_added_after_three_versions_boots_straight_into_the_committed_one(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    s = scenario
    for seed in (1, 2, 0):
        result = s.publish(str(tiny_dirs[seed]))
        assert result.outcome == "committed", result.summary()
    version = result.version
    assert version == 3
    cluster.wait_all_serving(version)

    # The third replica updates in place (memory-tight): it matters for the next test.
    joiner = cluster.add_replica("replica-3", wait=False, LOCKSTEP_UPDATE_MODE="inplace")
    seen: list[tuple[int | None, bool]] = []

    def ready() -> bool:
        status = joiner.status()
        seen.append((status["serving_version"], status["ready"]))
        return bool(status["ready"])

    wait_for(ready, 120, 0.02, f"replica-3 ready (log: {joiner.log()[-2000:]})")
    assert {v for v, _ in seen} <= {None, version}, seen  # never the initial model, nor anything else
    assert all(v == version for v, r in seen if r)
    assert "loaded builtin:tiny " not in joiner.log()
    s.serve(joiner)
    result = s.publish(str(tiny_dirs[1]))  # and it takes part in the next publish
    assert result.outcome == "committed" and len(result.replicas) == 3, result.summary()
    cluster.wait_all_serving(result.version)
    s.finish()


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
        assert (r.status()["staged"] or {}).get("state") != "staged"  # the abort dropped what was staged

    # Quorum: two of three staged, so it commits; the in-place replica is unready until it has caught up.
    result = s.publish(f"versions/{result.version}", commit_policy=CommitPolicy.QUORUM)
    assert result.outcome == "committed", result.summary()
    assert {r.replica_id: r.outcome for r in result.replicas}[inplace.name] == "failed"
    cluster.wait_all_serving(result.version)
    assert any(x.status != 200 for x in s.watch.samples if x.replica == inplace.name and x.sent > result.started_at)

    # Now all replicas have three layers: the in-place replica stages the next one like the others.
    result = s.publish(str(fewer_layers(builtin_dir / "tiny-s1", tmp_path / "tiny-s1-3-layers", 3)))
    assert result.outcome == "committed" and {r.outcome for r in result.replicas} == {"serving"}, result.summary()
    cluster.wait_all_serving(result.version)
    s.finish()
