"""Behaviour of the version-distribution simulator (benchmarks/distribution_sim.py) on small, exact cases."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from benchmarks.distribution_sim import ALGORITHMS, MIB, SimConfig, Simulator, calibrate, main, simulate

CHUNK = MIB
# Small enough to run in milliseconds, big enough that a chunk's transfer (about 8 ms) dwarfs the latencies.
SMALL = SimConfig(
    replicas=12,
    size_bytes=40 * CHUNK,
    chunk_bytes=CHUNK,
    bytes_per_s=1.25e8,
    rtt_ms=0.5,
    detect_ms=5.0,
    restart_s=0.05,
    chunk_overhead_ms=0.3,
    efficiency=0.9,
)


def run(config: SimConfig) -> tuple[Simulator, float]:
    """Run a simulation, returning the simulator (for its end state) and the last completion time."""
    sim = Simulator(config)
    return sim, sim.run().last_s


@pytest.mark.parametrize("serve", ["fifo", "parallel"])
def test_one_replica_window_one_pays_a_round_trip_and_overhead_per_chunk(serve: str) -> None:
    config = replace(SMALL, replicas=1, window=1, serve=serve, size_bytes=40 * CHUNK + 12345)
    chunks = 41
    expected = config.size_bytes / (config.bytes_per_s * config.efficiency)
    expected += chunks * (config.rtt_ms + config.chunk_overhead_ms) / 1000
    assert simulate(config).last_s == pytest.approx(expected, rel=1e-9)


def test_one_replica_fifo_window_two_keeps_the_link_busy() -> None:
    config = replace(SMALL, replicas=1, window=2, serve="fifo")
    expected = config.size_bytes / (config.bytes_per_s * config.efficiency)
    expected += (config.rtt_ms + config.chunk_overhead_ms) / 1000  # only the first request and last landing show
    assert simulate(config).last_s == pytest.approx(expected, rel=1e-9)


def test_parallel_window_two_shares_the_link_and_idles_a_round_trip_per_pair() -> None:
    config = replace(SMALL, replicas=1, window=2, serve="parallel")
    expected = config.size_bytes / (config.bytes_per_s * config.efficiency)
    expected += 20 * (config.rtt_ms + config.chunk_overhead_ms) / 1000  # 40 chunks streamed two at a time
    assert simulate(config).last_s == pytest.approx(expected, rel=1e-9)


def test_chain_pipeline_adds_one_chunk_and_landing_per_hop() -> None:
    config = replace(SMALL, algorithm="chain")
    cap = config.bytes_per_s * config.efficiency
    landing = (config.rtt_ms / 2 + config.chunk_overhead_ms) / 1000
    first = config.size_bytes / cap + (config.rtt_ms + config.chunk_overhead_ms) / 1000
    expected = first + (config.replicas - 1) * (CHUNK / cap + landing)
    assert simulate(config).last_s == pytest.approx(expected, rel=1e-9)


def test_chain_origin_sends_exactly_one_copy() -> None:
    result = simulate(replace(SMALL, algorithm="chain"))
    assert result.origin_bytes_over_s == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kill_fraction", [0.0, 0.25])
def test_every_replica_ends_with_the_whole_version(algorithm: str, kill_fraction: float) -> None:
    sim, _ = run(replace(SMALL, algorithm=algorithm, kill_fraction=kill_fraction, replicas=16))
    assert [sim.replica_bytes(k) for k in range(sim.replicas)] == [SMALL.size_bytes] * sim.replicas
    assert all(t is not None for t in sim.done_at)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("serve", ["fifo", "parallel"])
def test_killed_replicas_rejoin_without_origin_bytes(algorithm: str, serve: str) -> None:
    result = simulate(replace(SMALL, algorithm=algorithm, kill_fraction=0.25, replicas=16, serve=serve, seed=3))
    assert result.killed == 4
    assert result.rejoin_origin_bytes == 0
    assert result.rejoined_last_s >= SMALL.restart_s


def test_kill_slows_the_chain_behind_it() -> None:
    clean = simulate(replace(SMALL, algorithm="chain", replicas=16))
    faulty = simulate(replace(SMALL, algorithm="chain", replicas=16, kill_fraction=0.25, seed=1))
    assert faulty.survivors_last_s > clean.last_s  # at least one detect delay is paid downstream


def test_tree_of_degree_one_is_the_chain() -> None:
    for kill_fraction in (0.0, 0.25):
        chain = simulate(replace(SMALL, algorithm="chain", kill_fraction=kill_fraction))
        tree = simulate(replace(SMALL, algorithm="tree", degree=1, kill_fraction=kill_fraction))
        assert (tree.last_s, tree.p50_s, tree.p99_s, tree.origin_bytes_over_s, tree.events) == (
            chain.last_s,
            chain.p50_s,
            chain.p99_s,
            chain.origin_bytes_over_s,
            chain.events,
        )


def test_binary_tree_splits_the_parent_uplink() -> None:
    config = replace(SMALL, algorithm="tree", degree=2, replicas=3, chunk_overhead_ms=0.0)
    cap = config.bytes_per_s * config.efficiency
    last = simulate(config).last_s
    # Both children share the root's uplink: each gets half, so they need twice the floor (plus small latencies).
    assert 2 * config.size_bytes / cap < last < 2.05 * config.size_bytes / cap


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_percent_diff_moves_two_percent(algorithm: str) -> None:
    config = replace(SMALL, algorithm=algorithm, size_bytes=100 * CHUNK, diff_fraction=0.02)
    result = simulate(config)
    assert result.moved_bytes_over_s == pytest.approx(0.02, rel=1e-12)
    assert result.origin_bytes_over_s <= 0.02 * config.seeds + 1e-12


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("serve", ["fifo", "parallel"])
def test_never_faster_than_the_floor(algorithm: str, serve: str) -> None:
    config = replace(SMALL, algorithm=algorithm, serve=serve, rtt_ms=0.0, chunk_overhead_ms=0.0, efficiency=1.0)
    result = simulate(config)
    floor = config.size_bytes / config.bytes_per_s
    assert min(result.p50_s, result.last_s) >= floor * (1 - 1e-12)


def test_random_mesh_origin_sends_at_least_one_copy() -> None:
    result = simulate(replace(SMALL, algorithm="random", replicas=20))
    assert result.origin_bytes_over_s >= 1.0 - 1e-12


def test_same_seed_same_result() -> None:
    config = replace(SMALL, algorithm="random", kill_fraction=0.25, replicas=16)
    first, second = simulate(config), simulate(config)
    assert (first.last_s, first.events) == (second.last_s, second.events)


def test_json_output_has_the_stable_keys(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--replicas", "4", "--size-bytes", str(8 * CHUNK), "--chunk-bytes", str(CHUNK), "--json"])
    payload = json.loads(capsys.readouterr().out)
    for key in (
        "algorithm",
        "replicas",
        "size_bytes",
        "chunk_bytes",
        "bytes_per_s",
        "last_s",
        "p50_s",
        "p99_s",
        "origin_bytes_over_s",
        "killed",
        "survivors_last_s",
        "rejoined_last_s",
        "rejoin_origin_bytes",
        "events",
        "sim_wall_s",
    ):
        assert key in payload
    assert payload["replicas"] == 4 and payload["origin_bytes_over_s"] == pytest.approx(1.0)


def test_calibration_recovers_a_simulated_testbed(tmp_path: Path) -> None:
    truth = replace(SMALL, replicas=6, size_bytes=20 * CHUNK, efficiency=0.8, chunk_overhead_ms=2.0)
    sim = Simulator(truth)
    result = sim.run()
    measured = {
        "replicas": truth.replicas,
        "size_bytes": truth.size_bytes,
        "chunk_bytes": truth.chunk_bytes,
        "bytes_per_s": truth.bytes_per_s,
        "rtt_ms": truth.rtt_ms,
        "per_replica_seconds": list(sim.done_at),
        "last_s": result.last_s,
        "origin_bytes": result.origin_bytes_over_s * truth.size_bytes,
    }
    path = tmp_path / "testbed.json"
    path.write_text(json.dumps(measured))
    report = calibrate(str(path), replace(SMALL, chunk_overhead_ms=0.0, efficiency=1.0))
    assert "within 10% on last and p50: yes" in report
