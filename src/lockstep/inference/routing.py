"""Which resident version answers a request during a rollout: the split in force, sessions kept on one version.

Requests without a session key follow the share exactly (a smooth counter: 5% is every twentieth request).
A session key (``X-Lockstep-Session`` or the OpenAI ``user`` field) is hashed: its draw ``u`` in [0, 100) sends it
to the candidate while ``u < share``, the same on every replica. Shares only grow, so a session drawn for the
candidate stays there; one the committed version answered before a step whose larger share now covers it is
*pinned* to the committed version. Pins are exact fleet-wide: when a step takes effect each replica freezes the
sessions it answered on the committed version (``SessionTable``), the coordinator collects them from every
replica and sends the union back, and meanwhile a session in the step's new band that this replica has not
seen waits for that list instead of guessing (docs/protocol.md, Rollouts).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from lockstep.core.clock import Clock
from lockstep.sync.protocol import PIN_CHARS, Split


class Route(str, Enum):
    """Where one request goes."""

    COMMITTED = "committed"
    CANDIDATE = "candidate"


def pin_of(session: str) -> str:
    """The session's pin: a digest of its key, so the shared state never holds what users sent."""
    return hashlib.sha256(session.encode("utf-8", "surrogatepass")).hexdigest()[:PIN_CHARS]


def draw(rollout: str, pin: str) -> float:
    """The session's draw in [0, 100) for this rollout: uniform, the same on every replica."""
    digest = hashlib.sha256(f"{rollout}\0{pin}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


class SessionTable:
    """Sessions this replica answered recently and the version that answered each; bounded, oldest forgotten.

    Kept at all times, not only during rollouts: the first step must know which sessions the committed version
    was already answering.
    """

    def __init__(self, *, capacity: int, ttl_s: float, clock: Clock) -> None:
        self.capacity, self.ttl_s, self.clock = capacity, ttl_s, clock
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()  # pin → (version, last seen, monotonic)

    def get(self, pin: str) -> int | None:
        entry = self._seen.get(pin)
        if entry is None:
            return None
        if self.clock.monotonic() - entry[1] > self.ttl_s:
            del self._seen[pin]
            return None
        return entry[0]

    def put(self, pin: str, version: int) -> None:
        self._seen[pin] = (version, self.clock.monotonic())
        self._seen.move_to_end(pin)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def answered_by(self, version: int) -> list[str]:
        """Pins of the live sessions ``version`` answered."""
        now = self.clock.monotonic()
        return [pin for pin, (v, at) in self._seen.items() if v == version and now - at <= self.ttl_s]

    def __len__(self) -> int:
        return len(self._seen)


@dataclass
class SplitInForce:
    """The split a replica applies: the candidate's share and what its sessions go by."""

    split: Split
    committed: int  # the version the rest of the traffic goes to
    previous_share: float  # the share before this step: sessions drawn in [previous, share) are this step's band
    frozen: list[str] = field(default_factory=list)  # pins of this replica's committed sessions as the step began
    pins: frozenset[str] = frozenset()  # the fleet's pins, complete once ``split.pins_step == split.step``

    @property
    def pins_complete(self) -> bool:
        return self.split.pins_step == self.split.step


class Router:
    """Chooses the version for each request while a split is in force; thread-safe."""

    def __init__(self, table: SessionTable, *, pin_wait_s: float) -> None:
        self.table = table
        self.pin_wait_s = pin_wait_s
        self.in_force: SplitInForce | None = None
        self.held = 0  # requests that waited for the step's pins
        self.pin_timeouts = 0  # waits that ended without them (routed by the draw alone)
        self._credit = 0.0  # the smooth counter of requests without a session
        self._changed = threading.Condition()

    def apply(self, split: Split | None, committed: int | None) -> None:
        """Put ``split`` in force (None: no split). A new step freezes the committed version's sessions."""
        with self._changed:
            old = self.in_force
            if split is None or committed is None:
                self.in_force = None
            elif old is not None and old.split.rollout == split.rollout and old.split.step == split.step:
                self.in_force = SplitInForce(split, committed, old.previous_share, old.frozen,
                                             frozenset(split.pins) if split.pins_step == split.step else old.pins)
            else:
                same = old is not None and old.split.rollout == split.rollout
                previous = old.split.share if same and old is not None else 0.0
                carried = old.pins if same and old is not None else frozenset()
                frozen = [pin for pin in self.table.answered_by(committed) if draw(split.rollout, pin) < split.share]
                pins = frozenset(split.pins) if split.pins_step == split.step else carried
                self.in_force = SplitInForce(split, committed, previous, frozen, pins)
                self._credit = 0.0
            self._changed.notify_all()

    def frozen_pins(self, rollout: str, step: int) -> list[str] | None:
        """This replica's pins for ``step`` of ``rollout``; None when that step is not the one in force."""
        with self._changed:
            f = self.in_force
            if f is None or f.split.rollout != rollout or f.split.step != step:
                return None
            return list(f.frozen)

    def choose(self, session: str | None) -> Route:
        """The version for one request (blocks up to ``pin_wait_s`` for a session in a step's new band)."""
        with self._changed:
            f = self.in_force
            if f is None or f.split.share <= 0:  # share 0 is a rollback: sessions on the candidate come back too
                return Route.COMMITTED
            if session is None:
                self._credit += f.split.share / 100
                if self._credit >= 1.0 - 1e-9:
                    self._credit -= 1.0
                    return Route.CANDIDATE
                return Route.COMMITTED
            pin = pin_of(session)
            route = self._session_route(pin)
            if route is None:  # drawn into this step's band and unknown here: wait for the fleet's pins
                self.held += 1
                if not self._changed.wait_for(lambda: self._session_route(pin) is not None, timeout=self.pin_wait_s):
                    self.pin_timeouts += 1
                f = self.in_force
                route = self._session_route(pin) or Route.CANDIDATE
                if f is None:
                    return Route.COMMITTED
            self.table.put(pin, f.split.version if route is Route.CANDIDATE else f.committed)
            return route

    def _session_route(self, pin: str) -> Route | None:
        f = self.in_force
        if f is None:
            return Route.COMMITTED
        known = self.table.get(pin)
        if known == f.split.version:
            return Route.CANDIDATE
        if known == f.committed or pin in f.pins:
            return Route.COMMITTED
        u = draw(f.split.rollout, pin)
        if u >= f.split.share:
            return Route.COMMITTED
        if u < f.previous_share or f.pins_complete:
            return Route.CANDIDATE
        return None

    def record(self, session: str | None, version: int) -> None:
        """Note who answered ``session`` outside a split (so the first step knows its committed sessions)."""
        if session is not None:
            with self._changed:
                self.table.put(pin_of(session), version)

    def sessions(self) -> int:
        with self._changed:
            return len(self.table)


def union(pin_lists: Iterable[list[str]]) -> list[str]:
    """The fleet's pins: every replica's, each once, in a stable order."""
    return sorted({pin for pins in pin_lists for pin in pins})
