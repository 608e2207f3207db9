"""Discrete-event simulator of peer-to-peer version distribution: how fast a new model version reaches N replicas.

A version of S bytes, cut into content-addressed chunks, starts on one origin (the trainer) and must reach every
replica; replicas re-serve the chunks they hold. Three algorithms share one link model:

- ``chain``: the coordinator orders the replicas 0..N-1; replica k fetches the chunks it lacks, in manifest order,
  from its nearest live upstream in [k-1, k-2, ..., 0, origin] (pipelined, chunk-granular store-and-forward; a
  request for a chunk the upstream does not hold yet waits there until it does);
- ``tree``: the same over a d-ary tree (replica k's parent is (k-1)//d, the root's is the origin; on a failure,
  move to the grandparent and so on); the chain is the tree with d=1;
- ``random``: Kraken-like mesh: each replica connected to a few random others, the origin to a few seeds; each
  replica requests the rarest chunk (among its connections) it lacks from the connection with the fewest uploads.

Link model: every node (origin included) has an uplink and a downlink of ``bytes_per_s * efficiency``; concurrent
flows share them fluidly, max-min fair (water-filling, recomputed at each event for the flows on the links whose
flow set changed, the other flows held at their rates: exact for the chain and tree, an approximation in the mesh).
Each request costs one round trip before bytes flow (half to reach the upstream, half for the last byte to land)
plus ``chunk_overhead_ms`` after the last byte (verify, write) before the chunk counts as held.

Faults (``--kill-fraction``): replicas killed at a random moment during the transfer; those streaming from one notice
after ``--detect-ms``, discard the partial chunk and move upstream; the killed one restarts after ``--restart-s``
keeping its verified chunks and fetches the rest from any live replica holding each chunk (fewest uploads), from the
origin only if no replica can serve it (counted as ``rejoin_origin_bytes``).

    python benchmarks/distribution_sim.py --replicas 500 --size-gb 16 --gbps 25 --chunk-mib 4 --algorithm chain
    python benchmarks/distribution_sim.py --goals
    python benchmarks/distribution_sim.py --calibrate testbed_run.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import sys
import time
from array import array
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

MIB = 1 << 20
ALGORITHMS = ("chain", "tree", "random")
SERVE_MODES = ("parallel", "fifo")
# How many of a chunk's most recent holders a rejoining replica looks at to find the least loaded one: bounds the
# cost per request at large N (holders are appended as chunks land, so the newest are the least loaded in a chain).
REJOIN_SCAN = 64

# Event kinds, in the heap as (time, seq, kind, transfer or node, version).
ARRIVE, FINISH, DELIVER, FAIL, KILL, RESTART = range(6)
# Transfer states.
TRAVEL, WAIT, STREAM, SENT, CLOSED = range(5)


@dataclass(frozen=True)
class SimConfig:
    """Settings of one simulated distribution."""

    replicas: int = 500
    size_bytes: int = 16 * 10**9
    chunk_bytes: int = 4 * MIB
    bytes_per_s: float = 25e9 / 8
    algorithm: str = "chain"
    window: int = 2
    rtt_ms: float = 0.2
    detect_ms: float = 50.0
    restart_s: float = 2.0
    degree: int = 2
    peers: int = 5
    seeds: int = 3
    kill_fraction: float = 0.0
    diff_fraction: float = 0.0
    chunk_overhead_ms: float = 0.0
    efficiency: float = 1.0
    block_chunks: int = 1
    serve: str = "fifo"
    commit_s: float = 0.2
    seed: int = 0


@dataclass
class SimResult:
    """What one run measured (the ``--json`` object)."""

    algorithm: str
    replicas: int
    size_bytes: int
    chunk_bytes: int
    bytes_per_s: float
    last_s: float
    p50_s: float
    p99_s: float
    origin_bytes_over_s: float
    killed: int
    survivors_last_s: float
    rejoined_last_s: float
    rejoin_origin_bytes: float
    events: int
    sim_wall_s: float
    block_chunks: int
    serve: str
    diff_fraction: float
    moved_bytes_over_s: float
    floor_s: float
    commit_s: float
    transfer_plus_commit_s: float


class Transfer:
    """One chunk request: travels to its source, may wait there, streams, then lands."""

    __slots__ = ("dst", "src", "chunk", "size", "epoch", "remaining", "rate", "stamp", "version", "state")

    def __init__(self, dst: int, src: int, chunk: int, size: int, epoch: int) -> None:
        self.dst = dst
        self.src = src
        self.chunk = chunk
        self.size = size
        self.epoch = epoch
        self.remaining = float(size)
        self.rate = 0.0
        self.stamp = 0.0
        self.version = 0
        self.state = TRAVEL


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def next_prime(n: int) -> int:
    """Smallest prime >= n (n small: a few thousand chunks)."""
    candidate = max(n, 2)
    while any(candidate % d == 0 for d in range(2, int(candidate**0.5) + 1)):
        candidate += 1
    return candidate


class AncestorPolicy:
    """Chain and tree: fetch missing chunks in manifest order from the nearest live eligible ancestor."""

    def __init__(self, sim: Simulator, degree: int) -> None:
        self.sim = sim
        self.degree = degree
        n = sim.replicas
        self.upstream = [self.parent(k) for k in range(n)]
        self.cursor = [0] * n
        self.retry: list[list[int]] = [[] for _ in range(n)]

    def parent(self, node: int) -> int:
        """The next node up the list: (k-1)//d, the origin above replica 0."""
        return self.sim.origin if node == 0 else (node - 1) // self.degree

    def pick(self, node: int) -> tuple[int, int] | None:
        """Next chunk to request and from whom, or None when nothing is left to ask for."""
        retry = self.retry[node]
        if retry:
            return heapq.heappop(retry), self.upstream[node]
        needed = self.sim.needed
        if self.cursor[node] >= len(needed):
            return None
        chunk = needed[self.cursor[node]]
        self.cursor[node] += 1
        return chunk, self.upstream[node]

    def failed(self, transfer: Transfer) -> None:
        """The source died: move up to the next eligible ancestor and ask again for the chunk."""
        node = transfer.dst
        sim = self.sim
        while not sim.eligible_upstream(self.upstream[node]):
            self.upstream[node] = self.parent(self.upstream[node])
        heapq.heappush(self.retry[node], transfer.chunk)

    def delivered(self, node: int, chunk: int) -> None:
        """Nothing to track: the order is fixed."""

    def killed(self, node: int) -> None:
        """Nothing to track: downstream replicas notice through their failed transfers."""


