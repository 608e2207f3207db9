"""Hostile and sloppy input against a replica: every number bounded, refusals are 4xx that say what is wrong,
the guard answers before parsing (401, 413, Host), hostile requests never fail normal ones, /healthz answers
while a hostile request is being handled."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from lockstep.engine.sampling_params import MAX_SEED, MAX_STOP_CHARS, MAX_TOP_K
from tests.inference.conftest import MAX_NEW, PROMPTS, Served, reference_text, replica_settings, served

TOKEN = "hostile-input-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT_LIMIT = 4000  # characters, over all chat messages together
CHAT_LIMIT = 16  # messages
BODY_LIMIT = 64 * 1024  # bytes
WAIT_S = 60.0  # bound on every wait below (a hang, not a speed check)


@pytest.fixture(scope="module")
def srv(builtin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = replica_settings(builtin_dir, api_token=TOKEN, max_prompt_chars=PROMPT_LIMIT,
                                max_chat_messages=CHAT_LIMIT, max_body_bytes=BODY_LIMIT,
                                allowed_hosts="127.0.0.1,localhost", hf_home=tmp_path_factory.mktemp("hf_home"))
    with served(settings) as s:
        yield s


@pytest.fixture(scope="module")
def chat_expected(tiny_dirs: dict[int, Path]) -> str:
    return reference_text(tiny_dirs[0], PROMPTS[1], MAX_NEW, chat=True)


def post(srv: Served, path: str, body: Any, *, auth: bool = False, **headers: str) -> httpx.Response:
    """POST ``body`` (an object, sent as JSON that may hold NaN/Infinity, or raw bytes)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # allow_nan: NaN, Infinity literals
    all_headers = {"content-type": "application/json", **(AUTH if auth else {}), **headers}
    return httpx.post(srv.url + path, content=content, headers=all_headers, timeout=WAIT_S)


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()["error"]
    assert set(body) >= {"message", "type", "code"}
    return str(body["message"])


def serves_normally(srv: Served, expected: dict[int, dict[str, str]]) -> None:
    r = post(srv, "/generate", {"prompt": PROMPTS[0], "max_new_tokens": MAX_NEW, "temperature": 0})
    assert r.status_code == 200 and r.json()["text"] == expected[0][PROMPTS[0]]


# --- every number has bounds the schema states ---------------------------------------------------------------

