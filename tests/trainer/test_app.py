"""The trainer's HTTP API in this process: probes, metrics, and every kind of bad input refused with a clear
4xx (the cluster is not touched). End-to-end runs are in test_finetune.py and test_simulation.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from lockstep.core.settings import load_settings
from lockstep.trainer.server.app import create_app
from tests.support.stores import publish_as_files

TOKEN = "s3cret"


@pytest.fixture
def api(tmp_path: Path, builtin_dir: Path) -> Iterator[TestClient]:
    settings = load_settings(shared_dir=tmp_path / "shared", builtin_dir=builtin_dir, api_token=TOKEN,
                             reward_plugins="tests.trainer.plugins", discovery="static")
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def error(response: Any) -> str:
    return str(response.json()["error"]["message"])


def test_probes_and_metrics(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/ready").status_code == 200
    text = api.get("/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"lockstep_publish", "lockstep_publish_duration_seconds", "lockstep_run_active"} <= names
    assert 'lockstep_publish_total{outcome="committed"} 0.0' in text


def test_the_publish_counters_count_publishes_the_trainer_did_not_run(api: TestClient, tmp_path: Path,
                                                                      builtin_dir: Path) -> None:
    """Before, only the trainer's own jobs were counted: an abort by `lockstep publish` in its pod (the way
    operations.md publishes) or a rollout a gate rolled back never reached the alerts that read these."""
    import json

    from lockstep.core.clock import SYSTEM_CLOCK
    from lockstep.sync.coordinator import Coordinator

    def value(text: str, line: str) -> float:
        return float(next(x for x in text.splitlines() if x.startswith(line)).rsplit(" ", 1)[1])

    before = api.get("/metrics").text
    elsewhere = Coordinator(load_settings(shared_dir=tmp_path / "shared", builtin_dir=builtin_dir,
                                          discovery="static"), clock=SYSTEM_CLOCK, owner="cli@pod")
    assert elsewhere.publish("builtin:tiny-s1").outcome == "committed"  # no replicas: committed at once
    history = tmp_path / "shared" / "history"
    # A gate's rollback, as its coordinator records it; and a decision kept before its end (not counted yet).
    rolled_back = {"version": 9, "outcome": "rolled back", "total_s": 31.5,
                   "rollout": {"phase": "rolled back", "automatic_rollback": True, "human": None}}
    (history / f"{int(time.time() * 1000):015d}-v9.json").write_text(json.dumps(rolled_back))
    (history / f"{int(time.time() * 1000) + 1:015d}-v10.json").write_text(
        json.dumps({"version": 10, "outcome": "committed", "total_s": 0.0}))
    after = api.get("/metrics").text
    assert value(after, 'lockstep_publish_total{outcome="committed"}') == \
        value(before, 'lockstep_publish_total{outcome="committed"}') + 1
    assert value(after, 'lockstep_publish_total{outcome="rolled back"}') == 1
    assert value(after, 'lockstep_rollouts_total{outcome="rolled back",trigger="gates"}') == 1
    assert value(api.get("/metrics").text, 'lockstep_publish_total{outcome="committed"}') == \
        value(after, 'lockstep_publish_total{outcome="committed"}')  # each once


def test_mutating_endpoints_need_the_token(api: TestClient) -> None:
    for path, body in (("/runs", {"kind": "simulation"}), ("/publish", {"model": "builtin:tiny"}),
                       ("/rollback", {}), ("/runs/some-run/stop", None), ("/runs/some-run/resume", None)):
        response = api.post(path, json=body, headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401, path
        assert "Bearer" in error(response)
    response = api.delete("/runs/some-run", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401 and "Bearer" in error(response)
    assert api.get("/runs", headers={"Authorization": ""}).status_code == 200  # reading needs no token


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"kind": "dance"}, 400, "kind: Input should be 'simulation', 'finetune' or 'job'"),
    ({"kind": "finetune", "params": {"steps": -3}}, 400, "params.steps"),
    ({"kind": "finetune", "params": {"learning_rate": 50}}, 400, "params.learning_rate"),
    ({"kind": "finetune", "params": {"learning_rate": 0}}, 400, "params.learning_rate"),
    ({"kind": "finetune", "params": {"batch_size": 1024, "group_size": 64}}, 400, "at most 4096"),
    ({"kind": "finetune", "params": {"steps": True}}, 400, "params.steps"),
    ({"kind": "finetune", "params": {"temperature": "hot"}}, 400, "params.temperature"),
    ({"kind": "finetune", "params": {"stepz": 3}}, 400, "params.stepz is not a parameter"),
    ({"kind": "finetune", "params": {"group_size": 1}}, 400, "params.group_size"),
    ({"kind": "finetune", "params": {"task": "chess"}}, 400, "built-in tasks: digits"),
    ({"kind": "finetune", "params": {"model": "versions/99"}}, 404, "version 99 is not in the store"),
    ({"kind": "finetune", "params": {"model": "./no/such/dir"}}, 400, "does not exist"),
    ({"kind": "finetune", "params": {"model": "builtin:huge"}}, 400, "unknown built-in model"),
    ({"kind": "finetune", "params": {"reward": "os:system"}}, 400, "not allowed"),
    ({"kind": "finetune", "params": {"reward": "tests.trainer.plugins:always_raises"}}, 400,
     "ValueError: this reward is broken on purpose"),
    ({"kind": "finetune", "params": {"reward": "tests.trainer.plugins:not_a_number"}}, 400, "finite number"),
    ({"kind": "simulation", "params": {"rounds": 0}}, 400, "params.rounds"),
    ({"kind": "simulation", "params": {"rounds": 5000}}, 400, "params.rounds"),
    ({"kind": "simulation", "params": {"substitute_model": "versions/7"}}, 404, "version 7"),
    ({"kind": "simulation", "params": {"substitute_model": "not a model!"}}, 400, "not a valid model"),
    ({"kind": "simulation", "params": {"background_load": "no"}}, 400, "params.background_load"),
    ({"kind": "simulation", "params": {"interval_s": "1"}}, 400, "params.interval_s"),
    ({"params": {}}, 400, "kind is required"),
])
def test_bad_runs_are_refused_with_what_is_wrong(api: TestClient, body: dict[str, Any], status: int,
                                                 message: str) -> None:
    response = api.post("/runs", json=body)
    assert response.status_code == status, response.text
    assert message in error(response)
    assert api.get("/runs").json() == {"runs": []}  # nothing was created


def test_bad_publishes_rollbacks_and_run_ids(api: TestClient) -> None:
    assert api.post("/publish", json={"model": "versions/12"}).status_code == 404
    response = api.post("/publish", json={"model": "../../etc"})
    assert response.status_code == 400 and "model" in error(response)
    assert api.post("/publish", json={"model": "builtin:tiny", "timeout_s": -1}).status_code == 400
    assert api.post("/publish", json={"model": "builtin:tiny", "policy": "sometimes"}).status_code == 400
    for field, value in (("timeout_s", "120"), ("step_seconds", "5"), ("shadow", "5"), ("canary", ["5", "100"])):
        response = api.post("/publish", json={"model": "builtin:tiny", field: value})  # numbers, never strings
        assert response.status_code == 400 and field in error(response), (field, response.text)
    assert api.post("/rollback", json={"to": 4}).status_code == 404
    assert "nothing to roll back" in error(api.post("/rollback", json={}))
    assert api.post("/rollback", json={"to": -1}).status_code == 400
    assert api.get("/runs/NOT..valid").status_code == 400
    assert api.get("/runs/no-such-run").status_code == 404
    assert api.post("/runs/no-such-run/stop").status_code == 404
    assert api.post("/runs/no-such-run/resume").status_code == 404
    assert api.delete("/runs/no-such-run").status_code == 404
    assert api.delete("/runs/NOT..valid").status_code == 400
    assert api.get("/publishes/pub-nothing").status_code == 404


def test_the_cluster_view_and_versions_work_on_an_empty_folder(api: TestClient) -> None:
    cluster = api.get("/cluster").json()
    assert cluster["committed"] is None and cluster["replicas"] == []
    assert cluster["convergence"] == {"version": 0, "at_version": 0, "total": 0}
    assert cluster["discovery"]["mode"] == "static"
    assert api.get("/versions").json() == {"committed": 0, "versions": []}
    assert api.get("/history").json() == {"publishes": [], "flips": []}


def _finished(client: TestClient, job_id: str) -> dict[str, Any]:
    for _ in range(600):  # bounded: 60 s
        job: dict[str, Any] = client.get(f"/publishes/{job_id}").json()
        if job["status"] != "running":
            return job
        time.sleep(0.1)
    raise AssertionError(f"publish {job_id} did not end")


def test_without_a_shared_folder_the_trainer_keeps_everything_in_its_data_folder(tmp_path: Path,
                                                                                builtin_dir: Path) -> None:
    settings = load_settings(builtin_dir=builtin_dir, api_token=TOKEN, discovery="static",
                             trainer_data_dir=tmp_path / "data").model_copy(update={"shared_dir": None})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(settings), headers=auth) as api:
        assert api.get("/ready").status_code == 200
        assert api.get("/sync/committed").json() == {"committed": None, "generation": 0, "peers": []}
        job = api.post("/publish", json={"model": "builtin:tiny-s1"}).json()
        job = _finished(api, job["id"])
        # The version went into the trainer's own store; with no replica answering, nothing was committed.
        assert job["result"]["outcome"] == "aborted" and "no live replicas" in job["result"]["reason"]
        version = job["result"]["version"]
        assert (tmp_path / "data" / "versions" / f"{version:06d}" / "MANIFEST.json").is_file()
        manifest = api.get(f"/store/versions/{version}/manifest").json()
        assert manifest["version"] == version and manifest["kind"] == "directory"
        assert api.get(f"/store/versions/{version}/manifest", headers={"Authorization": ""}).status_code == 401
        config = api.get(f"/store/versions/{version}/files/config.json")
        assert config.status_code == 200 and config.json()["model_type"]
        assert api.get(f"/store/versions/{version}/files/MANIFEST.json").status_code == 404  # not a listed file
        assert api.get("/store/versions/99/manifest").status_code == 404
    # A restarted trainer on the same folder finds its versions and history again.
    with TestClient(create_app(settings), headers=auth) as api:
        assert [v["version"] for v in api.get("/versions").json()["versions"]] == [version]
        assert [p["outcome"] for p in api.get("/history").json()["publishes"]] == ["aborted"]


def test_without_a_shared_folder_heartbeat_discovery_says_what_to_set_instead(tmp_path: Path) -> None:
    settings = load_settings(discovery="heartbeats", trainer_data_dir=tmp_path / "data").model_copy(
        update={"shared_dir": None})
    with TestClient(create_app(settings)) as api:
        discovery = api.get("/cluster").json()["discovery"]
        assert discovery["urls"] == [] and "INFERENCE_URLS" in discovery["error"]


def test_an_unwritable_data_folder_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from lockstep.core.errors import BadRequest

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    settings = load_settings(trainer_data_dir=blocker / "data").model_copy(update={"shared_dir": None})
    with pytest.raises(BadRequest, match="LOCKSTEP_TRAINER_DATA_DIR"):
        create_app(settings)


def test_a_publish_while_another_runs_gets_409_naming_it_and_nothing_is_queued(api: TestClient,
                                                                               tiny_dirs: dict[int, Path]) -> None:
    import threading

    from lockstep.sync.coordinator import PublishResult

    trainer = api.app.state.trainer  # type: ignore[attr-defined]
    gate = threading.Event()

    def slow_work(model: str, *args: Any) -> Any:
        def work(progress: Any) -> PublishResult:
            progress("prepare", {"version": 7, "generation": 1})
            gate.wait(timeout=60)  # bounded: the test sets it long before
            return PublishResult(7, "versions/000007", "aborted", reason="test")
        return work

    trainer.publisher._ref_work = slow_work
    running = api.post("/publish", json={"model": "builtin:tiny-s1"})
    assert running.status_code == 202, running.text
    job_id = running.json()["id"]
    for _ in range(100):  # bounded: the job reaches prepare at once
        if api.get(f"/publishes/{job_id}").json()["phase"] == "prepare":
            break
        time.sleep(0.05)
    upload_id = api.post("/store/uploads").json()["upload_id"]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        data = (tiny_dirs[2] / name).read_bytes()
        assert api.put(f"/store/uploads/{upload_id}/files/{name}", content=data).status_code == 200
    for path, body in (("/publish", {"model": "builtin:tiny-s2"}), ("/rollback", {"to": 0}),
                       (f"/store/uploads/{upload_id}/publish", {}), ("/runs", {"kind": "simulation"})):
        refused = api.post(path, json=body)
        assert refused.status_code == 409, (path, refused.text)
        assert job_id in error(refused) and "phase prepare" in error(refused) and "v7" in error(refused)
        if path != "/runs":
            assert refused.json()["running"] == {**refused.json()["running"], "id": job_id, "version": 7,
                                                 "phase": "prepare", "model": "builtin:tiny-s1"}
    assert [j["id"] for j in api.get("/publishes").json()["publishes"]] == [job_id]  # none queued
    gate.set()
    assert _finished(api, job_id)["status"] == "done"
    # The refused upload was given back: it can be dropped (or published) now.
    assert api.delete(f"/store/uploads/{upload_id}").status_code == 204
    assert api.post("/rollback", json={"to": 0}).status_code == 202


def test_uploads_are_bounded_in_bytes_and_in_how_many_are_open(tmp_path: Path, builtin_dir: Path) -> None:
    settings = load_settings(shared_dir=tmp_path / "shared", builtin_dir=builtin_dir, api_token=TOKEN,
                             discovery="static", max_upload_bytes=1000, max_open_uploads=2)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        upload_id = client.post("/store/uploads").json()["upload_id"]
        assert client.put(f"/store/uploads/{upload_id}/files/a.bin", content=b"a" * 600).status_code == 200
        refused = client.put(f"/store/uploads/{upload_id}/files/b.bin", content=b"b" * 600)
        assert refused.status_code == 413 and "LOCKSTEP_MAX_UPLOAD_BYTES" in error(refused)
        chunked = client.put(f"/store/uploads/{upload_id}/files/b.bin", content=iter([b"b" * 300] * 2))
        assert chunked.status_code == 413
        assert client.put(f"/store/uploads/{upload_id}/files/b.bin", content=b"b" * 400).status_code == 200
        assert client.put(f"/store/uploads/{upload_id}/files/c.bin", content=b"c",
                          headers={"Content-Length": "x"}).status_code == 400
        assert client.put(f"/store/uploads/{upload_id}/files/c.bin", content=b"c",
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        # Only the streamed routes are unbounded: a JSON body under a path that merely contains /files/ is not.
        big = b'{"size": 1, "sha256": "' + b"a" * 64 + b'", "chunks": [], "pad": "' + b"x" * (2 << 20) + b'"}'
        for path in ("chunked/files/model.json", "chunked/chunks/model.json", "chunked/model.json"):
            response = client.put(f"/store/uploads/{upload_id}/{path}", content=big,
                                  headers={"content-type": "application/json"})
            assert response.status_code == 413, (path, response.text[:200])
        client.post("/store/uploads")
        crowded = client.post("/store/uploads")
        assert crowded.status_code == 429 and "LOCKSTEP_MAX_OPEN_UPLOADS" in error(crowded)
        assert crowded.headers["Retry-After"]


def test_the_trainer_never_serves_a_file_through_a_symlink_out_of_its_version(tmp_path: Path,
                                                                             tiny_dirs: dict[int, Path]) -> None:
    from lockstep.store import ModelStore

    settings = load_settings(api_token=TOKEN, discovery="static", trainer_data_dir=tmp_path / "data").model_copy(
        update={"shared_dir": None})
    store = ModelStore(tmp_path / "data")
    store.versions_dir.mkdir(parents=True)
    version = publish_as_files(store, tiny_dirs[0], 1).version  # a version stored as files, by an older Lockstep
    secret = tmp_path / "secret.txt"
    secret.write_text("the trainer's private key")
    config = store.folder_of(version) / "config.json"
    config.unlink()
    config.symlink_to(secret)  # put there by hand (the store never makes symlinks)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        refused = client.get(f"/store/versions/{version}/files/config.json")
        assert refused.status_code == 404 and "outside the version's folder" in error(refused)
        assert "private key" not in refused.text
        served = client.get(f"/store/versions/{version}/files/tokenizer.json")
        assert served.status_code == 200 and served.content == (tiny_dirs[0] / "tokenizer.json").read_bytes()
        assert client.get(f"/store/versions/{10**13}/manifest").status_code == 400  # out of the schema's bounds


def _unbounded(schema: dict[str, Any], components: dict[str, Any], where: str) -> list[str]:
    """Numbers without both bounds and strings without a most length, anywhere in ``schema``."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _unbounded(components[name], components, f"{where}→{name}")
    found = []
    kind = schema.get("type")
    if kind in ("number", "integer"):
        if not ({"maximum", "exclusiveMaximum"} & set(schema) and {"minimum", "exclusiveMinimum"} & set(schema)):
            found.append(f"{where}: {kind} without both bounds")
    if kind == "string" and "maxLength" not in schema and "enum" not in schema:
        found.append(f"{where}: string without maxLength")
    if kind == "object" and schema.get("additionalProperties") not in (None, False) and "maxProperties" not in schema:
        found.append(f"{where}: object without maxProperties")
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, [])):
            found += _unbounded(sub, components, f"{where}.{key}[{i}]")
    for name, sub in schema.get("properties", {}).items():
        found += _unbounded(sub, components, f"{where}.{name}")
    if isinstance(schema.get("items"), dict):
        found += _unbounded(schema["items"], components, f"{where}[]")
    return found


