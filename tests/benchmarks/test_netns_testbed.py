"""The network testbed: namespaces reach each other, killed or absent nodes do not, nothing is left behind; and
the user-space TokenBucket against a fake clock. No wall-clock thresholds: a loaded CI machine must not fail them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from benchmarks.netns_testbed import (
    SCRIPT,
    ShapingUnsupported,
    Testbed,
    TestbedError,
    TokenBucket,
    list_netns,
    netns_available,
)

needs_netns = pytest.mark.skipif(not netns_available(),
                                 reason="needs root and `ip netns` (the testbed builds network namespaces)")


def unique_prefix() -> str:
    """A prefix no other test (or run) uses, so leftovers never collide."""
    return "t" + uuid.uuid4().hex[:7]


def connects(bed: Testbed, src: int, dst: int) -> bool:
    """Whether node ``src`` opens a TCP connection to node ``dst``'s port (from inside ``src``'s namespace)."""
    code = ("import sys; from benchmarks.netns_testbed import reachable; "
            f"sys.exit(0 if reachable({bed.addr(dst)!r}, {bed.port(dst)}) else 1)")
    proc = bed.spawn(src, [sys.executable, "-c", code])
    return proc.wait(timeout=30) == 0


def start_server(bed: Testbed, i: int) -> subprocess.Popen[bytes]:
    """The testbed's blob server on node ``i``, once it listens."""
    proc = bed.spawn(i, [sys.executable, str(SCRIPT), "serve", "--port", str(bed.port(i))], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc


@pytest.fixture
def bed() -> Iterator[Testbed]:
    """A 3-node testbed at 50 Mbit/s with a fresh prefix."""
    with Testbed(3, 50.0, prefix=unique_prefix()) as testbed:
        yield testbed


@needs_netns
def test_nodes_reach_each_other_and_not_absent_or_killed_nodes(bed: Testbed) -> None:
    assert bed.shaped and [bed.addr(i) for i in range(3)] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    start_server(bed, 0)
    start_server(bed, 1)
    assert connects(bed, 2, 0) and connects(bed, 2, 1) and connects(bed, 0, 1)
    assert not connects(bed, 0, 2)  # nothing was started on node 2
    bed.kill(1)
    assert not connects(bed, 2, 1)
    assert connects(bed, 2, 0)  # the others live on


@needs_netns
def test_a_download_through_the_limited_links_arrives_whole(bed: Testbed) -> None:
    start_server(bed, 0)
    size = 2_000_000
    code = ("import json; from benchmarks.netns_testbed import fetch; "
            f"print(json.dumps(fetch({bed.addr(0)!r}, {bed.port(0)}, '/bytes/{size}', None, 0.0)))")
    proc = bed.spawn(1, [sys.executable, "-c", code], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert json.loads(out)["bytes"] == size


@needs_netns
def test_links_carry_the_configured_shaping() -> None:
    prefix = unique_prefix()
    with Testbed(2, 50.0, prefix=prefix) as bed:
        up = subprocess.run(["tc", "-n", bed.netns(0), "class", "show", "dev", "eth0"], capture_output=True,
                            text=True, check=True).stdout
        down = subprocess.run(["tc", "-n", bed.hub, "class", "show", "dev", "v0"], capture_output=True, text=True,
                              check=True).stdout
    assert "rate 50Mbit" in up and "rate 50Mbit" in down


@needs_netns
def test_exit_removes_every_namespace_and_leftovers_are_cleared() -> None:
    prefix = unique_prefix()
    subprocess.run(["ip", "netns", "add", f"{prefix}-7"], check=True)  # a crashed run's leftover
    with Testbed(3, 50.0, prefix=prefix) as bed:
        names = set(list_netns())
        assert {bed.hub, bed.netns(0), bed.netns(2)} <= names and f"{prefix}-7" not in names
        start_server(bed, 1)
    assert not [ns for ns in list_netns() if ns.startswith(prefix + "-")]


@needs_netns
def test_a_setup_failing_halfway_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = unique_prefix()
    build_node = Testbed._build_node

    def fail_on_node_1(self: Testbed, i: int) -> None:
        if i == 1:
            raise TestbedError("injected: node 1 could not be built")
        build_node(self, i)

    monkeypatch.setattr(Testbed, "_build_node", fail_on_node_1)
    with pytest.raises(TestbedError, match="injected"), Testbed(3, 50.0, prefix=prefix):
        pass
    assert not [ns for ns in list_netns() if ns.startswith(prefix + "-")]


@needs_netns
def test_a_delay_is_applied_or_refused_but_never_dropped_silently() -> None:
    prefix = unique_prefix()
    try:
        with Testbed(2, 50.0, delay_ms=4.0, prefix=prefix) as bed:
            shown = subprocess.run(["tc", "-n", bed.netns(0), "qdisc", "show", "dev", "eth0"], capture_output=True,
                                   text=True, check=True).stdout
            assert "netem" in shown and "delay 2ms" in shown  # half of it each way of a link
    except ShapingUnsupported:
        pass  # this kernel has no sch_netem: refused, as documented
    assert not [ns for ns in list_netns() if ns.startswith(prefix + "-")]


def test_userspace_mode_says_it_does_not_shape_and_gives_each_node_a_port() -> None:
    with Testbed(3, 50.0, prefix=unique_prefix(), userspace=True, base_port=21000) as bed:
        assert not bed.shaped and "NOT SHAPED" in bed.mode()
        assert [(bed.addr(i), bed.port(i)) for i in range(3)] == [("127.0.0.1", 21000 + i) for i in range(3)]
        env = bed.env_for(2)
        assert env["TESTBED_SHAPED"] == "0" and env["TESTBED_RATE_BPS"] == str(50_000_000 // 8)
        proc = bed.spawn(2, [sys.executable, "-c", "import os; print(os.environ['TESTBED_NODE'])"],
                         stdout=subprocess.PIPE)
        assert proc.communicate(timeout=30)[0].strip() == b"2"


class FakeClock:
    """A clock that only moves when the bucket sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_token_bucket_passes_the_burst_then_paces_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, 500.0, clock=clock, sleep=clock.sleep)
    bucket.consume(500)  # the full bucket: no wait
    assert clock.slept == []
    bucket.consume(250)  # empty: a quarter second at 1000 B/s
    assert clock.slept == [pytest.approx(0.25)]
    bucket.consume(2000)  # more than the burst still passes, in debt, at the rate
    assert clock.slept[-1] == pytest.approx(2.0)
    assert clock.now - 100.0 == pytest.approx((500 + 250 + 2000 - 500) / 1000)


def test_token_bucket_refills_only_up_to_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, 500.0, clock=clock, sleep=clock.sleep)
    bucket.consume(500)
    clock.now += 60.0  # a long idle: still only 500 bytes of credit
    assert bucket.reserve(500) == 0.0
    assert bucket.reserve(100) == pytest.approx(0.1)
    assert bucket.reserve(100) == pytest.approx(0.2)  # reservations queue behind each other


def test_token_bucket_rejects_a_zero_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0.0, 100.0)


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the choice made without root")
def test_without_root_the_testbed_falls_back_to_user_space() -> None:
    assert Testbed(2, 50.0, prefix=unique_prefix()).userspace
