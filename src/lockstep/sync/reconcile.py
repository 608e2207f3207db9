"""The state a coordinator goes on from: its ledger's, unless the replicas hold something it must not undo."""

from __future__ import annotations

import logging
from collections.abc import Callable

from lockstep.sync.protocol import LegacyRequest, SyncState, activate_at_problem, reference_problem

log = logging.getLogger(__name__)


def state_to_go_on_from(read: Callable[[], SyncState | LegacyRequest | None], held: Callable[[], SyncState], *,
                        replicas_read_ledger: bool, initial_model: str) -> SyncState:
    """The ledger's state (``read``), or what the live replicas hold (``held``) where the ledger cannot be used.

    Unreadable, legacy or missing (while replicas serve something): rebuilt from the replicas. Where replicas
    read the ledger themselves (a shared folder), they keep their last good state and ignore a file that goes
    backwards or commits what they refuse; building on such a file would make them ignore the next writes too.
    """
    try:
        state = read()
    except ValueError as exc:
        log.warning("%s; going on from what the replicas serve", exc)
        return held()
    if isinstance(state, LegacyRequest):
        return held()
    if state is None:
        rebuilt = held()
        if rebuilt.generation == 0 and (rebuilt.committed is None or rebuilt.committed.version == 0):
            return SyncState()
        log.warning("no committed state recorded but replicas serve v%s (generation %d); going on from it",
                    rebuilt.committed.version if rebuilt.committed else "-", rebuilt.generation)
        return rebuilt
    if not replicas_read_ledger:
        return state
    replicas = held()
    if state.generation < replicas.generation:
        log.warning("sync_state generation %d is below the %d replicas hold, so they ignore it; rebuilding from "
                    "heartbeats", state.generation, replicas.generation)
        return replicas
    refused = state.committed and (activate_at_problem(state.committed) or reference_problem(
        state.committed.version, state.committed.model, initial_model))
    if refused:
        log.warning("sync_state commits something replicas refuse (%s); going on from what they serve", refused)
        return replicas.model_copy(update={"generation": state.generation, "pending": state.pending})
    if (state.committed and replicas.committed and state.committed.version < replicas.committed.version
            and not state.committed.rollback):
        log.warning("sync_state commits v%d below the v%d replicas serve without a rollback, so they ignore it; "
                    "rebuilding from heartbeats", state.committed.version, replicas.committed.version)
        return replicas.model_copy(update={"generation": state.generation})
    return state
