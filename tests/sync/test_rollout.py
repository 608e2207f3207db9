"""Rollouts on real replicas under load: steps at one activate_at, sessions on one version, gates that read the
text roll a bad candidate back, and a person's promote or abort wins."""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lockstep.core.clock import SYSTEM_CLOCK
from lockstep.core.errors import BadRequest, Conflict
from lockstep.core.settings import Settings
from lockstep.sync.coordinator import Coordinator
from lockstep.sync.http_fleet import HttpFleet
from lockstep.sync.protocol import Pending, Phase, Split, SyncState
from lockstep.sync.rollout import RolloutControl, make_plan, parse_shares
from tests.support.cluster import Proc, base_env, free_port, http_replicas, spawn, wait_for

pytestmark = pytest.mark.e2e

CALM_GATES = {"latency_p99": None}  # a loaded 2-core test machine must not decide a rollout by its timing


@pytest.fixture(scope="module")
def replicas(builtin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    with http_replicas(builtin_dir, tmp_path_factory.mktemp("rollout-replicas")) as procs:
        yield procs


@pytest.fixture(scope="module")
def close_copy(builtin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The initial model with one weight nudged: a good candidate (new content, nearly the same answers)."""
    out = tmp_path_factory.mktemp("candidate") / "tiny-nudged"
    shutil.copytree(builtin_dir / "tiny-s0", out)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in sorted(tensors) if n.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name] * 1.001
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


def over_http(replicas: list[Proc]) -> Coordinator:
    settings = Settings(poll_interval_s=0.05, stage_timeout_s=120)
    urls = [p.url for p in replicas]
    return Coordinator.over_http(settings, HttpFleet(settings, lambda: urls, clock=SYSTEM_CLOCK),
                                 clock=SYSTEM_CLOCK, owner="test", data_dir=None)


@dataclass
class Load:
    """Clients with and without a session key at random replicas, until stopped (bounded either way)."""

    replicas: list[Proc]
    sessions: int = 24
    answers: list[tuple[float, str | None, int, int]] = field(default_factory=list)  # (sent, session, status, v)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(4)]
        for t in self.threads:
            t.start()

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as http:
            for _ in range(20_000):
                if self.stop.is_set():
                    return
                session = f"conversation-{rng.randrange(self.sessions)}" if rng.random() < 0.5 else None
                replica = rng.choice(self.replicas)
                sent = time.time()
                headers = {"X-Lockstep-Session": session} if session else {}
                r = http.post(replica.url + "/generate", headers=headers,
                              json={"prompt": rng.choice(["Once upon", "The cat", "One two"]), "max_new_tokens": 4,
                                    "temperature": 0})
                version = int(r.headers.get("x-model-version", -1))
                self.answers.append((sent, session, r.status_code, version))

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def committed_version(replicas: list[Proc]) -> int:
    versions = {p.status()["serving_version"] for p in replicas}
    assert len(versions) == 1, versions
    return versions.pop()


def settle(replicas: list[Proc]) -> int:
    wait_for(lambda: all(p.ready() and not p.status().get("staged") for p in replicas), 60, 0.1, "settled")
    return committed_version(replicas)


def in_split(proc: Proc, share: float, seen: list[tuple[bool, bool, float | None]]) -> bool:
    """Whether ``proc`` answers ready with ``share`` in force; notes (ready, candidate staged, share) in ``seen``."""
    try:
        status = proc.status()
    except httpx.HTTPError:
        return False
    staged = (status.get("staged") or {}).get("state") == "staged"
    in_force = (status.get("rollout") or {}).get("share")
    seen.append((bool(status["ready"]), staged, in_force))
    return bool(status["ready"]) and in_force == share


def test_a_replica_that_joins_over_http_mid_rollout_stages_the_candidate_unready_until_it_has_it(
        replicas: list[Proc], close_copy: Path, builtin_dir: Path, tmp_path: Path) -> None:
    """Steps reach replicas that came after the stage: the newcomer stages the candidate, then serves the split."""
    before = settle(replicas)  # v0 everywhere: the newcomer boots into the same committed version
    port = free_port()
    urls = [p.url for p in replicas] + [f"http://127.0.0.1:{port}"]  # the third answers once started below
    settings = Settings(poll_interval_s=0.05, stage_timeout_s=120)
    coordinator = Coordinator.over_http(settings, HttpFleet(settings, lambda: urls, clock=SYSTEM_CLOCK),
                                        clock=SYSTEM_CLOCK, owner="test", data_dir=None)
    plan = make_plan([30], step_seconds=0, min_requests=10**9, gate_specs=CALM_GATES)  # holds until aborted
    control = RolloutControl(plan)
    seen: list[tuple[bool, bool, float | None]] = []  # (ready, candidate staged, share) of the newcomer

    def join_then_abort() -> None:
        wait_for(lambda: control.phase == "step", 120, 0.05, "the first step")
        late = spawn("late", ["serve", "--port", str(port)], base_env(builtin_dir, LOCKSTEP_REPLICA_ID="late"),
                     tmp_path, port)
        try:
            wait_for(lambda: in_split(late, 30, seen), 180, 0.05, f"the newcomer in the split ({late.log()[-2000:]})")
        finally:
            control.abort()
            threading.Thread(target=lambda: (time.sleep(5), late.kill()), daemon=True).start()

    threading.Thread(target=join_then_abort, daemon=True).start()
    result = coordinator.rollout(str(close_copy), plan, control=control)
    assert result.outcome == "rolled back", result.summary()
    assert not [s for s in seen if s[0] and not s[1] and s[2]]  # never ready in the split without the candidate
    assert any(s[2] == 30 and not s[0] for s in seen) or seen[0][0] is False  # it was told before it could serve it
    assert settle(replicas) == before


def test_a_replica_restarted_over_http_mid_rollout_is_told_the_step_again_and_serves_the_split(
        replicas: list[Proc], close_copy: Path, builtin_dir: Path, tmp_path: Path) -> None:
    """Before, the restarted replica booted into the committed version alone and was never told the step again:
    ready, with no split, every session of the candidate it answered went back to the old version."""
    before = settle(replicas)
    plan = make_plan([30], step_seconds=0, min_requests=10**9, gate_specs=CALM_GATES)  # holds until aborted
    control = RolloutControl(plan)
    seen: list[tuple[bool, bool, float | None]] = []  # (ready, candidate staged, share) of the restarted one

    def restart_then_abort() -> None:
        wait_for(lambda: control.phase == "step", 120, 0.05, "the first step")
        old = replicas[1]
        old.kill()
        replicas[1] = spawn(old.name, ["serve", "--port", str(old.port)],
                            base_env(builtin_dir, LOCKSTEP_REPLICA_ID=old.name), tmp_path, old.port)
        try:
            wait_for(lambda: in_split(replicas[1], 30, seen), 180, 0.05,
                     f"the restarted replica in the split ({replicas[1].log()[-2000:]})")
        finally:
            control.abort()

    thread = threading.Thread(target=restart_then_abort, daemon=True)
    thread.start()
    result = over_http(replicas).rollout(str(close_copy), plan, control=control)
    thread.join(timeout=60)
    assert result.outcome == "rolled back", result.summary()
    assert seen and seen[-1][2] == 30  # it took the step again
    assert not [s for s in seen if s[0] and s[2] and not s[1]]  # never in the split without the candidate
    assert settle(replicas) == before


def test_a_good_candidate_goes_through_its_steps_with_sessions_on_one_version(replicas: list[Proc],
                                                                            close_copy: Path) -> None:
    before = settle(replicas)
    load = Load(replicas)
    try:
        plan = make_plan([50], shadow=50, step_seconds=0, min_requests=40, gate_specs={
            **CALM_GATES, "kl_divergence": {"threshold": 1.0, "min_samples": 5},
            "token_agreement": {"threshold": 0.5, "min_samples": 5}})
        control = RolloutControl(plan)
        result = over_http(replicas).rollout(str(close_copy), plan, control=control)
    finally:
        load.finish()
    assert result.outcome == "committed", (result.summary(), control.view())
    new = result.version
    assert new != before and committed_version(replicas) == new
    assert all(status == 200 for _, _, status, _ in load.answers)
    assert {v for *_, v in load.answers} <= {before, new}
    assert [s.share for s in control.steps] == [0, 50, 100]  # shadow first: the traffic gates wait for answers
    step = control.steps[1]
    during = [a for a in load.answers if step.activate_at + 0.2 < a[0] < (result.activate_at or 0) - 0.2]
    by_session: dict[str, set[int]] = {}
    for _, session, _, version in during:
        if session is not None:
            by_session.setdefault(session, set()).add(version)
    assert by_session and all(len(v) == 1 for v in by_session.values()), by_session
    plain = [v for _, s, _, v in during if s is None]
    assert plain and 0.3 < plain.count(new) / len(plain) < 0.7  # the smooth split is exact per replica
    gates = {g["name"]: g for g in control.view()["gates"]}
    assert gates["kl_divergence"]["verdict"] == "pass" and gates["kl_divergence"]["samples"] >= 5
    # The 50% step held until the candidate itself answered min_requests (its answers are compared too: once).
    assert control.candidate is not None and control.candidate.requests >= plan.min_requests


def test_a_candidate_whose_text_diverges_is_rolled_back_in_its_shadow_step_before_serving_anyone(
        replicas: list[Proc]) -> None:
    before = settle(replicas)
    load = Load(replicas)
    try:
        plan = make_plan([5, 25], shadow=50, step_seconds=0, min_requests=5, gate_specs={
            **CALM_GATES, "kl_divergence": {"threshold": 1.0, "min_samples": 5}})
        control = RolloutControl(plan)
        coordinator = over_http(replicas)
        result = coordinator.rollout("builtin:tiny-s1", plan, control=control)  # an unrelated model
    finally:
        load.finish()
    assert result.outcome == "rolled back", result.summary()
    # Its record names the decision that ended it (the abort after the rollback), not generation 0.
    assert result.generation == coordinator.read_state().generation > 0
    assert control.automatic_rollback and "kl_divergence" in (result.reason or "")
    assert settle(replicas) == before
    assert all(status == 200 and version == before for _, _, status, version in load.answers)  # it served nobody
    assert [s.share for s in control.steps] == [0.0]


def test_a_person_wins_over_the_gates(replicas: list[Proc], close_copy: Path) -> None:
    before = settle(replicas)
    for action, outcome in (("abort", "rolled back"), ("promote", "committed")):
        plan = make_plan([30], step_seconds=0, min_requests=10**9, gate_specs=CALM_GATES)  # holds until told
        control = RolloutControl(plan)
        coordinator = over_http(replicas)

        def act(control: RolloutControl = control, action: str = action) -> None:
            wait_for(lambda: control.phase == "step", 120, 0.05, "the first step")
            getattr(control, action)()

        threading.Thread(target=act, daemon=True).start()
        result = coordinator.rollout(str(close_copy), plan, control=control)
        assert result.outcome == outcome, result.summary()
        assert control.human is not None and not control.automatic_rollback
    assert settle(replicas) != before


def test_a_rollout_or_a_publish_while_one_runs_is_refused_with_nothing_staged(replicas: list[Proc]) -> None:
    coordinator = over_http(replicas)
    state = coordinator.read_state()
    running = SyncState(generation=state.generation + 1, committed=state.committed,
                        pending=Pending(version=99, model="builtin:tiny-s2", phase=Phase.CANARY, rollout="other"),
                        split=Split(rollout="other", version=99, share=5, step=0))
    coordinator.ledger.write(running)
    plan = make_plan([5])
    with pytest.raises(Conflict, match="rollout of v99 is in progress"):
        coordinator.rollout("builtin:tiny-s2", plan)
    with pytest.raises(Conflict, match="rollout of v99 is in progress"):
        coordinator.publish("builtin:tiny-s2")
    assert all(not p.status().get("staged") for p in replicas)


@pytest.mark.parametrize(("shares", "why"), [
    ("25,5", "must increase"), ("5,5", "must increase"), ("5,150", r"outside \(0, 100\]"), ("0", "outside"),
    ("five", "not a number"), ([True], "not a number"), (",".join(["1"] * 21), "1 to 20 shares"),
])
def test_shares_that_do_not_increase_or_exceed_100_are_refused(shares: object, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_shares(shares)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"gate_specs": {"no_such_gate": 1}}, "error_rate"), ({"gate_specs": {"error_rate": "high"}}, "error_rate"),
    ({"step_seconds": -1}, "step_seconds"), ({"shadow": 101}, "shadow"), ({"min_requests": 1.5}, "min_requests"),
])
def test_bad_rollout_settings_are_refused_naming_what_is_allowed(kwargs: dict[str, object], why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        make_plan([5, 50], **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("shares", ["5,abc,100", "5,,100", " ", "5,25,200"])
def test_the_command_line_refuses_bad_shares_with_what_is_allowed_and_no_traceback(
        shares: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lockstep import cli

    assert cli.main(["publish", "builtin:tiny-s1", "--canary", shares, "--shared", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: canary") and "like 5,25,100" in err and "Traceback" not in err
    assert not (tmp_path / "versions").exists() or not any((tmp_path / "versions").iterdir())  # nothing staged


def test_the_shares_end_in_the_ordinary_commit() -> None:
    assert parse_shares("5,25") == (5.0, 25.0, 100.0)
    assert make_plan([10], shadow=5).steps == (0.0, 10.0, 100.0)
    assert torch.isfinite(torch.tensor(parse_shares([1, 2.5, 100]))).all()


def test_a_rollout_over_the_shared_folder_from_the_command_line(builtin_dir: Path, close_copy: Path,
                                                                tmp_path: Path) -> None:
    """The same steps through sync_state.json and pins/: lockstep publish --canary, then lockstep status."""
    from tests.support.cluster import local_cluster

    with local_cluster(tmp_path, builtin_dir, replicas=2) as cluster:
        load = Load(cluster.replicas)
        try:
            done = cluster.run_cli("publish", str(close_copy), "--canary", "50", "--step-seconds", "0",
                                   "--min-requests", "30", "--gate", "latency_p99=off", "--gate", "kl_divergence=off",
                                   "--gate", "token_agreement=off")
        finally:
            load.finish()
        assert done.returncode == 0, done.stdout + done.stderr
        assert "committed" in done.stdout
        cluster.wait_all_serving(1)
        assert all(status == 200 for _, _, status, _ in load.answers)
        assert {v for *_, v in load.answers} == {0, 1}  # both versions answered during the step
        pins = list((cluster.shared / "pins").glob("*.json"))
        assert len(pins) == 2  # each replica wrote its sessions for the step
        status = cluster.run_cli("rollout", "status")
        assert status.returncode == 0 and "no rollout is in progress" in status.stdout


def test_a_candidate_that_scores_worse_on_the_task_is_dropped_before_any_step(replicas: list[Proc],
                                                                            close_copy: Path) -> None:
    """The task_score gate runs once, on the staged candidate: failing it aborts with no traffic moved."""
    from dataclasses import replace

    from lockstep.sync.rollout import TaskScore

    before = settle(replicas)
    asked: list[int] = []

    def evaluation(version: int) -> TaskScore:  # the trainer's evaluation is tested through its API
        asked.append(version)
        return TaskScore(score=0.2, baseline=0.9, samples=16)

    plan = replace(make_plan([5]), task_score=evaluation)
    control = RolloutControl(plan)
    result = over_http(replicas).rollout(str(close_copy), plan, control=control)
    assert result.outcome == "aborted" and "task_score" in (result.reason or ""), result.summary()
    assert asked == [result.version] and control.steps == []
    # Said as a decision of the gates (what the alert on trigger="gates" reads), against the committed version.
    assert control.automatic_rollback and control.reason == result.reason
    assert f"vs 0.90 on v{before}" in control.reason
    assert settle(replicas) == before


def test_a_person_who_promotes_while_the_task_gate_runs_wins_over_it(replicas: list[Proc], close_copy: Path) -> None:
    from dataclasses import replace

    from lockstep.sync.rollout import TaskScore

    before = settle(replicas)
    control: RolloutControl | None = None

    def evaluation(version: int) -> TaskScore:
        assert control is not None and control.phase == "evaluating"
        control.promote()  # accepted (202 on the API): it must win
        return TaskScore(score=0.2, baseline=0.9, samples=16)

    plan = replace(make_plan([5]), task_score=evaluation)
    control = RolloutControl(plan)
    result = over_http(replicas).rollout(str(close_copy), plan, control=control)
    assert result.outcome == "committed", result.summary()
    assert control.human is not None and not control.automatic_rollback
    assert settle(replicas) == result.version != before


def test_once_the_gates_roll_back_a_promote_is_refused_and_before_that_it_wins() -> None:
    control = RolloutControl(make_plan([5]))
    control.phase = "step"
    assert control.decide("rolling back", "gate failed", automatic=True)
    with pytest.raises(Conflict, match="rolling back: gate failed"):
        control.promote()
    assert control.human is None and control.automatic_rollback

    control = RolloutControl(make_plan([5]))
    control.phase = "step"
    control.promote()
    assert not control.decide("rolling back", "gate failed", automatic=True)  # the person came first
    assert control.phase == "step" and not control.automatic_rollback


@pytest.mark.parametrize(("first", "then"), [("promote", "abort"), ("abort", "promote")])
def test_a_persons_second_call_that_contradicts_the_first_is_refused_not_silently_dropped(first: str,
                                                                                          then: str) -> None:
    """Before, both got 202 and only the first was carried out."""
    control = RolloutControl(make_plan([5]))
    control.phase = "step"
    getattr(control, first)()
    getattr(control, first)()  # the same call again: the same request
    with pytest.raises(Conflict, match=f"a {first} was asked first"):
        getattr(control, then)()
    assert control.human == first


@pytest.mark.parametrize(("rollout", "why"), [({"canary": [25, 5]}, "must increase"),
                                              ({"canary": [5], "task": "digits"}, "task needs trainer_url")])
def test_a_python_publish_with_a_bad_rollout_is_refused_before_anything_is_copied(
        tmp_path: Path, close_copy: Path, rollout: dict[str, object], why: str) -> None:
    from lockstep.trainer.client import publish

    with pytest.raises(BadRequest, match=why):
        publish(close_copy, shared_dir=tmp_path, rollout=rollout)
    assert not (tmp_path / "versions").exists()
