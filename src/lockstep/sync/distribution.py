"""Which peers each replica asks for a version's chunks: the rule the coordinator applies at every stage.

The replicas that stage a version form a chain in the order the coordinator lists them (by URL, so every
stage of one fleet forms the same chain). Replica k asks its nearest predecessors first, k-1 then k-2...,
then the replicas that already hold the version, then the origin. A predecessor answers a chunk it is still
fetching as soon as it has verified it, so a chunk travels down the chain like a pipeline: the origin sends
each chunk about once, and every replica downloads once and uploads once, near its link rate.

A replica that dies mid-transfer is skipped by the next one (a refused connection), which asks the one before:
that one holds at least as much. A replica that stages alone (catching up, joining late, rejoining after a
crash) asks the replicas that hold the version. ``benchmarks/distribution_sim.py`` models the same rule.
"""

from __future__ import annotations

import random

CHAIN_PEERS = 6  # predecessors a replica may fall back through before it asks holders or the origin
HOLDER_PEERS = 4  # replicas that already hold the version, asked after the predecessors


def chain_peers(staging: list[str], holders: list[str], *, seed: int = 0) -> dict[str, list[str]]:
    """For each staging URL, the peer URLs to ask first, nearest first (the origin is always the last resort)."""
    chain = sorted(dict.fromkeys(staging))
    rng = random.Random(seed)
    others = [h for h in dict.fromkeys(holders) if h not in chain]
    plan: dict[str, list[str]] = {}
    for k, url in enumerate(chain):
        before = chain[max(0, k - CHAIN_PEERS):k][::-1]
        plan[url] = before + rng.sample(others, min(HOLDER_PEERS, len(others)))
    return plan
