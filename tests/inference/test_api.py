"""The replica's seed-compatible HTTP API: refusals that say what is wrong, probes, status, auth, metrics."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lockstep.core.errors import NotFound
from lockstep.inference import generation
from lockstep.inference.app import HEADER_SAFE
from lockstep.inference.metrics import ReplicaMetrics
from lockstep.inference.replica import default_engine_factory
from lockstep.inference.runtime import ReplicaRuntime
from lockstep.models.loader import LoadedModel
from tests.inference.conftest import (
    MAX_NEW,
    PROMPTS,
    Served,
    generate,
    replica_settings,
    served,
    wait_ready_200,
    wait_serving,
)
from tests.support.cluster import wait_for
from tests.support.metrics import metric_samples, metric_value

PROMPT_LIMIT = 400  # characters (LOCKSTEP_MAX_PROMPT_CHARS of the module's replica)
QUEUE = 32


@pytest.fixture(scope="module")
def api(builtin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    hf_home = tmp_path_factory.mktemp("hf_home")  # an empty, offline Hugging Face cache
    settings = replica_settings(builtin_dir, max_prompt_chars=PROMPT_LIMIT, max_queue=QUEUE, hf_home=hf_home)
    with served(settings) as srv:
        yield srv


def error_of(r: httpx.Response, status: int) -> str:
    """The OpenAI-shaped error message of a response that must have ``status``."""
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) >= {"message", "type", "code"}
    return str(body["message"])


def still_serves(srv: Served, expected: dict[int, dict[str, str]]) -> None:
    r = generate(srv.url, PROMPTS[0])
    assert r.status_code == 200 and r.json()["text"] == expected[0][PROMPTS[0]]


BAD_GENERATE: list[tuple[str, Any, tuple[str, ...]]] = [
    ("malformed json", b'{"prompt": "hi", ', ("not valid JSON",)),
    ("not an object", [1, 2], ("body",)),
    ("missing prompt", {"max_new_tokens": 4}, ("prompt is required",)),
    ("prompt not a string", {"prompt": 5}, ("prompt", "string")),
    ("empty prompt", {"prompt": ""}, ("prompt", "at least 1 character")),
    (
        "prompt over the limit",
        {"prompt": "a" * (PROMPT_LIMIT + 1)},
        (f"{PROMPT_LIMIT + 1} characters", f"limit is {PROMPT_LIMIT}", "LOCKSTEP_MAX_PROMPT_CHARS"),
    ),
    ("max_new_tokens a string", {"prompt": "hi", "max_new_tokens": "8"}, ("max_new_tokens", "integer")),
    ("max_new_tokens a float", {"prompt": "hi", "max_new_tokens": 8.5}, ("max_new_tokens", "integer")),
    (
        "negative max_new_tokens",
        {"prompt": "hi", "max_new_tokens": -1},
        ("max_new_tokens", "greater than or equal to 1"),
    ),
    (
        "zero max_new_tokens",
        {"prompt": "hi", "max_new_tokens": 0},
        ("max_new_tokens", "greater than or equal to 1"),
    ),
    (
        "oversized max_new_tokens",
        {"prompt": "hi", "max_new_tokens": 5000},
        ("max_new_tokens=5000", "1024", "LOCKSTEP_MAX_NEW_TOKENS_LIMIT"),
    ),
    (
        "temperature too high",
        {"prompt": "hi", "temperature": 2.5},
        ("temperature", "less than or equal to 2"),
    ),
    (
        "negative temperature",
        {"prompt": "hi", "temperature": -0.1},
        ("temperature", "greater than or equal to 0"),
    ),
    ("boolean temperature", {"prompt": "hi", "temperature": True}, ("temperature", "valid number")),
    ("top_p out of range", {"prompt": "hi", "top_p": 0}, ("top_p", "greater than 0")),
    ("unknown field", {"prompt": "hi", "max_tokens": 4}, ("max_tokens is not a supported field",)),
    ("system_prompt not a string", {"prompt": "hi", "system_prompt": ["x"]}, ("system_prompt", "string")),
    ("n of 0", {"prompt": "hi", "n": 0}, ("n", "greater than or equal to 1")),
    ("n over the limit", {"prompt": "hi", "n": 65}, ("n", "less than or equal to 64")),
    ("logprobs not a boolean", {"prompt": "hi", "logprobs": 1}, ("logprobs", "valid boolean")),
]


@pytest.mark.parametrize(("case", "body", "says"), BAD_GENERATE, ids=[c[0] for c in BAD_GENERATE])
def test_bad_generate_input_is_a_400_that_says_what_is_wrong(
    api: Served, expected: dict[int, dict[str, str]], case: str, body: Any, says: tuple[str, ...]
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(api.url + "/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(api.url + "/generate", json=body)
    message = error_of(r, 400)
    for part in says:
        assert part in message, f"{case}: {message!r} does not say {part!r}"
    still_serves(api, expected)


def test_generate_answers_with_the_version_in_headers_and_body(
    api: Served, expected: dict[int, dict[str, str]]
) -> None:
    r = generate(api.url, PROMPTS[1])
    assert r.status_code == 200
    body = r.json()
    assert body["text"] == expected[0][PROMPTS[1]]
    assert r.headers["x-model-version"] == "0" == str(body["model_version"])
    assert r.headers["x-model-repo-id"] == "builtin:tiny" == body["model_repo_id"]
    assert r.headers["x-replica-id"] == "test-replica" == body["replica_id"]
    assert body["finish_reason"] == "length" and body["completion_tokens"] == MAX_NEW
    assert body["prompt_tokens"] > 0 and body["latency_s"] >= body["ttft_s"] > 0


def test_generate_n_answers_come_from_one_version_each_with_its_own_seed(api: Served) -> None:
    asked = {"prompt": PROMPTS[0], "max_new_tokens": MAX_NEW, "temperature": 1.0, "seed": 123}
    r = httpx.post(api.url + "/generate", json={**asked, "n": 3}, timeout=60)
    assert r.status_code == 200 and r.headers["x-model-version"] == "0"
    body = r.json()
    alone = [httpx.post(api.url + "/generate", json={**asked, "seed": 123 + i}, timeout=60).json() for i in range(3)]
    assert [c["text"] for c in body["choices"]] == [a["text"] for a in alone]
    assert [c["completion_token_ids"] for c in body["choices"]] == [a["completion_token_ids"] for a in alone]
    assert body["text"] == alone[0]["text"] and "choices" not in alone[0]  # n = 1 answers as it always did
    assert len({a["text"] for a in alone}) > 1


def test_generate_logprobs_come_with_each_answers_tokens_only_when_asked(api: Served) -> None:
    asked = {"prompt": PROMPTS[2], "max_new_tokens": MAX_NEW, "temperature": 1.0, "seed": 7}
    plain = httpx.post(api.url + "/generate", json={**asked, "n": 2}, timeout=60).json()
    assert "completion_logprobs" not in plain and all("completion_logprobs" not in c for c in plain["choices"])
    body = httpx.post(api.url + "/generate", json={**asked, "n": 2, "logprobs": True}, timeout=60).json()
    assert [c["completion_token_ids"] for c in body["choices"]] == [c["completion_token_ids"] for c in plain["choices"]]
    assert body["completion_logprobs"] == body["choices"][0]["completion_logprobs"]
    for choice in body["choices"]:
        logprobs = choice["completion_logprobs"]
        assert len(logprobs) == len(choice["completion_token_ids"])
        assert all(isinstance(x, float) and x <= 0 for x in logprobs)
    greedy = httpx.post(api.url + "/generate", json={"prompt": PROMPTS[2], "max_new_tokens": MAX_NEW,
                                                     "temperature": 0, "logprobs": True}, timeout=60).json()
    assert len(greedy["completion_logprobs"]) == greedy["completion_tokens"] and "choices" not in greedy


def _model_dir(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


BAD_REFS: list[tuple[str, str, tuple[str, ...]]] = [
    ("unknown builtin", "builtin:huge", ("builtin:huge", "builtin:tiny")),
    ("parent path", "../x", ("'..' is not allowed",)),
    ("escaping version", "versions/../../etc", ("versions/N",)),
    ("version without shared folder", "versions/3", ("no shared folder", "LOCKSTEP_SHARED_DIR")),
    ("spaces", "not a model", ("not a valid model reference", "repo id")),
    ("double dash", "org/a--b", ("not a valid model reference",)),
    ("missing directory", "/nonexistent/model/dir", ("does not exist",)),
    ("bad revision", "org/name@bad rev", ("revision",)),
]


@pytest.mark.parametrize(("case", "ref", "says"), BAD_REFS, ids=[c[0] for c in BAD_REFS])
def test_bad_model_reference_is_refused_before_anything_loads(
    api: Served, expected: dict[int, dict[str, str]], case: str, ref: str, says: tuple[str, ...]
) -> None:
    message = error_of(httpx.post(api.url + "/update-model", json={"model_repo_id": ref}), 400)
    for part in says:
        assert part in message, f"{case}: {message!r} does not say {part!r}"
    st = api.status()
    assert st["staged"] is None and not st["updating"]
    still_serves(api, expected)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, "model_repo_id is required"),
        ({"model_repo_id": ""}, "model_repo_id"),
        ({"model_repo_id": 7}, "model_repo_id"),
    ],
)
def test_update_model_body_is_validated(api: Served, body: dict[str, Any], says: str) -> None:
    assert says in error_of(httpx.post(api.url + "/update-model", json=body), 400)


def test_pickle_only_model_is_refused_with_how_to_opt_in(
    api: Served, tiny_dirs: dict[int, Path], tmp_path: Path, expected: dict[int, dict[str, str]]
) -> None:
    folder = _model_dir(tiny_dirs[1], tmp_path / "pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    message = error_of(httpx.post(api.url + "/update-model", json={"model_repo_id": str(folder)}), 400)
    assert "pytorch_model.bin" in message and "LOCKSTEP_ALLOW_PICKLE" in message
    still_serves(api, expected)


def test_remote_code_model_is_refused_with_how_to_opt_in(
    api: Served, tiny_dirs: dict[int, Path], tmp_path: Path, expected: dict[int, dict[str, str]]
) -> None:
    folder = _model_dir(tiny_dirs[1], tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    message = error_of(httpx.post(api.url + "/update-model", json={"model_repo_id": str(folder)}), 400)
    assert "auto_map" in message and "LOCKSTEP_TRUST_REMOTE_CODE" in message
    still_serves(api, expected)


def test_repo_missing_from_the_offline_cache_fails_in_status_and_keeps_serving(
    api: Served, expected: dict[int, dict[str, str]]
) -> None:
    before = api.status()
    r = httpx.post(api.url + "/update-model", json={"model_repo_id": "org/absent-model"})
    assert r.status_code == 202, (
        r.text
    )  # whether a repo exists is known only once the (background) download runs
    st = wait_for(
        lambda: (s := api.status())["staged"] and s["staged"]["state"] == "failed" and s,
        60,
        0.05,
        "the stage to fail",
    )
    assert "org/absent-model" in st["last_error"] and "offline" in st["last_error"]
    assert st["serving_version"] == before["serving_version"] and st["ready"] and not st["updating"]
    still_serves(api, expected)


def test_healthz_and_ready_while_the_model_loads(builtin_dir: Path) -> None:
    gate = threading.Event()

    def gated_engine(loaded: LoadedModel, settings: Any) -> Any:
        gate.wait(120)  # the boot load holds here until the test has looked at the replica
        return default_engine_factory(loaded, settings)

    settings = replica_settings(builtin_dir)
    runtime = ReplicaRuntime(settings, engine_factory=gated_engine)
    try:
        with served(settings, runtime=runtime, wait_ready=False) as srv:
            assert httpx.get(srv.url + "/healthz").status_code == 200
            ready = httpx.get(srv.url + "/ready")
            assert ready.status_code == 503 and ready.json()["ready"] is False
            st = srv.status()
            assert st["state"] == "starting" and st["loading"] and not st["ready"]
            assert st["serving_version"] is None and st["serving_since"] is None and st["model"] is None
            assert st["last_error"] is None
            assert "GET /ready" in error_of(generate(srv.url, "hi"), 503)
            assert httpx.get(srv.url + "/v1/models").json()["data"] == []
            gate.set()
            wait_ready_200(srv.url)
            st2 = srv.status()
            assert st2["state"] == "serving" and st2["ready"] and not st2["loading"] and not st2["updating"]
            assert st2["serving_version"] == 0 and st2["model"] == "builtin:tiny"
            assert st2["serving_since"] <= time.time() and st2["uptime_s"] > st["uptime_s"]
            assert len(st2["weights_digest"]) == 64 and st2["update_mode"] == "swap"
            assert st2["replica_id"] == "test-replica" and st2["running"] == 0 and st2["queue_depth"] == 0
    finally:
        gate.set()


def test_mutating_endpoints_need_the_bearer_token(builtin_dir: Path) -> None:
    token = "s3cret-token"
    with served(replica_settings(builtin_dir, api_token=token)) as srv:
        for path, body in (
            ("/update-model", {"model_repo_id": "builtin:tiny-s1"}),
            ("/admin/stage", {"model": "builtin:tiny-s1", "version": 5}),
            ("/admin/commit", {"version": 5}),
            ("/admin/abort", {}),
        ):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                r = httpx.post(srv.url + path, json=body, headers=headers)
                assert "LOCKSTEP_API_TOKEN" in error_of(r, 401), (path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
        assert srv.status()["staged"] is None and srv.status()["serving_version"] == 0
        # Reading and generating need no token.
        assert generate(srv.url, PROMPTS[0], n=1).status_code == 200
        r = httpx.post(
            srv.url + "/update-model",
            json={"model_repo_id": "builtin:tiny-s1"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 202 and r.json()["version"] == 1
        wait_serving(srv.url, 1)




def test_metrics_parse_and_count_what_happened(api: Served) -> None:
    before = metric_samples(httpx.get(api.url + "/metrics").text)
    requests = 3
    for i in range(requests):
        assert generate(api.url, PROMPTS[i]).status_code == 200
    page = httpx.get(api.url + "/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(page.text)}
    declared = {m.name for m in ReplicaMetrics().registry.collect()}
    assert declared <= families, f"missing: {sorted(declared - families)}"
    after = metric_samples(page.text)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("lockstep_requests_total", endpoint="/generate", status="200", model_version="0") == requests
    assert delta("lockstep_generated_tokens_total") == requests * MAX_NEW
    assert delta("lockstep_request_generated_tokens_sum") == requests * MAX_NEW
    assert delta("lockstep_request_latency_seconds_count", endpoint="/generate") == requests
    assert delta("lockstep_request_latency_seconds_sum", endpoint="/generate") > 0
    assert delta("lockstep_time_to_first_token_seconds_count") == requests
    assert metric_value(after, "lockstep_serving_version") == 0
    assert (
        metric_value(after, "lockstep_staged_version") == -1 and metric_value(after, "lockstep_committed_version") == -1
    )
    assert metric_value(after, "lockstep_ready") == 1
    assert metric_value(after, "lockstep_queue_capacity") == QUEUE
    assert metric_value(after, "lockstep_queue_depth") == 0 and metric_value(after, "lockstep_running_batch_size") == 0
    assert metric_value(after, "lockstep_tokens_per_second") > 0
    assert metric_value(after, "lockstep_model_load_duration_seconds_count") >= 1
    assert metric_value(after, "lockstep_rejected_requests_total") == 0


def test_failed_boot_is_reported_and_an_update_recovers(
    builtin_dir: Path, tiny_dirs: dict[int, Path], tmp_path: Path, expected: dict[int, dict[str, str]]
) -> None:
    corrupt = _model_dir(tiny_dirs[1], tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00not safetensors" * 8)
    with served(replica_settings(builtin_dir, initial_model_repo_id=str(corrupt)), wait_ready=False) as srv:
        st = wait_for(lambda: (s := srv.status())["state"] == "failed" and s, 60, 0.05, "the boot to fail")
        assert not st["ready"] and not st["loading"] and st["serving_version"] is None
        assert str(corrupt) in st["last_error"] and "could not load" in st["last_error"]
        assert httpx.get(srv.url + "/healthz").status_code == 200
        assert httpx.get(srv.url + "/ready").status_code == 503
        assert generate(srv.url, PROMPTS[0]).status_code == 503
        r = httpx.post(srv.url + "/update-model", json={"model_repo_id": "builtin:tiny"})
        assert r.status_code == 202, r.text
        wait_ready_200(srv.url)
        r = generate(srv.url, PROMPTS[0])
        assert r.headers["x-model-version"] == str(r.json()["model_version"]) == "1"
        assert r.json()["text"] == expected[0][PROMPTS[0]]


def test_every_generation_request_is_counted_once_with_the_status_it_got(
    api: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = metric_samples(httpx.get(api.url + "/metrics").text)
    assert generate(api.url, PROMPTS[0]).status_code == 200
    assert httpx.post(api.url + "/generate", json={"prompt": ""}).status_code == 400  # refused by the schema
    too_many = httpx.post(api.url + "/generate", json={"prompt": "hi", "n": QUEUE + 1})
    assert f"n={QUEUE + 1}" in error_of(too_many, 400) and "LOCKSTEP_MAX_QUEUE" in error_of(too_many, 400)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug between admission and the answer")

    monkeypatch.setattr(generation, "final_events", broken)
    assert generate(api.url, PROMPTS[0]).status_code == 500
    monkeypatch.undo()
    after = metric_samples(httpx.get(api.url + "/metrics").text)

    def delta(**labels: str) -> float:
        return metric_value(after, "lockstep_requests_total", endpoint="/generate", **labels) - metric_value(
            before, "lockstep_requests_total", endpoint="/generate", **labels)

    assert delta(status="200", model_version="0") == 1
    assert delta(status="400", model_version="none") == 2  # refused before any version was chosen
    assert delta(status="500", model_version="0") == 1  # what LockstepServerErrors (status=~"5..") watches
    assert delta() == 4


def test_a_model_folder_named_in_cyrillic_answers_with_percent_encoded_headers(
    builtin_dir: Path, tiny_dirs: dict[int, Path], tmp_path: Path, expected: dict[int, dict[str, str]]
) -> None:
    folder = _model_dir(tiny_dirs[0], tmp_path / "x" / "модель")
    settings = replica_settings(builtin_dir, initial_model_repo_id=str(folder), replica_id="реплика-1")
    with served(settings) as srv:
        r = generate(srv.url, PROMPTS[0])
        assert r.status_code == 200, r.text
        assert r.json()["text"] == expected[0][PROMPTS[0]]
        assert r.json()["model_repo_id"] == str(folder) and r.json()["replica_id"] == "реплика-1"  # the real names
        assert r.headers["x-model-repo-id"] == urllib.parse.quote(str(folder), safe=HEADER_SAFE)
        assert urllib.parse.unquote(r.headers["x-model-repo-id"]) == str(folder)
        assert urllib.parse.unquote(r.headers["x-replica-id"]) == "реплика-1"
        chat = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": "lockstep", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
        assert chat.status_code == 200 and chat.text.endswith("data: [DONE]\n\n")
        assert urllib.parse.unquote(chat.headers["x-model-repo-id"]) == str(folder)


def test_update_model_with_a_shared_folder_refuses_a_model_that_is_not_there_at_once(
    builtin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = replica_settings(builtin_dir, shared_dir=tmp_path / "shared", hf_home=tmp_path / "hf_home")
    runtime = ReplicaRuntime(settings)  # not started: nothing loads
    assert runtime.watcher is not None

    def publish(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a publish started for a model that is not there")

    monkeypatch.setattr(runtime.watcher, "start_publish", publish)
    with pytest.raises(NotFound) as err:
        runtime.start_update("org/does-not-exist")
    assert "org/does-not-exist" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    with pytest.raises(NotFound):
        runtime.start_update("versions/99")  # a version the shared store does not hold


def test_an_engine_that_dies_makes_the_replica_unready_with_the_reason_and_answers_503(builtin_dir: Path) -> None:
    """Before, a dead engine (vLLM's engine process killed) left the replica ready, and every request got a 400
    'invalid_request_error' that no client retries, until the next publish."""
    with served(replica_settings(builtin_dir)) as srv:
        assert generate(srv.url, PROMPTS[0]).status_code == 200
        slot = srv.runtime.replica.serving
        assert slot is not None

        def dies() -> bool:
            raise RuntimeError("the engine's process is gone")

        slot.engine._step = dies  # type: ignore[method-assign]  # its loop's next step fails for good
        answer = generate(srv.url, PROMPTS[1])  # the request in flight when it died
        assert answer.status_code == 503 and "engine failed" in answer.json()["error"]["message"], answer.text
        assert httpx.get(srv.url + "/ready").status_code == 503
        status = srv.status()
        assert not status["ready"] and "the engine serving v0 failed" in status["last_error"], status
        assert generate(srv.url, PROMPTS[2]).status_code == 503  # not admitted to a dead engine
        assert metric_value(metric_samples(httpx.get(srv.url + "/metrics").text), "lockstep_ready") == 0
