"""``lockstep_requests_total``: every answered generation request, once, with the HTTP status actually sent.

Counted at the edge of the app (an ASGI middleware) because only there is every outcome seen: schema 400s,
429s, 500s from an unexpected exception, and streams whose client hung up (499).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lockstep.inference.metrics import ReplicaMetrics

CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before the answer was complete
NO_VERSION = "none"  # the model_version label of a request refused before any version was chosen for it
_VERSION_KEY = "lockstep_model_version"  # where a handler notes the version in the request's scope state

RequestRule = Callable[[str, str], bool]  # (method, path) → whether the request is counted
MetricsOf = Callable[[Scope], ReplicaMetrics | None]


def note_version(request: Request, version: int) -> None:
    """Record the version a request was admitted on, for its ``model_version`` label (errors included)."""
    setattr(request.state, _VERSION_KEY, str(version))


class _Outcome:
    """What the app sent for one request, and whether its client hung up before the answer was complete."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.complete = False
        self.client_left = False

    def label(self) -> str:
        """The status to count: 499 for a client gone mid-answer, 500 for an app that sent no answer.

        A client seen leaving before the answer's last byte counts as 499 even when the app then sends that
        byte: a non-streamed handler, told its client left, still ends with a 200 to a closed socket."""
        if self.client_left:
            return str(CLIENT_CLOSED)
        return "500" if self.status is None else str(self.status)


class CountRequests:
    """ASGI middleware: count each request ``counted`` selects in ``lockstep_requests_total``."""

    def __init__(self, app: ASGIApp, counted: RequestRule, metrics_of: MetricsOf) -> None:
        self.app, self.counted, self.metrics_of = app, counted, metrics_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.counted(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        outcome = _Outcome()
        state: dict[str, Any] = scope.setdefault("state", {})

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not outcome.complete:
                outcome.client_left = True
            return message

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome.status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                outcome.complete = True
            await send(message)

        try:
            await self.app(scope, watched_receive, watched_send)
        except (OSError, ClientDisconnect):  # the socket went away under a send: the client left
            outcome.client_left = not outcome.complete
            raise
        finally:
            metrics = self.metrics_of(scope)
            if metrics is not None:
                metrics.requests.labels(endpoint=scope["path"], status=outcome.label(),
                                        model_version=state.get(_VERSION_KEY, NO_VERSION)).inc()
