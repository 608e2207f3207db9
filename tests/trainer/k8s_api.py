"""A tiny local HTTP server standing in for the Kubernetes API: it serves a pod list, or refuses."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from kubernetes import client

PODS = {
    "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
    "items": [
        {"metadata": {"name": "replica-1", "namespace": "lockstep", "labels": {"app": "inference-server"}},
         "status": {"phase": "Running", "podIP": "10.1.0.5",
                    "conditions": [{"type": "Ready", "status": "True"}]}},
        {"metadata": {"name": "replica-2", "namespace": "lockstep", "labels": {"app": "inference-server"}},
         "status": {"phase": "Running", "podIP": "fd00::7",
                    "conditions": [{"type": "Ready", "status": "False"}]}},
        {"metadata": {"name": "replica-3", "namespace": "lockstep", "labels": {"app": "inference-server"}},
         "status": {"phase": "Pending"}},
        {"metadata": {"name": "replica-old", "namespace": "lockstep", "labels": {"app": "inference-server"}},
         "status": {"phase": "Succeeded", "podIP": "10.1.0.9"}},
    ],
}


class FakeApiServer:
    """Answers GET /api/v1/namespaces/<ns>/pods with PODS (or an error status) and records the queries."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.status = 200
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlparse(self.path)
                owner.requests.append((url.path, parse_qs(url.query)))
                body = json.dumps(PODS if owner.status == 200 else
                                  {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "message": "pods is forbidden", "reason": "Forbidden",
                                   "code": owner.status}).encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def api_client(self) -> client.ApiClient:
        return client.ApiClient(client.Configuration(host=self.url))


@contextmanager
def fake_api_server() -> Iterator[FakeApiServer]:
    """Serve until the block ends (bound to 127.0.0.1 only)."""
    server = FakeApiServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
