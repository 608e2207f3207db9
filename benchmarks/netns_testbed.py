"""A testbed of many network nodes on one machine: each node a network namespace with its own rate-limited link.

    python benchmarks/netns_testbed.py check --nodes 4 --rate-mbit 200
    python benchmarks/netns_testbed.py capacity --pairs 8 --rates 100,200,400,800,0

``Testbed(nodes, rate_mbit, delay_ms)`` (a context manager) builds, as root:

* a hub namespace ``<prefix>-hub`` holding one bridge ``br0``; the host's own network is never touched (every
  link is created inside the hub namespace, so not even a host interface name can collide);
* per node ``i`` a namespace ``<prefix>-<i>`` whose ``eth0`` (address ``addr(i)``, 10.77.0.0/16, node 0 at
  10.77.0.1) is one end of a veth pair; the other end, ``v<i>``, is a port of the bridge;
* on each node's ``eth0`` (its uplink) and on each ``v<i>`` (its downlink) an HTB limit of ``rate_mbit``, so a
  node sends and receives at that rate at once, like a full-duplex NIC. Under it one class per peer (u32 match
  on the peer's address), each guaranteed an equal share and allowed to borrow the whole rate: flows to or from
  different peers split a link evenly. ``fair=False`` uses one ``tbf`` FIFO per link instead; this kernel has
  no fq/fq_codel/sfq, and through a single FIFO three TCP flows with sub-ms RTTs split 200 Mbit/s as
  150/21/21 as often as 64/64/64 (measured), though their sum is exact. The rate counts Ethernet frames, so
  one TCP flow's goodput is ~95.6% of it (1448 payload bytes per 1514-byte frame), and in full duplex a bit
  less (each link also carries the other direction's ACKs). Burst (HTB burst/cburst, tbf burst):
  ``burst_bytes(rate)`` = 2 ms of traffic, at least 16 KiB: below ~10 frames the qdisc re-arms its timer per
  packet (CPU, and tbf then splits every GSO packet); much more and flows overshoot the rate in short windows.
  tbf's queue holds 50 ms beyond the burst;
* with ``delay_ms > 0``, a ``netem`` delay of ``delay_ms / 2`` under each leaf, so one way between two nodes
  (sender's uplink + receiver's downlink) takes ``delay_ms`` more and a round trip ``2 * delay_ms`` more.
  ``netem`` needs ``CONFIG_NET_SCH_NETEM``: the kernel this was written on (6.18, firecracker) lacks it, and
  then a delay raises ``ShapingUnsupported`` rather than silently running without one (untested with netem).

``spawn(i, argv)`` runs a command in node i's namespace (``ip netns exec``), ``kill(i)`` SIGKILLs everything in
it. On exit, at interpreter exit and on SIGTERM every process is killed and every namespace deleted (the links
go with them); leftovers of a crashed run with the same prefix are removed on enter.

Without root (or with ``userspace=True`` / ``--userspace``) there are no namespaces: every node is 127.0.0.1 on
its own port (``port(i)``), ``shaped`` is False and THE RATE LIMIT IS APPLIED IN USER SPACE BY THE NODES: node
code wraps its socket writes and reads in a ``TokenBucket`` (``send_shaped``, ``recv_shaped``) built from the
``TESTBED_RATE_BPS`` it is given. A node's limit then holds per process, and ``delay_ms`` is only passed on
(``TESTBED_DELAY_MS``). Every output of this module says which of the two it ran with.

Every spawned command gets ``TESTBED_NODE``, ``TESTBED_ADDR``, ``TESTBED_PORT``, ``TESTBED_SHAPED`` (1 when the
kernel shapes), ``TESTBED_RATE_BPS`` (bytes/s, 0 when unlimited) and ``TESTBED_DELAY_MS``.

CPU budget (2 cores; ``capacity``: N sender/receiver pairs of Python processes streaming through the bridge at
once, every link shaped; aggregate = nodes x rate, since each byte leaves one node and enters another):

    pairs x Mbit/s   aggregate asked -> got   CPU busy (whole machine)
    8 x 100            800 ->   763 Mbit/s    28%
    8 x 200           1600 ->  1528           26%
    8 x 400           3200 ->  3052           36%   (tbf FIFO instead of HTB: 72%)
    8 x 800           6400 ->  6096           58%   (tbf FIFO: 100%)
    8 x unlimited            15-18 Gbit/s     94-100%   (the bridge's ceiling here)
    16 x 25/50/100/200/400   every flow at 95% of its rate, up to 6078 Mbit/s in all

Every shaped run reached the rate (95%, the header overhead), so links up to ~6 Gbit/s in all are still what
limits a flow, not the CPU. The nodes' own work (hashing, writing files, Python) needs the CPU too, so keep
the aggregate near a tenth of the ceiling: **100 Mbit/s per node for 16 nodes** (1.6 Gbit/s in all) and
**50 Mbit/s per node for 24-32 nodes** (1.2-1.6 Gbit/s). CPU figures are noisy: other jobs shared the machine.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import IO, Any

SUBNET_PREFIX = "10.77"  # a /16 of its own: node i is host i + 1 in it
PREFIX_LEN = 16
FRAME_BYTES = 1514  # an Ethernet frame at MTU 1500, what tbf counts per full-sized packet
MIN_BURST_BYTES = 16 * 1024
BURST_SECONDS = 0.002
QUEUE_LATENCY_MS = 50  # how long a packet may wait in tbf before it is dropped: the queue's length
DEFAULT_BASE_PORT = 18000
CHUNK_BYTES = 256 * 1024
SCRIPT = Path(__file__).resolve()


class TestbedError(RuntimeError):
    """An `ip` or `tc` command failed while building the testbed."""

    __test__ = False  # pytest: not a test class, despite the name


class ShapingUnsupported(TestbedError):
    """The kernel lacks a qdisc the requested shaping needs."""


# ---------------------------------------------------------------------------------------------------- helpers


def run_cmd(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an `ip`/`tc` command; raise TestbedError with its stderr when it fails and ``check`` is set."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        message = f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}"
        if "qdisc kind is unknown" in proc.stderr:
            raise ShapingUnsupported(message)
        raise TestbedError(message)
    return proc


def netns_available() -> bool:
    """Whether this process may build namespaces: root, and `ip netns` works."""
    if os.geteuid() != 0:
        return False
    try:
        return run_cmd(["ip", "netns", "list"], check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list`` prints ``name (id: N)``)."""
    out = run_cmd(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    """Every process running in namespace ``ns``."""
    out = run_cmd(["ip", "netns", "pids", ns], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def kill_pids(pids: Sequence[int]) -> None:
    """SIGKILL each pid, ignoring those already gone."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def delete_netns(ns: str) -> None:
    """Kill what runs in ``ns`` and delete it (its links go with it); a missing one is fine."""
    kill_pids(netns_pids(ns))
    run_cmd(["ip", "netns", "del", ns], check=False)


def burst_bytes(rate_bytes_per_s: float) -> int:
    """tbf's bucket for a rate: 2 ms of traffic, at least 16 KiB (see the module docstring for why)."""
    return max(MIN_BURST_BYTES, int(rate_bytes_per_s * BURST_SECONDS))


def tbf_lines(dev: str, rate_bit: float, delay_ms: float) -> list[str]:
    """tc batch lines: one FIFO limited to ``rate_bit`` on ``dev``'s egress (``fair=False``), plus a delay."""
    burst = burst_bytes(rate_bit / 8)
    lines = [f"qdisc replace dev {dev} root handle 1: tbf rate {int(rate_bit)}bit burst {burst} "
             f"latency {QUEUE_LATENCY_MS}ms"]
    if delay_ms > 0:
        # netem under the limiter: tbf paces, netem holds each paced packet back (netem above tbf would hand it
        # bursts of delayed packets)
        lines.append(f"qdisc add dev {dev} parent 1:1 handle 10: netem delay {delay_ms}ms limit 100000")
    return lines


def htb_lines(dev: str, rate_bit: float, delay_ms: float, peers: Sequence[tuple[int, str]],
              match: str) -> list[str]:
    """tc batch lines: ``rate_bit`` on ``dev``'s egress, shared evenly by the ``peers`` (index, address) sending
    or receiving at once, matched on the packet's ``match`` ("dst" or "src") address."""
    rate = int(rate_bit)
    burst = burst_bytes(rate_bit / 8)
    share = max(8, rate // max(len(peers), 1))
    # every class is guaranteed an equal share and may borrow up to the whole rate; HTB hands out what is left
    # round-robin by quantum, so flows to different peers split the link evenly. A single tbf FIFO does not:
    # TCP flows with sub-ms RTTs through one queue split 200 Mbit/s as 150/21/21 just as often as 64/64/64.
    leaf = f"htb rate {share}bit ceil {rate}bit burst {burst} cburst {burst} quantum 65536"
    lines = [f"qdisc replace dev {dev} root handle 1: htb default ffff",
             f"class add dev {dev} parent 1: classid 1:1 htb rate {rate}bit burst {burst} cburst {burst}",
             f"class add dev {dev} parent 1:1 classid 1:ffff {leaf}"]  # ARP and anything unmatched
    minors = ["ffff"]
    for j, address in peers:
        minor = f"{j + 2:x}"  # 1:1 is the parent, so peer j is 1:(j + 2)
        minors.append(minor)
        lines.append(f"class add dev {dev} parent 1:1 classid 1:{minor} {leaf}")
        lines.append(f"filter add dev {dev} parent 1: protocol ip prio 1 u32 match ip {match} {address}/32 "
                     f"flowid 1:{minor}")
    if delay_ms > 0:
        lines += [f"qdisc add dev {dev} parent 1:{minor} netem delay {delay_ms}ms limit 100000" for minor in minors]
    return lines


def apply_tc(ns: str, lines: Sequence[str]) -> None:
    """Run tc batch ``lines`` in namespace ``ns`` (one process for all: thousands of classes at 32 nodes)."""
    proc = subprocess.run(["tc", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        message = f"tc -n {ns} -batch: {proc.stderr.strip()}"
        if "qdisc kind is unknown" in proc.stderr:
            raise ShapingUnsupported(message + " (a delay needs sch_netem: CONFIG_NET_SCH_NETEM)")
        raise TestbedError(message)


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy_since(start: tuple[float, float]) -> float:
    """Fraction of all CPUs busy since ``start`` (from ``cpu_times``)."""
    busy, total = cpu_times()
    return (busy - start[0]) / max(total - start[1], 1.0)


def cpu_busy_between(start_at: float, end_at: float) -> float:
    """Fraction of all CPUs busy between two wall-clock instants (sleeps until the second)."""
    time.sleep(max(0.0, start_at - time.time()))
    start = cpu_times()
    time.sleep(max(0.1, end_at - time.time()))
    return cpu_busy_since(start)


# ---------------------------------------------------------------------------------------------------- token bucket


class TokenBucket:
    """A thread-safe token bucket over bytes, for nodes that must shape their own traffic (no root)."""

    def __init__(self, rate_bytes_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """A bucket filling at ``rate_bytes_per_s`` up to ``burst`` bytes, full at start."""
        if rate_bytes_per_s <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes' tokens now (going into debt if short); return the seconds to wait before sending."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            # debt, not refusal: a caller with more than the burst to send still gets through, at the rate, and
            # callers that reserve later queue behind it
            return max(0.0, -self._tokens / self.rate)

    def consume(self, n: int) -> None:
        """Block until ``n`` bytes may pass."""
        wait = self.reserve(n)
        if wait > 0:
            self._sleep(wait)


def send_shaped(sock: socket.socket, data: bytes | memoryview, bucket: TokenBucket | None) -> None:
    """sendall through ``bucket`` (when given), a chunk at a time so the pacing is smooth."""
    view = memoryview(data)
    chunk = CHUNK_BYTES if bucket is None else max(1024, min(CHUNK_BYTES, int(bucket.burst)))
    for offset in range(0, len(view), chunk):
        piece = view[offset:offset + chunk]
        if bucket is not None:
            bucket.consume(len(piece))
        sock.sendall(piece)


def recv_shaped(sock: socket.socket, buf: bytearray | memoryview, bucket: TokenBucket | None) -> int:
    """recv_into ``buf`` and pay ``bucket`` for it; the receive window then throttles the sender."""
    view = memoryview(buf)
    if bucket is not None:
        view = view[:max(1024, min(len(view), int(bucket.burst)))]
    n = sock.recv_into(view)
    if bucket is not None and n:
        bucket.consume(n)
    return n


def bucket_from_env() -> TokenBucket | None:
    """The user-space bucket a node must apply itself: only when the kernel does not shape and a rate is set."""
    rate = float(os.environ.get("TESTBED_RATE_BPS", "0") or 0)
    if os.environ.get("TESTBED_SHAPED") == "1" or rate <= 0:
        return None
    return TokenBucket(rate, max(burst_bytes(rate), 64 * 1024))


# ---------------------------------------------------------------------------------------------------- testbed


class Testbed:
    """Nodes in network namespaces on one bridge, each with a rate-limited uplink and downlink."""

    __test__ = False  # pytest: not a test class, despite the name

    def __init__(self, nodes: int, rate_mbit: float | None, delay_ms: float = 0.0, prefix: str = "lst",
                 userspace: bool | None = None, base_port: int = DEFAULT_BASE_PORT, fair: bool = True) -> None:
        """``rate_mbit`` None (or <= 0) leaves links unlimited; ``userspace`` None means "when not root";
        ``fair`` shares a link evenly between peers (HTB class per peer) rather than one tbf FIFO."""
        if not 1 <= nodes <= 65000:
            raise ValueError("nodes must be in 1..65000")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", prefix):
            raise ValueError("prefix: a lower-case letter, then up to 15 letters or digits")
        self.nodes = nodes
        self.rate_mbit = rate_mbit if rate_mbit and rate_mbit > 0 else None
        self.delay_ms = float(delay_ms)
        self.prefix = prefix
        self.userspace = (not netns_available()) if userspace is None else userspace
        self.base_port = base_port
        self.fair = fair
        self._procs: dict[int, list[subprocess.Popen[Any]]] = {}
        self._entered = False
        self._closed = False
        self._previous_sigterm: Any = None

    # -- names and addresses

    @property
    def shaped(self) -> bool:
        """Whether the kernel limits the links (False: nodes must use TokenBucket themselves)."""
        return not self.userspace and self.rate_mbit is not None

    @property
    def hub(self) -> str:
        """The hub namespace, holding the bridge."""
        return f"{self.prefix}-hub"

    @property
    def rate_bytes_per_s(self) -> float:
        """Per-node rate in bytes/s each way, 0 when unlimited."""
        return self.rate_mbit * 1e6 / 8 if self.rate_mbit else 0.0

    def netns(self, i: int) -> str:
        """Namespace of node ``i``."""
        return f"{self.prefix}-{self._check_node(i)}"

    def addr(self, i: int) -> str:
        """Address of node ``i`` (10.77.0.1 for node 0; 127.0.0.1 for every node in user space)."""
        host = self._check_node(i) + 1
        return "127.0.0.1" if self.userspace else f"{SUBNET_PREFIX}.{host >> 8}.{host & 0xFF}"

    def port(self, i: int) -> int:
        """The port node ``i`` should listen on: the same for all with namespaces, one each in user space."""
        return self.base_port + self._check_node(i) if self.userspace else self.base_port

    def mode(self) -> str:
        """One line on how the rate limit is applied, for every output."""
        if self.rate_mbit is None:
            return "links unlimited"
        if self.shaped:
            how = "htb, a class per peer" if self.fair else "tbf"
            return f"kernel tc ({how}) at {self.rate_mbit:g} Mbit/s each way per node (shaped)"
        return (f"NOT SHAPED BY THE HARNESS: {self.rate_mbit:g} Mbit/s is applied in user space by the nodes "
                "(TokenBucket), all nodes on 127.0.0.1")

    def _check_node(self, i: int) -> int:
        """``i`` itself, when it names a node."""
        if not 0 <= i < self.nodes:
            raise IndexError(f"node {i} not in 0..{self.nodes - 1}")
        return i

    # -- lifecycle

    def __enter__(self) -> Testbed:
        """Build the namespaces and links (after removing leftovers of an earlier run with this prefix)."""
        self._entered = True
        atexit.register(self.close)
        self._install_sigterm()
        if not self.userspace:
            try:
                self.remove_leftovers()
                self._build()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Kill every node and delete everything built."""
        self.close()

    def remove_leftovers(self) -> list[str]:
        """Delete namespaces named like this testbed's (a crashed earlier run's); return their names."""
        pattern = re.compile(rf"{re.escape(self.prefix)}-(hub|\d+)")
        stale = [ns for ns in list_netns() if pattern.fullmatch(ns)]
        for ns in stale:
            delete_netns(ns)
        return stale

    def _build(self) -> None:
        """Hub with its bridge, then every node."""
        hub = self.hub
        run_cmd(["ip", "netns", "add", hub])
        run_cmd(["ip", "-n", hub, "link", "set", "lo", "up"])
        run_cmd(["ip", "-n", hub, "link", "add", "br0", "type", "bridge"])
        run_cmd(["ip", "-n", hub, "link", "set", "br0", "up"])
        # bridged frames skip iptables: the hub has no rules, and the hook costs CPU per packet (best effort,
        # the knob exists only with br_netfilter)
        subprocess.run(["ip", "netns", "exec", hub, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0",
                        "net.bridge.bridge-nf-call-ip6tables=0"], capture_output=True, timeout=30)
        for i in range(self.nodes):
            self._build_node(i)

    def _build_node(self, i: int) -> None:
        """Namespace, veth pair (eth0 in the node, v<i> on the bridge), address and shaping of node ``i``."""
        ns, hub, port = self.netns(i), self.hub, f"v{i}"
        run_cmd(["ip", "netns", "add", ns])
        # created inside the hub namespace, so the pair never exists on the host, even for an instant
        run_cmd(["ip", "-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run_cmd(["ip", "-n", hub, "link", "set", port, "master", "br0", "up"])
        run_cmd(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/{PREFIX_LEN}", "dev", "eth0"])
        run_cmd(["ip", "-n", ns, "link", "set", "eth0", "up"])
        run_cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
        if self.rate_mbit is not None or self.delay_ms > 0:
            self._shape_node(i)

    def _shape_node(self, i: int) -> None:
        """Limit node ``i``'s uplink (egress of its eth0) and downlink (egress of its bridge port)."""
        rate_bit = (self.rate_mbit or 100_000) * 1e6  # a delay without a limit: a limit far above any flow
        half_delay = self.delay_ms / 2
        if self.fair:
            peers = [(j, self.addr(j)) for j in range(self.nodes) if j != i]
            apply_tc(self.netns(i), htb_lines("eth0", rate_bit, half_delay, peers, "dst"))
            apply_tc(self.hub, htb_lines(f"v{i}", rate_bit, half_delay, peers, "src"))
        else:
            apply_tc(self.netns(i), tbf_lines("eth0", rate_bit, half_delay))
            apply_tc(self.hub, tbf_lines(f"v{i}", rate_bit, half_delay))

    def close(self) -> None:
        """Kill every process spawned and delete every namespace with this prefix; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for i in list(self._procs):
            self._kill_spawned(i)
        if not self.userspace and self._entered:
            for ns in [self.netns(i) for i in range(self.nodes)] + [self.hub]:
                delete_netns(ns)
            self.remove_leftovers()  # any other namespace of this prefix (a larger earlier testbed)
        self._restore_sigterm()
        atexit.unregister(self.close)

    def _install_sigterm(self) -> None:
        """On SIGTERM clean up first, then do what SIGTERM did before (main thread only: Python's rule)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _restore_sigterm(self) -> None:
        """Put back the SIGTERM handler found on enter."""
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Clean up, then chain to the previous handler (or exit 143, as the default would)."""
        previous = self._previous_sigterm
        self.close()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    # -- processes

    def env_for(self, i: int) -> dict[str, str]:
        """The TESTBED_* variables node ``i``'s processes get."""
        return {
            "TESTBED_NODE": str(i),
            "TESTBED_ADDR": self.addr(i),
            "TESTBED_PORT": str(self.port(i)),
            "TESTBED_SHAPED": "1" if self.shaped else "0",
            "TESTBED_RATE_BPS": str(int(self.rate_bytes_per_s)),
            "TESTBED_DELAY_MS": f"{self.delay_ms:g}",
        }

    def spawn(self, i: int, argv: Sequence[str], env: dict[str, str] | None = None,
              stdout: int | IO[Any] | None = None, stderr: int | IO[Any] | None = None) -> subprocess.Popen[Any]:
        """Run ``argv`` as node ``i`` (in its namespace; as a plain process in user space)."""
        if not self._entered or self._closed:
            raise RuntimeError("spawn needs an entered, open testbed")
        full_env = {**os.environ, **(env or {}), **self.env_for(i)}
        prefix = [] if self.userspace else ["ip", "netns", "exec", self.netns(i)]
        # its own process group, so kill() reaches the command's children too
        proc = subprocess.Popen([*prefix, *argv], env=full_env, stdout=stdout, stderr=stderr,
                                start_new_session=True)
        self._procs.setdefault(i, []).append(proc)
        return proc

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``'s processes (with namespaces: everything in its namespace)."""
        self._kill_spawned(self._check_node(i))
        if not self.userspace:
            kill_pids(netns_pids(self.netns(i)))

    def _kill_spawned(self, i: int) -> None:
        """SIGKILL the process groups spawned as node ``i`` and reap them."""
        for proc in self._procs.pop(i, []):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


# ---------------------------------------------------------------------------------------------------- node programs


class BlobHandler(BaseHTTPRequestHandler):
    """GET /bytes/<n>: n bytes; GET /stream: bytes until the client goes away."""

    protocol_version = "HTTP/1.0"
    bucket: TokenBucket | None = None  # the node's uplink, shared by every connection (user space only)
    blob = memoryview(bytes(CHUNK_BYTES))

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        """Send the requested number of bytes (or an endless stream)."""
        match = re.fullmatch(r"/bytes/(\d+)", self.path)
        if not match and self.path != "/stream":
            self.send_error(404)
            return
        remaining = int(match.group(1)) if match else None
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if remaining is not None:
            self.send_header("Content-Length", str(remaining))
        self.end_headers()
        try:
            while remaining is None or remaining > 0:
                piece = self.blob if remaining is None else self.blob[:min(remaining, len(self.blob))]
                send_shaped(self.connection, piece, self.bucket)
                if remaining is not None:
                    remaining -= len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a /stream client that has measured enough

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: hundreds of requests would drown the report."""


def serve(port: int) -> None:
    """Serve blobs on ``port`` (all addresses of the node); print "ready" once listening."""
    BlobHandler.bucket = bucket_from_env()
    server = ThreadingHTTPServer(("0.0.0.0", port), BlobHandler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


def fetch(host: str, port: int, path: str, seconds: float | None, start_at: float) -> dict[str, float]:
    """Download ``path`` (for at most ``seconds``) from ``start_at`` on; the body's bytes, time and Mbit/s."""
    bucket = bucket_from_env()
    time.sleep(max(0.0, start_at - time.time()))
    buf = bytearray(1 << 20)
    started = time.monotonic()
    deadline = started + seconds if seconds else float("inf")
    header: bytearray | None = bytearray()  # None once the response's header has been skipped
    body = 0
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        while time.monotonic() < deadline:
            n = recv_shaped(sock, buf, bucket)
            if not n:
                break
            if header is not None:
                header += buf[:n]
                if b"\r\n\r\n" in header:
                    body += len(header) - header.index(b"\r\n\r\n") - 4
                    header = None
                continue
            body += n
    elapsed = time.monotonic() - started
    return {"bytes": body, "seconds": elapsed, "mbit": body * 8 / elapsed / 1e6}


def tcp_rtt(host: str, port: int, count: int) -> dict[str, float]:
    """Round trip by TCP connect (SYN / SYN-ACK), ``count`` times: min, median and max in ms."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection((host, port), timeout=10):
            samples.append((time.perf_counter() - started) * 1000)
        time.sleep(0.02)
    return {"min_ms": min(samples), "median_ms": statistics.median(samples), "max_ms": max(samples)}


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------- checks


def start_servers(bed: Testbed, nodes: Sequence[int]) -> None:
    """A blob server on each of ``nodes``, waited for until it listens."""
    procs = [(i, bed.spawn(i, [sys.executable, str(SCRIPT), "serve", "--port", str(bed.port(i))],
                           stdout=subprocess.PIPE)) for i in nodes]
    for i, proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise TestbedError(f"the server of node {i} did not start")


def start_time(flows: int) -> float:
    """A wall-clock instant by which ``flows`` freshly spawned clients have all started their interpreters."""
    return time.time() + 0.5 + 0.1 * flows


def run_fetches(bed: Testbed, flows: Sequence[tuple[int, int]], path: str, seconds: float | None = None,
                start_at: float | None = None) -> list[dict[str, float]]:
    """Downloads (server node, client node) started at the same instant; each one's result."""
    start_at = start_at or start_time(len(flows))
    argv_for = [[sys.executable, str(SCRIPT), "fetch", "--host", bed.addr(src), "--port", str(bed.port(src)),
                 "--path", path, "--start-at", str(start_at), *(["--seconds", str(seconds)] if seconds else [])]
                for src, _ in flows]
    procs = [bed.spawn(dst, argv, stdout=subprocess.PIPE) for argv, (_, dst) in zip(argv_for, flows, strict=True)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise TestbedError(f"a fetch failed (exit {proc.returncode})")
        results.append(json.loads(out))
    return results


def spawn_json(bed: Testbed, i: int, argv: Sequence[str]) -> dict[str, float]:
    """Run a subcommand of this script as node ``i`` and parse the JSON it prints."""
    proc = bed.spawn(i, [sys.executable, str(SCRIPT), *argv], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=120)
    return json.loads(out)


def print_flows(label: str, results: Sequence[dict[str, float]], expected_mbit: float | None, busy: float) -> None:
    """One line per phase: each flow's Mbit/s and, with a limit, its share of the expected rate."""
    rates = ", ".join(f"{r['mbit']:.1f}" for r in results)
    ratio = "" if not expected_mbit else \
        " = " + ", ".join(f"{r['mbit'] / expected_mbit:.0%}" for r in results) + f" of {expected_mbit:.1f}"
    print(f"{label:<34} {rates} Mbit/s{ratio}   (CPU busy {busy:.0%})", flush=True)


def check(args: argparse.Namespace) -> None:
    """One flow, three sharing one uplink, full duplex, RTT: measured against the configured rate."""
    path = f"/bytes/{int(args.size_mb * 1e6)}"
    with Testbed(args.nodes, args.rate_mbit, args.delay_ms, args.prefix, userspace=args.userspace or None,
                 fair=not args.fifo) as bed:
        print(f"testbed: {bed.nodes} nodes, {bed.mode()}, delay {bed.delay_ms:g} ms, "
              f"burst {burst_bytes(bed.rate_bytes_per_s) if bed.rate_mbit else 0} B", flush=True)
        start_servers(bed, range(min(bed.nodes, 3)))
        rate = bed.rate_mbit
        rtt = spawn_json(bed, 1, ["rtt", "--host", bed.addr(0), "--port", str(bed.port(0)), "--count", "20"])
        print(f"{'RTT 1->0 (TCP connect, idle)':<34} min {rtt['min_ms']:.3f}  median {rtt['median_ms']:.3f}  "
              f"max {rtt['max_ms']:.3f} ms", flush=True)
        phases: list[tuple[str, list[tuple[int, int]], float | None]] = [
            (f"one flow 0->1 ({args.size_mb:g} MB)", [(0, 1)], rate),
            ("three flows 0->1,2,3 (shared up)", [(0, j) for j in range(1, min(bed.nodes, 4))],
             rate / 3 if rate else None),
            ("full duplex 1->2 and 2->1", [(1, 2), (2, 1)], rate),
        ]
        for label, flows, expected in phases:
            cpu = cpu_times()
            results = run_fetches(bed, flows, path)
            print_flows(label, results, expected, cpu_busy_since(cpu))
        if bed.shaped:
            print("(TCP goodput tops out at ~95.6% of a shaped rate: the limit counts Ethernet/IP/TCP headers)")
        print(f"mode: {bed.mode()}")


def sample_cpu(into: list[float], start_at: float, end_at: float) -> None:
    """Append to ``into`` the CPU busy fraction between two instants (a thread's target)."""
    into.append(cpu_busy_between(start_at, end_at))


def capacity(args: argparse.Namespace) -> None:
    """``pairs`` flows between distinct node pairs at once, per rate: what the machine moves in all."""
    for rate in args.rates:
        with Testbed(2 * args.pairs, rate or None, 0.0, args.prefix, userspace=args.userspace or None,
                     fair=not args.fifo) as bed:
            senders = list(range(0, 2 * args.pairs, 2))
            start_servers(bed, senders)
            start_at = start_time(len(senders))
            sampled: list[float] = []
            # CPU over the steady middle of the window, not the clients' interpreter start-up
            sampler = threading.Thread(target=sample_cpu, args=(sampled, start_at + 1.0,
                                                                 start_at + args.seconds - 0.5))
            sampler.start()
            results = run_fetches(bed, [(s, s + 1) for s in senders], "/stream", args.seconds, start_at)
            sampler.join()
            busy = sampled[0]
            total = sum(r["mbit"] for r in results)
            wanted = f"{rate * args.pairs:.0f}" if rate else "unlimited"
            print(f"{args.pairs} pairs at {rate or 'no limit'} Mbit/s: {total:.0f} Mbit/s in all (asked {wanted}), "
                  f"per flow min {min(r['mbit'] for r in results):.1f} max {max(r['mbit'] for r in results):.1f}, "
                  f"CPU busy {busy:.0%}  [{bed.mode()}]", flush=True)


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The subcommands: check and capacity for people, serve/fetch/rtt for the nodes themselves."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="prove the rate limit: one flow, three sharing, full duplex, RTT")
    chk.add_argument("--nodes", type=int, default=4)
    chk.add_argument("--rate-mbit", type=float, default=200.0)
    chk.add_argument("--delay-ms", type=float, default=0.0)
    chk.add_argument("--size-mb", type=float, default=50.0)
    cap = sub.add_parser("capacity", help="aggregate throughput of parallel pairs at increasing rates")
    cap.add_argument("--pairs", type=int, default=8)
    cap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[100, 200, 400, 800, 0],
                     help="Mbit/s per node, comma-separated; 0: no limit")
    cap.add_argument("--seconds", type=float, default=5.0)
    for p in (chk, cap):
        p.add_argument("--prefix", default="lstchk")
        p.add_argument("--userspace", action="store_true", help="no namespaces: nodes shape their own traffic")
        p.add_argument("--fifo", action="store_true", help="one tbf FIFO per link instead of a class per peer")
    srv = sub.add_parser("serve")
    srv.add_argument("--port", type=int, required=True)
    fet = sub.add_parser("fetch")
    fet.add_argument("--host", required=True)
    fet.add_argument("--port", type=int, required=True)
    fet.add_argument("--path", required=True)
    fet.add_argument("--seconds", type=float, default=None)
    fet.add_argument("--start-at", type=float, default=0.0)
    rtt = sub.add_parser("rtt")
    rtt.add_argument("--host", required=True)
    rtt.add_argument("--port", type=int, required=True)
    rtt.add_argument("--count", type=int, default=20)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch a subcommand."""
    args = parse_args(argv)
    if args.command == "check":
        check(args)
    elif args.command == "capacity":
        capacity(args)
    elif args.command == "serve":
        serve(args.port)
    elif args.command == "fetch":
        print(json.dumps(fetch(args.host, args.port, args.path, args.seconds, args.start_at)))
    elif args.command == "rtt":
        print(json.dumps(tcp_rtt(args.host, args.port, args.count)))


if __name__ == "__main__":
    main()
