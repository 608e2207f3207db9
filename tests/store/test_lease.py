"""The coordinator lease: exclusive, renewable, taken over when stale (in virtual time), race-safe."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from lockstep.core.clock import FakeClock
from lockstep.core.errors import BadRequest, LeaseHeld
from lockstep.store import Lease

TTL = 10.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=time.time())  # near real time: torn files are judged by their real mtime


@pytest.fixture
def locks(tmp_path: Path) -> Path:
    return tmp_path / "locks"


def lease(locks: Path, owner: str, clock: FakeClock) -> Lease:
    return Lease(locks, owner=owner, ttl_s=TTL, clock=clock)


def test_the_lease_is_exclusive(locks: Path, clock: FakeClock) -> None:
    a, b = lease(locks, "trainer-a", clock), lease(locks, "trainer-b", clock)
    a.acquire()
    with pytest.raises(LeaseHeld, match=r"held by trainer-a until .* \(10.0 s from now\)"):
        b.acquire()
    holder = a.holder()
    assert holder is not None and holder["owner"] == "trainer-a"
    assert holder["expires_at"] == clock.time() + TTL and holder["acquired_at"] == clock.time()
    assert set(holder) >= {"owner", "acquired_at", "expires_at", "token"}
    assert a.held and not b.held
    assert json.loads((locks / "coordinator.lease").read_text())["owner"] == "trainer-a"


def test_release_lets_another_acquire(locks: Path, clock: FakeClock) -> None:
    a, b = lease(locks, "a", clock), lease(locks, "b", clock)
    with a, pytest.raises(LeaseHeld):
        b.acquire()
    assert a.holder() is None and not a.held
    b.acquire()
    assert b.holder()["owner"] == "b"  # type: ignore[index]
    a.release()  # releasing what one does not hold is a no-op
    assert b.holder()["owner"] == "b"  # type: ignore[index]


def test_names_are_separate_leases(locks: Path, clock: FakeClock) -> None:
    Lease(locks, "coordinator", owner="a", ttl_s=TTL, clock=clock).acquire()
    Lease(locks, "gc", owner="b", ttl_s=TTL, clock=clock).acquire()


def test_renew_extends_the_lease(locks: Path, clock: FakeClock) -> None:
    a, b = lease(locks, "a", clock), lease(locks, "b", clock)
    start = clock.time()
    a.acquire()
    clock.advance(8)
    a.renew()
    clock.advance(8)  # 16 s after acquiring, 8 s after renewing
    with pytest.raises(LeaseHeld, match="held by a"):
        b.acquire()
    assert a.holder()["expires_at"] == start + 18  # type: ignore[index]
    assert a.holder()["acquired_at"] == start  # type: ignore[index]
    a.acquire()  # the holder acquiring again renews
    assert a.holder()["expires_at"] == start + 26  # type: ignore[index]


def test_a_stale_lease_is_taken_over_and_the_old_holder_has_lost_it(
        locks: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    a, b = lease(locks, "trainer-a", clock), lease(locks, "trainer-b", clock)
    a.acquire()
    clock.advance(TTL + 0.5)
    with caplog.at_level(logging.WARNING):
        b.acquire()
    assert "trainer-b takes over stale lease 'coordinator' from trainer-a" in caplog.text
    taken = b.holder()
    assert taken is not None and taken["owner"] == "trainer-b"
    with pytest.raises(LeaseHeld, match=r"lost the lease 'coordinator'.*held now by trainer-b"):
        a.renew()
    with pytest.raises(LeaseHeld, match="lost the lease"):
        a.renew()  # still lost
    a2 = lease(locks, "trainer-a", clock)  # a fresh object of the same owner does not hold it either
    with pytest.raises(LeaseHeld, match="lost the lease"):
        a2.renew()
    assert b.holder() == taken  # the losers touched nothing
    b.renew()
    b.release()
    assert b.holder() is None


def test_releasing_a_lost_lease_leaves_the_new_holder_alone(locks: Path, clock: FakeClock) -> None:
    a, b = lease(locks, "a", clock), lease(locks, "b", clock)
    a.acquire()
    clock.advance(TTL + 1)
    b.acquire()
    with pytest.raises(LeaseHeld, match="lost the lease"):
        a.release()
    assert b.holder()["owner"] == "b"  # type: ignore[index]
    with pytest.raises(LeaseHeld, match="held by b"), a:
        pytest.fail("entered the block without the lease")
    assert b.holder()["owner"] == "b"  # type: ignore[index]


def test_a_late_renew_keeps_a_lease_nobody_took(locks: Path, clock: FakeClock) -> None:
    a, b = lease(locks, "a", clock), lease(locks, "b", clock)
    a.acquire()
    clock.advance(TTL + 5)
    a.renew()
    assert a.holder()["owner"] == "a" and a.holder()["expires_at"] == clock.time() + TTL  # type: ignore[index]
    with pytest.raises(LeaseHeld, match="held by a"):
        b.acquire()


def test_a_torn_lease_file_counts_as_held_until_it_is_old(locks: Path, clock: FakeClock) -> None:
    locks.mkdir()
    torn = locks / "coordinator.lease"
    torn.write_bytes(b"")  # a holder died between O_EXCL create and write
    b = lease(locks, "b", clock)
    with pytest.raises(LeaseHeld, match="unreadable lease file"):
        b.acquire()
    assert b.holder()["unreadable"] is True  # type: ignore[index]
    old = clock.time() - TTL - 1
    os.utime(torn, (old, old))
    b.acquire()
    assert b.holder()["owner"] == "b"  # type: ignore[index]


def _claim_of(token: str) -> str:
    return f".coordinator.takeover-{hashlib.sha256(f'token:{token}'.encode()).hexdigest()[:32]}"


def test_a_takeover_claim_left_by_a_crashed_taker_is_dropped_after_ttl(locks: Path) -> None:
    a = lease(locks, "a", FakeClock(start=time.time() - TTL - 1))
    a.acquire()  # expired a second ago
    token = a.holder()["token"]  # type: ignore[index]
    os.link(locks / "coordinator.lease", locks / _claim_of(token))  # a taker died right after claiming
    clock = FakeClock(start=time.time())
    b = lease(locks, "b", clock)
    with pytest.raises(LeaseHeld, match="contended"):
        b.acquire()  # the claim is young: someone may be mid-takeover
    assert a.holder()["owner"] == "a"  # type: ignore[index]
    clock.advance(TTL + 1)  # the claim is now older than ttl_s: its taker is gone
    b.acquire()
    assert b.holder()["owner"] == "b"  # type: ignore[index]
    assert sorted(p.name for p in locks.iterdir()) == ["coordinator.lease"]


def test_bad_names_and_ttls_are_refused(locks: Path) -> None:
    with pytest.raises(BadRequest, match="lease name"):
        Lease(locks, "../escape", owner="a", ttl_s=TTL)
    with pytest.raises(BadRequest, match="ttl_s"):
        Lease(locks, owner="a", ttl_s=0)


def _contender(locks: str, rounds: int, barrier: Any, results: Any) -> None:
    """Runs in a spawned process: race for each round's stale lease as soon as everyone is ready."""
    me = f"contender-{os.getpid()}"
    for r in range(rounds):
        contender = Lease(Path(locks), f"round-{r}", owner=me, ttl_s=60)
        barrier.wait(timeout=120)
        try:
            contender.acquire()
            results.put((r, me, True))
        except LeaseHeld:
            results.put((r, me, False))
        except Exception as e:  # noqa: BLE001 - reported, so the test fails at once with the reason
            results.put((r, me, repr(e)))


