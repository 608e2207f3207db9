"""Rollouts through the UI server, against a real trainer (in this process, on 127.0.0.1) that has no replica.

With no replica, nothing answers a request, so every gate waits for samples and a rollout holds its first step
until a person promotes or aborts it: what the UI drives. The steps and gates with real replicas are in
tests/ui/test_page.py (the panel) and tests/sync/test_rollout.py (the protocol).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from lockstep.core.http_server import server_config
from lockstep.core.settings import Settings, load_settings
from lockstep.sync.gates import GATES
from lockstep.trainer.server.app import create_app as trainer_app
from lockstep.ui.app import create_app as ui_app
from lockstep.ui.session import CSRF_HEADER
from tests.support.cluster import free_port, wait_for

TOKEN = "ui-rollout-test-token-8c41d2"
WAIT_S = 60.0  # bound of every wait (a hang, not a speed check) on a loaded 2-core machine
FINAL = ("promoted", "rolled back", "aborted")


def trainer_settings(root: Path, builtin_dir: Path) -> Settings:
    """A trainer on its own shared folder that knows no replica: a rollout's gates wait, its steps are quick."""
    return load_settings(shared_dir=root / "shared", builtin_dir=builtin_dir, api_token=TOKEN, discovery="static",
                         inference_urls="", hf_hub_offline=True, poll_interval_s=0.05, commit_margin_s=0.1,
                         stage_timeout_s=5.0)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """``app`` under uvicorn in a thread of this process (lifespan on); its URL until the block ends."""
    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-ui-rollout-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/ready", timeout=5).status_code == 200, WAIT_S, 0.05, "the trainer ready")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def make_trainer(tmp_path: Path, builtin_dir: Path) -> Iterator[Callable[[], str]]:
    """Factory: a fresh trainer (its own shared folder), stopped after the test."""
    with ExitStack() as stack:
        def make() -> str:
            root = tmp_path / f"trainer-{free_port()}"
            root.joinpath("shared").mkdir(parents=True)
            return stack.enter_context(serve(trainer_app(trainer_settings(root, builtin_dir))))

        yield make


def ui_for(trainer_url: str) -> TestClient:
    """The UI server in front of ``trainer_url``, holding the token the page never sees."""
    return TestClient(ui_app(load_settings(trainer_url=trainer_url, api_token=TOKEN)))


def log_in(client: TestClient) -> TestClient:
    response = client.post("/api/login", json={"token": TOKEN})
    assert response.status_code == 200, response.text
    client.headers[CSRF_HEADER] = response.json()["csrf"]
    return client


def message(response: httpx.Response) -> str:
    return str(response.json()["error"]["message"])


def wait_phase(ui: TestClient, *phases: str, gates_read: bool = False) -> dict[str, Any]:
    """GET /api/rollout until its phase is one of ``phases`` (and, if ``gates_read``, its gates were read); the view."""
    def reached() -> dict[str, Any] | None:
        response = ui.get("/api/rollout")
        body: dict[str, Any] = response.json()
        ok = response.status_code == 200 and body["phase"] in phases and (body["gates"] or not gates_read)
        return body if ok else None

    view: dict[str, Any] = wait_for(reached, WAIT_S, 0.05, f"the rollout to reach {phases}")
    return view


# --------------------------------------------------------------------------------------------- who may
def test_the_rollout_routes_need_a_session_and_the_csrf_header(make_trainer: Callable[[], str]) -> None:
    trainer = make_trainer()
    with ui_for(trainer) as ui:
        assert ui.get("/api/rollout").status_code == 401
        for path in ("/api/rollout/promote", "/api/rollout/abort"):
            assert ui.post(path).status_code == 401, path
        log_in(ui)
        csrf = ui.headers.pop(CSRF_HEADER)
        for path in ("/api/rollout/promote", "/api/rollout/abort"):
            response = ui.post(path)
            assert response.status_code == 403 and CSRF_HEADER in message(response), path
        publish = ui.post("/api/publish", json={"model": "builtin:tiny-s1", "canary": [5, 50]})
        assert publish.status_code == 403
        ui.headers[CSRF_HEADER] = csrf
        assert ui.get("/api/rollout").status_code == 404, "nothing reached the trainer without the header"


def test_no_rollout_yet_is_a_404_in_the_trainers_words(make_trainer: Callable[[], str]) -> None:
    with ui_for(make_trainer()) as ui:
        log_in(ui)
        response = ui.get("/api/rollout")
        assert response.status_code == 404
        assert "no rollout has run on this trainer" in message(response)
        for path in ("/api/rollout/promote", "/api/rollout/abort"):
            response = ui.post(path)
            assert response.status_code == 404 and "no rollout is in progress" in message(response), path