class MeshPolicy:
    """Kraken-like: request the locally rarest missing chunk from the least-loaded connection that holds it."""

    def __init__(self, sim: Simulator, peers: int, seeds: int, rng: random.Random) -> None:
        self.sim = sim
        n = sim.replicas
        self.neighbors: list[list[int]] = [[] for _ in range(n + 1)]
        linked: list[set[int]] = [set() for _ in range(n)]
        for node in range(n):
            while len(linked[node]) < min(peers, n - 1):
                other = rng.randrange(n)
                if other != node and other not in linked[node]:
                    linked[node].add(other)
                    linked[other].add(node)
        for node in range(n):
            self.neighbors[node] = sorted(linked[node])
        for seed in rng.sample(range(n), min(seeds, n)):
            self.neighbors[seed].append(sim.origin)
            self.neighbors[sim.origin].append(seed)
        # Per-node pseudo-random relabelling of chunk ids: set.pop() then yields a different tie-break order on each
        # node, so neighbours do not all chase the same rarest chunk (cheap stand-in for a random choice).
        self.prime = next_prime(sim.chunk_count)
        self.scale = [rng.randrange(1, self.prime) for _ in range(n)]
        self.inverse = [pow(a, -1, self.prime) for a in self.scale]
        self.shift = [rng.randrange(self.prime) for _ in range(n)]
        max_count = max(len(nb) for nb in self.neighbors) + 1
        self.counts = [array("H", bytes(2 * sim.chunk_count)) for _ in range(n)]
        self.buckets: list[list[set[int]]] = [[set() for _ in range(max_count + 1)] for _ in range(n)]
        self.pending: list[set[int]] = [set() for _ in range(n)]
        for node in self.neighbors[sim.origin]:
            for chunk in sim.needed:
                self.counts[node][chunk] = 1
                self.buckets[node][1].add(self.key(node, chunk))

    def key(self, node: int, chunk: int) -> int:
        """The node's private label for a chunk."""
        return (chunk * self.scale[node] + self.shift[node]) % self.prime

    def chunk_of(self, node: int, key: int) -> int:
        """Inverse of key()."""
        return ((key - self.shift[node]) * self.inverse[node]) % self.prime

    def pick(self, node: int) -> tuple[int, int] | None:
        """Rarest fetchable chunk and its least-loaded holder among the node's connections."""
        for bucket in self.buckets[node]:
            if bucket:
                chunk = self.chunk_of(node, bucket.pop())
                self.pending[node].add(chunk)
                return chunk, self.best_holder(node, chunk)
        return None

    def best_holder(self, node: int, chunk: int) -> int:
        """Connection holding the chunk with the fewest uploads; the origin loses ties."""
        sim = self.sim
        best, best_load = -1, math.inf
        for other in self.neighbors[node]:
            if other == sim.origin:
                load = len(sim.up[other]) + 0.5
            elif sim.alive[other] and not sim.ever_killed[other] and sim.have[other][chunk]:
                load = len(sim.up[other])
            else:
                continue
            if load < best_load:
                best, best_load = other, load
        return best

    def failed(self, transfer: Transfer) -> None:
        """Put the chunk back among the fetchable ones if a live connection still holds it."""
        node, chunk = transfer.dst, transfer.chunk
        self.pending[node].discard(chunk)
        count = self.counts[node][chunk]
        if count:
            self.buckets[node][count].add(self.key(node, chunk))

    def delivered(self, node: int, chunk: int) -> None:
        """Tell the node's connections it holds one more chunk, and wake the idle ones."""
        sim = self.sim
        self.pending[node].discard(chunk)
        if sim.ever_killed[node]:
            return  # rejoined replicas left the mesh (their connections saw them close)
        for other in self.neighbors[node]:
            if other == sim.origin or not sim.alive[other] or sim.ever_killed[other]:
                continue
            count = self.counts[other][chunk]
            self.counts[other][chunk] = count + 1
            if not sim.have[other][chunk] and chunk not in self.pending[other]:
                buckets, key = self.buckets[other], self.key(other, chunk)
                if count:
                    buckets[count].discard(key)
                buckets[count + 1].add(key)
                if sim.outstanding[other] < sim.config.window:
                    sim.fill(other)

    def killed(self, node: int) -> None:
        """The node's connections close: its chunks no longer count for its neighbours."""
        sim = self.sim
        held = [chunk for chunk in sim.needed if sim.have[node][chunk]]
        for other in self.neighbors[node]:
            if other == sim.origin or not sim.alive[other] or sim.ever_killed[other]:
                continue
            counts, buckets, pending, have = (
                self.counts[other],
                self.buckets[other],
                self.pending[other],
                sim.have[other],
            )
            for chunk in held:
                count = counts[chunk]
                counts[chunk] = count - 1
                if not have[chunk] and chunk not in pending:
                    key = self.key(other, chunk)
                    buckets[count].discard(key)
                    if count > 1:
                        buckets[count - 1].add(key)


