"""The trainer without a shared volume: its own data folder, replicas driven over HTTP, versions downloaded.

Real processes: one trainer (no LOCKSTEP_SHARED_DIR) and replicas that know only the trainer's URL, each with
its own cache folder. The tests run in order on one cluster and build on the versions the previous ones left.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lockstep.store import ModelStore
from tests.support.cluster import Proc, base_env, free_port, spawn, wait_for
from tests.support.load import GenerationLoad, check_answers, greedy_texts
from tests.support.stores import damage_stored_file, distinct_model, fine_tuned

pytestmark = pytest.mark.e2e

TOKEN = "http-sync-test-token-0123456789"  # servers refuse tokens under 16 characters
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READY_S = 120.0


@dataclass
class HttpCluster:
    """A trainer with its data folder, the replicas it drives, and one replica URL not started yet."""

    root: Path
    builtin_dir: Path
    trainer: Proc
    replicas: list[Proc]
    late_port: int

    @property
    def data_dir(self) -> Path:
        return self.root / "trainer-data"

    def replica_env(self, name: str) -> dict[str, str]:
        return base_env(self.builtin_dir, LOCKSTEP_REPLICA_ID=name, LOCKSTEP_API_TOKEN=TOKEN,
                        LOCKSTEP_COORDINATOR_URL=self.trainer.url, HF_HOME=str(self.root / f"hf-{name}"))

    def start_replica(self, name: str, port: int) -> Proc:
        proc = spawn(name, ["serve", "--port", str(port)], self.replica_env(name), self.root / "logs", port)
        self.replicas.append(proc)
        return proc

    def publish(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /publish and wait for the job; returns the finished job."""
        started = self.trainer.post("/publish", json=body, headers=AUTH)
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]

        def done() -> dict[str, Any] | None:
            job: dict[str, Any] = self.trainer.get(f"/publishes/{job_id}").json()
            return job if job["status"] != "running" else None

        finished: dict[str, Any] = wait_for(done, 180, 0.2, f"publish {job_id} (log: {self.trainer.log()[-3000:]})")
        return finished

    def run(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        """POST /runs and wait until the run is no longer active; returns the run."""
        created = self.trainer.post("/runs", headers=AUTH, json={"kind": kind, "params": params})
        assert created.status_code == 201, created.text

        def ended() -> dict[str, Any] | None:
            run: dict[str, Any] = self.trainer.get(f"/runs/{created.json()['id']}").json()
            return None if run["active"] else run

        finished: dict[str, Any] = wait_for(ended, 300, 0.5, f"{kind} to end (log: {self.trainer.log()[-3000:]})")
        return finished

    def committed(self) -> int:
        return int((self.trainer.get("/sync/committed").json()["committed"] or {}).get("version") or 0)


@pytest.fixture(scope="module")
def http_cluster(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> Iterator[HttpCluster]:
    root = tmp_path_factory.mktemp("http-trainer")
    ports = [free_port() for _ in range(3)]
    urls = ",".join(f"http://127.0.0.1:{p}" for p in ports)  # the third answers only once started later
    trainer_port = free_port()
    # LOCKSTEP_KEEP_VERSIONS: the tests below roll back to version 1, so garbage collection must keep it.
    env = base_env(builtin_dir, LOCKSTEP_TRAINER_DATA_DIR=str(root / "trainer-data"), INFERENCE_URLS=urls,
                   LOCKSTEP_DISCOVERY="static", LOCKSTEP_API_TOKEN=TOKEN, HF_HOME=str(root / "hf-trainer"),
                   LOCKSTEP_KEEP_VERSIONS="50")
    trainer = spawn("trainer", ["trainer", "--port", str(trainer_port)], env, root / "logs", trainer_port)
    cluster = HttpCluster(root, builtin_dir, trainer, [], ports[2])
    try:
        wait_for(lambda: trainer.get("/ready").status_code == 200, READY_S, 0.2,
                 f"trainer ready (log: {trainer.log()[-2000:]})")
        for i, port in enumerate(ports[:2]):
            cluster.start_replica(f"h{i}", port)
        for proc in cluster.replicas:
            wait_for(proc.ready, READY_S, 0.1, f"{proc.name} ready (log: {proc.log()[-2000:]})")
        yield cluster
    finally:
        for proc in [trainer, *cluster.replicas]:
            proc.kill()


def serving(proc: Proc) -> tuple[int | None, bool]:
    status = proc.status()
    return status["serving_version"], bool(status["ready"])


def test_the_trainer_runs_without_a_shared_folder_and_keeps_its_data_in_its_own(http_cluster: HttpCluster) -> None:
    body = http_cluster.trainer.get("/cluster").json()
    assert body["discovery"]["mode"] == "static"
    live = [r for r in body["replicas"] if r["reachable"]]
    assert sorted(r["replica_id"] for r in live) == ["h0", "h1"]
    assert all(r["ready"] and r["serving_version"] == 0 for r in live)
    assert http_cluster.data_dir.is_dir()


def test_a_simulation_run_flips_both_replicas_to_the_same_version(http_cluster: HttpCluster) -> None:
    trainer = http_cluster.trainer
    run = http_cluster.run("simulation", {"rounds": 2, "requests_per_replica": 2, "max_new_tokens": 4,
                                          "timeout_s": 120})
    assert run["status"] == "succeeded", run["error"]
    rounds = run["rounds"]
    assert [r["model"] for r in rounds] == ["builtin:tiny-s1", "builtin:tiny"]
    for r in rounds:
        assert r["outcome"] == "committed" and r["converged"], r
        assert r["failed"] == 0 and r["mislabeled"] == 0 and r["errors"] == [], r
        assert r["replicas"] == 2 and r["version"] > r["from_version"]
    last = rounds[-1]["version"]
    assert [serving(p) for p in http_cluster.replicas] == [(last, True), (last, True)]
    assert http_cluster.committed() == last
    # The trainer's history and versions come from its data folder, as they would from the shared one.
    history = trainer.get("/history").json()
    assert [p["version"] for p in history["publishes"]] == [r["version"] for r in rounds]

    def flips_recorded() -> set[str] | None:  # the trainer's monitor notes flips on its next look (1 s)
        flips = {f["replica_id"] for f in trainer.get("/history").json()["flips"] if f["version"] == last}
        return flips if flips == {"h0", "h1"} else None

    wait_for(flips_recorded, 30, 0.2, "the trainer recording both replicas' flips to the last version")
    assert [v["version"] for v in trainer.get("/versions").json()["versions"]] == [r["version"] for r in rounds]
    assert (http_cluster.data_dir / "sync_state.json").is_file()


def test_a_published_directory_is_downloaded_verified_and_served(http_cluster: HttpCluster,
                                                                 tiny_dirs: dict[int, Path]) -> None:
    job = http_cluster.publish({"model": str(tiny_dirs[2])})
    result = job["result"]
    assert job["status"] == "done" and result["outcome"] == "committed", job
    version = result["version"]
    assert {r["replica_id"]: r["outcome"] for r in result["replicas"]} == {"h0": "serving", "h1": "serving"}
    assert len({r["weights_digest"] for r in result["replicas"]}) == 1
    for proc in http_cluster.replicas:
        cached = http_cluster.root / f"hf-{proc.name}" / "lockstep-versions" / f"{version:06d}"
        assert (cached / "MANIFEST.json").is_file() and list(cached.glob("*.safetensors"))
        assert f"assembled version {version}" in proc.log() and "every chunk verified" in proc.log()
        answer = proc.post("/generate", json={"prompt": "The cat", "max_new_tokens": 4, "temperature": 0})
        assert answer.headers["x-model-version"] == str(version)
        assert answer.headers["x-model-repo-id"] == f"versions/{version:06d}"


def test_a_corrupted_chunk_in_the_trainers_store_fails_the_stage_and_aborts_a_strict_publish(
        http_cluster: HttpCluster, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    before = http_cluster.committed()
    # Written into the trainer's store beside it (the store takes concurrent publishers), then damaged with its
    # size kept: only a sha256 check can notice. No replica holds any of its chunks, so each must fetch them.
    fresh = distinct_model(tiny_dirs[1], tmp_path / "fresh", 3)
    manifest = ModelStore(http_cluster.data_dir).publish_dir(fresh, source="test")
    damage_stored_file(http_cluster.data_dir, manifest.version, "model.safetensors")
    job = http_cluster.publish({"model": f"versions/{manifest.version}", "policy": "strict"})
    result = job["result"]
    assert result["outcome"] == "aborted", job
    assert "did not stage" in result["reason"] and "does not match its digest" in result["reason"], result
    assert {r["outcome"] for r in result["replicas"]} <= {"failed", "timeout"}
    assert http_cluster.committed() == before
    for proc in http_cluster.replicas:
        assert serving(proc) == (before, True)
        assert not (http_cluster.root / f"hf-{proc.name}" / "lockstep-versions" / f"{manifest.version:06d}").exists()
    state = http_cluster.trainer.get("/cluster").json()
    assert state["pending"]["phase"] == "abort" and state["committed"]["version"] == before


def test_downloads_and_stages_need_the_token(http_cluster: HttpCluster) -> None:
    version = http_cluster.committed()
    trainer, replica = http_cluster.trainer, http_cluster.replicas[0]
    manifest_path = f"/store/versions/{version}/manifest"
    assert trainer.get(manifest_path).status_code == 401
    assert trainer.get(manifest_path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert trainer.get(f"/store/versions/{version}/files/config.json").status_code == 401
    assert trainer.get(manifest_path, headers=AUTH).json()["version"] == version
    assert trainer.get(f"/store/versions/{version}/files/config.json", headers=AUTH).status_code == 200
    assert trainer.get(f"/store/versions/{version}/files/..%2Fsync_state.json", headers=AUTH).status_code == 404
    stage = {"model": f"versions/{version}", "version": version + 100}
    assert httpx.post(replica.url + "/admin/stage", json=stage).status_code == 401
    assert httpx.post(replica.url + "/admin/commit", json={"version": version}).status_code == 401


def test_a_replica_started_later_boots_into_the_committed_version_and_is_unready_before(
        http_cluster: HttpCluster) -> None:
    committed = http_cluster.committed()
    assert committed > 0
    late = http_cluster.start_replica("h2", http_cluster.late_port)
    seen: list[tuple[int | None, bool]] = []
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        try:
            # /ready first: a replica that flips between two reads then shows (committed, False), never a
            # (stale version, True) that it did not report at one instant.
            ready = late.get("/ready", timeout=2).status_code == 200
            status = late.get("/status", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        seen.append((status["serving_version"], ready))
        if ready and status["serving_version"] == committed:
            break
        time.sleep(0.05)
    assert seen and seen[-1] == (committed, True), f"{seen[-5:]} (log: {late.log()[-2000:]})"
    assert all(version == committed for version, _ in seen if version is not None), seen  # never v0 first
    assert all(not ready for version, ready in seen if version != committed), seen
    # It took the committed version from the replicas that serve it, not from the trainer.
    assert fetched(late)["origin"] == 0 and fetched(late)["peer"] > 0, fetched(late)
    # The trainer sees it, and the next publish goes to all three.
    wait_for(lambda: http_cluster.trainer.get("/cluster").json()["convergence"]["at_version"] == 3, 30, 0.2,
             "the trainer to count three replicas at the committed version")


def metric_values(proc: Proc, name: str, label: str) -> dict[str, float]:
    """``name{label="x"} value`` lines of a process's /metrics, by label value."""
    values = {}
    for line in proc.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and f'{label}="' in line:
            values[line.split(f'{label}="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return values


def fetched(proc: Proc) -> dict[str, float]:
    """Bytes a replica placed on its disk at stage, by source (local, peer, origin)."""
    return metric_values(proc, "lockstep_stage_bytes_fetched_total", "source")


def test_a_fine_tuned_version_moves_only_its_changed_chunks_and_the_trainer_sends_them_once(
        http_cluster: HttpCluster, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    base = distinct_model(tiny_dirs[2], tmp_path / "base", 4)
    first = http_cluster.publish({"model": str(base)})["result"]
    assert first["outcome"] == "committed", first
    tuned = fine_tuned(base, tmp_path / "tuned", ["lm_head.weight"])
    before = {p.name: fetched(p) for p in http_cluster.replicas}
    with GenerationLoad({p.name: p.url for p in http_cluster.replicas}, threads_per_replica=1) as load:
        second = http_cluster.publish({"model": str(tuned)})["result"]
    assert second["outcome"] == "committed", second
    store = ModelStore(http_cluster.data_dir)
    m1, m2 = store.get(first["version"]), store.get(second["version"])
    # Under load while the diff arrived from peers: every answer succeeded and is its labelled version's text.
    answers = load.stop()
    assert answers and check_answers(answers, {m1.version: greedy_texts(base), m2.version: greedy_texts(tuned)}) == []
    changed = m2.new_bytes
    assert changed is not None and 0 < changed < m2.total_size / 4
    served = metric_values(http_cluster.trainer, "lockstep_store_bytes_served_total", "version")
    # Each version's chunks left the trainer once, whatever the number of replicas: the others passed them on.
    assert m1.new_bytes is not None and m1.new_bytes <= served[str(m1.version)] <= m1.total_size
    assert served[str(m2.version)] == changed
    for proc in http_cluster.replicas:
        delta = {k: v - before[proc.name].get(k, 0) for k, v in fetched(proc).items()}
        assert delta["local"] == m2.total_size - changed and delta["peer"] + delta["origin"] == changed, delta


def test_a_replica_that_missed_a_commit_is_made_unready_and_caught_up_by_the_trainer(
        http_cluster: HttpCluster, tiny_dirs: dict[int, Path]) -> None:
    late = next(p for p in http_cluster.replicas if p.name == "h2")
    before = http_cluster.committed()
    assert serving(late) == (before, True)
    origin_bytes = fetched(late)["origin"]
    late.process.send_signal(signal.SIGSTOP)  # unreachable: the publish goes to the live replicas only
    try:
        job = http_cluster.publish({"model": str(tiny_dirs[0])})
    finally:
        late.process.send_signal(signal.SIGCONT)
    result = job["result"]
    assert result["outcome"] == "committed" and {r["replica_id"] for r in result["replicas"]} == {"h0", "h1"}
    version = result["version"]
    # Back, it still serves the old version; the trainer tells it (unready at once), stages and commits it.
    seen: list[tuple[int | None, bool]] = []

    def caught_up() -> bool:
        seen.append(serving(late))
        return seen[-1] == (version, True)

    wait_for(caught_up, 60, 0.05, f"h2 caught up to v{version} (trainer log: {http_cluster.trainer.log()[-2000:]})")
    assert fetched(late)["origin"] == origin_bytes  # from the replicas that committed it without h2
    told = seen.index((before, False))  # made unready while it still served the old version
    assert (before, True) not in seen[told:], seen
    # The trainer logs the end of a catch-up once its commit call returns, which may be after h2 serves.
    wait_for(lambda: f"replica h2 caught up: serving v{version}" in http_cluster.trainer.log(), 30, 0.1,
             "the trainer to log the catch-up")
    assert f"replica h2 serves v{before} but v{version} is committed: catching it up" in http_cluster.trainer.log()


def test_a_finetune_run_publishes_checkpoints_that_every_replica_downloads_and_serves(
        http_cluster: HttpCluster) -> None:
    trainer = http_cluster.trainer
    run = http_cluster.run("finetune", {"steps": 2, "publish_every": 1, "batch_size": 2, "group_size": 2,
                                        "max_new_tokens": 4, "eval_prompts": 2, "samples_per_version": 1,
                                        "timeout_s": 120})
    assert run["status"] == "succeeded", run["error"]
    versions = run["versions"]
    assert len(versions) == 2 and versions == sorted(versions)
    for version in versions:
        manifest = trainer.get(f"/store/versions/{version}/manifest", headers=AUTH).json()
        assert manifest["metadata"]["run_id"] == run["id"]
    evals = {e["version"]: e for e in run["evals"]}
    assert all(evals[v]["converged"] and evals[v]["serving"] == {"h0": v, "h1": v, "h2": v} for v in versions)
    for proc in http_cluster.replicas:
        assert serving(proc) == (versions[-1], True)
        assert f"assembled version {versions[-1]}" in proc.log()


def test_a_rollback_commits_an_earlier_version_again_on_every_replica(http_cluster: HttpCluster) -> None:
    started = http_cluster.trainer.post("/rollback", json={"to": 1}, headers=AUTH)
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    job = wait_for(lambda: (j := http_cluster.trainer.get(f"/publishes/{job_id}").json())["status"] != "running"
                   and j, 120, 0.2, "the rollback to end")
    result = job["result"]
    assert result["outcome"] == "committed" and result["rollback"] and result["version"] == 1, job
    assert {r["outcome"] for r in result["replicas"]} == {"serving"} and len(result["replicas"]) == 3
    assert [serving(p) for p in http_cluster.replicas] == [(1, True)] * 3
    assert http_cluster.committed() == 1


def test_the_cli_publishes_rolls_back_and_shows_status_through_the_trainer(http_cluster: HttpCluster,
                                                                           tiny_dirs: dict[int, Path]) -> None:
    import subprocess
    import sys

    def lockstep(*args: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
        env = base_env(http_cluster.builtin_dir, LOCKSTEP_API_TOKEN=token)
        return subprocess.run([sys.executable, "-m", "lockstep", *args, "--trainer", http_cluster.trainer.url],
                              env=env, capture_output=True, text=True, timeout=300)

    before = http_cluster.committed()
    published = lockstep("publish", str(tiny_dirs[2]))
    assert published.returncode == 0, published.stderr
    assert "uploading" in published.stderr  # a folder here, which a trainer elsewhere could not read
    version = http_cluster.committed()
    assert version > before and f"v{version} committed" in published.stdout
    assert [serving(p) for p in http_cluster.replicas] == [(version, True)] * 3
    status = lockstep("status")
    assert status.returncode == 0, status.stderr
    assert f"committed: v{version}" in status.stdout and "3/3 replicas at the committed version" in status.stdout
    assert all(name in status.stdout for name in ("h0", "h1", "h2"))
    rolled = lockstep("rollback", "--to", str(before))
    assert rolled.returncode == 0, rolled.stderr
    assert http_cluster.committed() == before
    assert [serving(p) for p in http_cluster.replicas] == [(before, True)] * 3
    refused = lockstep("publish", str(tiny_dirs[2]), token="wrong")
    assert refused.returncode == 2 and "401" in refused.stderr, refused.stderr
    not_a_model = lockstep("publish", str(http_cluster.root / "logs"))  # a folder here, but no model
    assert not_a_model.returncode == 2 and "config.json" in not_a_model.stderr, not_a_model.stderr
    assert "uploading" not in not_a_model.stderr  # refused before any byte was sent
    assert http_cluster.committed() == before


def test_a_model_uploaded_from_elsewhere_is_published_with_its_metadata_then_the_upload_removed(
        http_cluster: HttpCluster, tiny_dirs: dict[int, Path]) -> None:
    from lockstep.store.manifest import hash_file
    from lockstep.trainer.client import model_files, publish, wait_until_serving
    from tests.support.load import MAX_NEW_TOKENS, PROMPTS, greedy_texts

    url = http_cluster.trainer.url
    before = http_cluster.committed()  # tiny-s1's content, after the rollbacks above
    result = publish(tiny_dirs[0], trainer_url=url, token=TOKEN, metadata={"step": 7}, label="run-42 step 7")
    assert result.outcome == "committed" and result.version > before, result.summary()
    replicas = wait_until_serving(result.version, trainer_url=url, token=TOKEN, min_replicas=3)
    assert sorted(r["replica_id"] for r in replicas) == ["h0", "h1", "h2"]
    manifest = ModelStore(http_cluster.data_dir).get(result.version)
    assert manifest.source == "run-42 step 7" and manifest.metadata["step"] == 7
    sent = {name: hash_file(tiny_dirs[0] / name) for name in model_files(tiny_dirs[0])}
    assert {f.path: f.sha256 for f in manifest.files} == sent  # exactly the model files, byte for byte
    assert list((http_cluster.data_dir / "uploads").iterdir()) == []
    again = publish(tiny_dirs[0], trainer_url=url, token=TOKEN, label="run-42 step 7, once more")
    assert again.outcome == "unchanged" and again.version == result.version, again.summary()
    assert ModelStore(http_cluster.data_dir).latest().version == result.version  # no copy of the same content
    assert list((http_cluster.data_dir / "uploads").iterdir()) == []
    prompt = PROMPTS[0]
    expected = greedy_texts(tiny_dirs[0], [prompt])[prompt]
    for proc in http_cluster.replicas:
        answer = proc.post("/generate", json={"prompt": prompt, "max_new_tokens": MAX_NEW_TOKENS,
                                              "temperature": 0}).json()
        assert answer["model_version"] == result.version and answer["text"] == expected


def test_an_uploaded_fine_tune_crosses_the_network_as_its_changed_chunks(
        http_cluster: HttpCluster, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    from lockstep.trainer.client.http import TrainerClient

    tuned = fine_tuned(tiny_dirs[0], tmp_path / "tuned", ["model.embed_tokens.weight"])  # tiny-s0 is in the store
    for state in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):  # a Trainer checkpoint's
        (tuned / state).write_bytes(b"\x80\x04 pickled training state " * 1000)
    with TrainerClient(http_cluster.trainer.url, token=TOKEN) as client:  # as `lockstep publish DIR --trainer`
        result = client.publish_folder(tuned, label="one tensor changed")
        assert result.outcome == "committed", result.summary()
        manifest = ModelStore(http_cluster.data_dir).get(result.version)
        assert not {f.path for f in manifest.files} & {"optimizer.pt", "scheduler.pt", "rng_state.pth",
                                                       "trainer_state.json"}
        assert manifest.new_bytes is not None and 0 < manifest.new_bytes < manifest.total_size / 4
        assert client.bytes_sent == manifest.new_bytes  # only the changed tensor's chunk was sent
    assert list((http_cluster.data_dir / "uploads").iterdir()) == []
    # A chunk list that does not add up to its file, or a chunk whose bytes are not its name: 400, nothing kept.
    base = http_cluster.trainer.url
    upload_id = http_cluster.trainer.post("/store/uploads", headers=AUTH).json()["upload_id"]
    bad = httpx.put(f"{base}/store/uploads/{upload_id}/chunked/model.safetensors", headers=AUTH, json={
        "size": 10, "sha256": "a" * 64, "chunks": [{"offset": 0, "size": 4, "sha256": "b" * 64}]})
    assert bad.status_code == 400 and "add up to 4 bytes, the file has 10" in bad.text, bad.text
    lying = httpx.put(f"{base}/store/uploads/{upload_id}/chunks/{'c' * 64}", headers=AUTH, content=b"x")
    assert lying.status_code == 400 and "corrupted in transit" in lying.text, lying.text
    assert not (http_cluster.data_dir / "chunks" / "cc" / ("c" * 64)).exists()
    assert httpx.put(f"{base}/store/uploads/{upload_id}/chunks/{'c' * 64}", content=b"x").status_code == 401
    httpx.delete(f"{base}/store/uploads/{upload_id}", headers=AUTH)


def test_uploads_refuse_bad_paths_wrong_digests_missing_tokens_and_folders_that_are_not_models(
        http_cluster: HttpCluster, tiny_dirs: dict[int, Path]) -> None:
    trainer, before = http_cluster.trainer, http_cluster.committed()
    uploads = http_cluster.data_dir / "uploads"
    assert trainer.post("/store/uploads").status_code == 401
    upload_id = trainer.post("/store/uploads", headers=AUTH).json()["upload_id"]

    def put(path: str, data: bytes, **headers: str) -> httpx.Response:
        return httpx.put(f"{trainer.url}/store/uploads/{upload_id}/files/{path}", content=data,
                         headers={**AUTH, **headers}, timeout=30)

    assert httpx.put(f"{trainer.url}/store/uploads/{upload_id}/files/config.json", content=b"{}").status_code == 401
    for bad in ("..%2Fescape.json", ".hidden", "a/..%2F..%2Fb.json", "config.json.partial", "a/b/c/d/e.json"):
        refused = put(bad, b"{}")
        assert refused.status_code == 400 and "bad upload path" in refused.json()["error"]["message"], bad
    assert not (uploads / "escape.json").exists() and not (http_cluster.data_dir / "b.json").exists()
    weights = (tiny_dirs[0] / "model.safetensors").read_bytes()
    wrong = put("model.safetensors", weights, **{"X-Content-SHA256": "0" * 64})
    assert wrong.status_code == 400 and "corrupted in transit" in wrong.json()["error"]["message"]
    assert put("model.safetensors", weights, **{"X-Content-SHA256": "not-hex"}).status_code == 400
    assert list((uploads / upload_id).iterdir()) == []  # nothing kept of a refused file
    ok = put("model.safetensors", weights, **{"X-Content-SHA256": hashlib.sha256(weights).hexdigest()})
    assert ok.status_code == 200 and ok.json()["size"] == len(weights)
    # Weights without config.json are not a model: refused before anything starts; the upload stays open.
    not_a_model = trainer.post(f"/store/uploads/{upload_id}/publish", json={}, headers=AUTH)
    assert not_a_model.status_code == 400 and "config.json" in not_a_model.json()["error"]["message"]
    assert put("config.json", (tiny_dirs[0] / "config.json").read_bytes()).status_code == 200
    bad_policy = trainer.post(f"/store/uploads/{upload_id}/publish", json={"policy": "sometimes"}, headers=AUTH)
    assert bad_policy.status_code == 400 and "policy" in bad_policy.text
    assert httpx.delete(f"{trainer.url}/store/uploads/{upload_id}", headers=AUTH).status_code == 204
    assert not (uploads / upload_id).exists()
    assert put("config.json", b"{}").status_code == 404
    assert trainer.post(f"/store/uploads/{upload_id}/publish", json={}, headers=AUTH).status_code == 404
    assert trainer.post("/store/uploads/up-nope/publish", json={}, headers=AUTH).status_code == 404
    assert http_cluster.committed() == before  # nothing was published


def test_the_callback_example_uploads_each_checkpoint_to_the_trainer(http_cluster: HttpCluster) -> None:
    import subprocess
    import sys

    from tests.support.cluster import REPO

    before = http_cluster.committed()
    done = subprocess.run([sys.executable, str(REPO / "examples" / "train_with_callback.py"),
                           "--trainer", http_cluster.trainer.url, "--output", str(http_cluster.root / "callback"),
                           "--steps", "2", "--save-steps", "2", "--batch-size", "4"],
                          env=base_env(http_cluster.builtin_dir, LOCKSTEP_API_TOKEN=TOKEN), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    version = http_cluster.committed()
    assert version == before + 1 and f"v{version} committed" in done.stdout
    assert [serving(p) for p in http_cluster.replicas] == [(version, True)] * 3  # the callback waited for it
    published = {f.path for f in ModelStore(http_cluster.data_dir).get(version).files}
    assert "model.safetensors" in published and "tokenizer.json" in published
    assert not [n for n in published if n.endswith((".pt", ".pth", ".bin"))]  # no optimizer pickles


def test_a_rollout_through_the_trainer_api_holds_its_step_until_a_person_aborts_it(http_cluster: HttpCluster) -> None:
    trainer, before = http_cluster.trainer, http_cluster.committed()
    for bad, why in (({"canary": [25, 5]}, "must increase"), ({"canary": [5, 150]}, "less than or equal to 100"),
                     ({"canary": [5], "gates": {"no_such_gate": 1}}, "error_rate"),
                     ({"canary": [5], "gates": {"error_rate": "high"}}, "error_rate"),
                     ({"canary": [True]}, "number"), ({"task": "digits"}, "task belong to a rollout"),
                     # Without canary or shadow these would be ignored by a publish that commits at once.
                     ({"gates": {"kl_divergence": 0.5}}, "gates belong to a rollout"),
                     ({"step_seconds": 600, "min_requests": 1000}, "min_requests, step_seconds belong to a rollout"),
                     ({"canary": [5], "task": "digits", "task_prompts": 4}, "raise task_prompts")):
        refused = trainer.post("/publish", headers=AUTH, json={"model": "builtin:tiny-s2", **bad})
        assert refused.status_code in (400, 422) and why in refused.text, refused.text
    assert trainer.get("/rollout").status_code == 404
    started = trainer.post("/publish", headers=AUTH, json={"model": "builtin:tiny-s2", "canary": [20],
                                                           "step_seconds": 0, "min_requests": 10**9,
                                                           "task": "digits", "task_prompts": 4,
                                                           "gates": {"task_score": {"min_samples": 4}}})
    assert started.status_code == 202, started.text
    view = wait_for(lambda: (v := trainer.get("/rollout").json()).get("phase") == "step" and v, 180, 0.2,
                    f"the first step (log: {trainer.log()[-2000:]})")
    assert view["share"] == 20 and view["plan"]["shares"] == [20, 100]
    assert view["task_score"]["samples"] == 4  # the candidate answered held-out prompts before the first step
    assert [g["verdict"] for g in view["gates"] if g["name"] == "task_score"] == ["pass"]
    again = trainer.post("/publish", headers=AUTH, json={"model": "builtin:tiny-s1", "canary": [5]})
    assert again.status_code == 409  # one rollout at a time, nothing staged for it
    # The trainer reports the step once every replica holds it; each puts it in force at the step's activate_at.
    wait_for(lambda: all((p.status()["rollout"] or {}).get("share") == 20 for p in http_cluster.replicas), 30, 0.05,
             f"every replica to put the step in force at {view['steps'][-1]['activate_at']}")
    assert trainer.post("/rollout/abort").status_code == 401  # a change needs the token
    assert trainer.post("/rollout/abort", headers=AUTH).status_code == 202
    ended = wait_for(lambda: (v := trainer.get("/rollout").json())["phase"] == "rolled back" and v, 60, 0.2,
                     "the rollback")
    assert ended["human"] == "abort" and not ended["automatic_rollback"]
    assert http_cluster.committed() == before
    wait_for(lambda: all(serving(p) == (before, True) and not p.status()["staged"] for p in http_cluster.replicas),
             30, 0.1, "replicas back on the committed version, nothing staged")
    metrics = trainer.get("/metrics").text
    assert 'lockstep_rollouts_total{outcome="rolled back",trigger="person"} 1.0' in metrics
    assert "lockstep_rollout_gate_value{" not in metrics  # no rollout in progress: no gate to show
    # A rollout of what is already committed has nothing to roll out: it ends at once, and says so.
    committed = http_cluster.publish({"model": "builtin:tiny-s2"})["result"]
    assert committed["outcome"] == "committed", committed
    same = trainer.post("/publish", headers=AUTH, json={"model": f"versions/{committed['version']}",
                                                        "canary": [10]})
    assert same.status_code == 202, same.text
    job = wait_for(lambda: (j := trainer.get(f"/publishes/{same.json()['publish_id']}").json())["status"] != "running"
                   and j, 60, 0.2, "the rollout of the committed content")
    assert job["result"]["outcome"] == "unchanged", job["result"]
    assert trainer.get("/rollout").json()["phase"] == "unchanged"
    assert trainer.post("/rollout/promote", headers=AUTH).status_code == 404
