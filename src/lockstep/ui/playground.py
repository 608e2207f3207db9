"""The playground: one prompt streamed from the service, the next replica in turn, or a pinned replica.

A pinned replica must be one the cluster lists (the trainer's /cluster, or INFERENCE_URLS set by the
operator); the page names it, the server looks its URL up, and no URL from the page is ever called.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi.responses import JSONResponse, StreamingResponse

from lockstep.core.errors import BadRequest, NotReady
from lockstep.core.http import error_body
from lockstep.core.settings import Settings
from lockstep.ui.schemas import PlaygroundRequest
from lockstep.ui.upstream import Upstream, UpstreamUnavailable, describe, error_message

# seconds; connect fast, but a long answer on a busy CPU replica may take a while between tokens
STREAM_TIMEOUT = httpx.Timeout(120.0, connect=3.0)
FLEET_MAX_AGE_S = 2.0  # a fleet snapshot this old still picks the target (the feed refreshes it every second)


@dataclass(frozen=True)
class Target:
    """Where a prompt goes: a URL, how it was chosen, and the replica id when known beforehand."""

    url: str
    via: str  # service | round-robin | pinned
    replica_id: str | None = None


def _sse(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Playground:
    """Chooses a target, opens a streamed chat completion there and relays it to the page."""

    def __init__(self, settings: Settings, upstream: Upstream) -> None:
        self.settings = settings
        self.upstream = upstream
        self._turn = itertools.count()

    async def choose(self, pinned: str | None) -> Target:
        """The target for one prompt; a pinned replica must be listed by the cluster."""
        cluster = await self.upstream.cluster(max_age_s=FLEET_MAX_AGE_S)
        replicas = [r for r in cluster.get("replicas") or [] if isinstance(r, dict) and r.get("url")]
        if pinned is not None:
            allowed = self.upstream.allowed_replicas()
            for replica in replicas:
                url = str(replica["url"]).rstrip("/")
                if pinned in (replica.get("replica_id"), url) and url in allowed:
                    return Target(url, "pinned", replica.get("replica_id"))
            names = sorted(str(r.get("replica_id")) for r in replicas) or ["(none: the cluster lists none)"]
            raise BadRequest(f"replica {pinned!r} is not in the cluster; choose one of {', '.join(names)} "
                             "or leave it empty for round robin")
        if self.settings.inference_service_url:
            return Target(self.settings.inference_service_url.rstrip("/"), "service")
        # reachable None means "not probed", which is no reason to skip it
        ready = [r for r in replicas if r.get("ready") and r.get("reachable") is not False]
        if not ready:
            raise NotReady("no replica is ready to answer right now; wait for the fleet to converge, "
                           "or pin a replica")
        chosen = ready[next(self._turn) % len(ready)]
        return Target(str(chosen["url"]).rstrip("/"), "round-robin", chosen.get("replica_id"))

    async def stream(self, body: PlaygroundRequest) -> StreamingResponse | JSONResponse:
        """Open the upstream stream first, so a refusal comes back as a plain error, not half a stream."""
        target = await self.choose(body.replica)
        payload = {"model": self.settings.served_model_name, "stream": True, "max_tokens": body.max_tokens,
                   "temperature": body.temperature, "messages": [{"role": "user", "content": body.prompt}]}
        request = self.upstream.client.build_request(
            "POST", target.url + "/v1/chat/completions", json=payload, headers=self.upstream.auth_headers(),
            timeout=STREAM_TIMEOUT)
        where = (f"replica {target.replica_id}" if target.replica_id
                 else f"the inference service at {target.url}")
        try:
            response = await self.upstream.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"{where} is unreachable: {describe(exc)}") from exc
        if response.status_code != 200:
            raw = await response.aread()
            await response.aclose()
            try:
                message = error_message(json.loads(raw), raw[:200].decode(errors="replace"))
            except ValueError:
                message = raw[:200].decode(errors="replace")
            # A replica's 401 is this server's token, not the page's session: never relay it as the page's 401.
            status = 502 if response.status_code == 401 else response.status_code
            return JSONResponse(error_body(f"{where} refused the prompt ({response.status_code}): {message}",
                                           "upstream_error"), status_code=status)
        meta = {"version": _int_or_none(response.headers.get("x-model-version")),
                "replica_id": response.headers.get("x-replica-id") or target.replica_id,
                "model": response.headers.get("x-model-repo-id"), "via": target.via}
        return StreamingResponse(self._relay(response, meta, where), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _relay(self, response: httpx.Response, meta: dict[str, Any],
                     where: str) -> AsyncIterator[bytes]:
        """OpenAI chunks in, page events out: meta, token*, then done or error."""
        yield _sse("meta", meta)
        finished = False
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    yield _sse("error", {"message": error_message(chunk, "the replica failed mid-answer")})
                    finished = True
                    break
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield _sse("token", {"text": text})
                    if choice.get("finish_reason"):
                        yield _sse("done", {"finish_reason": choice["finish_reason"], **meta})
                        finished = True
            if not finished:
                yield _sse("error", {"message": f"{where} ended the answer without finishing it"})
        except (httpx.HTTPError, ValueError) as exc:
            text = describe(exc) if isinstance(exc, httpx.HTTPError) else "it sent something that is not JSON"
            yield _sse("error", {"message": f"{where} broke off the answer: {text}"})
        finally:
            await response.aclose()


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
