"""The attacks of issue 12's "Why", one regression test each (named after the attack), against the behaviour
its "What to build" asks for. Servers run on 127.0.0.1 in this process; every wait is bounded."""

from __future__ import annotations

import hashlib
import http.server
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from lockstep.core.atomic import atomic_write_bytes
from lockstep.core.errors import BadRequest
from lockstep.core.settings import CommitPolicy
from lockstep.inference.app import create_app as replica_app
from lockstep.store.model_store import ModelStore
from lockstep.sync.coordinator import Coordinator
from lockstep.sync.protocol import Committed, Heartbeat, Pending, Phase, ReplicaState, ServingInfo, SyncState
from lockstep.sync.shared_files import heartbeat_path, live_heartbeats, write_heartbeat, write_sync_state
from lockstep.trainer.server.app import create_app as trainer_app
from lockstep.ui.app import create_app as ui_app
from tests.security.conftest import (
    AUTH,
    TOKEN,
    Server,
    csrf_headers,
    raw_http,
    replica_settings,
    serve,
    settings,
    trainer_settings,
    ui_login,
)
from tests.support.cluster import free_port, wait_for

WAIT_S = 120.0  # bound of every wait below (a hang, not a speed check)


# ================================================================================================= servers
@pytest.fixture(scope="module")
def replica(builtin_dir: Path) -> Iterator[Server]:
    """A replica with the token, no shared folder, serving builtin:tiny; batches of up to 8."""
    app = replica_app(replica_settings(builtin_dir, max_new_tokens_limit=64, max_batch_size=8))
    with serve(app, ready_path="/ready") as srv:
        yield srv


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("attacks-trainer")
    with serve(trainer_app(trainer_settings(root / "shared", builtin_dir)), ready_path="/ready") as srv:
        yield srv


@pytest.fixture(scope="module")
def ui(trainer: Server) -> Iterator[Server]:
    with serve(ui_app(settings(trainer_url=trainer.url)), ready_path="/healthz") as srv:
        yield srv


