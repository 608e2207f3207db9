"""One testbed node: a replica's real staging and peer-serving code, without a model engine.

    python benchmarks/staging_node.py --listen 10.77.0.2:8100 --origin http://10.77.0.1:8000 --cache DIR \\
        --token T --version 1 --peers URL,URL --start-at EPOCH_S

It serves ``GET /peer/chunks/<sha256>`` (``lockstep.store.peer_server``, the replica's own route) over a
``RemoteStore`` (the replica's own cache, origin the trainer), waits until ``--start-at`` (wall clock, so every
node starts at once), stages ``--version`` with ``--peers`` first, prints one JSON line with when it finished
and where its bytes came from, and keeps serving its peers until it is killed or ``--hold-s`` passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from lockstep.core.http import install_error_handlers
from lockstep.store.peer_server import peer_router
from lockstep.store.remote import RemoteStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT for the peer route")
    parser.add_argument("--origin", required=True, help="the trainer's URL")
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--token", required=True)
    parser.add_argument("--version", required=True, type=int)
    parser.add_argument("--peers", default="", help="comma-separated peer URLs, nearest first")
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock second to start staging at")
    parser.add_argument("--hold-s", type=float, default=600.0, help="serve peers this long after staging")
    args = parser.parse_args()

    host, port = args.listen.rsplit(":", 1)
    cache = RemoteStore(args.origin, args.cache, token=args.token, keep=4)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(peer_router(lambda _: cache, args.token))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=int(port), log_level="warning", access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    ready_at = time.time()
    time.sleep(max(0.0, args.start_at - time.time()))
    cache.suggest_peers(args.version, [p for p in args.peers.split(",") if p])
    started = time.time()
    error = None
    try:
        cache.path_of(args.version)
    except Exception as exc:  # reported to the driver, which counts the node as failed
        error = f"{type(exc).__name__}: {exc}"
    finished = time.time()
    transfer = cache.transfer
    print(json.dumps({"listen": args.listen, "version": args.version, "ready_at": ready_at, "started": started,
                      "finished": finished, "error": error,
                      "bytes_by_source": transfer.by_source if transfer else {},
                      "avoided": transfer.avoided if transfer else {}}), flush=True)
    deadline = time.monotonic() + args.hold_s
    while time.monotonic() < deadline and not server.should_exit:
        time.sleep(0.2)
    server.should_exit = True
    sys.exit(0 if error is None else 1)


if __name__ == "__main__":
    main()
