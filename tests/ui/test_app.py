"""The UI server's HTTP surface: the page and its files, the checked forms, a trainer that is not there."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
from fastapi.testclient import TestClient

from lockstep.core.settings import load_settings
from lockstep.ui.app import create_app
from lockstep.ui.assets import Assets
from tests.support.cluster import free_port

MakeClient = Callable[..., TestClient]


@pytest.fixture(scope="module")
def dead_url() -> str:
    """A loopback URL where nothing listens (the port was free a moment ago)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def make_client(dead_url: str) -> Iterator[MakeClient]:
    """Factory: a UI whose trainer is unreachable, with these settings on top."""
    with ExitStack() as stack:
        def make(**overrides: object) -> TestClient:
            app = create_app(load_settings(**{"trainer_url": dead_url, **overrides}))
            return stack.enter_context(TestClient(app))

        yield make


@pytest.fixture(scope="module")
def client(dead_url: str) -> Iterator[TestClient]:
    """One UI for the tests that only read: its trainer is unreachable and it knows no replica."""
    with TestClient(create_app(load_settings(trainer_url=dead_url))) as shared:
        yield shared


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


@pytest.mark.parametrize(("body", "words"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
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
    assert client.get(f"/api/publishes/{run_id}").status_code in (400, 404)


# --------------------------------------------------------------------------------------- no trainer
@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/api/runs", None), ("GET", "/api/history", None), ("GET", "/api/versions", None),
    ("GET", "/api/publishes/p-1", None), ("POST", "/api/publish", {"model": "builtin:tiny-s1"}),
    ("POST", "/api/rollback", {}), ("POST", "/api/runs", {"kind": "finetune", "params": {"steps": 3}}),
    ("POST", "/api/runs/run-1/stop", None),
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


def test_config_says_where_things_are_but_not_the_token(make_client: MakeClient, dead_url: str) -> None:
    client = make_client(api_token="s3cret-token")
    body = client.get("/api/config").json()
    assert body["trainer_url"] == dead_url and body["token_configured"] is True
    assert "s3cret-token" not in client.get("/api/config").text
