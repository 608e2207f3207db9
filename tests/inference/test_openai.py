"""The OpenAI-compatible endpoints, driven by the official ``openai`` client over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from lockstep.inference.app import chat_prompt
from lockstep.models.loader import LoadedModel
from tests.inference.conftest import MAX_NEW, PROMPTS, Served, reference_text, replica_settings, served
from tests.support.cluster import wait_for
from tests.support.metrics import metric_samples, metric_value

LONG = 1000  # tokens (the default limit is 1024): runs far longer than the test needs to look at it
LONGEST = 1900  # tokens: a short chat prompt plus this still fits the 2048-token context


@pytest.fixture(scope="module")
def srv(builtin_dir: Path) -> Iterator[Served]:
    with served(replica_settings(builtin_dir)) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv: Served) -> Iterator[OpenAI]:
    with OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def chat_expected(tiny_dirs: dict[int, Path]) -> str:
    return reference_text(tiny_dirs[0], PROMPTS[1], MAX_NEW, chat=True)


def _loaded(srv: Served) -> LoadedModel:
    assert srv.runtime.replica.serving is not None
    return srv.runtime.replica.serving.loaded


def test_models_list_names_the_served_version(client: OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["lockstep", "lockstep@v0"]
    assert all(m.owned_by == "lockstep" for m in models.data)


def test_models_retrieve_answers_each_listed_model_and_an_openai_404_for_others(client: OpenAI) -> None:
    for listed in client.models.list().data:
        model = client.models.retrieve(listed.id)
        assert (model.id, model.object, model.owned_by, model.created) == (
            listed.id, "model", "lockstep", listed.created
        )
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.response.json()["error"]["code"] == "model_not_found"
    assert "'gpt-4o'" in _message(err.value) and "lockstep@v0" in _message(err.value)


def test_null_optional_parameters_mean_their_defaults(srv: Served, client: OpenAI) -> None:
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "presence_penalty": None,
             "frequency_penalty": None, "seed": None, "stop": None, "user": None, "stream_options": None}
    chat = client.chat.completions.create(
        model="lockstep", messages=[{"role": "user", "content": "hi"}], max_tokens=3, **nulls
    )
    assert len(chat.choices) == 1 and chat.usage is not None and 1 <= chat.usage.completion_tokens <= 3
    completion = client.completions.create(
        model="lockstep", prompt="hi", max_tokens=3, echo=None, best_of=None, logprobs=None, **nulls
    )
    assert len(completion.choices) == 1 and completion.choices[0].logprobs is None
    for path, body in [
        ("/v1/chat/completions", {"model": "lockstep", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": None, "max_completion_tokens": None, "top_k": None,
                                  "logprobs": None, "top_logprobs": None, **nulls}),
        ("/v1/completions", {"model": "lockstep", "prompt": "hi", "max_tokens": 3, "top_k": None, "echo": None,
                             "logprobs": None, "best_of": None, "suffix": None, **nulls}),
        ("/generate", {"prompt": "hi", "max_new_tokens": 3, "temperature": None, "top_p": None, "top_k": None,
                       "seed": None, "stop": None, "n": None, "logprobs": None, "system_prompt": None}),
    ]:
        r = httpx.post(srv.url + path, json=body, timeout=120)
        assert r.status_code == 200, (path, r.text)
    r = httpx.post(srv.url + "/generate", json={"prompt": None}, timeout=30)
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]  # a required field stays required
    schemas = httpx.get(srv.url + "/openapi.json").json()["components"]["schemas"]
    for model, field in [("ChatRequest", "temperature"), ("CompletionRequest", "echo"), ("GenerateRequest", "top_k")]:
        assert {"type": "null"} in schemas[model]["properties"][field]["anyOf"], (model, field)  # the spec says so
    assert schemas["ChatRequest"]["properties"]["temperature"]["anyOf"][0]["maximum"] == 2  # bounds kept


def _prompt_of(tokens: int, count: Any) -> str:
    """Text of ``"one "`` words whose prompt is ``tokens`` long or a few tokens shorter, as ``count`` counts it."""
    low, high = 0, tokens  # words; each is at least one token
    while low < high:
        mid = (low + high + 1) // 2
        if count("one " * mid) <= tokens:
            low = mid
        else:
            high = mid - 1
    return "one " * low


def test_without_max_tokens_the_default_length_is_cut_to_the_room_the_prompt_leaves(
    srv: Served, client: OpenAI
) -> None:
    tok, limit = _loaded(srv).tokenizer, _loaded(srv).max_context
    chat_text = _prompt_of(limit - 8, lambda t: len(chat_prompt(tok, [{"role": "user", "content": t}])))
    chat = client.chat.completions.create(model="lockstep", messages=[{"role": "user", "content": chat_text}],
                                          temperature=0)
    assert chat.usage is not None and chat.usage.prompt_tokens + 256 > limit  # the default (256) did not fit
    assert 1 <= chat.usage.completion_tokens <= limit - chat.usage.prompt_tokens
    text = _prompt_of(limit - 8, lambda t: len(tok(t)["input_ids"]))
    completion = client.completions.create(model="lockstep", prompt=text, temperature=0)
    assert completion.usage is not None and completion.usage.prompt_tokens + 16 > limit  # nor did 16
    assert 1 <= completion.usage.completion_tokens <= limit - completion.usage.prompt_tokens
    r = httpx.post(srv.url + "/generate", json={"prompt": text, "temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["prompt_tokens"] + r.json()["completion_tokens"] <= limit, r.text
    with pytest.raises(openai.BadRequestError) as err:  # a length the client chose is never cut
        client.completions.create(model="lockstep", prompt=text, temperature=0, max_tokens=16)
    assert "max_new_tokens (16)" in _message(err.value) and f"context limit of {limit} tokens" in _message(err.value)


def test_completion_text_usage_and_version(
    srv: Served, client: OpenAI, expected: dict[int, dict[str, str]]
) -> None:
    raw = client.completions.with_raw_response.create(
        model="lockstep", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0
    )
    assert raw.headers["x-model-version"] == "0" and raw.headers["x-model-repo-id"] == "builtin:tiny"
    c = raw.parse()
    assert c.object == "text_completion" and c.model == "lockstep@v0"
    assert c.system_fingerprint is not None and c.system_fingerprint.startswith("v0-")
    assert c.choices[0].text == expected[0][PROMPTS[0]] and c.choices[0].finish_reason == "length"
    prompt_tokens = len(_loaded(srv).tokenizer(PROMPTS[0])["input_ids"])
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (
        prompt_tokens,
        MAX_NEW,
        prompt_tokens + MAX_NEW,
    )


def test_chat_completion_uses_the_chat_template(client: OpenAI, chat_expected: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="lockstep@v0",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=MAX_NEW,
        temperature=0,
    )
    assert raw.headers["x-model-version"] == "0"
    c = raw.parse()
    assert (
        c.object == "chat.completion" and c.model == "lockstep@v0" and c.system_fingerprint.startswith("v0-")
    )
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == chat_expected and c.choices[0].finish_reason == "length"
    assert c.usage is not None and c.usage.completion_tokens == MAX_NEW


def test_streamed_completion_is_the_same_text(client: OpenAI, expected: dict[int, dict[str, str]]) -> None:
    chunks = list(
        client.completions.create(
            model="lockstep",
            prompt=PROMPTS[2],
            max_tokens=MAX_NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected[0][PROMPTS[2]]
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert reasons == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX_NEW
    assert {ch.model for ch in chunks} == {"lockstep@v0"}
    assert all(ch.system_fingerprint and ch.system_fingerprint.startswith("v0-") for ch in chunks)


def test_streamed_chat_is_the_same_text(client: OpenAI, chat_expected: str) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="lockstep",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=MAX_NEW,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-model-version"] == "0"
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat_expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX_NEW
    assert all(ch.system_fingerprint and ch.system_fingerprint.startswith("v0-") for ch in chunks)


def test_n_choices_are_each_the_answer_of_their_own_seed_and_one_version_wrote_them_all(client: OpenAI) -> None:
    """Choice i of (seed s, n) is the answer of (seed s + i, n = 1): sampled independently, reproducibly."""
    asked: dict[str, Any] = {"model": "lockstep", "prompt": PROMPTS[2], "max_tokens": MAX_NEW, "temperature": 1.0,
                             "seed": 40}
    raw = client.completions.with_raw_response.create(n=4, **asked)
    assert raw.headers["x-model-version"] == "0"
    c = raw.parse()
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(**{**asked, "seed": 40 + i}).choices[0].text for i in range(4)]
    assert [ch.text for ch in c.choices] == alone
    assert len(set(alone)) > 1  # sampled, not one answer four times
    assert c.usage is not None and c.usage.completion_tokens == 4 * MAX_NEW
    assert c.usage.prompt_tokens == client.completions.create(**asked).usage.prompt_tokens  # type: ignore[union-attr]


def test_streamed_n_choices_interleave_and_each_is_whole(client: OpenAI) -> None:
    asked: dict[str, Any] = {"model": "lockstep", "messages": [{"role": "user", "content": PROMPTS[1]}],
                             "max_tokens": MAX_NEW, "temperature": 1.0, "seed": 7}
    chunks = list(client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True},
                                                 **asked))
    texts = {i: "" for i in range(3)}
    finished = []
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.append(choice.index)
    assert sorted(finished) == [0, 1, 2]
    whole = client.chat.completions.create(n=3, **asked)
    assert [texts[i] for i in range(3)] == [ch.message.content for ch in whole.choices]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3 * MAX_NEW


def test_logprobs_are_each_chosen_tokens_on_both_apis_streamed_or_not(srv: Served, client: OpenAI) -> None:
    """logprobs 0 (completions) and logprobs true (chat): the log-probability of every token of the answer, the
    same as /generate's, in OpenAI's shapes; a stream carries the same values, chunk by chunk."""
    asked = {"model": "lockstep", "max_tokens": MAX_NEW, "temperature": 1.0, "seed": 21}
    generated = httpx.post(srv.url + "/generate", json={"prompt": PROMPTS[3], "max_new_tokens": MAX_NEW,
                                                        "temperature": 1.0, "seed": 21, "logprobs": True}).json()
    whole = client.completions.create(prompt=PROMPTS[3], logprobs=0, **asked).choices[0]
    assert whole.text == generated["text"] and whole.logprobs is not None
    assert whole.logprobs.token_logprobs == pytest.approx(generated["completion_logprobs"], abs=1e-6)
    tokenizer = _loaded(srv).tokenizer
    assert whole.logprobs.tokens == [tokenizer.decode([i]) for i in generated["completion_token_ids"]]
    offsets = whole.logprobs.text_offset or []
    tokens = whole.logprobs.tokens or []
    assert offsets[0] == 0 and all(offsets[i + 1] - offsets[i] == len(tokens[i]) for i in range(len(offsets) - 1))
    streamed = [c.choices[0].logprobs for c in client.completions.create(prompt=PROMPTS[3], logprobs=0, stream=True,
                                                                       **asked) if c.choices[0].logprobs]
    assert [v for lp in streamed for v in lp.token_logprobs or []] == whole.logprobs.token_logprobs
    assert [o for lp in streamed for o in lp.text_offset or []] == offsets
    assert client.completions.create(prompt=PROMPTS[3], **asked).choices[0].logprobs is None  # only when asked

    messages: Any = [{"role": "user", "content": PROMPTS[1]}]
    chat = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=0, n=2, **asked)
    assert chat.usage is not None
    assert sum(len(c.logprobs.content or []) for c in chat.choices if c.logprobs) == chat.usage.completion_tokens
    for choice in chat.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert all(t.logprob <= 0 and t.top_logprobs == [] and bytes(t.bytes or []).decode() == t.token
                   for t in choice.logprobs.content)
    chunks = list(client.chat.completions.create(messages=messages, logprobs=True, n=2, stream=True, **asked))
    for index, choice in enumerate(chat.choices):
        assert choice.logprobs is not None and choice.logprobs.content is not None
        in_stream = [t.logprob for c in chunks for ch in c.choices if ch.index == index and ch.logprobs
                     for t in ch.logprobs.content or []]
        assert in_stream == [t.logprob for t in choice.logprobs.content]
    assert client.chat.completions.create(messages=messages, **asked).choices[0].logprobs is None


UNSUPPORTED: list[tuple[str, dict[str, Any], str]] = [
    ("completions", {"logprobs": 1}, "logprobs above 0"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("chat", {"logprobs": True, "top_logprobs": 2}, "top_logprobs above 0"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
]


def _call(client: OpenAI, kind: str, **kw: Any) -> Any:
    base: dict[str, Any] = {"model": "lockstep", "max_tokens": 2, "temperature": 0}
    if kind == "chat":
        return client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **{**base, **kw})
    return client.completions.create(prompt=kw.pop("prompt", "hi"), **{**base, **kw})


def _message(exc: openai.APIStatusError) -> str:
    body = exc.response.json()["error"]
    assert set(body) >= {"message", "type", "param", "code"}
    return str(body["message"])


@pytest.mark.parametrize(
    ("kind", "params", "says"), UNSUPPORTED, ids=[f"{k}-{next(iter(p))}" for k, p, _ in UNSUPPORTED]
)
def test_unsupported_parameters_are_a_400_naming_them(
    client: OpenAI, kind: str, params: dict[str, Any], says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _call(client, kind, **params)
    message = _message(err.value)
    assert "unsupported" in message and says in message


def test_unknown_model_is_a_400_listing_the_served_ones(client: OpenAI) -> None:
    for kind in ("completions", "chat"):
        with pytest.raises(openai.BadRequestError) as err:
            _call(client, kind, model="gpt-4o")
        message = _message(err.value)
        assert "'gpt-4o'" in message and "lockstep@v0" in message


def test_prompt_over_the_context_window_is_a_400_with_the_limit(srv: Served, client: OpenAI) -> None:
    limit = _loaded(srv).max_context
    prompt = "one two three " * limit  # well over ``limit`` tokens, under the character limit
    assert len(_loaded(srv).tokenizer(prompt)["input_ids"]) > limit
    with pytest.raises(openai.BadRequestError) as err:
        _call(client, "completions", prompt=prompt)
    assert f"context limit of {limit} tokens" in _message(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        _call(client, "completions", max_tokens=100_000)
    assert "LOCKSTEP_MAX_NEW_TOKENS_LIMIT" in _message(err.value)


def test_client_that_disconnects_mid_stream_frees_its_slot(
    srv: Served, client: OpenAI, expected: dict[int, dict[str, str]]
) -> None:
    engine = srv.runtime.replica.serving.engine  # type: ignore[union-attr]
    cancelled = engine.finished_total.get("cancelled", 0)
    tokens_before = engine.generated_tokens_total
    stream = client.completions.create(
        model="lockstep", prompt=PROMPTS[0], max_tokens=LONG, temperature=0, stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].text
    stream.close()  # hang up with most of the answer still to come
    wait_for(
        lambda: (s := srv.status())["running"] == 0 and s["queue_depth"] == 0, 60, 0.05, "the slot freed"
    )
    wait_for(
        lambda: engine.finished_total.get("cancelled", 0) == cancelled + 1, 30, 0.05, "the request cancelled"
    )
    assert engine.generated_tokens_total - tokens_before < LONG
    c = client.completions.create(model="lockstep", prompt=PROMPTS[3], max_tokens=MAX_NEW, temperature=0)
    assert c.choices[0].text == expected[0][PROMPTS[3]]


def test_a_stream_its_client_leaves_is_counted_as_499_with_the_tokens_it_generated(srv: Served, client: OpenAI) -> None:
    before = metric_samples(httpx.get(srv.url + "/metrics").text)
    stream = client.completions.create(model="lockstep", prompt=PROMPTS[2], max_tokens=LONG, temperature=0,
                                       stream=True)
    first = next(iter(stream))
    assert first.choices[0].text
    stream.close()

    def counted() -> Any:
        after = metric_samples(httpx.get(srv.url + "/metrics").text)
        left = metric_value(after, "lockstep_requests_total", endpoint="/v1/completions", status="499",
                            model_version="0") - metric_value(before, "lockstep_requests_total",
                                                              endpoint="/v1/completions", status="499")
        return after if left == 1 else None

    after = wait_for(counted, 60, 0.05, "the stream its client left counted as 499")
    tokens = metric_value(after, "lockstep_generated_tokens_total") - metric_value(
        before, "lockstep_generated_tokens_total")
    assert 1 <= tokens < LONG
    ok = metric_value(after, "lockstep_requests_total", endpoint="/v1/completions", status="200") - metric_value(
        before, "lockstep_requests_total", endpoint="/v1/completions", status="200")
    assert ok == 0  # counted once, as what it was


def test_a_non_streamed_request_its_client_leaves_is_counted_as_499(srv: Served) -> None:
    """The handler, told its client left, still ends with a 200 to the closed socket: the count must say 499."""
    before = metric_samples(httpx.get(srv.url + "/metrics").text)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(srv.url + "/v1/completions", timeout=0.3,
                   json={"model": "lockstep", "prompt": PROMPTS[1], "max_tokens": LONG, "temperature": 0})

    def delta(after: dict[Any, float], status: str) -> float:
        return (metric_value(after, "lockstep_requests_total", endpoint="/v1/completions", status=status,
                             model_version="0")
                - metric_value(before, "lockstep_requests_total", endpoint="/v1/completions", status=status,
                               model_version="0"))

    def counted() -> dict[Any, float] | None:
        after = metric_samples(httpx.get(srv.url + "/metrics").text)
        return after if delta(after, "499") == 1 else None

    after = wait_for(counted, 60, 0.05, "the request its client left counted as 499")
    assert delta(after, "200") == 0


def test_full_queue_is_a_429_with_retry_after_and_others_are_unaffected(
    builtin_dir: Path, expected: dict[int, dict[str, str]]
) -> None:
    with (
        served(
            replica_settings(builtin_dir, max_batch_size=1, max_queue=1, max_new_tokens_limit=LONGEST)
        ) as small,
        OpenAI(base_url=small.url + "/v1", api_key="x", max_retries=0, timeout=120) as c,
    ):

        def long_chat() -> Any:  # the first chunk (the role) arrives as soon as the request is admitted
            return c.chat.completions.create(
                model="lockstep",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=LONGEST,
                temperature=0,
                stream=True,
            )

        running = long_chat()
        next(iter(running))
        wait_for(lambda: small.status()["running"] == 1, 60, 0.05, "one request running")
        queued = long_chat()
        next(iter(queued))
        wait_for(lambda: small.status()["queue_depth"] == 1, 60, 0.05, "one request queued")

        with pytest.raises(openai.RateLimitError) as err:
            c.completions.create(model="lockstep", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0)
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert "queue is full" in _message(err.value)
        r = httpx.post(
            small.url + "/generate", json={"prompt": PROMPTS[0], "max_new_tokens": MAX_NEW}, timeout=60
        )
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1

        running.close()
        queued.close()
        wait_for(
            lambda: (s := small.status())["running"] == 0 and s["queue_depth"] == 0, 60, 0.05, "slots freed"
        )
        ok = c.completions.create(model="lockstep", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0)
        assert ok.choices[0].text == expected[0][PROMPTS[0]]
        metrics = httpx.get(small.url + "/metrics").text
        assert "lockstep_rejected_requests_total 2.0" in metrics
        refused = metric_value(metric_samples(metrics), "lockstep_requests_total", status="429")
        assert refused == 2  # each 429 is also a request answered, by the status it got
