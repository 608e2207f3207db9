"""The UI server's HTTP surface: the page and its files, the checked forms, a trainer that is not there."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx
import pytest
from fastapi.testclient import TestClient

from lockstep.core.settings import load_settings
from lockstep.ui.app import create_app
from lockstep.ui.assets import Assets
from lockstep.ui.session import CSRF_HEADER
from tests.support.cluster import free_port

MakeClient = Callable[..., TestClient]
TOKEN = "ui-app-test-token-2b7e40"


@pytest.fixture(scope="module")
def dead_url() -> str:
    """A loopback URL where nothing listens (the port was free a moment ago)."""
    return f"http://127.0.0.1:{free_port()}"


def logged_in(client: TestClient) -> TestClient:
    """Log ``client`` in with the token; it keeps the cookie and sends the CSRF header from now on."""
    response = client.post("/api/login", json={"token": TOKEN})
    assert response.status_code == 200, response.text
    client.headers[CSRF_HEADER] = response.json()["csrf"]
    return client


@pytest.fixture
def make_client(dead_url: str) -> Iterator[MakeClient]:
    """Factory: a logged-in UI whose trainer is unreachable, with these settings on top."""
    with ExitStack() as stack:
        def make(*, http_client: httpx.AsyncClient | None = None, **overrides: object) -> TestClient:
            app = create_app(load_settings(**{"trainer_url": dead_url, "api_token": TOKEN, **overrides}),
                             http_client=http_client)
            return logged_in(stack.enter_context(TestClient(app)))

        yield make


@pytest.fixture(scope="module")
def client(dead_url: str) -> Iterator[TestClient]:
    """One logged-in UI for most tests: its trainer is unreachable and it knows no replica."""
    with TestClient(create_app(load_settings(trainer_url=dead_url, api_token=TOKEN))) as shared:
        yield logged_in(shared)


# --------------------------------------------------------------------------------------------- page
def test_healthz_answers(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_page_is_served_with_a_strict_policy(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>Lockstep</title>" in response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy


def test_every_file_the_page_references_is_served_locally(client: TestClient) -> None:
    html = client.get("/").text
    refs = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert refs, "the page references its script and stylesheet"
    for ref in refs:
        assert ref.startswith("/static/"), f"{ref} would leave the UI server"
        assert client.get(ref).status_code == 200, ref
    scripts = [name for name in Assets().names() if name.endswith(".js")]
    for name in scripts:
        body = client.get(f"/static/{name}")
        assert body.headers["content-type"].startswith("text/javascript")
        for imported in re.findall(r'from "\./([^"]+)"', body.text):
            assert imported in scripts, f"{name} imports {imported}, which is not an asset"
        outside = re.findall(r"https?://[^\s\"'`]+", body.text.replace("http://www.w3.org/2000/svg", ""))
        assert not outside, f"{name} refers to {outside}: the page must work offline"


def test_assets_are_revalidated_by_etag(client: TestClient) -> None:
    first = client.get("/static/app.js")
    again = client.get("/static/app.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/..%2Fapp.py", "/static/%2e%2e%2fapp.py",
                                  "/static/app.py", "/static/__init__.py", "/static/.hidden.js",
                                  "/static/..%5Capp.py"])
def test_static_never_reaches_outside_the_assets(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "error" in response.json()


# -------------------------------------------------------------------------------------------- forms
@pytest.mark.parametrize(("body", "words"), [
    ({}, "model is required"),
    ({"model": ""}, "model"),
    ({"model": "   "}, "model"),
    ({"model": "has space"}, "model"),
    ({"model": "a;rm -rf /"}, "model"),
    ({"model": "x" * 501}, "model"),
    ({"model": "builtin:tiny-s1", "policy": "maybe"}, "policy"),
    ({"model": "builtin:tiny-s1", "timeout_s": 0}, "timeout_s"),
    ({"model": "builtin:tiny-s1", "timeout_s": True}, "timeout_s"),
    ({"model": "builtin:tiny-s1", "extra": 1}, "extra is not a supported field"),
    # A rollout's fields: the trainer's bounds, checked here first (the order of the shares is the trainer's).
    ({"model": "builtin:tiny-s1", "canary": []}, "canary"),
    ({"model": "builtin:tiny-s1", "canary": "5,25,100"}, "canary"),
    ({"model": "builtin:tiny-s1", "canary": [0, 50]}, "canary.0"),
    ({"model": "builtin:tiny-s1", "canary": [5, 101]}, "canary.1"),
    ({"model": "builtin:tiny-s1", "canary": [True]}, "canary.0"),
    ({"model": "builtin:tiny-s1", "canary": list(range(1, 22))}, "canary"),
    ({"model": "builtin:tiny-s1", "shadow": 101}, "shadow"),
    ({"model": "builtin:tiny-s1", "shadow": -1}, "shadow"),
    ({"model": "builtin:tiny-s1", "step_seconds": -1}, "step_seconds"),
    ({"model": "builtin:tiny-s1", "step_seconds": 86_401}, "step_seconds"),
    ({"model": "builtin:tiny-s1", "min_requests": 1.5}, "min_requests"),
    ({"model": "builtin:tiny-s1", "min_requests": -1}, "min_requests"),
    ({"model": "builtin:tiny-s1", "gates": {"Error Rate": 0.1}}, "gates"),
    ({"model": "builtin:tiny-s1", "gates": {"error_rate": "low"}}, "a gate takes a threshold"),
    ({"model": "builtin:tiny-s1", "gates": {"error_rate": True}}, "a gate takes a threshold"),
    ({"model": "builtin:tiny-s1", "gates": {"error_rate": -0.1}}, "gates.error_rate"),
    ({"model": "builtin:tiny-s1", "gates": {"error_rate": {"threshold": 0.1, "window": 3}}}, "window"),
    ({"model": "builtin:tiny-s1", "gates": {"error_rate": {"min_samples": 0}}}, "min_samples"),
    ({"model": "builtin:tiny-s1", "gates": {f"g{i}": 1 for i in range(33)}}, "gates"),
])
def test_publish_form_is_checked_before_the_trainer(client: TestClient, body: dict[str, object],
                                                    words: str) -> None:
    response = client.post("/api/publish", json=body)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"]


@pytest.mark.parametrize("body", [{"to": -1}, {"to": "2"}, {"to": True}, {"to": 1.5}, {"policy": "x"}])
def test_rollback_form_is_checked(client: TestClient, body: dict[str, object]) -> None:
    assert client.post("/api/rollback", json=body).status_code == 400


@pytest.mark.parametrize("body", [
    {"kind": "other"},
    {},
    {"kind": "finetune", "params": {"../x": 1}},
    {"kind": "finetune", "params": {"Steps": 1}},
    {"kind": "finetune", "params": {"steps": {"nested": 1}}},
    {"kind": "finetune", "params": {"steps": [1, 2]}},
    {"kind": "finetune", "params": {f"p{i}": i for i in range(40)}},
])
def test_run_form_is_checked(client: TestClient, body: dict[str, object]) -> None:
    assert client.post("/api/runs", json=body).status_code == 400


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_number_that_is_not_finite_is_a_400_naming_its_field(client: TestClient, value: str) -> None:
    for path, raw, field in (("/api/runs", '{"kind": "finetune", "params": {"learning_rate": %s}}', "learning_rate"),
                             ("/api/playground", '{"prompt": "hi", "temperature": %s}', "temperature")):
        response = client.post(path, content=raw % value, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert field in response.json()["error"]["message"]


@pytest.mark.parametrize(("body", "words"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "temperature": "1"}, "temperature"),
    ({"prompt": "hi", "temperature": True}, "temperature"),
    ({"prompt": "hi", "replica": "http://x/ y"}, "replica"),
    ({"prompt": "x" * 8001}, "prompt"),
])
def test_playground_form_is_checked(client: TestClient, body: dict[str, object], words: str) -> None:
    response = client.post("/api/playground", json=body)
    assert response.status_code == 400
    assert words in response.json()["error"]["message"]


@pytest.mark.parametrize("run_id", ["a b", "..", ".hidden", "-x", "x" * 200, "..%2F..%2Fcluster", "a%00b"])
def test_ids_in_paths_are_checked(client: TestClient, run_id: str) -> None:
    # The trainer is unreachable: anything forwarded would come back 502, so 400/404 proves it was not.
    assert client.get(f"/api/runs/{run_id}").status_code in (400, 404)
    assert client.post(f"/api/runs/{run_id}/stop").status_code in (400, 404)
    assert client.delete(f"/api/runs/{run_id}").status_code in (400, 404)
    assert client.get(f"/api/publishes/{run_id}").status_code in (400, 404)


# --------------------------------------------------------------------------------------- no trainer
@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/api/runs", None), ("GET", "/api/history", None), ("GET", "/api/versions", None),
    ("GET", "/api/publishes/p-1", None), ("POST", "/api/publish", {"model": "builtin:tiny-s1"}),
    ("POST", "/api/rollback", {}), ("POST", "/api/runs", {"kind": "finetune", "params": {"steps": 3}}),
    ("POST", "/api/runs/run-1/stop", None), ("GET", "/api/rollout", None), ("POST", "/api/rollout/promote", None),
    ("POST", "/api/rollout/abort", None), ("DELETE", "/api/runs/run-1", None),
])
def test_unreachable_trainer_is_a_502_in_plain_words(client: TestClient, dead_url: str, method: str,
                                                     path: str, body: object) -> None:
    response = client.request(method, path, json=body)
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert f"the trainer at {dead_url} is unreachable" in message
    assert "TRAINER_URL" in message


def test_cluster_without_trainer_asks_the_configured_replicas(make_client: MakeClient, dead_url: str) -> None:
    replica = f"http://127.0.0.1:{free_port()}"
    client = make_client(inference_urls=replica)
    body = client.get("/api/cluster").json()
    assert body["source"] == "replicas"
    assert body["trainer"] == {"url": dead_url, "reachable": False, "error": body["trainer"]["error"]}
    assert "unreachable" in body["trainer"]["error"]
    [only] = body["replicas"]
    assert only["url"] == replica and only["reachable"] is False and only["state"] == "unreachable"
    assert body["convergence"] == {"version": None, "at_version": 0, "total": 1}


def test_pinning_a_replica_the_cluster_does_not_list_is_refused(client: TestClient) -> None:
    response = client.post("/api/playground", json={"prompt": "hi", "replica": "http://169.254.169.254:80"})
    assert response.status_code == 400
    assert "is not in the cluster" in response.json()["error"]["message"]


def test_no_ready_replica_for_round_robin_is_a_503(client: TestClient) -> None:
    response = client.post("/api/playground", json={"prompt": "hi"})
    assert response.status_code == 503
    assert "no replica is ready" in response.json()["error"]["message"]


def test_unreachable_service_is_a_502_naming_it(make_client: MakeClient) -> None:
    service = f"http://127.0.0.1:{free_port()}"
    client = make_client(inference_service_url=service)
    response = client.post("/api/playground", json={"prompt": "hi"})
    assert response.status_code == 502
    assert f"the inference service at {service} is unreachable" in response.json()["error"]["message"]


def test_config_says_where_things_are_but_not_the_token(client: TestClient, dead_url: str) -> None:
    body = client.get("/api/config").json()
    assert body["trainer_url"] == dead_url and body["token_configured"] is True
    assert TOKEN not in client.get("/api/config").text


# ------------------------------------------------------------------------------- the trainer's refusals
def trainer_that_answers(status: int, message: str, seen: list[httpx.Request]) -> httpx.AsyncClient:
    """An HTTP client whose every request the 'trainer' answers with ``status`` and ``message``."""
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json={"error": {"message": message, "code": "invalid_model_reference"}})

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


# What the trainer says of folders that exist, do not, or hold the wrong things: each tells about its filesystem.
FOLDER_REFUSALS = [
    (400, "model directory '/etc/nope' does not exist or is not a directory"),
    (400, "/etc holds no model weights (*.safetensors); is it a model directory?"),
    (400, "/srv/ckpt has only pickle weights (optimizer.pt, model.bin); pickle can run code on load."),
    (404, "version 7 does not exist"),
    (422, "/srv/ckpt/config.json is not valid JSON: Expecting value: line 1 column 1"),
]


@pytest.mark.parametrize(("path", "form"), [
    ("/api/publish", {"model": "/etc/nope"}),
    ("/api/publish", {"model": "./checkpoints/step-10"}),
    ("/api/runs", {"kind": "finetune", "params": {"steps": 3, "model": "~/models/x"}}),
])
def test_a_refused_folder_reads_the_same_whatever_is_there(make_client: MakeClient, path: str,
                                                           form: dict[str, object]) -> None:
    answers = set()
    for status, message in FOLDER_REFUSALS:
        seen: list[httpx.Request] = []
        client = make_client(http_client=trainer_that_answers(status, message, seen))
        response = client.post(path, json=form)
        assert len(seen) == 1, "the trainer was asked"
        assert response.status_code == 400
        body = response.json()["error"]
        assert "/etc" not in body["message"].replace(str(form.get("model", "")), "")
        assert "pickle" not in body["message"] and "does not exist" not in body["message"]
        answers.add(response.text)
    assert len(answers) == 1, answers


def test_a_refused_repo_id_keeps_the_trainers_words(make_client: MakeClient) -> None:
    seen: list[httpx.Request] = []
    client = make_client(http_client=trainer_that_answers(400, "unknown built-in model 'builtin:huge'", seen))
    response = client.post("/api/publish", json={"model": "builtin:huge"})
    assert response.status_code == 400 and "unknown built-in model" in response.json()["error"]["message"]


def test_deleting_a_run_relays_the_trainers_answer(make_client: MakeClient) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204) if request.url.path == "/runs/run-1" else httpx.Response(
            409, json={"error": {"message": "run run-2 is running; stop it", "code": "conflict"}})

    client = make_client(http_client=httpx.AsyncClient(transport=httpx.MockTransport(answer)))
    deleted = client.delete("/api/runs/run-1")
    assert deleted.status_code == 204 and deleted.content == b""
    refused = client.delete("/api/runs/run-2")
    assert refused.status_code == 409 and "stop it" in refused.json()["error"]["message"]
    assert [(r.method, r.url.path) for r in seen] == [("DELETE", "/runs/run-1"), ("DELETE", "/runs/run-2")]
    assert seen[0].headers["authorization"] == f"Bearer {TOKEN}", "the UI adds its token, server-side"


def test_the_trainer_refusing_the_ui_token_is_not_the_pages_401(make_client: MakeClient) -> None:
    seen: list[httpx.Request] = []
    client = make_client(http_client=trainer_that_answers(401, "this endpoint needs a bearer token", seen))
    response = client.post("/api/rollback", json={})
    assert response.status_code == 502
    assert "LOCKSTEP_API_TOKEN" in response.json()["error"]["message"]
    assert seen[0].headers["authorization"] == f"Bearer {TOKEN}", "the UI adds its token, server-side"