class FakeTrainer:
    """The trainer as the UI reaches it, in memory: records every request, answers 202/200 with JSON."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path, dict(request.headers)))
        if request.method == "POST":
            return httpx.Response(202, json={"publish_id": "p-1", "id": "r-1"})
        if request.url.path == "/cluster":
            return httpx.Response(200, json={"committed": None, "pending": None, "generation": 0, "replicas": []})
        return httpx.Response(200, json={})

    @property
    def mutations(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.requests if m != "GET"]


@pytest.fixture
def relay_ui() -> Iterator[tuple[TestClient, FakeTrainer]]:
    fake = FakeTrainer()
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake.handler))
    app = ui_app(settings(trainer_url="http://trainer.test:8090"), http_client=client)
    with TestClient(app, base_url="http://127.0.0.1") as tc:
        yield tc, fake


UI_MUTATIONS = [
    ("POST", "/api/publish", {"model": "builtin:tiny-s1"}),
    ("POST", "/api/publish", {"model": "/etc"}),
    ("POST", "/api/rollback", {}),
    ("POST", "/api/runs", {"kind": "simulation", "params": {"rounds": 1}}),
    ("POST", "/api/runs/run-1/stop", None),
    ("POST", "/api/runs/run-1/resume", None),
    ("DELETE", "/api/runs/run-1", None),
]


# ===================================================================================== 1. the UI as a relay
def test_ui_open_relay_mutation_without_login_is_401(relay_ui: tuple[TestClient, FakeTrainer]) -> None:
    client, fake = relay_ui
    for method, path, body in UI_MUTATIONS:
        response = client.request(method, path, json=body)
        assert response.status_code == 401, f"{method} {path} without a login: {response.status_code} {response.text}"
    assert fake.mutations == [], f"the UI forwarded changes with its token for an anonymous caller: {fake.mutations}"


def test_ui_csrf_mutation_with_login_but_without_csrf_header_is_403(
        relay_ui: tuple[TestClient, FakeTrainer]) -> None:
    client, fake = relay_ui
    login = client.post("/api/login", json={"token": TOKEN})
    assert login.status_code == 200, f"the UI has no login: {login.status_code} {login.text}"
    cookie = login.headers.get("set-cookie", "")
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower(), cookie
    for method, path, body in UI_MUTATIONS:
        response = client.request(method, path, json=body)  # the session cookie, as a cross-site form sends it
        assert response.status_code == 403, f"{method} {path} without the CSRF header: {response.status_code}"
    assert fake.mutations == [], fake.mutations
    ok = client.post("/api/publish", json={"model": "builtin:tiny-s1"}, headers=csrf_headers(login.json()))
    assert ok.status_code == 202, ok.text  # logged in, with the header: relayed
    assert fake.mutations == [("POST", "/publish")]
    assert client.post("/api/login", json={"token": "not-the-token-0000000000"}).status_code == 401


# ============================================================ 2. one hostile request in a batch of normal ones
NORMAL_PROMPTS = ("Once upon a time", "The cat sat on", "One, two, three,", "Colours of the sky")
HOSTILE_SAMPLING: list[dict[str, Any]] = [
    {"top_k": 2**63},  # overflows the int64 tensor the sampler builds
    {"top_k": 2**64 + 1},
    {"temperature": 5e-324},  # logits / 5e-324 = inf: softmax NaN, multinomial fails
    {"temperature": 1e-300, "top_p": 5e-324},
]


class Gate:
    """Blocks the engine thread inside a forward (hook on the output layer) until opened."""

    def __init__(self, model: Any) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        self.armed = False
        self._hook = model.get_output_embeddings().register_forward_hook(self._wait)

    def _wait(self, *_: Any) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.open.wait(WAIT_S)

    def remove(self) -> None:
        self.open.set()
        self._hook.remove()


def _generate(url: str, prompt: str, n: int, **extra: Any) -> httpx.Response:
    return httpx.post(url + "/generate", json={"prompt": prompt, "max_new_tokens": n, "temperature": 0, **extra},
                      timeout=WAIT_S)


NEAR_TIE = 1e-3  # logits this close are a tie up to float32 summation order


def assert_greedy_up_to_ties(model: Any, tokenizer: Any, prompt: str, completion: list[int]) -> None:
    """Every generated token is the model's greedy choice after the tokens before it, or within float noise of it.

    Beside other requests a greedy answer may take the other side of a near tie: a batch of another shape sums
    in another order, and the random tiny model has near ties. A request that hostile input had harmed would
    pick tokens far from the top.
    """
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + completion])).logits[0].float()
    for i, token in enumerate(completion):
        row = logits[len(prompt_ids) - 1 + i]
        gap = float(row.max() - row[token])
        assert gap <= NEAR_TIE, f"{prompt!r}: token {i} is {gap:.4f} below the greedy choice beside hostile requests"


def test_sampling_parameter_at_edge_of_its_type_fails_only_its_own_request(replica: Server) -> None:
    n = 32
    for p in NORMAL_PROMPTS:
        r = _generate(replica.url, p, n)
        assert r.status_code == 200, r.text
    rt = replica.app.state.runtime
    assert rt.replica.serving is not None
    gate = Gate(rt.replica.serving.loaded.model)
    hostile_results: list[httpx.Response] = []
    try:
        with ThreadPoolExecutor(len(NORMAL_PROMPTS) + len(HOSTILE_SAMPLING)) as pool:
            gate.armed = True
            normal = [pool.submit(_generate, replica.url, p, n) for p in NORMAL_PROMPTS]
            assert gate.entered.wait(WAIT_S), "the engine never ran a forward for the normal requests"
            # The engine is paused inside a step of the normal batch: the hostile ones queue behind it.
            hostile = [pool.submit(httpx.post, replica.url + "/generate", timeout=WAIT_S,
                                   json={"prompt": "Once upon a time", "max_new_tokens": n, "temperature": 1.0,
                                         **h}) for h in HOSTILE_SAMPLING]

            def queued() -> bool:
                done = sum(f.done() for f in hostile)
                return done + int(replica.get("/status").json()["queue_depth"]) >= len(hostile)

            wait_for(queued, WAIT_S, 0.02, "the hostile requests refused or queued")
            gate.open.set()
            answers = [f.result(timeout=WAIT_S) for f in normal]
            hostile_results = [f.result(timeout=WAIT_S) for f in hostile]
    finally:
        gate.remove()
    loaded = rt.replica.serving.loaded
    for p, r in zip(NORMAL_PROMPTS, answers, strict=True):
        assert r.status_code == 200, f"a normal request failed beside hostile ones: {r.status_code} {r.text}"
        assert_greedy_up_to_ties(loaded.model, loaded.tokenizer, p, r.json()["completion_token_ids"])
    for h, r in zip(HOSTILE_SAMPLING, hostile_results, strict=True):
        assert r.status_code < 500, f"hostile {h}: {r.status_code} {r.text}"


def test_engine_ends_only_the_failing_request_of_a_batch() -> None:
    """The engine on its own: hostile sampling in the same first batch as greedy requests (all submitted before
    the engine starts, so they are admitted together); the greedy ones write what they write alone."""
    from lockstep.engine import Engine, FinalEvent, FinishReason, SamplingParams
    from tests.engine import encode, llama, tokenizer

    model = llama(seed=0)
    prompts = ["The quick brown fox", "Numbers: one two three", "A small model writes"]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    hostile_params = []
    for h in HOSTILE_SAMPLING:
        try:
            hostile_params.append(SamplingParams(max_new_tokens=12, **h))
        except BadRequest:
            pass  # refused where it is built: it never reaches a batch

    def final(handle: Any) -> FinalEvent:
        events = [e for e in handle if isinstance(e, FinalEvent)]
        return events[-1]

    eng = Engine(model, tokenizer(), max_batch_size=8, max_queue=64, max_context=256)
    try:
        eng.start()
        alone = {p: list(final(eng.submit(encode(p), greedy)).token_ids) for p in prompts}
    finally:
        eng.close()
    eng = Engine(model, tokenizer(), max_batch_size=8, max_queue=64, max_context=256)
    try:
        handles = {p: eng.submit(encode(p), greedy) for p in prompts}
        bad = [eng.submit(encode("The quick brown fox"), params) for params in hostile_params]
        eng.start()
        for p, handle in handles.items():
            event = final(handle)
            assert event.finish_reason is not FinishReason.ERROR, f"{p!r} ended with an error: {event.error}"
            assert list(event.token_ids) == alone[p], f"{p!r} wrote other tokens beside hostile requests"
        for handle in bad:
            final(handle)  # ends, with an error or not
    finally:
        eng.close()


# ================================================================= 3. in-place flip with weights changed on disk
def _weights_changed(folder: Path, how: str, other: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    if how == "other-weights":
        shutil.copy(other / "model.safetensors", path)
        return
    tensors = load_file(str(path))
    name = sorted(k for k in tensors if tensors[k].dim() == 2)[0]
    if how == "nan-weights":
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    else:  # other-shape
        tensors[name] = torch.zeros(tensors[name].shape[0] + 3, tensors[name].shape[1], dtype=tensors[name].dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("how", ["other-weights", "nan-weights", "other-shape"])
def test_inplace_flip_with_weights_changed_between_stage_and_commit(
        builtin_dir: Path, tiny_dirs: dict[int, Path], tmp_path: Path, how: str) -> None:
    from tests.inference.conftest import reference_text

    folder = tmp_path / "model"
    shutil.copytree(tiny_dirs[1], folder)
    prompt = "Once upon a time"
    expected = {0: reference_text(tiny_dirs[0], prompt), 1: reference_text(tiny_dirs[1], prompt)}
    with serve(replica_app(replica_settings(builtin_dir, update_mode="inplace")), ready_path="/ready") as srv:
        r = srv.post("/admin/stage", json={"model": str(folder), "version": 1}, headers=AUTH)
        assert r.status_code == 202, r.text
        st = wait_for(lambda: (s := srv.get("/status").json())["staged"] and s["staged"]["state"] == "staged"
                      and s, WAIT_S, 0.05, "v1 staged")
        staged_digest = st["staged"]["weights_digest"]
        _weights_changed(folder, how, tiny_dirs[2])  # after verification, before the commit
        commit = srv.post("/admin/commit", json={"version": 1}, headers=AUTH)
        assert commit.status_code < 500, commit.text

        def settled() -> dict[str, Any] | None:
            s = srv.get("/status").json()
            if s["updating"] or s["loading"]:
                return None
            return s if s["serving_version"] == 1 or s["last_error"] or not s["ready"] else None

        st = wait_for(settled, WAIT_S, 0.05, "the commit applied or refused")
        if st["ready"]:
            assert st["serving_version"] == 1 and st["weights_digest"] == staged_digest, (
                f"ready on weights nobody verified: {st}")
        else:
            assert st["last_error"], f"unready without saying why: {st}"
        answer = _generate(srv.url, prompt, 8)
        if answer.status_code == 200:
            version = int(answer.headers["x-model-version"])
            assert answer.json()["text"] == expected[version], (
                f"an answer labelled v{version} was not written by v{version}'s verified weights ({how})")


# ======================================================================================= 4. the store fills up
def _wait_job(client: TestClient, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/publishes/{job_id}").json()
        return job if job["status"] != "running" else None

    return wait_for(done, WAIT_S, 0.02, f"publish {job_id} to end")  # type: ignore[no-any-return]


def test_store_gc_after_50_publishes_is_bounded(tmp_path: Path, builtin_dir: Path,
                                               small_models: list[Path]) -> None:
    keep = 3
    shared = tmp_path / "shared"
    s = trainer_settings(shared, builtin_dir, keep_versions=keep, gc_grace_s=0.0)
    with TestClient(trainer_app(s), headers=AUTH) as client:
        for folder in small_models[:50]:
            r = client.post("/publish", json={"model": str(folder)})
            assert r.status_code == 202, r.text
            job = _wait_job(client, r.json()["publish_id"])
            assert job["status"] == "done" and job["result"]["outcome"] == "committed", job
        versions = sorted(p.name for p in (shared / "versions").iterdir())
        published = [v for v in versions if v.isdigit()]
        # LOCKSTEP_KEEP_VERSIONS, plus the committed one and what a rollback needs (no replica serves another)
        assert len(published) <= keep + 2, f"50 publishes left {len(published)} versions: {published}"
        assert not [v for v in versions if not v.isdigit()], f"leftovers: {versions}"
        oldest = int(published[0])
        r = client.post("/rollback", json={"to": oldest})
        assert r.status_code == 202, r.text
        job = _wait_job(client, r.json()["publish_id"])
        assert job["status"] == "done" and job["result"]["outcome"] == "committed", job


# ============================================================================================== 5. uploads
def test_upload_over_the_size_limit_is_413_and_nothing_is_kept(tmp_path: Path, builtin_dir: Path) -> None:
    shared = tmp_path / "shared"
    s = trainer_settings(shared, builtin_dir, max_upload_bytes=4096)
    body = os.urandom(10_000)
    with TestClient(trainer_app(s), headers=AUTH) as client:
        upload_id = client.post("/store/uploads").json()["upload_id"]
        r = client.put(f"/store/uploads/{upload_id}/files/model.safetensors", content=body,
                       headers={"X-Content-SHA256": hashlib.sha256(body).hexdigest()})
        assert r.status_code == 413, f"{len(body)} bytes over a 4096-byte limit: {r.status_code} {r.text}"
        kept = [p for p in (shared / "uploads").rglob("*") if p.is_file()]
        assert not kept, f"bytes of a refused upload were kept: {kept}"


def test_concurrent_put_to_one_upload_path_gets_409(tmp_path: Path, builtin_dir: Path) -> None:
    shared = tmp_path / "shared"
    first_body, second_body = b"A" * 300_000, b"B" * 300_000
    release = threading.Event()

    def slow_first() -> Iterator[bytes]:
        yield first_body[:1000]
        release.wait(WAIT_S)
        yield first_body[1000:]

    with serve(trainer_app(trainer_settings(shared, builtin_dir)), ready_path="/ready") as srv:
        upload_id = srv.post("/store/uploads", headers=AUTH).json()["upload_id"]
        url = f"{srv.url}/store/uploads/{upload_id}/files/model.safetensors"
        folder = shared / "uploads" / upload_id
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.put, url, content=slow_first(), timeout=WAIT_S,
                                headers={**AUTH, "X-Content-SHA256": hashlib.sha256(first_body).hexdigest()})
            wait_for(lambda: folder.is_dir() and any(folder.iterdir()), WAIT_S, 0.01, "the first PUT writing")
            second = httpx.put(url, content=second_body, timeout=WAIT_S,
                               headers={**AUTH, "X-Content-SHA256": hashlib.sha256(second_body).hexdigest()})
            release.set()
            first_answer = first.result(timeout=WAIT_S)
        assert second.status_code == 409, f"a second writer to the same path: {second.status_code} {second.text}"
        assert first_answer.status_code == 200, first_answer.text
        on_disk = (folder / "model.safetensors").read_bytes()
        assert hashlib.sha256(on_disk).hexdigest() == first_answer.json()["sha256"], (
            "the bytes kept are not the ones whose digest was acknowledged")


# ================================================================================ 6. shared files trusted too far
def _beat(replica_id: str, url: str, at: float) -> Heartbeat:
    return Heartbeat(replica_id=replica_id, url=url, pid=1, state=ReplicaState.SERVING, ready=True,
                     serving=ServingInfo(version=0, model="builtin:tiny"), time=at, generation_seen=0)


def test_heartbeat_stamped_in_the_future_is_ignored(tmp_path: Path, builtin_dir: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    now = time.time()
    write_heartbeat(shared, _beat("forged", "http://127.0.0.1:9", now + 3600))
    write_heartbeat(shared, _beat("honest", "http://127.0.0.1:10", now))
    live = [b.replica_id for b in live_heartbeats(shared, 5.0, now)]
    assert live == ["honest"], f"a heartbeat an hour in the future counts as live: {live}"
    heartbeat_path(shared, "honest").unlink()
    # A strict publish would wait for the forged replica to stage, then abort; it must commit.
    s = trainer_settings(shared, builtin_dir, stage_timeout_s=3.0, commit_policy=CommitPolicy.STRICT,
                         heartbeat_ttl_s=5.0)
    from lockstep.core.clock import SYSTEM_CLOCK

    coordinator = Coordinator(s, clock=SYSTEM_CLOCK, owner="test")
    from tests.security.conftest import small_model_dir

    result = coordinator.publish(str(small_model_dir(tmp_path / "m", 1)))
    assert result.outcome == "committed", f"a forged future heartbeat decided the publish: {result.as_dict()}"


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        body = b'{"replica_id": "forged", "state": "serving", "ready": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_forged_heartbeat_url_never_receives_the_token(tmp_path: Path, builtin_dir: Path) -> None:
    """A heartbeat from the future naming a URL outside discovery: neither the trainer's cluster view nor the
    UI in front of it (reading the fleet, pinning the playground to it, or asking replicas itself once the
    trainer is gone) contacts that URL, let alone with the bearer token."""
    _Recorder.seen = []
    listener = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=listener.serve_forever, daemon=True)
    thread.start()
    shared = tmp_path / "shared"
    shared.mkdir()
    forged_url = f"http://127.0.0.1:{listener.server_address[1]}"
    write_heartbeat(shared, _beat("forged", forged_url, time.time() + 3600))
    trainer_cm = serve(trainer_app(trainer_settings(shared, builtin_dir, discovery="heartbeats")), ready_path="/ready")
    try:
        trainer = trainer_cm.__enter__()
        try:
            with serve(ui_app(settings(trainer_url=trainer.url)), ready_path="/healthz") as ui, \
                    httpx.Client(base_url=ui.url, timeout=30) as client:
                for _ in range(3):
                    assert trainer.get("/cluster").status_code == 200
                client.headers.update(ui_login(client))
                for _ in range(3):
                    client.get("/api/cluster")
                client.post("/api/playground", json={"prompt": "hi", "max_tokens": 2, "replica": "forged"})
                client.post("/api/playground", json={"prompt": "hi", "max_tokens": 2, "replica": forged_url})
                trainer_cm.__exit__(None, None, None)  # the trainer gone: the UI asks replicas itself
                trainer_cm = None
                for _ in range(3):
                    client.get("/api/cluster")
        finally:
            if trainer_cm is not None:
                trainer_cm.__exit__(None, None, None)
    finally:
        listener.shutdown()
        listener.server_close()
    leaked = [path for path, auth in _Recorder.seen if auth and TOKEN in auth]
    assert not leaked, f"the token was sent to a URL named only by a forged heartbeat: {leaked}"
    # Only replicas that were discovered or sent a valid heartbeat are contacted at all.
    assert not _Recorder.seen, f"a URL named only by a heartbeat from the future was contacted: {_Recorder.seen}"


def test_a_token_ending_in_a_newline_works_everywhere_and_never_reaches_a_page(
        tmp_path: Path, builtin_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Secret made from a file ends in a newline. Before, the trainer refused the right token (401), and the UI,
    its header invalid, quoted it to anonymous readers in the error of every /api read."""
    from lockstep.cli import main
    from lockstep.ui.upstream import describe

    padded = TOKEN + "\n"
    shared = tmp_path / "shared"
    shared.mkdir()
    with serve(trainer_app(trainer_settings(shared, builtin_dir, api_token=padded)), ready_path="/ready") as trainer, \
            serve(ui_app(settings(trainer_url=trainer.url, api_token=padded, ui_public_reads=True)),
                  ready_path="/healthz") as ui:
        assert trainer.post("/runs/none/stop", headers=AUTH).status_code == 404  # the token, not 401
        answer = httpx.get(ui.url + "/api/versions", timeout=30)  # no login: public reads
        assert answer.status_code == 200, answer.text
        assert TOKEN not in answer.text
    # A token that is not visible ASCII stops a server at its start, without printing the token.
    os.environ["LOCKSTEP_API_TOKEN"] = "with a space " + TOKEN
    try:
        assert main(["trainer", "--port", str(free_port())]) == 2
    finally:
        del os.environ["LOCKSTEP_API_TOKEN"]
    printed = capsys.readouterr().err
    assert "visible ASCII" in printed and TOKEN not in printed
    assert TOKEN not in describe(httpx.LocalProtocolError(f"Illegal header value b'Bearer {TOKEN}\\n'"))


