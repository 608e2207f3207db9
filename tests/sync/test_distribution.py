"""The rule that says which peers each staging replica asks: a chain for large transfers, a binary tree for small
ones, ancestors first, holders after, and never a cycle (a replica only ever waits on replicas above it)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lockstep.store.chunks import CHUNK_MAX_BYTES
from lockstep.sync.distribution import ANCESTOR_PEERS, HOLDER_PEERS, chain_peers, fan_out


def urls(n: int, prefix: str = "r") -> list[str]:
    return [f"http://{prefix}{i:03d}:8000" for i in range(n)]


def test_a_whole_new_model_goes_down_a_chain_in_url_order() -> None:
    staging = urls(10)
    plan = chain_peers(list(reversed(staging)), [], new_bytes=16 << 30)  # the order given does not matter
    assert plan[staging[0]] == []  # the head asks the origin
    assert plan[staging[1]] == [staging[0]]
    assert plan[staging[9]] == [staging[8], staging[7], staging[6], staging[5], staging[4], staging[3]]


def test_a_small_diff_goes_down_a_binary_tree() -> None:
    staging = urls(15)
    plan = chain_peers(staging, [], new_bytes=CHUNK_MAX_BYTES)  # one chunk for 15 replicas
    assert plan[staging[1]] == plan[staging[2]] == [staging[0]]
    assert plan[staging[14]] == [staging[6], staging[2], staging[0]]  # parent, grandparent, root


def test_the_fan_out_follows_the_bytes_to_move_per_replica() -> None:
    assert fan_out(500, 16 * 10**9) == 1 and fan_out(500, None) == 1
    assert fan_out(500, 320 * 10**6) == 2  # 2 % of 16 GB: fewer than one chunk per replica
    assert fan_out(10, 320 * 10**6) == 1


def test_a_replica_staging_alone_asks_the_replicas_that_hold_the_version() -> None:
    holders = urls(8, "h")
    plan = chain_peers(["http://late:8000"], holders, seed=3)
    assert len(plan["http://late:8000"]) == HOLDER_PEERS and set(plan["http://late:8000"]) <= set(holders)


@given(n=st.integers(1, 300), holders=st.integers(0, 10), new_bytes=st.one_of(st.none(), st.integers(0, 1 << 40)))
def test_every_replica_asks_only_replicas_above_it_then_holders(n: int, holders: int, new_bytes: int | None) -> None:
    staging, held = urls(n), urls(holders, "h")
    plan = chain_peers(staging, held, new_bytes=new_bytes)
    rank = {url: i for i, url in enumerate(staging)}
    for url, peers in plan.items():
        ancestors = [p for p in peers if p in rank]
        assert all(rank[p] < rank[url] for p in ancestors)  # no cycle: nobody waits on a replica below it
        assert len(ancestors) <= ANCESTOR_PEERS and url not in peers and len(set(peers)) == len(peers)
        assert peers[:len(ancestors)] == ancestors  # ancestors first, nearest first
        assert [rank[p] for p in ancestors] == sorted((rank[p] for p in ancestors), reverse=True)
        assert set(peers[len(ancestors):]) <= set(held)
