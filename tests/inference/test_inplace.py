"""In-place updates (LOCKSTEP_UPDATE_MODE=inplace): new weights copied into the live model during a short
admission pause; every answer still names the weights that wrote it, and other architectures are refused."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lockstep.models import loader
from lockstep.models.tiny import llama_config
from tests.inference.conftest import (
    PROMPTS,
    Served,
    builtin_seed,
    generate,
    replica_settings,
    served,
    wait_serving,
    wait_stage_failed,
)
from tests.inference.test_hot_swap import client_loop

UPDATES = ("builtin:tiny-s1", "builtin:tiny-s2", "builtin:tiny")


@pytest.fixture(scope="module")
def srv(builtin_dir: Path) -> Iterator[Served]:
    with served(replica_settings(builtin_dir, update_mode="inplace")) as s:
        yield s


def _pauses(url: str) -> tuple[float, float]:
    """(count, sum in seconds) of lockstep_inplace_pause_seconds."""
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
        for s in f.samples
        if s.name.startswith("lockstep_inplace_pause_seconds")
    }
    return samples["lockstep_inplace_pause_seconds_count"], samples["lockstep_inplace_pause_seconds_sum"]


def test_inplace_updates_under_load_label_every_answer(
    srv: Served, builtin_dir: Path, expected: dict[int, dict[str, str]]
) -> None:
    replica = srv.runtime.replica
    assert replica.serving is not None
    live = replica.serving.loaded
    assert srv.status()["update_mode"] == "inplace"
    models = {0: "builtin:tiny"}
    stop = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client_loop, srv.url, i, stop) for i in range(3)]
        try:
            for model in UPDATES:
                r = httpx.post(srv.url + "/update-model", json={"model_repo_id": model})
                assert r.status_code == 202, r.text
                models[r.json()["version"]] = model
                version = r.json()["version"]
                wait_serving(srv.url, version)
                own = generate(srv.url, PROMPTS[0])  # after the pause: the new weights, labelled as such
                assert own.headers["x-model-version"] == str(version)
                assert own.json()["text"] == expected[builtin_seed(model)][PROMPTS[0]]
        finally:
            stop.set()
        answers = [a for f in futures for a in f.result(timeout=300)]

    assert answers and all(a.status == 200 for a in answers), [a for a in answers if a.status != 200][:3]
    assert len({a.header_version for a in answers}) >= 2, "the load did not span the updates"
    for a in answers:
        assert (
            a.body is not None
            and a.body["model_version"] == a.header_version
            and models[a.header_version] == a.header_ref
        )
        assert a.body["text"] == expected[builtin_seed(a.header_ref)][a.prompt], f"mislabelled answer {a}"
    for client in range(3):
        seen = [a.header_version for a in sorted(answers, key=lambda a: a.seq) if a.client == client]
        assert seen == sorted(seen), f"client {client} saw versions go backwards: {seen}"

    count, seconds = _pauses(srv.url)
    assert count == len(UPDATES) and seconds > 0
    assert (
        replica.serving is not None and replica.serving.loaded is live
    )  # the same model object: no second copy
    settings = replica_settings(builtin_dir)
    fresh = loader.load(loader.resolve("builtin:tiny", settings), settings)
    assert srv.status()["weights_digest"] == fresh.weights_digest  # the copied weights are exactly tiny-s0's


def _other_architecture(dest: Path, tokenizer_from: Path, **changes: Any) -> Path:
    """A small LlamaForCausalLM unlike the tiny one, saved as safetensors with the tiny tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config("tiny")
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, dest / name)
    return dest


@pytest.mark.parametrize(
    "changes",
    [{"hidden_size": 128, "intermediate_size": 344}, {"num_hidden_layers": 5}, {"rms_norm_eps": 1e-3}],
    ids=["hidden-size", "more-layers", "norm-eps"],
)
def test_other_architecture_is_refused_naming_swap_mode(
    srv: Served,
    tiny_dirs: dict[int, Path],
    tmp_path: Path,
    expected: dict[int, dict[str, str]],
    changes: dict[str, Any],
) -> None:
    before = srv.status()
    folder = _other_architecture(tmp_path / "other", tiny_dirs[0], **changes)
    r = httpx.post(srv.url + "/update-model", json={"model_repo_id": str(folder)})
    assert r.status_code == 202, r.text
    st = wait_stage_failed(srv.url)
    assert (
        "same architecture" in st["staged"]["error"] and "LOCKSTEP_UPDATE_MODE=swap" in st["staged"]["error"]
    )
    assert "LOCKSTEP_UPDATE_MODE=swap" in st["last_error"]
    assert (
        st["serving_version"] == before["serving_version"]
        and st["weights_digest"] == before["weights_digest"]
    )
    assert st["ready"] and not st["updating"]
    r = generate(srv.url, PROMPTS[1])
    assert r.headers["x-model-version"] == str(before["serving_version"])
    assert r.json()["text"] == expected[builtin_seed(before["model"])][PROMPTS[1]]