def test_processes_racing_for_a_stale_lease_have_exactly_one_winner(locks: Path) -> None:
    contenders, rounds = 5, 40  # the plain rename protocol had two winners in about 1 round in 200
    locks.mkdir()
    for r in range(rounds):
        stale = {"owner": "crashed", "acquired_at": time.time() - 100, "expires_at": time.time() - 40,
                 "token": f"old-{r}"}
        (locks / f"round-{r}.lease").write_text(json.dumps(stale))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(contenders), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(locks), rounds, barrier, results))
             for _ in range(contenders)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=180) for _ in range(contenders * rounds)]
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    assert not [o for o in outcomes if isinstance(o[2], str)], outcomes
    for r in range(rounds):
        winners = [me for (rr, me, won) in outcomes if rr == r and won]
        assert len(winners) == 1, f"round {r}: winners {winners}"
        holder = Lease(locks, f"round-{r}", owner="reader", ttl_s=60).holder()
        assert holder is not None and holder["owner"] == winners[0]
    assert sorted(p.name for p in locks.iterdir()) == sorted(f"round-{r}.lease" for r in range(rounds))


@pytest.mark.parametrize("expires_at", ["Infinity", "NaN", "1e300", "true"])
def test_a_lease_that_never_expires_is_treated_as_torn_and_taken_over(tmp_path, expires_at) -> None:
    """A hand-edited or hostile lease file must not lock every coordinator out forever."""
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "coordinator.lease").write_text(  # a record the reader must refuse
        '{"owner": "ghost", "token": "t", "acquired_at": 0, "expires_at": ' + expires_at + "}")
    clock = FakeClock(start=time.time() + 3600)  # past the torn file's ttl
    Lease(locks, owner="me", ttl_s=30.0, clock=clock).acquire()  # raises LeaseHeld if the ghost still held it
