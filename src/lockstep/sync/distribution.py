"""Which peers each replica asks for a version's chunks: the rule the coordinator applies at every stage.

The replicas that stage a version together are ordered by URL (so every stage of one fleet orders them alike)
and placed in a pipelined tree of fan-out ``d``: replica k's parent is (k-1)//d, the root's is the origin.
A replica asks its parent first, then its grandparent and so on up the tree, then a few replicas that already
hold the version, then the origin. A parent answers a chunk it is still fetching as soon as it has verified it,
so each chunk flows down the tree like a pipeline and the origin sends it about once.

The fan-out depends on how many bytes must move. With d = 1 the tree is a chain: every replica receives once
and sends once at its full link rate, so a large transfer of D bytes takes about D/B, plus N chunk times for
the pipeline to fill. With d = 2 each parent splits its uplink between two children (2·D/B) but the tree is only
log2(N) deep. So: a chain when D is at least N chunks (a new model), a binary tree when it is less (a fine-tune
that changed a few tensors, on a large fleet). ``benchmarks/distribution_sim.py`` models the same rule.

A replica that dies mid-transfer is skipped by its children (a refused connection): they ask its parent, which
holds at least as much. A replica that stages alone (catching up, joining late, restarting) asks the replicas
that hold the version.
"""

from __future__ import annotations

import random

from lockstep.store.chunks import CHUNK_MAX_BYTES

ANCESTOR_PEERS = 6  # ancestors a replica may fall back through before it asks holders or the origin
HOLDER_PEERS = 4  # replicas that already hold the version, asked after the ancestors


def fan_out(replicas: int, new_bytes: int | None, chunk_bytes: int = CHUNK_MAX_BYTES) -> int:
    """1 (a chain) when the bytes to move fill at least one chunk per replica, else 2 (a binary tree)."""
    if new_bytes is None or new_bytes >= replicas * chunk_bytes:
        return 1
    return 2


def chain_peers(staging: list[str], holders: list[str], *, new_bytes: int | None = None,
                chunk_bytes: int = CHUNK_MAX_BYTES, seed: int = 0) -> dict[str, list[str]]:
    """For each staging URL, the peer URLs to ask first, nearest first (the origin is always the last resort).

    ``new_bytes``: what each replica lacks (the version's new chunks); None when unknown (a chain)."""
    order = sorted(dict.fromkeys(staging))
    degree = fan_out(len(order), new_bytes, chunk_bytes)
    rng = random.Random(seed)
    others = [h for h in dict.fromkeys(holders) if h not in order]
    plan: dict[str, list[str]] = {}
    for k, url in enumerate(order):
        ancestors: list[str] = []
        node = k
        while node > 0 and len(ancestors) < ANCESTOR_PEERS:
            node = (node - 1) // degree
            ancestors.append(order[node])
        plan[url] = ancestors + rng.sample(others, min(HOLDER_PEERS, len(others)))
    return plan