def _numbers(schema: dict[str, Any], components: dict[str, Any], seen: set[str]) -> Iterator[dict[str, Any]]:
    """Every integer/number sub-schema reachable from ``schema`` (through $ref, anyOf, items, properties)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name not in seen:
            seen.add(name)
            yield from _numbers(components[name], components, seen)
        return
    if schema.get("type") in ("integer", "number"):
        yield schema
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for sub in schema.get(key, []):
            yield from _numbers(sub, components, seen)
    for sub in (schema.get("items"), schema.get("additionalProperties")):
        if isinstance(sub, dict):
            yield from _numbers(sub, components, seen)
    for sub in schema.get("properties", {}).values():
        yield from _numbers(sub, components, seen)


def test_openapi_states_bounds_for_every_number_of_every_request(srv: Served) -> None:
    spec = httpx.get(srv.url + "/openapi.json").json()
    components = spec["components"]["schemas"]
    found: list[dict[str, Any]] = []
    bodies = 0
    for path, operations in spec["paths"].items():
        for op in operations.values():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is None:
                continue
            bodies += 1
            for number in _numbers(body, components, set()):
                found.append(number)
                assert {"minimum", "exclusiveMinimum"} & set(number), (path, number)
                assert {"maximum", "exclusiveMaximum"} & set(number), (path, number)
    assert bodies == 8 and len(found) >= 30  # /generate, /v1/*, /update-model, /admin/*: not vacuous
    generate = components["GenerateRequest"]["properties"]
    assert generate["seed"]["anyOf"][0]["maximum"] == float(MAX_SEED)  # FastAPI's OpenAPI models keep floats
    assert generate["top_k"]["maximum"] == MAX_TOP_K and generate["temperature"]["maximum"] == 2


# --- NaN and infinities (Python's json reads them) are refused everywhere --------------------------------------

NUMERIC_FIELDS: list[tuple[str, dict[str, Any], str, bool]] = [
    *[("/generate", {"prompt": "hi"}, f, False)
      for f in ("temperature", "top_p", "top_k", "max_new_tokens", "seed")],
    *[("/v1/completions", {"model": "lockstep", "prompt": "hi"}, f, False)
      for f in ("temperature", "top_p", "top_k", "max_tokens", "n", "seed", "presence_penalty",
                "frequency_penalty", "logprobs", "best_of")],
    *[("/v1/chat/completions", {"model": "lockstep", "messages": [{"role": "user", "content": "hi"}]}, f, False)
      for f in ("temperature", "top_p", "max_completion_tokens", "top_logprobs")],
    ("/admin/commit", {"version": 1}, "activate_at", True),
    ("/admin/commit", {}, "version", True),
    ("/admin/stage", {"model": "builtin:tiny-s1"}, "version", True),
    ("/admin/abort", {}, "version", True),
]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize(("path", "base", "field", "auth"), NUMERIC_FIELDS,
                         ids=[f"{p}:{f}" for p, _, f, _ in NUMERIC_FIELDS])
def test_non_finite_numbers_are_a_400_naming_the_field(
    srv: Served, path: str, base: dict[str, Any], field: str, auth: bool, value: float
) -> None:
    assert field in error_of(post(srv, path, {**base, field: value}, auth=auth), 400)


# --- out of range, wrong type: 400 that says which field -------------------------------------------------------

CHAT = {"model": "lockstep", "messages": [{"role": "user", "content": "hi"}]}
OUT_OF_RANGE: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
    ("seed too large", "/generate", {"prompt": "hi", "seed": MAX_SEED + 1}, ("seed",)),
    ("seed negative", "/generate", {"prompt": "hi", "seed": -1}, ("seed",)),
    ("seed a float", "/generate", {"prompt": "hi", "seed": 1.0}, ("seed", "integer")),
    ("top_k too large", "/generate", {"prompt": "hi", "top_k": MAX_TOP_K + 1}, ("top_k",)),
    ("top_k boolean", "/generate", {"prompt": "hi", "top_k": True}, ("top_k",)),
    ("temperature a string", "/generate", {"prompt": "hi", "temperature": "0.5"}, ("temperature",)),
    ("max_new_tokens 2**64", "/generate", {"prompt": "hi", "max_new_tokens": 2**64}, ("max_new_tokens",)),
    ("too many stops", "/generate", {"prompt": "hi", "stop": ["x"] * 9}, ("stop",)),
    ("stop too long", "/generate", {"prompt": "hi", "stop": ["x" * (MAX_STOP_CHARS + 1)]}, ("stop",)),
    ("empty stop", "/generate", {"prompt": "hi", "stop": [""]}, ("stop",)),
    ("n zero", "/v1/completions", {"model": "lockstep", "prompt": "hi", "n": 0}, ("n",)),
    ("n huge", "/v1/completions", {"model": "lockstep", "prompt": "hi", "n": 10**6}, ("n",)),
    ("logprobs too many", "/v1/completions", {"model": "lockstep", "prompt": "hi", "logprobs": 6}, ("logprobs",)),
    ("penalty out of range", "/v1/completions", {"model": "lockstep", "prompt": "hi", "presence_penalty": 3},
     ("presence_penalty",)),
    ("max_tokens zero", "/v1/completions", {"model": "lockstep", "prompt": "hi", "max_tokens": 0}, ("max_tokens",)),
    ("empty prompt list", "/v1/completions", {"model": "lockstep", "prompt": []}, ("prompt",)),
    ("five stops", "/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, ("stop",)),
    ("top_logprobs huge", "/v1/chat/completions", {**CHAT, "top_logprobs": 1000}, ("top_logprobs",)),
    ("unknown role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "hi"}]},
     ("role",)),
    ("role not a string", "/v1/chat/completions", {**CHAT, "messages": [{"role": 1, "content": "hi"}]}, ("role",)),
    ("image part", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     ("only text content parts",)),
    ("no messages", "/v1/chat/completions", {**CHAT, "messages": []}, ("messages",)),
    # JSON's "\udfff" alone decodes to a lone surrogate, which no tokenizer takes: before, a 500 on the OpenAI API.
    ("lone surrogate prompt", "/v1/completions", {"model": "lockstep", "prompt": "a\udfff"},
     ("prompt", "lone surrogate")),
    ("lone surrogate in a prompt list", "/v1/completions", {"model": "lockstep", "prompt": ["\ud83d"]},
     ("prompt", "lone surrogate")),
    ("lone surrogate chat", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud83d"}]},
     ("messages.0.content", "lone surrogate")),
    ("lone surrogate chat part", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d!"}]}]},
     ("lone surrogate",)),
    ("lone surrogate system prompt", "/generate", {"prompt": "hi", "system_prompt": "\udc00"},
     ("system_prompt", "lone surrogate")),
    ("lone surrogate generate", "/generate", {"prompt": "\udc00"}, ("prompt",)),
]


@pytest.mark.parametrize(("case", "path", "body", "says"), OUT_OF_RANGE, ids=[c[0] for c in OUT_OF_RANGE])
def test_out_of_range_and_mistyped_fields_are_a_400_that_says_which(
    srv: Served, case: str, path: str, body: dict[str, Any], says: tuple[str, ...]
) -> None:
    message = error_of(post(srv, path, body), 400)
    for part in says:
        assert part in message, f"{case}: {message!r} does not say {part!r}"


SPLIT = {"rollout": "r1", "version": 3, "model": "builtin:tiny-s1", "share": 50, "step": 1}
ADMIN_OUT_OF_RANGE: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
    ("negative version", "/admin/stage", {"model": "builtin:tiny-s1", "version": -1}, ("version",)),
    ("version past 2**31", "/admin/stage", {"model": "builtin:tiny-s1", "version": 2**31}, ("version",)),
    # Past the store's bound (9 digits) but within 2**31: the schema once took them and the commit was a 500.
    ("version past the store's bound: stage", "/admin/stage", {"model": "builtin:tiny-s1", "version": 10**9},
     ("version",)),
    ("version past the store's bound: commit", "/admin/commit", {"version": 10**9}, ("version",)),
    ("version past the store's bound: abort", "/admin/abort", {"version": 2**31 - 1}, ("version",)),
    ("version past the store's bound: split", "/admin/split", {**SPLIT, "version": 10**9}, ("version",)),
    ("version a float", "/admin/commit", {"version": 1.0}, ("version", "integer")),
    ("version boolean", "/admin/abort", {"version": True}, ("version",)),
    ("digest not hex", "/admin/stage", {"model": "builtin:tiny-s1", "version": 3, "digest": "../../etc"},
     ("digest",)),
    ("digest too short", "/admin/stage", {"model": "builtin:tiny-s1", "version": 3, "digest": "ab" * 8},
     ("digest",)),
    ("activate_at negative", "/admin/commit", {"version": 1, "activate_at": -1}, ("activate_at",)),
    ("activate_at in milliseconds", "/admin/commit", {"version": 1, "activate_at": time.time() * 1000},
     ("activate_at",)),
    ("activate_at a day ahead", "/admin/commit", {"version": 1, "activate_at": time.time() + 86_400},
     ("activate_at", "clocks")),
    # Numbers are never strings or booleans, on the admin routes too.
    ("share a string", "/admin/split", {**SPLIT, "share": "50"}, ("share",)),
    ("share boolean", "/admin/split", {**SPLIT, "share": True}, ("share",)),
    ("step a string", "/admin/split", {**SPLIT, "step": "3"}, ("step",)),
    ("step a float", "/admin/split", {**SPLIT, "step": 1.0}, ("step", "integer")),
    ("pins_step a string", "/admin/split", {**SPLIT, "pins_step": "2"}, ("pins_step",)),
    ("shadow a string", "/admin/split", {**SPLIT, "share": 0, "shadow": "5"}, ("shadow",)),
]


@pytest.mark.parametrize(("case", "path", "body", "says"), ADMIN_OUT_OF_RANGE,
                         ids=[c[0] for c in ADMIN_OUT_OF_RANGE])
def test_admin_bodies_out_of_range_are_a_400_and_change_nothing(
    srv: Served, case: str, path: str, body: dict[str, Any], says: tuple[str, ...]
) -> None:
    message = error_of(post(srv, path, body, auth=True), 400)
    for part in says:
        assert part in message, f"{case}: {message!r} does not say {part!r}"
    st = srv.status()
    assert st["staged"] is None and st["serving_version"] == 0 and st["ready"]


@pytest.mark.parametrize("folder", ["/proc", "/usr"])
def test_a_system_folder_as_the_model_is_a_400(srv: Served, folder: str) -> None:
    """/proc holds entries no one may list and /usr tens of thousands of files: each is refused as no model folder,
    quickly (the walk is bounded), and nothing is staged."""
    for path, body in [("/admin/stage", {"model": folder, "version": 9, "check_only": True}),
                       ("/admin/stage", {"model": folder, "version": 9}),
                       ("/update-model", {"model_repo_id": folder})]:
        r = post(srv, path, body, auth=True)
        assert r.status_code == 400, (path, body, r.status_code, r.text[:300])
        assert r.json()["error"]["code"] == "invalid_model_reference", r.text[:300]
    st = srv.status()
    assert st["staged"] is None and st["serving_version"] == 0 and st["ready"]
    # A model it may load: 200, answered at once (202 would say something runs in the background).
    ok = post(srv, "/admin/stage", {"model": "builtin:tiny-s1", "version": 9, "check_only": True}, auth=True)
    assert ok.status_code == 200 and ok.json()["status"] == "ok", ok.text[:300]


@pytest.mark.parametrize("raw", [b"\xb2", b"\xb9\xb3", b"-1", b"1.0", b"9" * 16])
def test_a_version_header_that_is_no_version_number_is_a_400(srv: Served, raw: bytes) -> None:
    # Over the socket a byte 0xB2 reaches the app as '²': a digit to str.isdigit(), not to int().
    r = httpx.post(srv.url + "/generate", json={"prompt": "hi", "max_new_tokens": 1},
                   headers={**AUTH, "X-Lockstep-Version": raw}, timeout=WAIT_S)
    assert "X-Lockstep-Version" in error_of(r, 400)


@pytest.mark.parametrize("query", ["rollout=r1&step=-1", "rollout=r1&step=1001", "rollout=r1&step=x",
                                   "rollout=&step=1", "rollout=" + "r" * 65 + "&step=1", "step=1"])
def test_split_sessions_queries_out_of_range_are_a_400(srv: Served, query: str) -> None:
    r = httpx.get(f"{srv.url}/admin/split/sessions?{query}", headers=AUTH, timeout=WAIT_S)
    error_of(r, 400)


def test_callers_waiting_for_a_rollout_step_hold_no_thread_a_generation_needs(
    srv: Served, expected: dict[int, dict[str, str]]
) -> None:
    # GET /admin/split/sessions waits (up to 10 s) for a step to be in force. Many such waits at once must not
    # take the worker threads that admit generations: the answers below come while every wait is still open.
    waiting = 16
    with ThreadPoolExecutor(max_workers=waiting) as pool:
        waits = [pool.submit(httpx.get, f"{srv.url}/admin/split/sessions?rollout=none&step={i}", headers=AUTH,
                             timeout=WAIT_S) for i in range(waiting)]
        time.sleep(0.5)  # let every wait reach the replica (not a bound on anything)
        for prompt in PROMPTS:
            r = post(srv, "/generate", {"prompt": prompt, "max_new_tokens": MAX_NEW, "temperature": 0})
            assert r.status_code == 200 and r.json()["text"] == expected[0][prompt]
        open_after_generations = sum(not w.done() for w in waits)
        assert [error_of(w.result(), 404) for w in waits]  # each ends by itself, saying the step is not in force
    assert open_after_generations == waiting


# --- chat: bounded count, bounded characters over all messages ---------------------------------------------------

def chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "lockstep", "messages": messages, "max_tokens": 1, "temperature": 0, **extra}


def test_chat_message_count_and_total_characters_are_bounded(srv: Served) -> None:
    many = [{"role": "user", "content": "hi"}] * (CHAT_LIMIT + 1)
    message = error_of(post(srv, "/v1/chat/completions", chat(many)), 400)
    assert f"{CHAT_LIMIT + 1} messages" in message and "LOCKSTEP_MAX_CHAT_MESSAGES" in message
    assert post(srv, "/v1/chat/completions", chat(many[:CHAT_LIMIT])).status_code == 200
    # Each message alone is well under the limit; together they pass it.
    part = PROMPT_LIMIT // 4 + 1
    spread = [{"role": "user", "content": "a" * part}] * 4
    message = error_of(post(srv, "/v1/chat/completions", chat(spread)), 400)
    assert f"{4 * part} characters" in message and "LOCKSTEP_MAX_PROMPT_CHARS" in message
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "a" * part}] * 4}]
    assert "LOCKSTEP_MAX_PROMPT_CHARS" in error_of(post(srv, "/v1/chat/completions", chat(as_parts)), 400)


# --- the guard: token before body, size before parsing, Host allow-list ------------------------------------------

ADMIN_PATHS = ["/admin/stage", "/admin/commit", "/admin/abort", "/update-model"]


@pytest.mark.parametrize("path", ADMIN_PATHS)
def test_admin_bodies_are_authenticated_before_they_are_parsed(srv: Served, path: str) -> None:
    for garbage in (b"{not json", b"[" * 5000, json.dumps({"version": float("nan")}).encode()):
        r = post(srv, path, garbage)
        assert "LOCKSTEP_API_TOKEN" in error_of(r, 401) and r.headers["www-authenticate"] == "Bearer"
        assert post(srv, path, garbage, Authorization="Bearer wrong-token").status_code == 401
        assert post(srv, path, garbage, auth=True).status_code == 400  # with the token: now it is parsed


def _chunks(total: int, size: int = 8192) -> Iterator[bytes]:
    yield b'{"prompt": "'
    for _ in range(total // size):
        yield b"a" * size
    yield b'"}'


@pytest.mark.parametrize(("path", "auth"), [("/generate", False), ("/v1/chat/completions", False),
                                            ("/admin/stage", True)])
def test_a_body_over_the_limit_is_a_413_with_or_without_content_length(
    srv: Served, expected: dict[int, dict[str, str]], path: str, auth: bool
) -> None:
    headers = {"content-type": "application/json", **(AUTH if auth else {})}
    declared = httpx.post(srv.url + path, content=b"{" + b" " * BODY_LIMIT + b"}", headers=headers, timeout=WAIT_S)
    assert "LOCKSTEP_MAX_BODY_BYTES" in error_of(declared, 413)
    chunked = httpx.post(srv.url + path, content=_chunks(4 * BODY_LIMIT), headers=headers, timeout=WAIT_S)
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert "LOCKSTEP_MAX_BODY_BYTES" in error_of(chunked, 413)
    serves_normally(srv, expected)


def test_a_body_just_under_the_limit_is_parsed(srv: Served) -> None:
    body = json.dumps({"prompt": "x", "max_new_tokens": 1, "stop": ["y"], "system_prompt": None}).encode()
    padded = body[:-1] + b" " * (BODY_LIMIT - len(body)) + b"}"
    assert len(padded) == BODY_LIMIT
    assert post(srv, "/generate", padded).status_code == 200


def test_a_host_outside_the_allow_list_is_refused(srv: Served) -> None:
    r = httpx.get(srv.url + "/status", headers={"Host": "evil.example"})
    assert "LOCKSTEP_ALLOWED_HOSTS" in error_of(r, 400)
    assert httpx.get(srv.url + "/ready", headers={"Host": "evil.example"}).status_code in (200, 503)  # probes: any Host
    r = post(srv, "/generate", {"prompt": "hi", "max_new_tokens": 1}, Host="rebound.attacker.test:8001")
    assert r.status_code == 400
    port = srv.url.rsplit(":", 1)[1]
    assert httpx.get(srv.url + "/healthz", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_deep_and_wide_json_is_a_400_and_harms_nothing(srv: Served, expected: dict[int, dict[str, str]]) -> None:
    deep = b'{"prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    assert len(deep) < BODY_LIMIT
    assert post(srv, "/generate", deep).status_code == 400
    nested = b"[" * 20_000 + b"]" * 20_000
    deep_chat = json.dumps(chat([{"role": "user", "content": "hi"}])).encode()[:-1] + b', "x": ' + nested + b"}"
    assert post(srv, "/v1/chat/completions", deep_chat).status_code == 400
    wide = {"prompt": "hi", "stop": ["s"] * 8000}
    assert "stop" in error_of(post(srv, "/generate", wide), 400)
    serves_normally(srv, expected)


# --- mixed load: hostile requests beside normal ones ------------------------------------------------------------

def test_hostile_requests_in_the_same_batch_never_fail_normal_ones(
    srv: Served, expected: dict[int, dict[str, str]], chat_expected: str
) -> None:
    # Within every bound but at the edge of float32: the engine takes them into the batch with the normal ones.
    edge = [{"temperature": 5e-324}, {"temperature": 1e-40, "top_k": MAX_TOP_K}, {"temperature": 2, "top_p": 5e-324},
            {"temperature": 1, "seed": MAX_SEED, "stop": ["é" * MAX_STOP_CHARS] * 8}]
    calls: list[tuple[str, Callable[[], httpx.Response], Callable[[httpx.Response], None]]] = []

    def normal_generate(prompt: str) -> None:
        def check(r: httpx.Response) -> None:
            assert r.status_code == 200 and r.json()["text"] == expected[0][prompt], r.text
        calls.append(("normal", lambda: post(srv, "/generate", {"prompt": prompt, "max_new_tokens": MAX_NEW,
                                                                 "temperature": 0}), check))

    def normal_chat() -> None:
        def check(r: httpx.Response) -> None:
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == chat_expected
        body = chat([{"role": "user", "content": PROMPTS[1]}], max_tokens=MAX_NEW)
        calls.append(("normal", lambda: post(srv, "/v1/chat/completions", body), check))

    def hostile(body: dict[str, Any], path: str = "/generate", status: int = 200, raw: bytes | None = None) -> None:
        def check(r: httpx.Response) -> None:
            assert r.status_code == status, r.text[:300]
            if status == 200:
                assert r.json()["finish_reason"] in ("length", "stop")
        calls.append(("hostile", lambda: post(srv, path, raw if raw is not None else body), check))

    for i in range(3):
        for prompt in PROMPTS:
            normal_generate(prompt)
        normal_chat()
        hostile({"prompt": PROMPTS[i], "max_new_tokens": MAX_NEW, **edge[i]})
    hostile({"prompt": PROMPTS[3], "max_new_tokens": MAX_NEW, **edge[3]})
    hostile({"prompt": "hi", "seed": MAX_SEED + 1}, status=400)
    hostile({}, status=413, raw=b'{"prompt": "' + b"a" * (2 * BODY_LIMIT) + b'"}')
    hostile({}, status=400, raw=b"[" * 50_000)
    hostile(chat([{"role": "user", "content": "x" * 300}] * CHAT_LIMIT), "/v1/chat/completions", 400)
    assert sum(kind == "hostile" for kind, _, _ in calls) * 10 >= len(calls)  # at least 1 in 10

    engine = srv.runtime.replica.serving.engine  # type: ignore[union-attr]
    errors_before = engine.finished_total.get("error", 0)
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda call: call[1](), calls))
    for (_, _, check), response in zip(calls, responses, strict=True):
        check(response)
    assert engine.finished_total.get("error", 0) == errors_before


# --- /healthz answers while a hostile request is being handled ---------------------------------------------------

class Gate:
    """Holds a blocking call inside its worker until released: the hostile request stays in progress."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.release.wait(WAIT_S), "the gate was never released"
        return self.real(*args, **kwargs)


