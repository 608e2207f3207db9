"""The trainer's rollout client waits out a moment with no ready replica instead of failing a whole round."""

from __future__ import annotations

from lockstep.trainer.runs.rollouts import GenRequest, RolloutClient
from tests.support.cluster import free_port


def test_a_round_waits_for_a_ready_replica_then_asks_it() -> None:
    """An in-place flip pauses admission on every replica at one activate_at: for a moment none is ready."""
    calls: list[int] = []
    closed_port = free_port()  # nothing listens: the request reaches the replica's address and fails there

    def urls() -> list[str]:
        calls.append(1)
        return [] if len(calls) < 4 else [f"http://127.0.0.1:{closed_port}"]

    client = RolloutClient(urls, no_replica_wait_s=30)
    try:
        [rollout] = client.generate([GenRequest("p", 2, 0.0)])
    finally:
        client.close()
    assert len(calls) == 4
    assert rollout.url.endswith(f":{closed_port}") and rollout.error is not None and "ConnectError" in rollout.error


def test_with_no_ready_replica_for_the_whole_wait_the_round_fails_with_the_reason() -> None:
    client = RolloutClient(lambda: [], no_replica_wait_s=0.2)
    try:
        rollouts = client.generate([GenRequest("p", 2, 0.0), GenRequest("q", 2, 0.0)])
    finally:
        client.close()
    assert [r.error for r in rollouts] == ["no ready replica was found (see GET /cluster)"] * 2
