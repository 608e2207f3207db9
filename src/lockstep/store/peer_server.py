"""The route through which a replica gives its peers the chunks it holds: ``GET /peer/chunks/<sha256>``.

Authenticated with the fleet's token (LOCKSTEP_API_TOKEN): peers are replicas of one fleet. A chunk on its way
here (the assembly in progress lists it) is awaited, so replicas that stage together form a pipeline; one this
replica neither holds nor expects is a 404 at once while it stages, and after ``STAGE_START_WAIT_S`` when no
stage runs here (one may be about to start), waited for on the event loop, not on a thread. The bytes are sent
as they lie on disk: the asking peer checks them against the digest it asked for, so a damaged copy here costs
one retry elsewhere, nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam

from lockstep.core.errors import NotFound
from lockstep.core.http import check_bearer
from lockstep.store.version_cache import PEER_PATH, VersionCache

# Peers' requests wait here for chunks on their way, up to PEER_WAIT_S each: their own threads, so they never
# hold the threads the rest of the replica's API runs on (asyncio's default executor is a handful wide).
PEER_THREADS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="peer")
ChunkId = Annotated[str, PathParam(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]
PEER_WAIT_S = 30.0  # a chunk on its way here is awaited this long before the peer hears 404
STAGE_START_WAIT_S = 2.0  # with no stage running here, how long a peer's ask waits for one to start
STAGE_START_POLL_S = 0.02


def peer_router(cache_of: Callable[[Request], VersionCache | None], token: str | None, *,
                on_served: Callable[[Request, int], None] | None = None, wait_s: float = PEER_WAIT_S) -> APIRouter:
    """The peer route over the cache ``cache_of(request)`` returns (None: this process keeps no chunks)."""
    router = APIRouter()

    @router.get(PEER_PATH + "{sha256}", summary="A chunk this replica holds, for a peer staging a version (token)")
    async def peer_chunk(sha256: ChunkId, request: Request) -> Response:
        check_bearer(request, token)
        cache = cache_of(request)
        if cache is None:
            raise NotFound("this replica keeps no chunks (no shared folder and no trainer)")
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(PEER_THREADS, cache.read_held, sha256, 0.0)
        if data is None:
            # A stage may be about to start here (the coordinator posts to every replica at once): wait for it on
            # the event loop, so that asks for chunks nobody sends never hold the threads real chunks wait on.
            starts_by = loop.time() + min(wait_s, STAGE_START_WAIT_S)
            while not cache.assembling and loop.time() < starts_by:
                await asyncio.sleep(STAGE_START_POLL_S)
            if cache.assembling:  # a chunk it does not list is a 404 at once; one it lists is awaited
                data = await loop.run_in_executor(PEER_THREADS, cache.read_held, sha256, wait_s)
        if data is None:
            raise NotFound(f"chunk {sha256[:12]} is not held here")
        if on_served is not None:
            on_served(request, len(data))
        return Response(data, media_type="application/octet-stream")

    return router
