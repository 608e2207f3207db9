"""The replicas a coordinator drives: who is live, what each reports, and how a decision reaches them.

``FolderFleet`` is the shared folder's: replicas write heartbeats and read the ledger's ``sync_state.json``
themselves, so a decision reaches them when it is written. ``HttpFleet`` (``lockstep.sync.http_fleet``)
reads ``GET /status`` and POSTs each decision to the admin endpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from lockstep.core.clock import Clock
from lockstep.core.settings import Settings
from lockstep.sync.protocol import Heartbeat, Pending, Split
from lockstep.sync.shared_files import live_heartbeats, read_pins

PINS_POLL_S = 0.01  # seconds between reads of the replicas' session pins while a step's list is collected


class Fleet(Protocol):
    """The live replicas and the way a decision reaches them."""

    pushes: bool  # decisions are sent to each replica: one can be told alone (caught up) and must be told at all
    replicas_verify: bool  # replicas hash every file they fetch: the coordinator only checks that files are there

    def live(self) -> list[Heartbeat]:
        """What each live replica reports now (``generation_seen``: the last decision it has seen)."""
        ...

    def deliver(self, decision: Pending, generation: int, to: list[Heartbeat] | None = None) -> dict[str, str]:
        """Make ``decision`` reach the replicas (``to``, default all); why it failed, by replica id."""
        ...

    def deliver_split(self, split: Split, model: str, generation: int, to: list[Heartbeat]) -> dict[str, str]:
        """Make a rollout step reach the replicas ``to``; why it failed, by replica id."""
        ...

    def session_pins(self, rollout: str, step: int, to: list[Heartbeat], until: float
                     ) -> tuple[dict[str, list[str]], dict[str, str]]:
        """Each replica's sessions the committed version answered before ``step``; why one has none, by id.

        Waits (until the monotonic time ``until``) for replicas that have not put the step in force yet."""
        ...

    def reach_s(self, staged: list[Heartbeat], slack_s: float) -> float:
        """Seconds a decision may take to reach the slowest of ``staged`` when made within ``slack_s`` from now."""
        ...

    def check(self, model: str) -> None:
        """``BadRequest`` when the replicas would refuse ``model`` (asked before any replica stages)."""
        ...

    def describe(self) -> str:
        """Where the replicas are looked for, for error messages."""
        ...

    def close(self) -> None: ...


class FolderFleet:
    """Replicas that share the folder: heartbeats in ``replicas/``; they poll the state file."""

    pushes = False
    replicas_verify = False

    def __init__(self, shared_dir: Path, settings: Settings, *, clock: Clock) -> None:
        self.shared_dir = shared_dir
        self.settings = settings
        self.clock = clock

    def live(self) -> list[Heartbeat]:
        return live_heartbeats(self.shared_dir, self.settings.heartbeat_ttl_s, self.clock.time(),
                               self.settings.clock_skew_s)

    def deliver(self, decision: Pending, generation: int, to: list[Heartbeat] | None = None) -> dict[str, str]:
        return {}  # the ledger's write of sync_state.json was the delivery

    def deliver_split(self, split: Split, model: str, generation: int, to: list[Heartbeat]) -> dict[str, str]:
        return {}  # in sync_state.json too

    def session_pins(self, rollout: str, step: int, to: list[Heartbeat], until: float
                     ) -> tuple[dict[str, list[str]], dict[str, str]]:
        """From ``pins/<replica>.json``, which each replica writes once the step is in force."""
        found: dict[str, list[str]] = {}
        while True:
            for beat in to:
                if beat.replica_id not in found:
                    pins = read_pins(self.shared_dir, beat.replica_id)
                    if pins is not None and pins.rollout == rollout and pins.step == step:
                        found[beat.replica_id] = pins.pins
            if len(found) == len(to) or self.clock.monotonic() >= until:
                return found, {b.replica_id: f"wrote no session pins for step {step} in {self.shared_dir / 'pins'}"
                               for b in to if b.replica_id not in found}
            self.clock.sleep(PINS_POLL_S)

    def reach_s(self, staged: list[Heartbeat], slack_s: float) -> float:
        """A replica reads the file within one poll: its fast commit poll while it still says so, else the normal."""
        slow = self.settings.poll_interval_s
        fast = [(b.commit_poll_s, b.commit_poll_until) for b in staged
                if b.commit_poll_s is not None and b.commit_poll_until is not None]
        if not staged or len(fast) < len(staged):
            return slow
        poll = max(p for p, _ in fast)
        # Each must still poll fast at activate_at, with slack for its clock and for the decision.
        if min(until for _, until in fast) < self.clock.time() + 2 * poll + 0.05 + slack_s:
            return slow
        return poll

    def check(self, model: str) -> None:
        pass  # the coordinator only commits published versions here; it checked the reference itself

    def describe(self) -> str:
        return f"heartbeats in {self.shared_dir / 'replicas'}"

    def close(self) -> None:
        pass
