"""A replica on the vLLM engine keeps the built-in engine's API and guarantees (issue 11).

One ``lockstep serve`` process with ``LOCKSTEP_ENGINE=vllm`` (swap mode, no shared folder: the trainer's HTTP
admin calls drive it) for the module; the tests run in file order. The oracle is the built-in engine in float32.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import load_file, save_file

from tests.support.cluster import Proc, base_env, free_port, metric, spawn, wait_for
from tests.support.load import PROMPTS, GenerationLoad, check_answers, greedy_texts
from tests.support.metrics import metric_samples, metric_value
from tests.support.vllm import VLLM_ENV, needs_vllm, rss_mib, stage, vllm_processes, wait_gone, wait_ready

pytestmark = [pytest.mark.e2e, needs_vllm, pytest.mark.timeout(1800)]

TOKEN = "vllm-replica-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> Iterator[Proc]:
    root = tmp_path_factory.mktemp("vllm-replica")
    port = free_port()
    env = base_env(builtin_dir, **VLLM_ENV, LOCKSTEP_API_TOKEN=TOKEN, LOCKSTEP_MAX_QUEUE="4",
                   LOCKSTEP_REPLICA_ID="vllm-1", LOCKSTEP_TRAINER_DATA_DIR=str(root / "data"))
    proc = spawn("vllm-1", ["serve", "--port", str(port), "--model", "builtin:tiny-s0"], env, root / "logs", port)
    try:
        wait_ready(proc)
        yield proc
    finally:
        engines = vllm_processes(proc.process.pid)
        proc.process.terminate()
        proc.process.wait(timeout=60)
        assert not wait_gone(engines, 30), "a stopped replica left vLLM engine processes running"


def _generate(proc: Proc, prompt: str, **body: Any) -> httpx.Response:
    return proc.post("/generate", json={"prompt": prompt, "max_new_tokens": 8, "temperature": 0.0, **body})




def test_greedy_answers_equal_the_builtin_engines_on_both_apis(replica: Proc, tiny_dirs: dict[int, Path]) -> None:
    want = greedy_texts(tiny_dirs[0], dtype="float32")
    for prompt in PROMPTS:
        r = _generate(replica, prompt)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == want[prompt]
        assert (r.headers["X-Model-Version"], r.json()["model_version"]) == ("0", 0)
        assert r.headers["X-Model-Repo-Id"] == "builtin:tiny-s0"

        chunks: list[dict[str, Any]] = []
        with httpx.stream("POST", replica.url + "/v1/completions", timeout=60,
                          json={"model": "lockstep", "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
                                "stream": True}) as s:
            assert s.status_code == 200
            assert s.headers["X-Model-Version"] == "0"
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        assert "".join(c["choices"][0]["text"] for c in chunks) == want[prompt]
        assert {c["model"] for c in chunks} == {"lockstep@v0"}


def test_a_request_that_leaves_the_length_unset_or_null_gets_the_default_cut_to_the_context(replica: Proc) -> None:
    """What the openai client sends by default: no max_tokens. The default is cut to the room the prompt leaves,
    from the engine's own context window (a vLLM slot holds no transformers model to read it from: it was a 500)."""
    for path, body in [("/generate", {"prompt": "Hi"}), ("/generate", {"prompt": "Hi", "max_new_tokens": None}),
                       ("/v1/completions", {"model": "lockstep", "prompt": "Hi"}),
                       ("/v1/chat/completions", {"model": "lockstep", "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": None})]:
        r = httpx.post(replica.url + path, json={**body, "temperature": 0.0}, timeout=120)
        assert r.status_code == 200, (path, body, r.status_code, r.text[:300])
        assert r.headers["X-Model-Version"] == "0"
    long = httpx.post(replica.url + "/generate", json={"prompt": "hello world " * 1500}, timeout=120)
    assert long.status_code == 400 and "fills the context limit" in long.json()["error"]["message"], long.text[:300]


def test_n_answers_of_one_request_come_from_one_version_on_both_apis(replica: Proc, tiny_dirs: dict[int, Path]) -> None:
    prompt = PROMPTS[0]
    want = greedy_texts(tiny_dirs[0], dtype="float32")[prompt]
    r = replica.post("/generate", json={"prompt": prompt, "max_new_tokens": 8, "temperature": 0.0, "n": 3})
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == "0" and [c["text"] for c in r.json()["choices"]] == [want] * 3
    sampled = replica.post("/v1/completions", json={"model": "lockstep", "prompt": prompt, "max_tokens": 8,
                                                    "temperature": 1.0, "seed": 11, "n": 4})
    assert sampled.status_code == 200, sampled.text
    choices = sampled.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3] and sampled.json()["usage"]["completion_tokens"] > 0
    assert len({c["text"] for c in choices}) > 1  # four samples, not one answer four times


