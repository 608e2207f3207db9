"""The two phases over HTTP, for clusters without a shared volume: real replicas, no shared folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lockstep.core.clock import SYSTEM_CLOCK
from lockstep.core.errors import BadRequest
from lockstep.core.settings import CommitPolicy, Settings
from lockstep.sync.coordinator import Coordinator
from lockstep.sync.http_fleet import HttpFleet
from lockstep.sync.protocol import Heartbeat, Pending, Phase
from tests.support.cluster import Proc, base_env, free_port, http_replicas, metric, spawn, wait_for

TOKEN = "guarded-replica-token-0123456789"  # servers refuse tokens under 16 characters

pytestmark = pytest.mark.e2e


def over_http(settings: Settings, replicas: list[Proc]) -> Coordinator:
    """The coordinator ``lockstep publish --urls`` uses: replicas driven over HTTP, nothing kept."""
    urls = [p.url for p in replicas]
    fleet = HttpFleet(settings, lambda: urls, clock=SYSTEM_CLOCK)
    return Coordinator.over_http(settings, fleet, clock=SYSTEM_CLOCK, owner="test", data_dir=None)


@pytest.fixture(scope="module")
def replicas(builtin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    with http_replicas(builtin_dir, tmp_path_factory.mktemp("http-replicas")) as procs:
        yield procs


def test_stage_then_commit_flips_every_replica_to_the_same_version(replicas: list[Proc]) -> None:
    settings = Settings(poll_interval_s=0.05, stage_timeout_s=120)
    result = over_http(settings, replicas).publish("builtin:tiny-s1")
    assert result.outcome == "committed", result.summary()
    assert {r.outcome for r in result.replicas} == {"serving"}
    assert len({r.weights_digest for r in result.replicas}) == 1
    for p in replicas:
        wait_for(lambda p=p: p.status()["serving_version"] == result.version, 30, 0.05, f"{p.name} flipped")
        answer = p.post("/generate", json={"prompt": "The cat", "max_new_tokens": 4, "temperature": 0})
        assert answer.headers["x-model-version"] == str(result.version)
        # What the alert LockstepReadyReplicaOffCommitted compares: before, the committed gauge stayed at 0.
        assert metric(p, "lockstep_committed_version") == metric(p, "lockstep_serving_version") == result.version


def test_a_replica_that_cannot_stage_aborts_a_strict_publish_for_all(replicas: list[Proc], tmp_path: Path) -> None:
    before = [p.status()["serving_version"] for p in replicas]
    missing = tmp_path / "broken-model"
    missing.mkdir()  # looks like a model (so the check before staging passes) but its weights do not load
    (missing / "config.json").write_text('{"model_type": "llama"}')
    (missing / "model.safetensors").write_bytes(b"not a safetensors file")
    settings = Settings(poll_interval_s=0.05, stage_timeout_s=60, commit_policy=CommitPolicy.STRICT)
    result = over_http(settings, replicas).publish(str(missing))
    assert result.outcome == "aborted" and result.reason and "did not stage" in result.reason
    assert [p.status()["serving_version"] for p in replicas] == before
    assert all(p.ready() for p in replicas)


def test_stage_and_commit_need_the_token_when_one_is_configured(builtin_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = spawn("guarded", ["serve", "--port", str(port)], base_env(builtin_dir, LOCKSTEP_API_TOKEN=TOKEN),
                 tmp_path, port)
    try:
        wait_for(proc.ready, 120, 0.1, "guarded replica ready")
        body = {"model": "builtin:tiny-s1", "version": 1}
        assert httpx.post(proc.url + "/admin/stage", json=body).status_code == 401
        assert httpx.post(proc.url + "/admin/commit", json={"version": 1}).status_code == 401
        ok = httpx.post(proc.url + "/admin/stage", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 202
    finally:
        proc.kill()


@pytest.mark.parametrize(("kind", "reason"), [("missing folder", "does not exist"),
                                              ("not a model", "refused before staging.*no model weights"),
                                              ("unknown repo id", "refused before staging.*not in the cache")])
def test_a_reference_that_is_not_there_is_refused_before_any_replica_stages(replicas: list[Proc], tmp_path: Path,
                                                                            kind: str, reason: str) -> None:
    if kind == "missing folder":
        ref = str(tmp_path / "nowhere")
    elif kind == "not a model":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "README.md").write_text("no weights here")
        ref = str(tmp_path / "notes")
    else:
        ref = "no-such-org/no-such-model"  # offline in tests: not in the replica's cache
    before = [p.status() for p in replicas]
    settings = Settings(poll_interval_s=0.05, stage_timeout_s=60)
    with pytest.raises(BadRequest, match=reason):
        over_http(settings, replicas).publish(ref)
    after = [p.status() for p in replicas]
    assert [a["staged"] for a in after] == [b["staged"] for b in before]  # no replica was asked to stage
    assert [a["serving_version"] for a in after] == [b["serving_version"] for b in before]
    assert all(p.ready() for p in replicas)


def test_catching_up_a_replica_that_has_the_version_staged_commits_it_without_a_second_copy(
        replicas: list[Proc], tmp_path: Path) -> None:
    """As after a trainer that died between writing a commit and delivering it: the replica staged v, the ledger
    says v is committed. Before, the catch-up read it as behind, committed, then staged v again beside it."""
    from lockstep.sync.protocol import Committed, SyncState

    replica = replicas[0]
    serving = replica.status()["serving_version"]
    version = serving + 1
    staged = replica.post("/admin/stage", json={"model": "builtin:tiny-s2", "version": version})
    assert staged.status_code == 202, staged.text
    wait_for(lambda: (replica.status().get("staged") or {}).get("state") == "staged", 120, 0.05, "the stage")
    settings = Settings(poll_interval_s=0.05, stage_timeout_s=120)
    coordinator = Coordinator.over_http(settings, HttpFleet(settings, lambda: [replica.url], clock=SYSTEM_CLOCK),
                                        clock=SYSTEM_CLOCK, owner="test", data_dir=tmp_path)
    with coordinator.lease:
        coordinator.write_state(SyncState(), committed=Committed(version=version, model="builtin:tiny-s2"))
    reports = coordinator.catch_up()
    assert [r.outcome for r in reports] == ["serving"], reports
    status = replica.status()
    assert status["serving_version"] == version and status["ready"]
    assert not status.get("staged"), status["staged"]  # no second copy of what it serves


def test_a_replica_restarted_after_it_was_told_to_stage_is_told_again_and_the_publish_commits(
        builtin_dir: Path, tmp_path: Path) -> None:
    """Before, the coordinator counted the prepare as seen by the process it had told: the restarted replica never
    staged, and the publish waited until its deadline (holding every other publish), then aborted."""
    with http_replicas(builtin_dir, tmp_path) as procs:
        settings = Settings(poll_interval_s=0.05, stage_timeout_s=60)
        coordinator = over_http(settings, procs)
        deliver = coordinator.fleet.deliver

        def then_restart_r1(decision: Pending, generation: int, to: list[Heartbeat] | None = None) -> dict[str, str]:
            failed = deliver(decision, generation, to)
            if decision.phase is Phase.PREPARE and procs[1].name == "r1":
                old = procs[1]
                old.kill()  # SIGKILL: what it was told, and staged, is gone
                procs[1] = spawn("r1-again", ["serve", "--port", str(old.port)],
                                 base_env(builtin_dir, LOCKSTEP_REPLICA_ID="r1"), tmp_path, old.port)
                wait_for(procs[1].ready, 120, 0.1, "r1 back")
            return failed

        coordinator.fleet.deliver = then_restart_r1
        result = coordinator.publish("builtin:tiny-s2")
        assert result.outcome == "committed", result.summary()
        assert sorted((r.replica_id, r.outcome) for r in result.replicas) == [("r0", "serving"), ("r1", "serving")]
        assert result.prepare_s < settings.stage_timeout_s
