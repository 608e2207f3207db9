"""Bad input at the shared folder, with real replica processes under load (docs/protocol.md §2–§3).

Torn or hand-written ``sync_state.json``, the seed's legacy format, references that must be refused before any
replica stages, corrupted weight files, and the shared folder vanishing for a moment. After each, the cluster
keeps serving its committed version and the next publish works.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from lockstep.core.errors import BadModelRef, NotFound, VerificationError
from lockstep.store import ModelStore
from tests.support.cluster import LocalCluster, Proc, wait_for
from tests.support.load import UpdateScenario
from tests.support.stores import chunk_paths, distinct_model

pytestmark = pytest.mark.e2e


def _live(cluster: LocalCluster) -> list[Proc]:
    return [r for r in cluster.replicas if r.alive()]


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(".hand-written.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _logged_everywhere(cluster: LocalCluster, text: str, after: dict[str, int]) -> None:
    """Every live replica logged ``text`` more often than it had at ``after`` (per replica counts)."""
    wait_for(lambda: all(r.log().count(text) > after.get(r.name, 0) for r in _live(cluster)), 30, 0.05,
             f"every replica to log {text!r}")


def _counts(cluster: LocalCluster, text: str) -> dict[str, int]:
    return {r.name: r.log().count(text) for r in _live(cluster)}


def _still_serving(cluster: LocalCluster, version: int) -> None:
    time.sleep(0.3)  # several poll intervals: time enough to act on the file, were it accepted
    for r in _live(cluster):
        status = r.status()
        assert (status["serving_version"], status["ready"]) == (version, True), status


def _flip_byte(path: Path, offset: int = -100) -> None:
    """Change one byte inside the file (same size: only hashing can tell)."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_torn_empty_or_garbage_sync_state_is_logged_and_ignored(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    s = scenario
    assert s.publish(str(tiny_dirs[1])).outcome == "committed"
    version = s.committed_version()
    cluster.wait_all_serving(version)
    good = s.sync_path.read_bytes()
    for content in (good[: len(good) // 2], b"", b"\x00\xff not json {"):
        seen = _counts(cluster, "keeping the last good state")
        s.sync_path.write_bytes(content)  # in place, as a writer that does not rename would leave it
        _logged_everywhere(cluster, "keeping the last good state", seen)
        _still_serving(cluster, version)

    result = s.publish(str(tiny_dirs[2]))  # the coordinator rebuilds the state from the heartbeats
    assert result.outcome == "committed", result.summary()
    cluster.wait_all_serving(result.version)
    assert s.committed_version() == result.version
    s.finish()


def test_hand_written_states_that_go_backwards_or_break_the_schema_are_ignored(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    s = scenario
    state = s.state()
    version, generation = state["committed"]["version"], state["generation"]
    older = {"version": version - 1, "model": f"versions/{version - 1:06d}"}
    variants: list[tuple[str, dict[str, Any]]] = [
        ("has no committed version", {**state, "generation": generation + 3, "committed": None}),
        ("field 'committed.model'", {**state, "generation": generation + 5,
                                     "committed": {"version": version - 1}}),
        ("field 'generation'", {**state, "generation": "eleven"}),
        ("without a rollback", {**state, "generation": generation + 7, "pending": None, "committed": older}),
    ]
    for reason, content in variants:
        seen = _counts(cluster, reason)
        _write_atomically(s.sync_path, json.dumps(content).encode())
        _logged_everywhere(cluster, reason, seen)
        _still_serving(cluster, version)
    result = s.publish(str(tiny_dirs[1]))  # goes on from what the replicas hold, not from the file
    assert result.outcome == "committed", result.summary()
    cluster.wait_all_serving(result.version)

    # A lower generation, even one that says "rollback": replicas must not go back to an older version.
    state = s.state()
    version = state["committed"]["version"]
    seen = _counts(cluster, "is lower than")
    lower = {**state, "generation": state["generation"] - 1, "pending": None,
             "committed": {**older, "rollback": True}}
    _write_atomically(s.sync_path, json.dumps(lower).encode())
    _logged_everywhere(cluster, "is lower than", seen)
    _still_serving(cluster, version)
    result = s.publish(str(tiny_dirs[0]))
    assert result.outcome == "committed", result.summary()
    cluster.wait_all_serving(result.version)
    s.finish()


def test_the_seeds_legacy_line_becomes_a_two_phase_commit_of_a_new_version(
        scenario: UpdateScenario, cluster: LocalCluster) -> None:
    s = scenario
    before = s.state()
    _write_atomically(s.sync_path, b'{"desired_model_repo_id": "builtin:tiny-s1"}\n')
    state = s.wait_state(lambda st: (st.get("pending") or {}).get("phase") == "commit"
                         and st["committed"]["version"] > before["committed"]["version"], "the legacy commit")
    version = state["committed"]["version"]
    manifest = json.loads((cluster.shared / "versions" / f"{version:06d}" / "MANIFEST.json").read_text())
    assert manifest["source"] == "builtin:tiny-s1"
    assert state["writer"] in {r.name for r in _live(cluster)}  # a replica coordinated it
    assert state["generation"] > before["generation"]
    cluster.wait_all_serving(version)
    s.finish()


def test_references_that_are_missing_corrupt_or_not_models_are_refused_before_any_replica_stages(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    s = scenario
    version = s.committed_version()
    store = ModelStore(cluster.shared)
    stored = store.publish_dir(distinct_model(tiny_dirs[2], tmp_path / "distinct", 1))  # in the store, never staged
    _flip_byte(chunk_paths(cluster.shared, stored.version, "model.safetensors")[-1])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("not a model\n")
    before = s.sync_path.read_bytes()

    cli = cluster.run_cli("publish", f"versions/{stored.version}")
    assert cli.returncode == 2 and "does not match its digest" in cli.stderr, cli.stderr[-2000:]
    for ref, error in ((str(tmp_path / "no-such-model"), BadModelRef), (str(notes), BadModelRef),
                       ("versions/999", NotFound), ("someone/not-in-the-offline-cache", NotFound),
                       (f"versions/{stored.version}", VerificationError)):
        with pytest.raises(error):
            s.publish(ref)
    assert s.sync_path.read_bytes() == before
    assert all(r.status()["staged"] is None for r in _live(cluster))

    # Corrupted after the coordinator checked it: every replica refuses to stage it, so it is aborted.
    coordinator = s.coordinator()
    fresh = distinct_model(tiny_dirs[0], tmp_path / "fresh", 2)  # no replica holds any of its chunks
    source = coordinator.prepare_source(str(fresh))
    _flip_byte(chunk_paths(cluster.shared, source.version, "model.safetensors")[-1])
    result = coordinator.publish(str(fresh), source=source)
    assert result.outcome == "aborted", result.summary()  # strict: at the first refusal
    assert "staged" not in {r.outcome for r in result.replicas}
    assert all("sha256" in (r.error or "") for r in result.replicas if r.outcome == "failed")
    def refused(r: Proc) -> bool:
        error = r.status()["last_error"] or ""
        return f"as v{source.version} failed" in error and "sha256" in error

    def settled(r: Proc) -> bool:  # refused it, or the abort came before it started staging
        staged = r.status()["staged"]
        return refused(r) or staged is None or staged.get("version") != source.version

    wait_for(lambda: all(settled(r) for r in _live(cluster)), 60, 0.1, "every replica to refuse or drop it")
    assert any(refused(r) for r in _live(cluster))
    _still_serving(cluster, version)
    s.finish()


def test_the_shared_folder_vanishing_for_a_moment_changes_nothing(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    # Tests run as root, so chmod 000 would not stop anyone reading: the folder is renamed away and back,
    # as an unmounted or unreachable volume looks to its readers (nothing there, nothing writable).
    s = scenario
    version = s.committed_version()
    away = cluster.shared.with_name("shared-away")
    seen = _counts(cluster, "cannot write heartbeat")
    os.rename(cluster.shared, away)
    try:
        _logged_everywhere(cluster, "cannot write heartbeat", seen)
        time.sleep(1.0)
        assert not cluster.shared.exists(), "a replica recreated the shared folder while it was gone"
    finally:
        os.rename(away, cluster.shared)
    _still_serving(cluster, version)
    start = time.time()
    def beat_time(r: Proc) -> float:
        return float(json.loads((cluster.shared / "replicas" / f"{r.name}.json").read_text())["time"])
    wait_for(lambda: all(beat_time(r) > start for r in _live(cluster)), 30, 0.05, "fresh heartbeats")
    result = s.publish(str(tiny_dirs[2]))
    assert result.outcome == "committed", result.summary()
    cluster.wait_all_serving(result.version)
    s.finish()


def test_a_replica_booting_into_a_corrupted_committed_version_refuses_it_until_it_is_repaired(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    s = scenario
    if s.committed_version() == 0:  # run alone: publish something to corrupt
        assert s.publish(str(tiny_dirs[1])).outcome == "committed"
        cluster.wait_all_serving(s.committed_version())
    version = s.committed_version()
    weights = chunk_paths(cluster.shared, version, "model.safetensors")[-1]  # a chunk of the committed version
    _flip_byte(weights)
    try:
        with pytest.raises(VerificationError):
            s.publish(f"versions/{version}")
        joiner = cluster.add_replica("replica-3", wait=False)
        wait_for(lambda: "sha256" in (joiner.status().get("last_error") or ""), 120, 0.1,
                 f"replica-3 to refuse v{version} (log: {joiner.log()[-2000:]})")
        assert joiner.status()["serving_version"] is None and not joiner.ready()
        s.watch.add(joiner.name, joiner.url)
    finally:
        _flip_byte(weights)  # repaired: the same bytes as published
    wait_for(joiner.ready, 60, 0.1, "replica-3 to load the repaired version")
    assert joiner.status()["serving_version"] == version
    s.serve(joiner)
    s.finish()


def test_a_commit_every_replica_refuses_is_repaired_by_publishing_what_they_hold_or_by_a_rollback(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    """A hand-written commit of a raw path makes every replica unready (docs/operations.md, troubleshooting).
    The documented remedy, publish or roll back again, must write a commit they accept: before, the coordinator
    went on from "no ready replica, so nothing committed", wrote states every replica ignores, and the fleet
    stayed unready."""
    s = scenario
    if s.committed_version() < 2:
        for folder in (tiny_dirs[1], tiny_dirs[2]):
            assert s.publish(str(folder)).outcome == "committed"
    version = s.committed_version()
    cluster.wait_all_serving(version)
    s.finish()  # what follows makes every replica unready on purpose

    def refuse_everywhere() -> None:
        state = s.state()
        bad = {**state, "generation": state["generation"] + 1, "pending": None, "split": None,
               "committed": {"version": version + 40, "model": "/tmp/not-a-published-version",
                             "activate_at": time.time()}}
        _write_atomically(s.sync_path, json.dumps(bad).encode())
        wait_for(lambda: all(not r.ready() and "refusing the commit" in (r.status().get("last_error") or "")
                             for r in _live(cluster)), 60, 0.05, "every replica to refuse the hand-written commit")

    refuse_everywhere()
    result = s.publish(str(s.model_dir(version)))  # the content they hold: unchanged, and committed again
    assert result.outcome == "unchanged", result.summary()
    wait_for(lambda: all(r.ready() for r in _live(cluster)), 60, 0.05, "every replica ready again")
    assert {r.status()["serving_version"] for r in _live(cluster)} == {version}
    assert s.committed_version() == version

    refuse_everywhere()
    result = s.publish(f"versions/{version}")  # the version they hold, staged and committed again
    assert result.outcome == "committed", result.summary()
    wait_for(lambda: all(r.ready() for r in _live(cluster)), 60, 0.05, "every replica ready again")

    refuse_everywhere()
    result = s.coordinator().rollback()  # the version before the one they hold
    assert result.outcome == "committed", result.summary()
    assert result.version < version
    cluster.wait_all_serving(result.version)
    assert all(r.ready() for r in _live(cluster))
    # Serving what is committed again, the replicas no longer report the refusal as their error.
    assert [r.status()["last_error"] for r in _live(cluster)] == [None] * len(_live(cluster))