def test_logprobs_are_the_models_in_the_distribution_each_token_was_drawn_from(
        replica: Proc, tiny_dirs: dict[int, Path]) -> None:
    import torch

    from lockstep.core.settings import Settings
    from lockstep.models import loader

    settings = Settings(device="cpu", dtype="float32", trust_remote_code=False, allow_pickle=False)
    loaded = loader.load(loader.resolve(str(tiny_dirs[0].resolve()), settings), settings)
    for sampling in ({"temperature": 0.0}, {"temperature": 0.8, "top_k": 20, "seed": 5}):
        body = replica.post("/generate", json={"prompt": PROMPTS[1], "max_new_tokens": 8, "logprobs": True,
                                               **sampling}).json()
        tokens, logprobs = body["completion_token_ids"], body["completion_logprobs"]
        assert len(logprobs) == len(tokens) == body["completion_tokens"]
        prompt = loaded.tokenizer(PROMPTS[1])["input_ids"]
        with torch.no_grad():
            logits = loaded.model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1].float()
        scaled = logits / (sampling["temperature"] or 1.0)
        if "top_k" in sampling:
            scaled = scaled.masked_fill(scaled < scaled.topk(sampling["top_k"], -1).values[:, -1:], float("-inf"))
        expected = torch.log_softmax(scaled, -1).gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=2e-2, rtol=0)


def test_status_and_metrics_show_the_engine_and_vllms_own_metrics(replica: Proc) -> None:
    status = replica.status()
    assert status["engine"] == "vllm"
    assert len(status["weights_digest"]) == 64
    text = replica.get("/metrics").text
    assert "vllm:num_requests_running{" in text  # vLLM's own families, beside Lockstep's
    assert "lockstep_serving_version 0.0" in text
    assert metric(replica, "lockstep_engine_version_mismatches_total") == 0


def test_a_full_queue_answers_429_with_retry_after_and_harms_no_admitted_request(replica: Proc) -> None:
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        r = _generate(replica, "Once upon a time", max_new_tokens=48)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(40)]  # 40 at once against a queue of 4 (+16 running)
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted({r.status_code for r in results})
    assert len(results) == 40 and set(codes) <= {200, 429}, codes
    refused = [r for r in results if r.status_code == 429]
    assert refused, "nobody was refused: the queue bound does not hold"
    assert all(float(r.headers["Retry-After"]) > 0 for r in refused)
    assert all(r.json()["model_version"] == 0 for r in results if r.status_code == 200)


def test_more_answers_than_the_queue_holds_are_refused_and_leave_nothing_queued(replica: Proc) -> None:
    """More answers than the queue can ever hold are a 400 (no retry could admit them), and nothing of them stays
    queued: before, the answers admitted before the one refused stayed counted as waiting, and a few such
    requests left the replica answering 429 to everyone, for good."""
    wait_for(lambda: replica.status()["running"] + replica.status()["queue_depth"] == 0, 60, 0.1, "an idle replica")
    for _ in range(3):
        refused = _generate(replica, "x", max_new_tokens=2, n=5)  # 5 answers, a queue of 4
        assert refused.status_code == 400 and "LOCKSTEP_MAX_QUEUE" in refused.text, refused.text
    wait_for(lambda: replica.status()["queue_depth"] == 0, 30, 0.1, "the cancelled answers to leave the queue")
    assert replica.status()["running"] == 0
    assert _generate(replica, "Once upon a time", max_new_tokens=4).status_code == 200


def _requests(replica: Proc, status: str) -> float:
    return metric_value(metric_samples(replica.get("/metrics").text), "lockstep_requests_total", status=status)


