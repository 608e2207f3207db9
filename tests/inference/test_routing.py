"""The rollout's traffic split on one replica, and sessions that never see two versions across replicas."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockstep.core.clock import FakeClock
from lockstep.inference.routing import Route, Router, SessionTable, draw, pin_of, union
from lockstep.sync.protocol import Split

COMMITTED, CANDIDATE = 1, 2


def router(pin_wait_s: float = 0.0, clock: FakeClock | None = None) -> Router:
    return Router(SessionTable(capacity=100_000, ttl_s=3600, clock=clock or FakeClock()), pin_wait_s=pin_wait_s)


def split(share: float, step: int, pins: list[str] | None = None, complete: bool = False, rollout: str = "r1"
          ) -> Split:
    return Split(rollout=rollout, version=CANDIDATE, share=share, step=step, pins=pins or [],
                 pins_step=step if complete else None)


def test_requests_without_a_session_follow_the_share_exactly() -> None:
    r = router()
    for share in (5.0, 25.0, 50.0, 12.5):
        r.apply(split(share, int(share)), COMMITTED)
        routes = [r.choose(None) for _ in range(10_000)]
        assert abs(routes.count(Route.CANDIDATE) - 100 * share) <= 1


def test_no_split_and_a_rollback_send_everything_to_the_committed_version() -> None:
    r = router()
    assert {r.choose(None) for _ in range(100)} == {Route.COMMITTED}
    r.apply(split(50, 0, complete=True), COMMITTED)
    sessions = [f"user-{i}" for i in range(200)]
    first = {s: r.choose(s) for s in sessions}
    assert Route.CANDIDATE in first.values()
    r.apply(split(0, 1, complete=True), COMMITTED)  # rolled back: the candidate's sessions come back too
    assert {r.choose(s) for s in sessions} == {Route.COMMITTED}
    assert {r.choose(None) for _ in range(100)} == {Route.COMMITTED}


def test_a_session_draw_is_the_same_everywhere_and_uniform() -> None:
    pins = [pin_of(f"conversation-{i}") for i in range(20_000)]
    draws = [draw("r1", p) for p in pins]
    assert all(0 <= u < 100 for u in draws)
    assert abs(sum(u < 25 for u in draws) / len(draws) - 0.25) < 0.02
    assert draws[:10] == [draw("r1", p) for p in pins[:10]]
    assert draws[:10] != [draw("r2", p) for p in pins[:10]]  # each rollout draws anew


def test_a_session_in_a_steps_new_band_waits_for_the_fleets_pins() -> None:
    r = router(pin_wait_s=30.0)
    session = next(s for s in (f"s{i}" for i in range(10_000)) if 5 <= draw("r1", pin_of(s)) < 25)
    r.apply(split(5, 0, complete=True), COMMITTED)
    r.apply(split(25, 1), COMMITTED)  # step 1 in force, its pins not here yet
    chosen: list[Route] = []
    waiter = threading.Thread(target=lambda: chosen.append(r.choose(session)))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive() and not chosen  # held: it might be pinned by another replica
    r.apply(split(25, 1, pins=[pin_of(session)], complete=True), COMMITTED)  # another replica answered it
    waiter.join(timeout=30)
    assert chosen == [Route.COMMITTED]
    assert r.held == 1 and r.pin_timeouts == 0


def test_a_step_freezes_the_sessions_the_committed_version_answered() -> None:
    r = router()
    sessions = [f"user-{i}" for i in range(500)]
    for s in sessions:
        r.record(s, COMMITTED)  # before the rollout
    r.apply(split(25, 0), COMMITTED)
    frozen = r.frozen_pins("r1", 0)
    assert frozen is not None
    assert sorted(frozen) == sorted(pin_of(s) for s in sessions if draw("r1", pin_of(s)) < 25)
    assert r.frozen_pins("r1", 1) is None and r.frozen_pins("other", 0) is None


Event = tuple[str, int, int]  # ("request", replica, session) or ("step", share index, 0)


@settings(max_examples=60, deadline=None)
@given(replicas=st.integers(1, 4), shares=st.lists(st.floats(1, 99), min_size=1, max_size=4, unique=True),
       events=st.lists(st.tuples(st.sampled_from(["request", "request", "request", "step"]), st.integers(0, 3),
                                 st.integers(0, 40)), max_size=150))
def test_no_session_sees_two_versions_during_a_rollout(replicas: int, shares: list[float], events: list[Event]
                                                       ) -> None:
    """Steps reach every replica, each replica's frozen pins are collected and their union sent back (the
    coordinator's part), with requests of any session at any replica in between: one version per session."""
    shares = sorted(shares)
    fleet = [router() for _ in range(replicas)]
    seen: dict[int, set[int]] = {}
    step, pins = -1, list[str]()

    def take_step() -> None:
        nonlocal step, pins
        step += 1
        for r in fleet:
            r.apply(split(shares[step], step, pins=pins), COMMITTED)
        pins = union([pins] + [r.frozen_pins("r1", step) or [] for r in fleet])
        for r in fleet:
            r.apply(split(shares[step], step, pins=pins, complete=True), COMMITTED)

    for kind, where, session in events:
        if kind == "step":
            if step + 1 < len(shares):
                take_step()
            continue
        r = fleet[where % replicas]
        key = f"session-{session}"
        if step < 0:
            r.record(key, COMMITTED)
            version = COMMITTED
        else:
            version = CANDIDATE if r.choose(key) is Route.CANDIDATE else COMMITTED
        seen.setdefault(session, set()).add(version)
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert all(r.pin_timeouts == 0 for r in fleet)


def test_a_replica_without_room_for_a_second_model_says_so_instead_of_loading(tmp_path: Path) -> None:
    from lockstep.core.errors import LoadError
    from lockstep.inference.replica import check_room
    from lockstep.models.loader import ResolvedModel
    from lockstep.models.refs import parse_ref

    huge = tmp_path / "model.safetensors"
    with open(huge, "wb") as f:
        f.truncate(1 << 40)  # sparse: a terabyte of weights on no disk at all
    with pytest.raises(LoadError, match=r"cannot hold v7 beside the version it serves.*1024\.00 GiB"):
        check_room(ResolvedModel(parse_ref(str(tmp_path)), tmp_path), 7)
    huge.unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1024)
    check_room(ResolvedModel(parse_ref(str(tmp_path)), tmp_path), 7)
