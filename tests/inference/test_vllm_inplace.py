"""In-place updates on the vLLM engine: one engine, new weights through vLLM's own reload path (issue 11).

Requests admitted before the flip finish on the old weights before vLLM reloads (the replica drains, then vLLM
pauses with mode="wait"), so no answer is mislabelled; vLLM's own per-answer record of the weight version that
sampled each token must agree with every label.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Proc, base_env, free_port, metric, spawn, wait_for
from tests.support.load import GenerationLoad, check_answers, greedy_texts
from tests.support.vllm import VLLM_ENV, needs_vllm, stage, vllm_processes, wait_gone, wait_ready

pytestmark = [pytest.mark.e2e, needs_vllm, pytest.mark.timeout(1800)]

TOKEN = "vllm-inplace-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> Iterator[Proc]:
    root = tmp_path_factory.mktemp("vllm-inplace")
    port = free_port()
    env = base_env(builtin_dir, **VLLM_ENV, LOCKSTEP_API_TOKEN=TOKEN, LOCKSTEP_UPDATE_MODE="inplace",
                   LOCKSTEP_REPLICA_ID="vllm-inplace", LOCKSTEP_TRAINER_DATA_DIR=str(root / "data"))
    proc = spawn("vllm-inplace", ["serve", "--port", str(port), "--model", "builtin:tiny-s0"], env, root / "logs",
                 port)
    try:
        wait_ready(proc)
        yield proc
    finally:
        engines = vllm_processes(proc.process.pid)
        proc.process.terminate()
        proc.process.wait(timeout=60)
        assert not wait_gone(engines, 30), "a stopped replica left vLLM engine processes running"




def test_an_inplace_update_under_load_reloads_the_one_engine_and_mislabels_nothing(
        replica: Proc, tiny_dirs: dict[int, Path]) -> None:
    engine = sorted(vllm_processes(replica.process.pid))
    with GenerationLoad({replica.name: replica.url}) as load:
        staged = stage(replica, str(tiny_dirs[1]), 1, AUTH)
        assert staged["state"] == "staged", staged
        assert sorted(vllm_processes(replica.process.pid)) == engine, "in-place mode started a second engine"
        before = load.count()
        assert replica.post("/admin/commit", json={"version": 1}, headers=AUTH).status_code == 200
        wait_for(lambda: replica.status()["serving_version"] == 1, 120, 0.05, "the in-place flip to v1")
        wait_for(lambda: load.count() > before + 20, 120, 0.1, "answers after the flip")
    answers = load.answers
    expected = {0: greedy_texts(tiny_dirs[0], dtype="float32"), 1: greedy_texts(tiny_dirs[1], dtype="float32")}
    problems = check_answers(answers, expected)
    assert not problems, f"{len(problems)} problems in {len(answers)} answers:\n" + "\n".join(problems[:20])
    assert {a.body_version for a in answers} == {0, 1}
    assert metric(replica, "lockstep_engine_version_mismatches_total") == 0
    assert metric(replica, "lockstep_inplace_pause_seconds_count") == 1  # the pause is reported
    assert sorted(vllm_processes(replica.process.pid)) == engine
    status = replica.status()
    assert (status["ready"], status["last_error"]) == (True, None), status


def test_an_inplace_update_to_another_architecture_is_refused_with_the_swap_hint(
        replica: Proc, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_dirs[2], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 10  # same shapes, another model
    (other / "config.json").write_text(json.dumps(cfg))
    staged = stage(replica, str(other), 2, AUTH)
    assert staged["state"] == "failed" and "LOCKSTEP_UPDATE_MODE=swap" in staged["error"], staged
    status = replica.status()
    assert (status["serving_version"], status["ready"]) == (1, True), status


def test_weights_changed_on_disk_after_the_stage_do_not_reach_the_model(
        replica: Proc, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(tiny_dirs[2], source)
    staged = stage(replica, str(source), 2, AUTH)
    assert staged["state"] == "staged", staged
    shutil.copyfile(tiny_dirs[0] / "model.safetensors", source / "model.safetensors")  # v0's weights, after the stage
    assert replica.post("/admin/commit", json={"version": 2}, headers=AUTH).status_code == 200
    wait_for(lambda: replica.status()["serving_version"] == 2, 120, 0.05, "the in-place flip to v2")
    want = greedy_texts(tiny_dirs[2], dtype="float32")
    for prompt, text in want.items():
        r = replica.post("/generate", json={"prompt": prompt, "max_new_tokens": 8, "temperature": 0.0})
        assert (r.json()["model_version"], r.json()["text"]) == (2, text)
    assert replica.status()["weights_digest"] == staged["weights_digest"]
