"""The two-phase publish and a replica killed while it stages, with every replica on the vLLM engine (issue 11).

The same scenarios as test_cluster_failures.py (which runs the built-in engine), with vLLM's start time allowed
for: a stage starts a whole vLLM engine (a minute or more on 2 cores). ``finish()`` checks what it checks there:
no failed request, every answer labelled and worded by the version that produced it, no stale ready, no
flip-flop. A killed replica must also leave no vLLM engine process behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockstep.sync.rollout import RolloutControl, make_plan
from tests.support.cluster import LocalCluster, Proc, local_cluster, wait_for
from tests.support.load import UpdateScenario, check_answers, greedy_texts
from tests.support.vllm import ENGINE_START_S, VLLM_ENV, needs_vllm, vllm_processes, wait_gone, wait_ready

pytestmark = [pytest.mark.e2e, needs_vllm, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> Iterator[LocalCluster]:
    """Two vLLM replicas sharing a folder (overrides the conftest's built-in one)."""
    with local_cluster(tmp_path_factory.mktemp("vllm-cluster"), builtin_dir, replicas=0, **VLLM_ENV) as cluster:
        for _ in range(2):
            cluster.add_replica(wait=False)
        for proc in cluster.replicas:
            wait_ready(proc)
        yield cluster


@pytest.fixture
def scenario(cluster: LocalCluster) -> Iterator[UpdateScenario]:
    path = cluster.shared / "sync_state.json"
    committed = json.loads(path.read_text())["committed"]["version"] if path.exists() else 0
    cluster.wait_all_serving(committed, timeout=ENGINE_START_S)
    s = UpdateScenario(cluster, dtype="float32")
    yield s
    s.close()


def _live(cluster: LocalCluster) -> list[Proc]:
    return [r for r in cluster.replicas if r.alive()]


def _staged_state(proc: Proc) -> str | None:
    return (proc.status().get("staged") or {}).get("state")


def test_a_publish_under_load_flips_every_vllm_replica_together(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    result = scenario.publish(str(tiny_dirs[1]), stage_timeout_s=ENGINE_START_S)
    assert result.outcome == "committed", result.summary()
    assert sorted(r.outcome for r in result.replicas) == ["serving", "serving"]
    cluster.wait_all_serving(result.version, timeout=ENGINE_START_S)
    scenario.finish()


def test_a_rollout_on_vllm_replicas_answers_from_both_engines_labelled_and_compares_them_then_promotes(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    """Both versions resident as two vLLM engines per replica; the split, its labels and vLLM's comparisons."""
    s = scenario
    before = s.committed_version()
    # Two unrelated random models: the text gates would stop them, so the KL gate only waits for 3 comparisons
    # (vLLM's prompt log-probabilities, made on each replica) and the step then advances.
    plan = make_plan([50], step_seconds=0, min_requests=20, gate_specs={
        "latency_p99": None, "token_agreement": None, "length_shift": None,
        "kl_divergence": {"threshold": 1000, "min_samples": 3}})
    control = RolloutControl(plan)
    # tiny-s0: new content after the test above committed tiny-s1, and not what the test below publishes.
    result = s.coordinator(stage_timeout_s=ENGINE_START_S).rollout(str(tiny_dirs[0]), plan, control=control)
    assert result.outcome == "committed", (result.summary(), control.view())
    cluster.wait_all_serving(result.version, timeout=ENGINE_START_S)
    answers = s.load.stop()
    expected = {before: greedy_texts(s.model_dir(before)), result.version: greedy_texts(tiny_dirs[0])}
    assert check_answers(answers, expected) == []
    split = control.steps[0]
    during = {a.body_version for a in answers if split.activate_at < a.sent and a.received < (result.activate_at or 0)}
    assert during == {before, result.version}  # both engines answered during the step
    kl = next(g for g in control.view()["gates"] if g["name"] == "kl_divergence")
    assert kl["samples"] >= 3 and kl["value"] > 0


def test_a_vllm_replica_killed_while_it_stages_leaves_no_engine_and_comes_back_at_the_committed_version(
        scenario: UpdateScenario, cluster: LocalCluster, tiny_dirs: dict[int, Path]) -> None:
    s = scenario
    survivor, victim = _live(cluster)
    publish = s.publish_in_background(str(tiny_dirs[2]), stage_timeout_s=ENGINE_START_S)
    wait_for(lambda: _staged_state(victim) == "staging", 60, 0.01, f"{victim.name} staging")
    # Until the second engine's processes exist: the kill lands while vLLM loads the new version.
    serving_engine = set(vllm_processes(victim.process.pid))
    wait_for(lambda: set(vllm_processes(victim.process.pid)) - serving_engine, ENGINE_START_S, 0.05,
             f"{victim.name}'s staging engine to start")
    engines = vllm_processes(victim.process.pid)
    s.kill(victim)
    assert not wait_gone(engines, 60), "the killed replica's vLLM engine processes are still running"

    result = publish.result(timeout=2 * ENGINE_START_S)
    assert result.outcome == "committed", result.summary()
    assert sorted((r.replica_id, r.outcome) for r in result.replicas) == sorted(
        [(survivor.name, "serving"), (victim.name, "lost")])  # said, not left out; and it did not stop the commit
    cluster.wait_all_serving(result.version, timeout=ENGINE_START_S)

    back = cluster.add_replica(victim.name, wait=False)  # boots straight into the committed version
    wait_ready(back)
    assert back.status()["serving_version"] == result.version
    s.serve(back)
    s.finish()


def test_a_vllm_replica_whose_engine_process_dies_goes_unready_with_the_reason_and_loads_it_again(
        scenario: UpdateScenario, cluster: LocalCluster) -> None:
    """Before, a killed EngineCore left the replica ready: every request got a 400 that no client retries, and
    nothing recovered until the next publish."""
    import signal

    import httpx
    import psutil

    scenario.close()  # its load would count this replica's refusals while it reloads as failures
    victim = _live(cluster)[0]
    committed = victim.status()["serving_version"]
    core = next(pid for pid in vllm_processes(victim.process.pid) if "EngineCore" in psutil.Process(pid).name())
    psutil.Process(core).send_signal(signal.SIGKILL)
    body = {"model": "lockstep", "prompt": "hi", "max_tokens": 3}

    def refused_as_unavailable() -> bool:
        return httpx.post(victim.url + "/v1/completions", json=body, timeout=30).status_code == 503
    wait_for(refused_as_unavailable, 60, 0.1, f"{victim.name} to refuse requests with 503")
    status = victim.status()
    assert not status["ready"] and "failed" in (status["last_error"] or ""), status
    # Caught up: the committed version loaded afresh, ready and answering again.
    wait_for(lambda: victim.ready() and victim.status()["serving_version"] == committed, ENGINE_START_S, 0.5,
             f"{victim.name} to load v{committed} again")
    assert httpx.post(victim.url + "/v1/completions", json=body, timeout=60).status_code == 200
