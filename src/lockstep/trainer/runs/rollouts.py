"""Rollouts from the inference service: ``POST /generate`` to the replicas, round robin, with the version that
produced each answer (``X-Model-Version``, checked against the body)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import httpx

from lockstep.core.numbers import parse_decimal

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 120.0  # seconds for one generation; a loaded CPU replica can be slow
CONCURRENCY = 32  # requests in flight at once (replicas batch them)
# How long a round waits for a ready replica before its requests fail. A flip can leave none ready for a moment:
# in-place copies pause admission on every replica at one activate_at.
NO_REPLICA_WAIT_S = 10.0


@dataclass(frozen=True)
class GenRequest:
    """One generation to ask for."""

    prompt: str
    max_new_tokens: int
    temperature: float
    seed: int | None = None
    top_k: int = 0
    group: int = 0  # which prompt group it belongs to (GRPO baseline)
    n: int = 1  # answers to ask for at once: one version writes them all (answer i samples with seed + i)
    logprobs: bool = False  # also ask for each token's log-probability under the version that drew it

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": self.prompt, "max_new_tokens": self.max_new_tokens,
                                "temperature": self.temperature, "top_k": self.top_k}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.n != 1:
            body["n"] = self.n
        if self.logprobs:
            body["logprobs"] = True
        return body


@dataclass
class Rollout:
    """An answer and where it came from; ``error`` is set (and the rest may be empty) when it failed."""

    request: GenRequest
    url: str
    text: str = ""
    version: int | None = None  # from X-Model-Version
    body_version: int | None = None  # model_version in the body
    replica_id: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    token_ids: list[int] | None = None  # when the replica returns them
    logprobs: list[float | None] | None = None  # one per token of token_ids, when asked and returned
    latency_s: float = 0.0
    started_at: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def mislabeled(self) -> bool:
        """The header and the body disagree on the version (or one is missing)."""
        return self.ok and (self.version is None or self.version != self.body_version)


def parse_answer(rollout: Rollout, response: httpx.Response) -> list[Rollout]:
    """The answers of a ``/generate`` response: ``rollout`` filled in, and with n > 1 one more per answer."""
    n = rollout.request.n
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        return failed_answers(rollout, f"HTTP {response.status_code}: {message}")
    body = response.json()
    if not isinstance(body, dict):
        return failed_answers(rollout, f"the replica answered 200 with a JSON {type(body).__name__}, not an object")
    rollout.version = parse_decimal(response.headers.get("x-model-version"))
    rollout.body_version = body.get("model_version")
    rollout.replica_id = body.get("replica_id") or response.headers.get("x-replica-id")
    choices = body.get("choices") if n > 1 else [body]
    if not isinstance(choices, list) or len(choices) != n or not all(isinstance(c, dict) for c in choices):
        return failed_answers(rollout, f"the replica answered {len(choices) if isinstance(choices, list) else 'no'} "
                                       f"choices of {n}")
    answers = []
    for choice in choices:
        ids = choice.get("completion_token_ids", choice.get("token_ids"))
        token_ids = [int(i) for i in ids] if isinstance(ids, list) else None
        answers.append(replace(rollout, text=str(choice.get("text") or ""), finish_reason=choice.get("finish_reason"),
                               completion_tokens=choice.get("completion_tokens"), token_ids=token_ids,
                               logprobs=token_logprobs(choice.get("completion_logprobs"), token_ids)))
    return answers


def token_logprobs(value: Any, token_ids: list[int] | None) -> list[float | None] | None:
    """The answer's per-token log-probabilities when they are a list aligned with its tokens; else None."""
    if token_ids is None or not isinstance(value, list) or len(value) != len(token_ids):
        return None
    if not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in value):
        return None
    return [None if x is None else float(x) for x in value]


def failed_answers(rollout: Rollout, error: str) -> list[Rollout]:
    """Every answer ``rollout``'s request asked for, failed with ``error`` (each counts as a failed sample)."""
    return [replace(rollout, error=error) for _ in range(rollout.request.n)]


class RolloutClient:
    """Sends generations to the replicas ``urls()`` returns, spreading them round robin."""

    def __init__(self, urls: Callable[[], list[str]], *, timeout_s: float = REQUEST_TIMEOUT_S,
                 concurrency: int = CONCURRENCY, no_replica_wait_s: float = NO_REPLICA_WAIT_S) -> None:
        self.urls = urls
        self.no_replica_wait_s = no_replica_wait_s
        self._client = httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rollout")
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def one(self, url: str, request: GenRequest) -> list[Rollout]:
        """The ``request.n`` answers of one request to one replica (no retry)."""
        rollout = Rollout(request, url, started_at=time.time())
        started = time.monotonic()
        try:
            response = self._client.post(url.rstrip("/") + "/generate", json=request.body())
            answers = parse_answer(rollout, response)
        except (httpx.HTTPError, ValueError) as exc:
            answers = failed_answers(rollout, f"{type(exc).__name__}: {exc}")
        for answer in answers:
            answer.latency_s = time.monotonic() - started
        return answers

    def _round_robin(self, request: GenRequest, urls: list[str]) -> list[Rollout]:
        with self._lock:
            start = next(self._turn)
        answers = [Rollout(request, "", error="no replica to ask") for _ in range(request.n)]
        # A replica that is unreachable or not ready (503) is skipped: the next one is asked.
        for attempt in range(len(urls)):
            answers = self.one(urls[(start + attempt) % len(urls)], request)
            if answers[0].ok or not _retryable(answers[0].error):
                return answers
        return answers

    def generate(self, requests: list[GenRequest]) -> list[Rollout]:
        """Every request, concurrently, round robin over the ready replicas: its ``n`` answers in order, one
        after the other; failures carry ``error``."""
        urls = self._ready_urls()
        if not urls:
            return [Rollout(r, "", error="no ready replica was found (see GET /cluster)")
                    for r in requests for _ in range(r.n)]
        return [a for answers in self._pool.map(lambda r: self._round_robin(r, urls), requests) for a in answers]

    def _ready_urls(self) -> list[str]:
        """The ready replicas; when there are none, asked again for up to ``no_replica_wait_s``."""
        deadline = time.monotonic() + self.no_replica_wait_s
        while not (urls := self.urls()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return urls

    def on_each(self, urls: list[str], requests: list[GenRequest]) -> list[Rollout]:
        """Every request on every replica in ``urls`` (the simulation asks each one)."""
        pairs = [(u, r) for u in urls for r in requests]
        return [a for answers in self._pool.map(lambda pair: self.one(*pair), pairs) for a in answers]


def _retryable(error: str | None) -> bool:
    if error is None:
        return False
    return not error.startswith("HTTP 4") or error.startswith(("HTTP 408", "HTTP 429"))