class RejoinPolicy:
    """A restarted replica: missing chunks in manifest order, each from the least-loaded live replica holding it."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.cursor = [0] * sim.replicas
        self.retry: list[list[int]] = [[] for _ in range(sim.replicas)]

    def restart(self, node: int) -> None:
        """Start over the manifest; chunks already verified on disk are skipped."""
        self.cursor[node] = 0
        self.retry[node] = []

    def pick(self, node: int) -> tuple[int, int] | None:
        """Next missing chunk and its source."""
        sim = self.sim
        retry = self.retry[node]
        if retry:
            chunk = heapq.heappop(retry)
        else:
            needed, have, cursor = sim.needed, sim.have[node], self.cursor[node]
            while cursor < len(needed) and have[needed[cursor]]:
                cursor += 1
            if cursor >= len(needed):
                self.cursor[node] = cursor
                return None
            chunk = needed[cursor]
            self.cursor[node] = cursor + 1
        return chunk, self.source(chunk)

    def source(self, chunk: int) -> int:
        """Least-loaded live holder; else wait at the live replica furthest ahead; the origin only as a last resort."""
        sim = self.sim
        best, best_load, scanned = -1, math.inf, 0
        for other in reversed(sim.holders[chunk]):
            if not sim.alive[other]:
                continue
            load = len(sim.up[other])
            if load < best_load:
                best, best_load = other, load
                if load == 0:
                    break
            scanned += 1
            if scanned >= REJOIN_SCAN:
                break
        if best >= 0:
            return best
        ahead = [k for k in range(sim.replicas) if sim.alive[k] and not sim.ever_killed[k]]
        if ahead:
            return max(ahead, key=lambda k: sim.held_count[k])
        return sim.origin

    def failed(self, transfer: Transfer) -> None:
        """Ask again for the chunk, from whoever holds it now."""
        heapq.heappush(self.retry[transfer.dst], transfer.chunk)

    def delivered(self, node: int, chunk: int) -> None:
        """Nothing to track."""


class Simulator:
    """Event loop, fluid link model, replica state and fault injection for one distribution."""

    def __init__(self, config: SimConfig) -> None:
        if config.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {config.algorithm!r}")
        if config.serve not in SERVE_MODES:
            raise ValueError(f"unknown serve mode {config.serve!r}")
        self.config = config
        rng = random.Random(config.seed)
        self.replicas = n = config.replicas
        self.origin = n
        self.cap = config.bytes_per_s * config.efficiency
        self.unit = config.chunk_bytes * config.block_chunks
        self.chunk_count = max(1, math.ceil(config.size_bytes / self.unit))
        last = config.size_bytes - self.unit * (self.chunk_count - 1)
        self.sizes = [self.unit] * (self.chunk_count - 1) + [last]
        if config.diff_fraction > 0:
            new = max(1, round(config.diff_fraction * self.chunk_count))
            self.needed = sorted(rng.sample(range(self.chunk_count), new))
        else:
            self.needed = list(range(self.chunk_count))
        self.needed_bytes = sum(self.sizes[c] for c in self.needed)
        self.half_rtt = config.rtt_ms / 2000
        self.land_delay = self.half_rtt + config.chunk_overhead_ms / 1000
        self.detect_s = config.detect_ms / 1000

        have_row = bytearray(b"\x01" * self.chunk_count)
        for chunk in self.needed:
            have_row[chunk] = 0
        self.have = [bytearray(have_row) for _ in range(n)]
        self.held_count = [self.chunk_count - len(self.needed)] * n
        self.up: list[list[Transfer]] = [[] for _ in range(n + 1)]
        self.down: list[list[Transfer]] = [[] for _ in range(n + 1)]
        self.waiters: list[dict[int, list[Transfer]]] = [{} for _ in range(n + 1)]
        # serve="fifo": one connection per (source, destination) pair streams one chunk at a time, the other
        # requests queue behind it (HTTP/1.1 keep-alive pipelining); "parallel": each request streams at once.
        self.fifo = config.serve == "fifo"
        self.busy_pairs: dict[tuple[int, int], list[Transfer]] = {}
        self.outstanding = [0] * n
        self.alive = [True] * n
        self.ever_killed = [False] * n
        self.epoch = [0] * n
        self.done_at: list[float | None] = [0.0 if not self.needed else None] * n
        self.holders: list[list[int]] = [[] for _ in range(self.chunk_count)]
        self.track_holders = config.kill_fraction > 0
        self.origin_bytes = 0.0
        self.rejoin_origin_bytes = 0.0
        self.received_bytes = 0.0

        self.heap: list[tuple[float, int, int, object, int]] = []
        self.seq = 0
        self.now = 0.0
        self.events = 0

        if config.algorithm == "random":
            self.main_policy: AncestorPolicy | MeshPolicy = MeshPolicy(self, config.peers, config.seeds, rng)
        else:
            self.main_policy = AncestorPolicy(self, 1 if config.algorithm == "chain" else config.degree)
        self.rejoin_policy = RejoinPolicy(self)

        self.victims = rng.sample(range(n), round(config.kill_fraction * n)) if config.kill_fraction > 0 else []
        floor = self.needed_bytes / self.cap
        for victim in self.victims:
            self.push(rng.uniform(0, floor), KILL, victim)

    # -- event plumbing -------------------------------------------------------------------------------------------

    def push(self, at: float, kind: int, what: object, version: int = 0) -> None:
        """Schedule an event."""
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, what, version))

    def run(self) -> SimResult:
        """Run to completion and summarize."""
        started = time.perf_counter()
        for node in range(self.replicas):
            self.fill(node)
        heap, handlers = self.heap, (self.on_arrive, self.on_finish, self.on_deliver, self.on_fail)
        while heap:
            at, _, kind, what, version = heapq.heappop(heap)
            self.now = at
            self.events += 1
            if kind <= FAIL:
                handlers[kind](what, version)  # type: ignore[arg-type]
            elif kind == KILL:
                self.kill(what)  # type: ignore[arg-type]
            else:
                self.restart(what)  # type: ignore[arg-type]
        return self.summarize(time.perf_counter() - started)

    def policy(self, node: int) -> AncestorPolicy | MeshPolicy | RejoinPolicy:
        """Who decides what the node fetches next."""
        return self.rejoin_policy if self.ever_killed[node] else self.main_policy

    def eligible_upstream(self, node: int) -> bool:
        """A chain/tree node may stream from the origin or from a live replica that never restarted."""
        return node == self.origin or (self.alive[node] and not self.ever_killed[node])

    def holds(self, node: int, chunk: int) -> bool:
        """Whether the node can serve the chunk now."""
        return node == self.origin or bool(self.have[node][chunk])

    # -- replica behaviour ----------------------------------------------------------------------------------------

    def fill(self, node: int) -> None:
        """Issue requests until the node's window is full or it has nothing left to ask for."""
        if not self.alive[node]:
            return
        policy, window = self.policy(node), self.config.window
        while self.outstanding[node] < window:
            choice = policy.pick(node)
            if choice is None:
                return
            chunk, src = choice
            self.outstanding[node] += 1
            transfer = Transfer(node, src, chunk, self.sizes[chunk], self.epoch[node])
            self.push(self.now + self.half_rtt, ARRIVE, transfer)

    def on_arrive(self, transfer: Transfer, _version: int) -> None:
        """The request reaches its source: stream now, wait for the chunk there, or find the source dead."""
        if transfer.epoch != self.epoch[transfer.dst]:
            return
        src = transfer.src
        if src != self.origin and not self.alive[src]:
            transfer.state = CLOSED
            self.push(self.now + self.detect_s, FAIL, transfer)
        elif self.holds(src, transfer.chunk):
            self.start_stream(transfer)
        else:
            transfer.state = WAIT
            self.waiters[src].setdefault(transfer.chunk, []).append(transfer)

    def start_stream(self, transfer: Transfer) -> None:
        """Bytes start flowing: the transfer joins its source's uplink and its destination's downlink."""
        src, dst = transfer.src, transfer.dst
        if self.fifo:
            queue = self.busy_pairs.get((src, dst))
            if queue is not None:
                transfer.state = WAIT
                queue.append(transfer)
                return
            self.busy_pairs[(src, dst)] = []
        transfer.state = STREAM
        transfer.stamp = self.now
        up, down = self.up[src], self.down[dst]
        up.append(transfer)
        down.append(transfer)
        if len(up) == 1 and len(down) == 1:
            self.set_rate(transfer, self.cap)  # the common chain case: alone on both links
        else:
            self.reshare(((src, True), (dst, False)))

    def next_in_pair(self, src: int, dst: int) -> None:
        """serve=fifo: the pair's connection is free; stream the next queued request on it."""
        queue = self.busy_pairs.pop((src, dst), None)
        while queue:
            transfer = queue.pop(0)
            if transfer.state == WAIT and transfer.epoch == self.epoch[dst]:
                self.start_stream(transfer)  # takes the free connection
                self.busy_pairs[(src, dst)] = queue
                return

    def on_finish(self, transfer: Transfer, version: int) -> None:
        """The last byte left the source; it lands half a round trip (plus per-chunk overhead) later."""
        if transfer.state != STREAM or version != transfer.version:
            return
        transfer.state = SENT
        self.count_sent(transfer, transfer.size)
        src, dst = transfer.src, transfer.dst
        up, down = self.up[src], self.down[dst]
        up.remove(transfer)
        down.remove(transfer)
        if up or down:
            self.reshare(((src, True), (dst, False)))
        self.push(self.now + self.land_delay, DELIVER, transfer)
        if self.fifo:
            self.next_in_pair(src, dst)

    def count_sent(self, transfer: Transfer, sent: float) -> None:
        """Account bytes that left the origin (partial chunks included: the link carried them)."""
        if transfer.src == self.origin:
            self.origin_bytes += sent
            if self.ever_killed[transfer.dst]:
                self.rejoin_origin_bytes += sent

    def on_deliver(self, transfer: Transfer, _version: int) -> None:
        """The chunk is verified on the destination: it holds it, serves waiters, and asks for more."""
        node, chunk = transfer.dst, transfer.chunk
        if transfer.state != SENT or transfer.epoch != self.epoch[node]:
            return
        transfer.state = CLOSED
        self.have[node][chunk] = 1
        self.held_count[node] += 1
        self.received_bytes += transfer.size
        if self.track_holders:
            self.holders[chunk].append(node)
        if self.held_count[node] == self.chunk_count:
            self.done_at[node] = self.now
        for waiter in self.waiters[node].pop(chunk, ()):
            if waiter.state == WAIT and waiter.epoch == self.epoch[waiter.dst]:
                self.start_stream(waiter)
        self.outstanding[node] -= 1
        self.policy(node).delivered(node, chunk)
        self.fill(node)

    def on_fail(self, transfer: Transfer, _version: int) -> None:
        """The destination noticed its source died: the policy picks another source."""
        node = transfer.dst
        if transfer.epoch != self.epoch[node]:
            return
        self.outstanding[node] -= 1
        self.policy(node).failed(transfer)
        self.fill(node)

    # -- faults ---------------------------------------------------------------------------------------------------

    def kill(self, node: int) -> None:
        """The replica dies: its flows stop now, those fetching from it find out after detect_ms."""
        if not self.alive[node] or self.done_at[node] is not None:
            return  # finished before its kill time: nothing was mid-transfer
        self.alive[node] = False
        self.epoch[node] += 1
        self.outstanding[node] = 0
        changed: list[tuple[int, bool]] = [(node, True), (node, False)]
        for transfer in self.down[node]:  # its own downloads: the partial chunk is lost
            transfer.remaining -= transfer.rate * (self.now - transfer.stamp)
            self.count_sent(transfer, transfer.size - transfer.remaining)
            transfer.state = CLOSED
            self.up[transfer.src].remove(transfer)
            changed.append((transfer.src, True))
        for transfer in self.up[node]:  # its uploads: the receivers see a broken connection
            transfer.state = CLOSED
            self.down[transfer.dst].remove(transfer)
            changed.append((transfer.dst, False))
            self.push(self.now + self.detect_s, FAIL, transfer)
        for waiting in self.waiters[node].values():
            for transfer in waiting:
                if transfer.state == WAIT:
                    transfer.state = CLOSED
                    self.push(self.now + self.detect_s, FAIL, transfer)
        for pair in [pair for pair in self.busy_pairs if node in pair]:
            for transfer in self.busy_pairs.pop(pair):
                if transfer.state == WAIT and pair[0] == node:
                    transfer.state = CLOSED
                    self.push(self.now + self.detect_s, FAIL, transfer)
        self.down[node] = []
        self.up[node] = []
        self.waiters[node] = {}
        self.reshare(changed)
        self.main_policy.killed(node)
        self.ever_killed[node] = True
        self.push(self.now + self.config.restart_s, RESTART, node)

    def restart(self, node: int) -> None:
        """The replica is back with the chunks it had verified; it fetches the rest from peers."""
        self.alive[node] = True
        self.rejoin_policy.restart(node)
        if self.held_count[node] == self.chunk_count:
            self.done_at[node] = self.now
        self.fill(node)

    # -- fluid link model -----------------------------------------------------------------------------------------

    def set_rate(self, transfer: Transfer, rate: float) -> None:
        """Bring the transfer's progress up to now and, if its rate changed, reschedule its finish."""
        now = self.now
        transfer.remaining -= transfer.rate * (now - transfer.stamp)
        transfer.stamp = now
        if rate != transfer.rate:
            transfer.rate = rate
            transfer.version += 1
            if rate > 0:
                self.push(now + max(transfer.remaining, 0.0) / rate, FINISH, transfer, transfer.version)

    def reshare(self, links: Iterable[tuple[int, bool]]) -> None:
        """Max-min (water-filling) rates for the flows on links whose flow set changed; other flows keep theirs."""
        flows: list[Transfer] = []
        seen: set[Transfer] = set()
        for node, is_up in links:
            for transfer in self.up[node] if is_up else self.down[node]:
                if transfer not in seen:
                    seen.add(transfer)
                    flows.append(transfer)
        if not flows:
            return
        cap = self.cap
        if len(flows) == 1:
            only = flows[0]
            if len(self.up[only.src]) == 1 and len(self.down[only.dst]) == 1:
                self.set_rate(only, cap)  # the common chain case: alone on both links
                return
        left: dict[int, float] = {}
        members: dict[int, list[Transfer]] = {}
        for transfer in flows:
            for key, on_link in (
                (2 * transfer.src, self.up[transfer.src]),
                (2 * transfer.dst + 1, self.down[transfer.dst]),
            ):
                if key not in members:
                    left[key] = cap - sum(other.rate for other in on_link if other not in seen)
                    members[key] = []
                members[key].append(transfer)
        while members:
            key = min(members, key=lambda k: left[k] / len(members[k]))
            share = max(left[key] / len(members[key]), 0.0)
            for transfer in members.pop(key):
                self.set_rate(transfer, share)
                other = 2 * transfer.dst + 1 if key == 2 * transfer.src else 2 * transfer.src
                if other in members:
                    members[other].remove(transfer)
                    left[other] -= share
                    if not members[other]:
                        del members[other]

    # -- results --------------------------------------------------------------------------------------------------

    def replica_bytes(self, node: int) -> int:
        """Bytes of the version the replica holds."""
        return sum(size for size, held in zip(self.sizes, self.have[node], strict=True) if held)

    def summarize(self, wall_s: float) -> SimResult:
        """The run's figures."""
        config = self.config
        unfinished = [k for k, t in enumerate(self.done_at) if t is None]
        if unfinished:
            raise RuntimeError(f"{len(unfinished)} replicas never finished (first: {unfinished[:5]})")
        done = [t for t in self.done_at if t is not None]
        survivors = [t for k, t in enumerate(self.done_at) if t is not None and not self.ever_killed[k]]
        rejoined = [t for k, t in enumerate(self.done_at) if t is not None and self.ever_killed[k]]
        last = max(done)
        return SimResult(
            algorithm=config.algorithm,
            replicas=config.replicas,
            size_bytes=config.size_bytes,
            chunk_bytes=config.chunk_bytes,
            bytes_per_s=config.bytes_per_s,
            last_s=last,
            p50_s=percentile(done, 50),
            p99_s=percentile(done, 99),
            origin_bytes_over_s=self.origin_bytes / config.size_bytes,
            killed=sum(self.ever_killed),
            survivors_last_s=max(survivors) if survivors else 0.0,
            rejoined_last_s=max(rejoined) if rejoined else 0.0,
            rejoin_origin_bytes=self.rejoin_origin_bytes,
            events=self.events,
            sim_wall_s=wall_s,
            block_chunks=config.block_chunks,
            serve=config.serve,
            diff_fraction=config.diff_fraction,
            moved_bytes_over_s=self.received_bytes / (config.size_bytes * config.replicas),
            floor_s=config.size_bytes / config.bytes_per_s,
            commit_s=config.commit_s,
            transfer_plus_commit_s=last + config.commit_s,
        )