def test_a_client_that_hangs_up_cancels_its_request(replica: Proc) -> None:
    answered, left = _requests(replica, "200"), _requests(replica, "499")
    with httpx.stream("POST", replica.url + "/v1/completions", timeout=60,
                      json={"model": "lockstep", "prompt": "Once upon a time", "max_tokens": 1000,
                            "temperature": 0.0, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                break  # the first token is in: hang up
    wait_for(lambda: replica.status()["running"] + replica.status()["queue_depth"] == 0, 60, 0.1,
             "the abandoned request to leave the engine")
    wait_for(lambda: metric(replica, "vllm:num_requests_running") == 0, 60, 0.1, "vLLM to drop it too")
    wait_for(lambda: _requests(replica, "499") == left + 1, 30, 0.1, "the request counted as its client's (499)")
    assert _requests(replica, "200") == answered, "the request ran to its end: not cancelled"


def test_a_swap_under_load_fails_and_mislabels_nothing_and_returns_the_old_engines_memory(
        replica: Proc, tiny_dirs: dict[int, Path]) -> None:
    old_engine = vllm_processes(replica.process.pid)
    assert len(old_engine) >= 1
    with GenerationLoad({replica.name: replica.url}) as load:
        staged = stage(replica, str(tiny_dirs[1]), 1, AUTH)
        assert staged["state"] == "staged", staged
        both = vllm_processes(replica.process.pid)
        assert set(old_engine) < set(both), "the new version did not get its own engine"
        old_rss = rss_mib(old_engine)
        before = load.count()
        r = replica.post("/admin/commit", json={"version": 1}, headers=AUTH)
        assert r.status_code == 200, r.text
        wait_for(lambda: replica.status()["serving_version"] == 1, 60, 0.05, "the flip to v1")
        wait_for(lambda: load.count() > before + 20, 120, 0.1, "answers after the flip")
    answers = load.answers
    expected = {0: greedy_texts(tiny_dirs[0], dtype="float32"), 1: greedy_texts(tiny_dirs[1], dtype="float32")}
    problems = check_answers(answers, expected)
    assert not problems, f"{len(problems)} problems in {len(answers)} answers:\n" + "\n".join(problems[:20])
    assert {a.body_version for a in answers} == {0, 1}
    assert metric(replica, "lockstep_engine_version_mismatches_total") == 0
    assert not wait_gone(old_engine, 120), "the old engine's processes are still running after the flip"
    assert old_rss > 100, old_rss  # what went back to the system with them, MiB
    assert replica.ready()


def _broken_copy(src: Path, dst: Path, **config: Any) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_failed_vllm_load_is_reported_and_the_old_version_keeps_serving(
        replica: Proc, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    serving = replica.status()["serving_version"]
    engines = vllm_processes(replica.process.pid)

    # vLLM refuses the architecture: the engine fails to start.
    unknown = _broken_copy(tiny_dirs[2], tmp_path / "unknown", architectures=["NoSuchModelForCausalLM"])
    staged = stage(replica, str(unknown), serving + 1, AUTH)
    assert staged["state"] == "failed" and "NoSuchModelForCausalLM" in staged["error"], staged
    assert "NoSuchModelForCausalLM" in replica.status()["last_error"]

    # Non-finite weights: refused from the files, before any engine starts.
    nan = _broken_copy(tiny_dirs[2], tmp_path / "nan")
    weights = nan / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, weights)
    staged = stage(replica, str(nan), serving + 1, AUTH)
    assert staged["state"] == "failed" and "non-finite" in staged["error"], staged

    time.sleep(0.5)
    status = replica.status()
    assert (status["serving_version"], status["ready"]) == (serving, True), status
    assert _generate(replica, PROMPTS[0]).json()["model_version"] == serving
    assert not wait_gone(list(set(vllm_processes(replica.process.pid)) - set(engines)), 60), \
        "a failed start left engine processes behind"


def test_vllms_own_metrics_follow_the_serving_engine_while_another_is_staged_and_after_it_is_dropped(
        replica: Proc, tiny_dirs: dict[int, Path]) -> None:
    """vLLM registers each engine's vllm:* series in the process-wide registry, where a staged engine replaced
    the serving one's: before, they counted the staged engine from its stage on, and froze for good once it was
    dropped."""
    serving = replica.status()["serving_version"]

    def tokens() -> float:
        return metric_value(metric_samples(replica.get("/metrics").text), "vllm:generation_tokens_total")

    staged = stage(replica, str(tiny_dirs[1]), serving + 1, AUTH)
    assert staged["state"] == "staged", staged
    for dropped in (False, True):
        if dropped:
            assert replica.post("/admin/abort", json={"version": serving + 1}, headers=AUTH).status_code == 200
            wait_for(lambda: not replica.status()["staged"], 60, 0.1, "the staged engine dropped")
        before = tokens()
        answer = _generate(replica, PROMPTS[0]).json()
        assert answer["model_version"] == serving
        expected = before + answer["completion_tokens"]
        wait_for(lambda: tokens() >= expected,  # noqa: B023 (used at once, in this iteration)
                 30, 0.1, f"the serving engine's tokens in vllm:generation_tokens_total "
                 f"({'after' if dropped else 'while'} another engine is staged)")