def healthz_answers_during(srv: Served, send: Callable[[], httpx.Response], gate: Gate) -> httpx.Response:
    """Start ``send`` (it blocks in ``gate``), check /healthz meanwhile, then let it finish; its response."""
    result: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: result.append(send()), daemon=True)
    sender.start()
    try:
        assert gate.entered.wait(WAIT_S), "the hostile request never reached the gated work"
        # If the gated work ran on the event loop, this would wait for it (and the gate waits for this).
        health = httpx.get(srv.url + "/healthz", timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert sender.is_alive() and not result, "the hostile request ended before /healthz was asked"
    finally:
        gate.release.set()
        sender.join(WAIT_S)
    assert result, "the hostile request did not finish"
    return result[0]


@pytest.mark.parametrize(("path", "body"), [
    ("/admin/stage", {"version": 9}),
    ("/admin/stage", {"version": 9, "check_only": True}),
    ("/update-model", {}),
])
def test_healthz_answers_while_a_stage_walks_a_folder_of_many_files(
    srv: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any]
) -> None:
    import lockstep.inference.runtime as runtime_module
    import lockstep.models.loader as loader_module

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(2000):
        (folder / f"f{i:05d}.txt").touch()
    gate = Gate(loader_module.check_safe_files)
    monkeypatch.setattr(runtime_module, "check_safe_files", gate)
    monkeypatch.setattr(loader_module, "check_safe_files", gate)  # check_available's walk (check_only)
    key = "model_repo_id" if path == "/update-model" else "model"
    r = healthz_answers_during(srv, lambda: post(srv, path, {key: str(folder), **body}, auth=True), gate)
    assert "holds no model weights" in error_of(r, 400)
    assert srv.status()["staged"] is None


def test_healthz_answers_while_a_max_size_chat_is_tokenized(
    srv: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = srv.runtime.replica.serving.tokenizer  # type: ignore[union-attr]
    assert tokenizer.chat_template, "the built-in model has a chat template: the gated call is the one used"
    gate = Gate(tokenizer.apply_chat_template)
    monkeypatch.setattr(tokenizer, "apply_chat_template", gate)
    per_message = PROMPT_LIMIT // CHAT_LIMIT
    messages = [{"role": ("user", "assistant")[i % 2], "content": "word " * (per_message // 5)}
                for i in range(CHAT_LIMIT)]
    assert sum(len(m["content"]) for m in messages) == PROMPT_LIMIT
    r = healthz_answers_during(srv, lambda: post(srv, "/v1/chat/completions", chat(messages)), gate)
    assert r.status_code == 200, r.text
