"""The trainer's rollout client: it waits out a moment with no ready replica instead of failing a whole round, and
a group asked for in one request comes back as one rollout per answer."""

from __future__ import annotations

import httpx

from lockstep.trainer.runs.rollouts import GenRequest, Rollout, RolloutClient, parse_answer
from tests.support.cluster import free_port


def test_a_round_waits_for_a_ready_replica_then_asks_it() -> None:
    """An in-place flip pauses admission on every replica at one activate_at: for a moment none is ready."""
    calls: list[int] = []
    closed_port = free_port()  # nothing listens: the request reaches the replica's address and fails there

    def urls() -> list[str]:
        calls.append(1)
        return [] if len(calls) < 4 else [f"http://127.0.0.1:{closed_port}"]

    client = RolloutClient(urls, no_replica_wait_s=30)
    try:
        [rollout] = client.generate([GenRequest("p", 2, 0.0)])
    finally:
        client.close()
    assert len(calls) == 4
    assert rollout.url.endswith(f":{closed_port}") and rollout.error is not None and "ConnectError" in rollout.error


def test_with_no_ready_replica_for_the_whole_wait_the_round_fails_with_the_reason() -> None:
    client = RolloutClient(lambda: [], no_replica_wait_s=0.2)
    try:
        rollouts = client.generate([GenRequest("p", 2, 0.0), GenRequest("q", 2, 0.0)])
    finally:
        client.close()
    assert [r.error for r in rollouts] == ["no ready replica was found (see GET /cluster)"] * 2


def _answer(choices: list[dict[str, object]] | None, status: int = 200) -> httpx.Response:
    body: dict[str, object] = {"text": "a", "model_version": 4, "replica_id": "r1", "finish_reason": "length",
                               "completion_tokens": 1, "completion_token_ids": [7]}
    if choices is not None:
        body["choices"] = choices
    if status != 200:
        body = {"error": {"message": "the queue is full"}}
    return httpx.Response(status, json=body, headers={"x-model-version": "4"})


def test_a_group_asked_in_one_request_comes_back_as_one_rollout_per_answer_with_the_version() -> None:
    request = GenRequest("p", 2, 1.0, seed=5, group=2, n=3)
    assert request.body()["n"] == 3 and "n" not in GenRequest("p", 2, 1.0).body()
    choices = [{"text": t, "finish_reason": "stop", "completion_tokens": 1, "completion_token_ids": [i]}
               for i, t in enumerate("xyz")]
    rollouts = parse_answer(Rollout(request, "http://r"), _answer(choices))
    assert [(r.text, r.token_ids, r.version, r.body_version, r.request.group) for r in rollouts] == [
        ("x", [0], 4, 4, 2), ("y", [1], 4, 4, 2), ("z", [2], 4, 4, 2)]
    assert all(r.ok and not r.mislabeled for r in rollouts)


def test_a_group_request_that_fails_or_answers_short_fails_every_answer_of_it() -> None:
    request = GenRequest("p", 2, 1.0, n=3)
    short = parse_answer(Rollout(request, "http://r"), _answer([{"text": "x"}]))
    refused = parse_answer(Rollout(request, "http://r"), _answer(None, status=429))
    assert [r.error for r in short] == ["the replica answered 1 choices of 3"] * 3
    assert [r.error for r in refused] == ["HTTP 429: the queue is full"] * 3
    client = RolloutClient(lambda: [], no_replica_wait_s=0)
    try:
        assert len(client.generate([request, GenRequest("q", 2, 0.0)])) == 4  # 3 + 1 answers, all failed
    finally:
        client.close()


def test_logprobs_are_asked_for_and_kept_only_when_aligned_with_the_tokens() -> None:
    request = GenRequest("p", 2, 1.0, n=2, logprobs=True)
    assert request.body()["logprobs"] is True and "logprobs" not in GenRequest("p", 2, 1.0).body()
    choices = [{"text": "x", "completion_token_ids": [3, 4], "completion_logprobs": [-0.5, None]},
               {"text": "y", "completion_token_ids": [5, 6], "completion_logprobs": [-0.1]}]  # one short
    aligned, short = parse_answer(Rollout(request, "http://r"), _answer(choices))
    assert aligned.logprobs == [-0.5, None] and short.logprobs is None
    odd = [{"text": "x", "completion_token_ids": [3], "completion_logprobs": ["-0.5"]},
           {"text": "y", "completion_token_ids": [5], "completion_logprobs": [True]}]
    assert [r.logprobs for r in parse_answer(Rollout(request, "http://r"), _answer(odd))] == [None, None]


def test_a_200_whose_body_is_not_an_object_fails_every_answer() -> None:
    request = GenRequest("p", 2, 1.0, n=2)
    rollouts = parse_answer(Rollout(request, "http://r"), httpx.Response(200, json=[1, 2]))
    assert [r.error for r in rollouts] == ["the replica answered 200 with a JSON list, not an object"] * 2
