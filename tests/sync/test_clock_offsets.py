"""Replicas whose clocks are not the trainer's: over HTTP each flips at the commit's moment on its own clock."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import pytest

from lockstep.core.clock import SYSTEM_CLOCK, SystemClock
from lockstep.core.settings import Settings
from lockstep.inference.app import create_app
from lockstep.inference.runtime import ReplicaRuntime
from lockstep.sync.coordinator import Coordinator
from lockstep.sync.http_fleet import ClockOffsets, HttpFleet, beat_from_status
from lockstep.sync.protocol import SplitApplied
from tests.support.cluster import serving, wait_for

NOW = 1_700_000_000.0
URL = "http://10.0.0.1:8000"


def status_at(replica_time: object, started_at: float = NOW - 100) -> dict[str, object]:
    return {"time": replica_time, "started_at": started_at}


def test_the_least_delayed_reading_measures_a_replica_clock_that_is_ahead() -> None:
    offsets = ClockOffsets()
    offsets.observe(URL, NOW, NOW + 0.4, status_at(NOW + 2.0 + 0.35))  # slow answer: 2.15 ± 0.2
    offsets.observe(URL, NOW + 1, NOW + 1.01, status_at(NOW + 1 + 2.0 + 0.005))  # quick answer: 2.0 ± 0.005
    assert offsets.error_s(URL) == pytest.approx(0.01)
    assert offsets.of(URL) == pytest.approx(2.0 - 0.005)  # the offset nearest zero that the reading allows


def test_a_clock_behind_is_measured_as_a_negative_offset() -> None:
    offsets = ClockOffsets()
    offsets.observe(URL, NOW, NOW + 0.02, status_at(NOW - 60.0 + 0.01))
    assert offsets.of(URL) == pytest.approx(-60.0 + 0.01)


def test_a_clock_that_agrees_within_the_round_trip_is_left_alone() -> None:
    offsets = ClockOffsets()
    # The replica stamped its answer late in a slow round trip: its clock may well be this one.
    offsets.observe(URL, NOW, NOW + 0.2, status_at(NOW + 0.19))
    assert offsets.of(URL) == 0.0
    assert ClockOffsets().of(URL) == 0.0 and ClockOffsets().error_s(URL) == math.inf


def test_a_restarted_replica_is_measured_afresh() -> None:
    offsets = ClockOffsets()
    offsets.observe(URL, NOW, NOW + 0.001, status_at(NOW + 30.0, started_at=NOW - 100))
    offsets.observe(URL, NOW + 1, NOW + 1.2, status_at(NOW + 1.1, started_at=NOW))  # another process, slower answer
    assert offsets.of(URL) == 0.0


@pytest.mark.parametrize("bad", [None, "1700000000", True, math.nan, math.inf])
def test_an_answer_without_a_time_measures_nothing(bad: object) -> None:
    offsets = ClockOffsets()
    offsets.observe(URL, NOW, NOW + 0.001, status_at(bad))
    assert offsets.of(URL) == 0.0 and offsets.error_s(URL) == math.inf


def test_the_times_a_replica_reports_are_read_on_the_readers_clock() -> None:
    status = {"replica_id": "r1", "state": "serving", "ready": True, "started_at": NOW - 10 + 5.0,
              "serving": {"version": 3, "model": "versions/000003", "since": NOW - 1 + 5.0},
              "splits": [SplitApplied(rollout="r", version=3, step=1, share=10.0, at=NOW + 5.0).model_dump()]}
    beat = beat_from_status(URL, status, NOW, None, clock_offset=5.0)
    assert beat.serving is not None and beat.serving.since == pytest.approx(NOW - 1)
    assert beat.started_at == pytest.approx(NOW - 10) and beat.splits[0].at == pytest.approx(NOW)
    assert beat.time == NOW


class OffsetClock(SystemClock):
    """The system clock, ``offset_s`` ahead (negative: behind), as on a node whose clock was never synchronized."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def time(self) -> float:
        return time.time() + self.offset_s


@pytest.mark.e2e
def test_replicas_whose_clocks_are_off_flip_at_the_commits_moment(builtin_dir: Path) -> None:
    # 5 s ahead: without the measure it would flip as soon as it heard the commit, before the others.
    # 60 s behind: it would serve the old version for another minute while the other serves the new one.
    offsets = {"ahead": 5.0, "behind": -60.0}
    with contextlib.ExitStack() as stack:
        runtimes: dict[str, ReplicaRuntime] = {}
        urls: dict[str, str] = {}
        for name, offset in offsets.items():
            settings = Settings(builtin_dir=builtin_dir, hf_hub_offline=True, device="cpu", dtype="float32",
                                shared_dir=None, replica_id=name, api_token=None)
            runtimes[name] = ReplicaRuntime(settings, clock=OffsetClock(offset))
            urls[name] = stack.enter_context(serving(create_app(settings, runtime=runtimes[name])))
        for name, rt in runtimes.items():
            wait_for(lambda rt=rt: rt.replica.ready, 120, 0.05, f"replica {name} ready")

        fleet = HttpFleet(Settings(poll_interval_s=0.05, stage_timeout_s=120), lambda: list(urls.values()),
                          clock=SYSTEM_CLOCK)
        coordinator = Coordinator.over_http(Settings(poll_interval_s=0.05, stage_timeout_s=120), fleet,
                                            clock=SYSTEM_CLOCK, owner="test", data_dir=None)
        result = coordinator.publish("builtin:tiny-s1")
        assert result.outcome == "committed", result.summary()
        assert result.activate_at is not None
        for name, rt in runtimes.items():
            url = urls[name]
            assert fleet.clock_offsets.of(url) == pytest.approx(offsets[name], abs=fleet.clock_offsets.error_s(url))
            wait_for(lambda rt=rt: rt.replica.serving is not None and rt.replica.serving.version == result.version,
                     30, 0.02, f"replica {name} serving v{result.version}")
            serving_info = rt.replica.serving_info()
            assert serving_info is not None and serving_info.since is not None
            flipped_at = serving_info.since - offsets[name]  # on the trainer's clock
            assert flipped_at >= result.activate_at - fleet.clock_offsets.error_s(url), name
        for beat in fleet.live():  # what the trainer reads is on its own clock
            assert beat.serving is not None and beat.serving.since is not None
            assert beat.serving.since >= result.activate_at - fleet.clock_offsets.error_s(beat.url or "")