def simulate(config: SimConfig) -> SimResult:
    """Run one distribution."""
    return Simulator(config).run()


# -- goal table -----------------------------------------------------------------------------------------------------

LAST_GOAL_S = 8.0
ORIGIN_GOAL = 1.1
DIFF_GOAL_S = 1.5
FAULT_SLOWDOWN_GOAL = 1.2


def goal_configs(
    base: SimConfig, replica_counts: list[int], aggregate_above: int, block_chunks: int
) -> list[SimConfig]:
    """Every run of the goal table: each size × algorithm × (fault-free, 5% killed, 2% diff).

    The random mesh is the slow one to simulate; above ``aggregate_above`` replicas it runs with blocks of
    ``block_chunks`` chunks. Chain and tree never are: their store-and-forward hop delay grows with the block.
    """
    configs = []
    for replicas in replica_counts:
        for algorithm in ALGORITHMS:
            blocks = block_chunks if algorithm == "random" and replicas > aggregate_above else base.block_chunks
            run = replace(
                base, replicas=replicas, algorithm=algorithm, kill_fraction=0.0, diff_fraction=0.0, block_chunks=blocks
            )
            configs += [run, replace(run, kill_fraction=0.05), replace(run, diff_fraction=0.02)]
    return configs


def fidelity_configs(
    base: SimConfig, replica_counts: list[int], aggregate_above: int, block_chunks: int
) -> list[SimConfig]:
    """The check that aggregation is harmless: the random mesh, fault-free, at the largest unaggregated size."""
    small = [n for n in replica_counts if n <= aggregate_above]
    if block_chunks == 1 or not small or max(replica_counts) <= aggregate_above:
        return []
    return [replace(base, replicas=max(small), algorithm="random", block_chunks=block_chunks)]