# --------------------------------------------------------------------------------------- the trainer's no
@pytest.mark.parametrize(("fields", "words"), [
    ({"canary": [25, 5]}, "canary shares must increase: 5 follows 25"),
    ({"canary": [100]}, "a rollout needs canary shares below 100"),
    ({"canary": [5], "gates": {"no_such_gate": 0.1}}, "unknown gate 'no_such_gate'; the gates are error_rate"),
    ({"canary": [5], "gates": {"error_rate": 2}}, "gate 'error_rate': threshold 2.0 is out of range"),
])
def test_a_bad_rollout_gets_the_trainers_reason(make_trainer: Callable[[], str], fields: dict[str, Any],
                                                words: str) -> None:
    with ui_for(make_trainer()) as ui:
        log_in(ui)
        response = ui.post("/api/publish", json={"model": "builtin:tiny-s1", **fields})
        assert response.status_code == 400, response.text
        assert words in message(response)
        assert ui.get("/api/rollout").status_code == 404, "nothing started"


# ----------------------------------------------------------------------------------------- a rollout
def test_a_rollout_from_the_ui_holds_until_a_person_aborts_or_promotes(make_trainer: Callable[[], str]) -> None:
    trainer = make_trainer()
    with ui_for(trainer) as ui:
        log_in(ui)
        committed = httpx.get(trainer + "/cluster").json()["committed"]
        gates = {"kl_divergence": None, "error_rate": {"threshold": 0.05, "min_samples": 10}, "length_shift": 0.25}
        started = ui.post("/api/publish", json={"model": "builtin:tiny-s1", "canary": [5, 50], "step_seconds": 0,
                                                "min_requests": 0, "gates": gates})
        assert started.status_code == 202, started.text
        assert started.json()["kind"] == "rollout"

        view = wait_phase(ui, "step", gates_read=True)
        assert view["plan"]["shares"] == [5, 50, 100] and view["plan"]["steps"] == [5, 50, 100]
        assert view["plan"]["step_seconds"] == 0 and view["plan"]["min_requests"] == 0
        planned = view["plan"]["gates"]
        assert "kl_divergence" not in planned, "null turned the gate off: it reached the trainer"
        assert planned["error_rate"] == {"threshold": 0.05, "min_samples": 10, "direction": "max"}
        assert planned["length_shift"]["threshold"] == 0.25
        assert view["step"] == 0 and view["share"] == 5 and view["human"] is None
        assert {g["name"] for g in view["gates"]} == set(planned)
        assert {g["verdict"] for g in view["gates"]} <= {"waiting", "skipped"}, "no replica: nothing measured"
        assert set(view["gate_descriptions"]) == set(GATES), "the UI adds what each gate measures"

        busy = ui.post("/api/publish", json={"model": "builtin:tiny-s2"})
        assert busy.status_code == 409 and "rollout" in message(busy)

        aborted = ui.post("/api/rollout/abort")
        assert aborted.status_code == 202 and aborted.json()["human"] == "abort"
        view = wait_phase(ui, *FINAL)
        assert view["phase"] == "rolled back" and view["automatic_rollback"] is False
        assert view["reason"] == "aborted by a person at step 0"
        assert [s["outcome"] for s in view["steps"]] == ["rolled back"]
        for path in ("/api/rollout/abort", "/api/rollout/promote"):
            assert ui.post(path).status_code == 404, f"{path}: the rollout has ended"
        assert httpx.get(trainer + "/cluster").json()["committed"] == committed, "nothing was committed"

        # A shadow-only rollout: a step at share 0 first, then the commit, which a person brings forward.
        started = ui.post("/api/publish", json={"model": "builtin:tiny-s1", "shadow": 50, "step_seconds": 0})
        assert started.status_code == 202, started.text
        view = wait_phase(ui, "step")
        assert view["plan"]["steps"] == [0, 100] and view["plan"]["shadow"] == 50 and view["share"] == 0
        promoted = ui.post("/api/rollout/promote")
        assert promoted.status_code == 202 and promoted.json()["human"] == "promote"
        view = wait_phase(ui, *FINAL)
        assert view["phase"] == "promoted"
        assert [s["outcome"] for s in view["steps"]] == ["promoted", "promoted"]
        assert httpx.get(trainer + "/cluster").json()["committed"]["version"] == view["version"]


# ------------------------------------------------------------------------------------------- the page
def test_the_page_has_the_rollout_fields_and_panel() -> None:
    with ui_for(f"http://127.0.0.1:{free_port()}") as ui:  # the page and its files need no trainer
        html = ui.get("/").text
        for field in ("publish-canary", "publish-shadow", "publish-step-seconds", "publish-min-requests"):
            assert f'<label for="{field}">' in html and f'id="{field}"' in html, field
        for part in ('id="rollout-panel"', 'id="rollout-steps"', 'id="rollout-split"', 'id="rollout-gates"',
                     'id="rollout-promote"', 'id="rollout-abort"'):
            assert part in html, part
        assert 'import * as rollout from "./rollout.js"' in ui.get("/static/app.js").text
        script = ui.get("/static/rollout.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        for part in ('"/api/rollout"', '"/api/rollout/promote"', '"/api/rollout/abort"', "confirmDialog(",
                     'on("publishes"', "setTimeout(read"):
            assert part in script.text, part
        control = ui.get("/static/control.js").text
        for part in ("canary", "shadow", "step_seconds", "min_requests"):
            assert f"fields.{part} =" in control, part