def test_every_number_and_string_a_request_may_carry_is_bounded_in_the_openapi_schema(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    components = spec["components"]["schemas"]
    found: list[str] = []
    checked = 0
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            for param in operation.get("parameters", []):
                if param["in"] == "path":
                    found += _unbounded(param["schema"], components, f"{method.upper()} {path} {param['name']}")
                    checked += 1
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:
                found += _unbounded(body, components, f"{method.upper()} {path}")
                checked += 1
    assert checked >= 15 and found == []
    params = components["RunRequest"]["properties"]["params"]["anyOf"]
    assert {"rounds", "learning_rate", "temperature"} <= {k for p in params for k in p["properties"]}


@pytest.mark.parametrize(("path", "raw"), [
    ("/publish", '{"model": "builtin:tiny", "timeout_s": NaN}'),
    ("/publish", '{"model": "builtin:tiny", "timeout_s": Infinity}'),
    ("/runs", '{"kind": "finetune", "params": {"temperature": NaN}}'),
    ("/runs", '{"kind": "finetune", "params": {"learning_rate": -Infinity}}'),
    ("/runs", '{"kind": "simulation", "params": {"interval_s": Infinity}}'),
    ("/runs", '{"kind": "finetune", "params": {"task": "' + "d" * 65 + '"}}'),
    ("/publish", '{"model": "' + "m" * 1025 + '"}'),
    ("/rollback", '{"to": 10000000000000}'),
    ("/store/uploads/up-0000000000000000/publish", '{"metadata": {"loss": NaN}}'),
    ("/store/uploads/up-0000000000000000/publish", '{"metadata": {"loss": 1e400}}'),
    ("/store/uploads/up-0000000000000000/publish", '{"metadata": {"deep": [[[[["too deep"]]]]]}}'),
    ("/store/uploads/up-0000000000000000/publish", '{"label": "' + "l" * 1025 + '"}'),
])
def test_non_finite_numbers_and_overlong_strings_are_refused(api: TestClient, path: str, raw: str) -> None:
    response = api.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert api.get("/publishes").json() == {"publishes": []} and api.get("/runs").json() == {"runs": []}


def test_a_chunked_file_says_its_byte_counts_as_integers(api: TestClient) -> None:
    upload_id = api.post("/store/uploads").json()["upload_id"]
    sha = "a" * 64
    for body, says in (({"size": "5", "sha256": sha, "chunks": []}, "size"),
                       ({"size": True, "sha256": sha, "chunks": []}, "size"),
                       ({"size": 5, "sha256": sha, "chunks": [{"offset": "0", "size": 5, "sha256": sha}]}, "offset"),
                       ({"size": 5, "sha256": sha, "chunks": [{"offset": 0, "size": 5.0, "sha256": sha}]}, "size")):
        response = api.put(f"/store/uploads/{upload_id}/chunked/model.json", json=body)
        assert response.status_code == 400 and says in error(response), (body, response.text)


def test_metadata_is_bounded_in_keys_and_size(api: TestClient) -> None:
    many = {f"k{i}": i for i in range(65)}
    big = {"notes": "x" * 20_000}
    for metadata in (many, big):
        response = api.post("/store/uploads/up-0000000000000000/publish", json={"metadata": metadata})
        assert response.status_code == 400 and "metadata" in error(response)


@pytest.mark.parametrize("raw", [b'{"metadata": {"\\ud800": "x"}}', b'{"metadata": {"notes": "a\\udfffb"}}',
                                 b'{"metadata": {"m": [{"\\ud83d": 1}]}}'])
def test_metadata_with_a_lone_surrogate_is_400_before_anything_is_written(api: TestClient, raw: bytes) -> None:
    # json.dumps writes the surrogate as an escape, and every strict reader then refuses the MANIFEST.json.
    response = api.post("/store/uploads/up-0000000000000000/publish", content=raw,
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "surrogate" in error(response), response.text


def test_an_unknown_option_named_with_a_lone_surrogate_is_400(api: TestClient) -> None:
    # The 400 quotes the option's name, which UTF-8 cannot encode: the answer must still be the 400.
    response = api.post("/runs", content=b'{"kind": "finetune", "params": {"trl_args": {"\\ud800": 1}}}',
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "trl_args" in error(response) and "\\ud800" in error(response), response.text


def test_garbage_collection_runs_at_trainer_start(tmp_path: Path, builtin_dir: Path,
                                                  tiny_dirs: dict[int, Path]) -> None:
    import json

    from lockstep.store import ModelStore
    from lockstep.sync.protocol import Committed, SyncState
    from lockstep.sync.shared_files import write_sync_state

    shared = tmp_path / "shared"
    store = ModelStore(shared)
    versions = [store.publish_dir(tiny_dirs[i % 3]).version for i in range(4)]
    (shared / "history").mkdir()
    for i, version in enumerate(versions):  # each was committed once, in turn
        (shared / "history" / f"{1000 + i:015d}-v{version}.json").write_text(
            json.dumps({"version": version, "outcome": "committed"}))
    write_sync_state(shared / "sync_state.json", SyncState(generation=8, committed=Committed(
        version=versions[-1], model=ModelStore.ref(versions[-1]))))
    settings = load_settings(shared_dir=shared, builtin_dir=builtin_dir, api_token=TOKEN, discovery="static",
                             keep_versions=1)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        kept = [v["version"] for v in client.get("/versions").json()["versions"]]
    assert kept == versions[-2:]  # the committed one, and the one a rollback goes back to


def test_without_a_shared_folder_every_publish_collects_the_trainers_store(tmp_path: Path, builtin_dir: Path) -> None:
    settings = load_settings(builtin_dir=builtin_dir, api_token=TOKEN, discovery="static", keep_versions=1,
                             gc_grace_s=0, trainer_data_dir=tmp_path / "data").model_copy(update={"shared_dir": None})
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        outcomes = []
        for model in ("builtin:tiny-s0", "builtin:tiny-s1", "builtin:tiny-s2"):
            job = _finished(client, client.post("/publish", json={"model": model}).json()["id"])
            outcomes.append((job["result"]["version"], job["result"]["outcome"]))
        # No replica answers, so each aborted; aborted versions past their grace go, but never the newest.
        assert [o for _, o in outcomes] == ["aborted"] * 3
        assert [v["version"] for v in client.get("/versions").json()["versions"]] == [outcomes[-1][0]]


def test_a_rollout_another_coordinator_drives_is_shown_as_driven_elsewhere_not_orphaned(
        tmp_path: Path, builtin_dir: Path) -> None:
    """A `lockstep publish --canary` holds the lease and renews it: the trainer must not call its rollout
    orphaned (nor offer to abort what it cannot take over); it names who drives it."""
    from lockstep.store.lease import Lease
    from lockstep.sync.protocol import Committed, Pending, Phase, Split, SyncState
    from lockstep.sync.rollout import RolloutControl, RolloutPlan
    from lockstep.sync.shared_files import write_sync_state

    shared = tmp_path / "shared"
    write_sync_state(shared / "sync_state.json", SyncState(
        generation=3, committed=Committed(version=1, model="versions/000001"),
        pending=Pending(version=2, model="versions/000002", phase=Phase.CANARY, rollout="r-1"),
        split=Split(rollout="r-1", version=2, share=50, step=0, activate_at=time.time())))
    holder = Lease(shared / "locks", owner="cli@elsewhere", ttl_s=600)
    holder.acquire()
    try:
        settings = load_settings(shared_dir=shared, builtin_dir=builtin_dir, api_token=TOKEN, discovery="static")
        with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            view = client.get("/rollout").json()
            assert view["phase"] == "elsewhere" and "cli@elsewhere" in view["reason"], view
            assert view["version"] == 2 and view["share"] == 50
            # Once this trainer has run a rollout of its own (ended), the one driven elsewhere still shows.
            ended = RolloutControl(RolloutPlan(shares=(100,)), rollout_id="r-0")
            ended.phase = "promoted"
            client.app.state.trainer.publisher.rollout = ended  # type: ignore[attr-defined]
            assert client.get("/rollout").json()["phase"] == "elsewhere"
            holder.release()
            assert client.get("/rollout").json()["phase"] == "orphaned"  # its driver gone
            ended_here = client.post("/rollout/abort").json()  # a person ends it from here
            assert (ended_here["id"], ended_here["phase"], ended_here["step"]) == ("r-1", "rolled back", 1)
            assert 'lockstep_rollouts_total{outcome="rolled back",trigger="person"} 1.0' in client.get("/metrics").text
            assert client.get("/rollout").json()["id"] == "r-0"  # no other: this trainer's last
    finally:
        holder.release()


def test_a_run_whose_record_is_unreadable_reads_as_404_and_can_be_deleted(api: TestClient, tmp_path: Path) -> None:
    folder = tmp_path / "shared" / "runs" / "torn-run"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text('{"broken')
    got = api.get("/runs/torn-run")
    assert got.status_code == 404 and "unreadable run.json" in error(got)
    assert api.delete("/runs/torn-run").status_code == 204
    assert not folder.exists()
    assert api.delete("/runs/torn-run").status_code == 404