def mark(ok: bool) -> str:
    """Table cell for a goal check."""
    return "yes" if ok else "**no**"


def goal_table(
    base: SimConfig, replica_counts: list[int], jobs: int, aggregate_above: int, block_chunks: int
) -> tuple[str, list[SimResult]]:
    """Run the goal table (in parallel processes) and format it as markdown."""
    configs = goal_configs(base, replica_counts, aggregate_above, block_chunks)
    checks = fidelity_configs(base, replica_counts, aggregate_above, block_chunks)
    # Longest runs first so the pool does not end on one straggler.
    order = sorted(range(len(configs + checks)), key=lambda i: -estimated_cost((configs + checks)[i]))
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        done = dict(zip(order, pool.map(simulate, [(configs + checks)[i] for i in order]), strict=True))
    results = [done[i] for i in range(len(configs))]
    fidelity = [done[i] for i in range(len(configs), len(configs) + len(checks))]
    lines = [
        "| replicas | algorithm | last s | p50 s | p99 s | origin/S | ≤8 s & ≤1.1·S | 5% killed: survivors s (×) "
        "| rejoined s | rejoin origin B | ≤1.2× & 0 B | 2% diff s + commit | ≤1.5 s | sim wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i in range(0, len(results), 3):
        clean, faulty, diff = results[i : i + 3]
        slowdown = faulty.survivors_last_s / clean.last_s
        staged_ok = clean.last_s <= LAST_GOAL_S and clean.origin_bytes_over_s <= ORIGIN_GOAL
        fault_ok = slowdown <= FAULT_SLOWDOWN_GOAL and faulty.rejoin_origin_bytes == 0
        aggregated = f" (blocks of {clean.block_chunks} chunks)" if clean.block_chunks > 1 else ""
        lines.append(
            f"| {clean.replicas} | {clean.algorithm} | {clean.last_s:.2f} | {clean.p50_s:.2f} | {clean.p99_s:.2f} "
            f"| {clean.origin_bytes_over_s:.3f} | {mark(staged_ok)} "
            f"| {faulty.survivors_last_s:.2f} ({slowdown:.2f}×) | {faulty.rejoined_last_s:.2f} "
            f"| {faulty.rejoin_origin_bytes:.0f} | {mark(fault_ok)} "
            f"| {diff.last_s:.3f} + {diff.commit_s:.1f} | {mark(diff.transfer_plus_commit_s <= DIFF_GOAL_S)} "
            f"| {clean.sim_wall_s:.0f} / {faulty.sim_wall_s:.0f} / {diff.sim_wall_s:.1f}{aggregated} |"
        )
    floor = base.size_bytes / base.bytes_per_s
    lines.append("")
    lines.append(
        f"S = {base.size_bytes / 1e9:g} GB, B = {base.bytes_per_s * 8 / 1e9:g} Gb/s (floor S/B = {floor:.2f} s), "
        f"chunk = {base.chunk_bytes / MIB:g} MiB × {base.block_chunks} per simulated block, window {base.window}, "
        f"rtt {base.rtt_ms} ms, detect {base.detect_ms} ms, restart {base.restart_s} s, efficiency {base.efficiency}, "
        f"overhead {base.chunk_overhead_ms} ms/chunk, serve {base.serve}, seed {base.seed}. "
        "sim wall = fault-free / killed / diff."
    )
    for check in fidelity:
        exact = next(r for r in results if r.replicas == check.replicas and r.algorithm == check.algorithm)
        delta = (check.last_s - exact.last_s) / exact.last_s
        lines.append(
            f"aggregation check: {check.algorithm} at {check.replicas} replicas, "
            f"blocks of {check.block_chunks} chunks: "
            f"last {check.last_s:.2f} s vs {exact.last_s:.2f} s unaggregated ({delta:+.1%}; "
            f"p50 {(check.p50_s - exact.p50_s) / exact.p50_s:+.1%}) -> {'ok' if abs(delta) < 0.02 else 'over 2%'}"
        )
    return "\n".join(lines), results


def estimated_cost(config: SimConfig) -> float:
    """Rough relative simulation cost: chunk transfers, the mesh being the dearest per transfer."""
    transfers = config.replicas * config.size_bytes / (config.chunk_bytes * config.block_chunks)
    transfers *= config.diff_fraction or 1.0
    return transfers * {"chain": 1.0, "tree": 1.8, "random": 5.0}[config.algorithm]


# -- calibration ----------------------------------------------------------------------------------------------------


def calibration_error(sim: SimResult, last_s: float, p50_s: float) -> float:
    """Worst relative error on the last replica and the median replica."""
    return max(abs(sim.last_s - last_s) / last_s, abs(sim.p50_s - p50_s) / p50_s)


def calibrate(path: str, base: SimConfig) -> str:
    """Fit efficiency and per-chunk overhead to a testbed run by grid search, then compare."""
    with open(path) as handle:
        measured = json.load(handle)
    per_replica = [float(t) for t in measured["per_replica_seconds"]]
    last_s = float(measured.get("last_s", max(per_replica)))
    p50_s, p99_s = percentile(per_replica, 50), percentile(per_replica, 99)
    testbed = replace(
        base,
        replicas=int(measured["replicas"]),
        size_bytes=int(measured["size_bytes"]),
        chunk_bytes=int(measured["chunk_bytes"]),
        bytes_per_s=float(measured["bytes_per_s"]),
        rtt_ms=float(measured.get("rtt_ms", base.rtt_ms)),
        algorithm=str(measured.get("algorithm", base.algorithm)),
        window=int(measured.get("window", base.window)),
        kill_fraction=0.0,
        diff_fraction=0.0,
    )
    cache: dict[tuple[float, float], tuple[float, SimResult]] = {}

    def score(efficiency: float, overhead_ms: float) -> float:
        """Error of one grid point (memoized)."""
        point = (round(efficiency, 4), round(overhead_ms, 4))
        if point not in cache:
            result = simulate(replace(testbed, efficiency=point[0], chunk_overhead_ms=point[1]))
            cache[point] = (calibration_error(result, last_s, p50_s), result)
        return cache[point][0]

    efficiencies = [0.3 + 0.05 * i for i in range(15)]
    overheads = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    best = min(((e, o) for e in efficiencies for o in overheads), key=lambda p: score(*p))
    step_e, step_o = 0.025, max(best[1] / 4, 0.125)
    for _ in range(4):  # refine around the best point, halving the steps
        around = [
            (min(1.0, max(0.05, best[0] + de * step_e)), max(0.0, best[1] + do * step_o))
            for de in (-1, 0, 1)
            for do in (-1, 0, 1)
        ]
        best = min(around, key=lambda p: score(*p))
        step_e, step_o = step_e / 2, step_o / 2
    error, fitted = cache[(round(best[0], 4), round(best[1], 4))]
    rows = [
        f"calibrated on {path}: {testbed.replicas} replicas, {testbed.size_bytes / 1e9:g} GB, "
        f"chunk {testbed.chunk_bytes / MIB:g} MiB, {testbed.bytes_per_s * 8 / 1e9:g} Gb/s, {testbed.algorithm}",
        f"fitted efficiency = {best[0]:.4f}, chunk_overhead_ms = {best[1]:.4f} ({len(cache)} simulations)",
        "| metric | simulated s | measured s | relative error |",
        "|---|---|---|---|",
    ]
    for name, sim_value, real in (
        ("last", fitted.last_s, last_s),
        ("p50", fitted.p50_s, p50_s),
        ("p99", fitted.p99_s, p99_s),
    ):
        rows.append(f"| {name} | {sim_value:.3f} | {real:.3f} | {(sim_value - real) / real:+.1%} |")
    if "origin_bytes" in measured:
        rows.append(
            f"origin bytes: simulated {fitted.origin_bytes_over_s:.3f}·S, "
            f"measured {float(measured['origin_bytes']) / testbed.size_bytes:.3f}·S"
        )
    rows.append(f"within 10% on last and p50: {'yes' if error <= 0.10 else 'no'} (worst {error:.1%})")
    return "\n".join(rows)


# -- command line ---------------------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """SimConfig from parsed options."""
    size = args.size_bytes if args.size_bytes else round(args.size_gb * 1e9)
    chunk = args.chunk_bytes if args.chunk_bytes else round(args.chunk_mib * MIB)
    return SimConfig(
        replicas=args.replicas,
        size_bytes=size,
        chunk_bytes=chunk,
        bytes_per_s=args.gbps * 1e9 / 8,
        algorithm=args.algorithm,
        window=args.window,
        rtt_ms=args.rtt_ms,
        detect_ms=args.detect_ms,
        restart_s=args.restart_s,
        degree=args.degree,
        peers=args.peers,
        seeds=args.seeds,
        kill_fraction=args.kill_fraction,
        diff_fraction=args.diff_fraction,
        chunk_overhead_ms=args.chunk_overhead_ms,
        efficiency=args.efficiency,
        block_chunks=args.block_chunks,
        serve=args.serve,
        commit_s=args.commit_s,
        seed=args.seed,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=500)
    parser.add_argument("--size-gb", type=float, default=16.0, help="version size in GB (10^9 bytes)")
    parser.add_argument("--size-bytes", type=int, default=0, help="version size in bytes (overrides --size-gb)")
    parser.add_argument("--gbps", type=float, default=25.0, help="per-node uplink and downlink, Gb/s each")
    parser.add_argument("--chunk-mib", type=float, default=4.0)
    parser.add_argument("--chunk-bytes", type=int, default=0, help="chunk size in bytes (overrides --chunk-mib)")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="chain")
    parser.add_argument("--window", type=int, default=2, help="outstanding requests per replica")
    parser.add_argument("--rtt-ms", type=float, default=0.2)
    parser.add_argument("--detect-ms", type=float, default=50.0, help="time to notice a dead upstream")
    parser.add_argument("--restart-s", type=float, default=2.0, help="killed replica's restart delay")
    parser.add_argument("--degree", type=int, default=2, help="tree fan-out")
    parser.add_argument("--peers", type=int, default=5, help="random: connections per replica")
    parser.add_argument("--seeds", type=int, default=3, help="random: replicas the origin serves")
    parser.add_argument("--kill-fraction", type=float, default=0.0)
    parser.add_argument("--diff-fraction", type=float, default=0.0, help="fraction of chunks that are new")
    parser.add_argument("--commit-s", type=float, default=0.2, help="commit/flip time added to a diff's transfer")
    parser.add_argument("--chunk-overhead-ms", type=float, default=0.0, help="per-chunk cost after the last byte")
    parser.add_argument("--efficiency", type=float, default=1.0, help="fraction of the nominal rate a flow gets")
    parser.add_argument(
        "--block-chunks", type=int, default=1, help="simulate k chunks as one block (faster, coarser pipeline)"
    )
    parser.add_argument(
        "--serve",
        choices=SERVE_MODES,
        default="fifo",
        help="a replica's requests to one source: one after another on one connection (fifo), or side by side",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--goals", action="store_true", help="run the goal table (500 and 2,000 replicas)")
    parser.add_argument("--goal-replicas", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--aggregate-above", type=int, default=1000, help="--goals: aggregate random runs above N")
    parser.add_argument("--aggregate-blocks", type=int, default=4, help="--goals: chunks per block when aggregating")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes for --goals")
    parser.add_argument("--calibrate", metavar="FILE.json", help="fit efficiency and overhead to a testbed run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    config = config_from_args(args)
    if args.calibrate:
        print(calibrate(args.calibrate, config))
        return 0
    if args.goals:
        started = time.perf_counter()
        table, results = goal_table(config, args.goal_replicas, args.jobs, args.aggregate_above, args.aggregate_blocks)
        print(table)
        print(
            f"\ngoal table: {len(results)} runs in {time.perf_counter() - started:.0f} s wall ({args.jobs} processes)"
        )
        if args.json:
            print(json.dumps([asdict(r) for r in results]))
        return 0
    result = simulate(config)
    if args.json:
        print(json.dumps(asdict(result)))
        return 0
    diff = f" (diff {config.diff_fraction:.0%})" if config.diff_fraction else ""
    print(
        f"{result.algorithm}: {result.replicas} replicas, {result.size_bytes / 1e9:g} GB in "
        f"{config.chunk_bytes / MIB:g} MiB chunks{diff}, serve {config.serve}"
    )
    print(
        f"last {result.last_s:.3f} s (floor {result.floor_s:.2f} s), p50 {result.p50_s:.3f} s, "
        f"p99 {result.p99_s:.3f} s, "
        f"origin {result.origin_bytes_over_s:.3f}·S, moved {result.moved_bytes_over_s:.3f}·S per replica"
    )
    if result.killed:
        print(
            f"killed {result.killed}: survivors last {result.survivors_last_s:.3f} s, rejoined last "
            f"{result.rejoined_last_s:.3f} s, rejoin origin bytes {result.rejoin_origin_bytes:.0f}"
        )
    if config.diff_fraction:
        print(f"transfer + commit = {result.transfer_plus_commit_s:.3f} s")
    print(f"{result.events} events in {result.sim_wall_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