def _write_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(state).encode())  # json writes NaN as NaN: what a careless writer makes


def test_non_finite_activate_at_makes_the_replica_unready_and_the_flip_thread_survives(
        tmp_path: Path, builtin_dir: Path, tiny_dirs: dict[int, Path]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    manifest = ModelStore(shared).publish_dir(tiny_dirs[1])
    model = ModelStore.ref(manifest.version)
    path = shared / "sync_state.json"
    s = replica_settings(builtin_dir, shared_dir=shared, replica_id="r-nan", poll_interval_s=0.05,
                         heartbeat_interval_s=0.2)

    def prepare(generation: int) -> None:
        now = time.time()
        write_sync_state(path, SyncState(generation=generation, pending=Pending(
            version=manifest.version, model=model, digest=manifest.digest, phase=Phase.PREPARE,
            coordinator="test", started_at=now, deadline=now + WAIT_S)))

    def commit(generation: int, activate_at: float) -> None:
        committed = Committed(version=manifest.version, model=model, digest=manifest.digest, committed_at=time.time())
        pending = Pending(version=manifest.version, model=model, digest=manifest.digest, phase=Phase.COMMIT,
                          coordinator="test")
        state = SyncState(generation=generation, committed=committed, pending=pending).model_dump(mode="json")
        state["committed"]["activate_at"] = activate_at
        state["pending"]["activate_at"] = activate_at
        _write_state(path, state)

    with serve(replica_app(s), ready_path="/ready") as srv:
        prepare(1)
        wait_for(lambda: (st := srv.get("/status").json())["staged"] and st["staged"]["state"] == "staged",
                 WAIT_S, 0.05, "v1 staged")
        commit(2, math.nan)
        st = wait_for(lambda: (x := srv.get("/status").json())["last_error"] and not x["ready"] and x,
                      30.0, 0.05, "the replica unready, saying why")
        assert srv.get("/ready").status_code == 503, st
        # The thread that flips is still there: a good commit is applied.
        prepare(3)
        wait_for(lambda: (x := srv.get("/status").json())["serving_version"] == manifest.version
                 or (x["staged"] and x["staged"]["state"] == "staged"), WAIT_S, 0.05, "v1 staged again")
        commit(4, time.time() + 0.3)
        wait_for(lambda: srv.get("/status").json()["serving_version"] == manifest.version
                 and srv.get("/ready").status_code == 200, WAIT_S, 0.05, "v1 served after a good commit")


def test_non_finite_activate_at_over_http_is_400(replica: Server) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        r = httpx.post(replica.url + "/admin/commit", content=b'{"version": 1, "activate_at": ' + literal + b"}",
                       headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, f"activate_at {literal!r}: {r.status_code} {r.text}"
    assert replica.get("/ready").status_code == 200


# ======================================================================================== 7. the event loop
def test_stage_naming_a_large_directory_keeps_healthz_answering(
        replica: Server, tmp_path: Path, tiny_dirs: dict[int, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk of the folder is held (its first directory listing blocks) while /healthz is asked: it must
    answer, so the walk is not on the event loop."""
    big = tmp_path / "big"
    shutil.copytree(tiny_dirs[1], big)
    for i in range(50):
        (big / "shards" / f"d{i:02d}").mkdir(parents=True)
        (big / "shards" / f"d{i:02d}" / "x.bin.txt").write_text("x")
    entered, release = threading.Event(), threading.Event()
    real_scandir, real_listdir = os.scandir, os.listdir

    def held(path: Any) -> None:
        if str(path).startswith(str(big)) and not release.is_set():
            entered.set()
            release.wait(WAIT_S)

    def scandir(path: Any = ".") -> Any:
        held(path)
        return real_scandir(path)

    def listdir(path: Any = ".") -> Any:
        held(path)
        return real_listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    with ThreadPoolExecutor(1) as pool:
        try:
            stage = pool.submit(httpx.post, replica.url + "/admin/stage", headers=AUTH, timeout=WAIT_S,
                                json={"model": str(big), "version": 77})
            wait_for(lambda: entered.is_set() or stage.done(), WAIT_S, 0.01, "the stage to walk the folder")
            health = httpx.get(replica.url + "/healthz", timeout=30)  # a generous bound: blocked means never
            assert health.status_code == 200
        except httpx.TimeoutException as exc:
            raise AssertionError("/healthz did not answer while a stage walked a folder: the walk blocks the "
                                 "event loop") from exc
        finally:
            release.set()
            monkeypatch.undo()
        assert stage.result(timeout=WAIT_S).status_code < 500
    httpx.post(replica.url + "/admin/abort", json={}, headers=AUTH, timeout=30)


def test_chat_with_a_huge_number_of_messages_is_400(replica: Server) -> None:
    """1000 one-character messages: under the body limit and under the prompt's character limit, so only a
    bound on the number of messages refuses them (each is tokenized through the chat template)."""
    messages = [{"role": "user", "content": "a"}] * 1000
    body = json.dumps({"model": "lockstep", "messages": messages, "max_tokens": 4}).encode()
    assert len(body) < 1_048_576, "below the body limit: the message count is what must be refused"
    r = httpx.post(replica.url + "/v1/chat/completions", content=body, timeout=WAIT_S,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, f"{len(messages)} messages: {r.status_code} {r.text[:300]}"
    assert "messages" in r.json()["error"]["message"], r.text[:300]


@pytest.mark.parametrize("server_name", ["replica", "trainer", "ui"])
def test_200_mb_body_is_413_before_it_is_read(server_name: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(server_name)
    path = {"replica": "/generate", "trainer": "/publish", "ui": "/api/publish"}[server_name]
    auth = f"Authorization: Bearer {TOKEN}\r\n" if server_name == "trainer" else ""
    if server_name == "ui":  # logged in, so that only the size can refuse it
        with httpx.Client(base_url=server.url, timeout=30) as client:
            headers = ui_login(client)
            cookies = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        auth = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + (f"Cookie: {cookies}\r\n" if cookies else "")
    size = 200 * 1024 * 1024
    # Content-Length says 200 MB, 64 KiB follow: a server that reads before it refuses never answers.
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n").encode()
    answer, _ = raw_http(server.port, head + b"{" + b" " * 65_535, read_timeout=30)
    assert answer.startswith(b"HTTP/1.1 413"), f"{server_name}: {answer[:200]!r}"
    # No Content-Length (chunked): refused once past the limit, long before 200 MB were taken.
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    chunk = b"%x\r\n" % 65_536 + b" " * 65_536 + b"\r\n"
    answer, sent = raw_http(server.port, head, iter([chunk] * (size // 65_536)), read_timeout=30)
    assert answer.startswith(b"HTTP/1.1 413"), f"{server_name} (chunked): {answer[:200]!r}"
    assert sent < size // 4, f"{server_name} took {sent} bytes of a body it refuses"


@pytest.mark.parametrize("server_name", ["replica", "trainer", "ui"])
def test_64_mb_header_is_431_while_it_arrives(server_name: str, request: pytest.FixtureRequest) -> None:
    """uvicorn buffers a request's head without limit, and no app sees it before it ends: the server itself must
    refuse a head past its bound, long before 64 MB were taken. Many small headers are refused the same way;
    a head of ordinary size (a 16 KB cookie) is not."""
    server: Server = request.getfixturevalue(server_name)
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: "
    size = 64 << 20
    answer, sent = raw_http(server.port, head, iter([b"a" * 65_536] * (size // 65_536)), read_timeout=30)
    assert answer.startswith(b"HTTP/1.1 431"), f"{server_name}: {answer[:200]!r}"
    assert sent < size // 16, f"{server_name} took {sent} bytes of a header it refuses"
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
    answer, _ = raw_http(server.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), f"{server_name}, 1000 headers: {answer[:200]!r}"
    ordinary = httpx.get(server.url + "/healthz", headers={"Cookie": "c=" + "x" * 16_000}, timeout=30)
    assert ordinary.status_code == 200, f"{server_name}: a 16 KB cookie got {ordinary.status_code}"


# ================================================================================= 8. authenticate, then parse
MALFORMED = [b"{not json", b'{"version": "x", "model": 5}', b""]


@pytest.mark.parametrize("server_name", ["replica", "trainer", "ui"])
def test_malformed_admin_body_without_token_is_401_not_400(server_name: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(server_name)
    routes = {
        "replica": [("POST", "/admin/stage"), ("POST", "/admin/commit"), ("POST", "/admin/abort"),
                    ("POST", "/update-model")],
        "trainer": [("POST", "/publish"), ("POST", "/rollback"), ("POST", "/runs"), ("POST", "/runs/x/stop"),
                    ("DELETE", "/runs/x"),
                    ("POST", "/store/uploads"), ("POST", "/store/uploads/x/publish"),
                    ("PUT", "/store/uploads/x/files/model.safetensors"), ("DELETE", "/store/uploads/x")],
        "ui": [("POST", "/api/publish"), ("POST", "/api/rollback"), ("POST", "/api/runs"),
               ("POST", "/api/runs/x/stop"), ("DELETE", "/api/runs/x"), ("POST", "/api/playground")],
    }[server_name]
    wrong = [{}, {"Authorization": "Bearer wrong-token-of-the-same-length-000"}, {"Authorization": f"Basic {TOKEN}"}]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in routes:
            for i, body in enumerate(MALFORMED):
                headers = wrong[i % len(wrong)]
                r = client.request(method, path, content=body, headers={"Content-Type": "application/json", **headers})
                assert r.status_code == 401, f"{method} {path} {headers} {body!r}: {r.status_code} {r.text[:200]}"


# ================================================================================= 9. concurrent publishes
def test_concurrent_publish_gets_409_naming_the_running_one(tmp_path: Path, builtin_dir: Path,
                                                          small_models: list[Path]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    s = trainer_settings(shared, builtin_dir, heartbeat_ttl_s=600.0)
    # A live replica that never stages: the first publish waits for it until its timeout.
    write_heartbeat(shared, _beat("slow", f"http://127.0.0.1:{free_port()}", time.time()))
    with TestClient(trainer_app(s), headers=AUTH) as client:
        first = client.post("/publish", json={"model": str(small_models[50]), "timeout_s": 4})
        assert first.status_code == 202, first.text
        first_id = first.json()["publish_id"]
        second = client.post("/publish", json={"model": str(small_models[51])})
        assert second.status_code == 409, f"a second publish while one runs: {second.status_code} {second.text}"
        assert first_id in second.text, f"the 409 does not say what is running: {second.text}"
        _wait_job(client, first_id)
        assert client.get("/publishes").json()["publishes"][0]["id"] == first_id, "the second one was queued"

