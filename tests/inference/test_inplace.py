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

from lockstep.inference.replica import Replica
from lockstep.inference.runtime import ReplicaRuntime
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
from tests.support.cluster import wait_for

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


# ------------------------------------------------------------------ integrity at flip time
@pytest.fixture
def inplace_replica(builtin_dir: Path) -> Iterator[Replica]:
    """An in-process in-place replica serving builtin:tiny as v0 in a cluster that committed v0."""
    replica = Replica(replica_settings(builtin_dir, update_mode="inplace"))
    replica.set_committed(0)
    replica.boot("builtin:tiny", 0)
    assert replica.ready
    yield replica
    replica.close()


def _live_digest(replica: Replica) -> str:
    assert replica.serving is not None
    return loader.weights_digest(replica.serving.loaded.model)


def _fresh_digest(builtin_dir: Path, ref: str) -> str:
    settings = replica_settings(builtin_dir)
    return loader.load(loader.resolve(ref, settings), settings).weights_digest


def _save(folder: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _change_on_disk(folder: Path, how: str, tiny_dirs: dict[int, Path]) -> None:
    """Change the staged folder's weights after the stage, as a writer of the volume could."""
    import torch
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if how == "other-weights":
        shutil.copy(tiny_dirs[2] / "model.safetensors", weights)
    elif how == "nan":
        tensors = load_file(str(weights))
        tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
        _save(folder, tensors)
    elif how == "other-shape":
        tensors = load_file(str(weights))
        name = next(k for k, v in tensors.items() if v.dim() == 2)
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
        _save(folder, tensors)
    else:
        weights.unlink()


@pytest.mark.parametrize("how", ["other-weights", "nan", "other-shape", "deleted"])
def test_the_flip_copies_exactly_what_was_staged_whatever_happens_to_the_files_meanwhile(
        inplace_replica: Replica, builtin_dir: Path, tiny_dirs: dict[int, Path], tmp_path: Path, how: str) -> None:
    replica = inplace_replica
    folder = tmp_path / "tiny-s1"
    shutil.copytree(tiny_dirs[1], folder)
    staged = replica.stage(str(folder), 1)
    assert staged.state.value == "staged", staged.error
    assert staged.weights_digest == _fresh_digest(builtin_dir, "builtin:tiny-s1")
    _change_on_disk(folder, how, tiny_dirs)
    old = replica.serving
    assert old is not None
    before = old.weights_digest
    replica.flip(1)  # what the commit at activate_at does
    assert replica.ready and replica.serving is not None and replica.serving.version == 1
    assert _live_digest(replica) == staged.weights_digest == replica.serving.weights_digest
    # The old slot shares the model object, but an answer it still labels names the weights that wrote it.
    assert old.weights_digest == before != staged.weights_digest


def test_a_published_weight_file_changed_after_its_verification_is_refused_at_stage(
        inplace_replica: Replica, tiny_dirs: dict[int, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from lockstep.store import ModelStore

    store = ModelStore(tmp_path / "shared")
    manifest = store.publish_dir(tiny_dirs[1])
    inplace_replica.store = store
    weights = store.path_of(manifest.version) / "model.safetensors"  # the copy assembled for this process
    # The file changes between the store's hash check and the read that loads it: the read is checked too.
    real_verify = store.verify

    def verify_then_change(n: int, files_dir: Path | None = None) -> Any:
        checked = real_verify(n, files_dir)
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
        return checked

    monkeypatch.setattr(store, "verify", verify_then_change)
    before = _live_digest(inplace_replica)
    info = inplace_replica.stage(f"versions/{manifest.version}", manifest.version, manifest.digest)
    assert info.state.value == "failed" and "changed after it was verified" in (info.error or "")
    assert inplace_replica.ready and _live_digest(inplace_replica) == before


def test_a_copy_that_fails_part_way_makes_the_replica_unready_until_the_committed_version_is_reloaded(
        inplace_replica: Replica, builtin_dir: Path) -> None:
    import torch

    from lockstep.core.errors import NotReady
    from lockstep.inference.inplace import PartialCopy

    replica = inplace_replica
    assert replica.stage("builtin:tiny-s1", 1).state.value == "staged"
    plan = replica._staged
    assert plan is not None and plan.inplace is not None
    names = sorted(plan.inplace.tensors)
    middle = names[len(names) // 2]
    good = plan.inplace.tensors[middle]
    plan.inplace.tensors[middle] = torch.empty(good.shape, dtype=good.dtype, device="meta")  # cannot be copied
    with pytest.raises(PartialCopy, match="failed after"):
        replica.flip(1)
    # Mixed weights are nobody's version: nothing is served, /ready says 503, /status says why.
    assert not replica.ready and replica.serving is None and replica.state.value == "failed"
    assert "failed part-way" in (replica.last_error or "") and replica.committed_version == 1
    with pytest.raises(NotReady):
        with replica.pinned(wait_s=0.1):
            pass
    replica.boot("builtin:tiny-s1", 1)  # the catch-up a watcher or the trainer starts
    assert replica.ready and _live_digest(replica) == _fresh_digest(builtin_dir, "builtin:tiny-s1")


def test_a_copy_refused_before_it_began_leaves_the_live_weights_untouched(inplace_replica: Replica) -> None:
    import torch

    from lockstep.core.errors import Conflict

    replica = inplace_replica
    before = _live_digest(replica)
    assert replica.stage("builtin:tiny-s1", 1).state.value == "staged"
    plan = replica._staged
    assert plan is not None and plan.inplace is not None
    name = sorted(plan.inplace.tensors)[-1]
    plan.inplace.tensors[name] = torch.zeros(3, 3)  # no longer fits: checked before the first copy
    with pytest.raises(Conflict, match="nothing was copied"):
        replica.flip(1)
    assert replica.serving is not None and replica.serving.version == 0 and _live_digest(replica) == before


def test_a_commit_that_cannot_be_applied_makes_the_replica_unready_and_says_why(
        inplace_replica: Replica, builtin_dir: Path) -> None:
    runtime = ReplicaRuntime(replica_settings(builtin_dir, update_mode="inplace"), replica=inplace_replica)
    assert inplace_replica.stage("builtin:tiny-s1", 1).state.value == "staged"
    runtime.schedule_commit(1, float("nan"))  # a time that never comes: before, the flip thread died silently
    wait_for(lambda: not runtime.status()["ready"], 30, 0.01, "the replica to go unready")
    status = runtime.status()
    assert status["committed_version"] == 1 and status["serving_version"] == 0
    assert "commit of v1 failed" in status["last_error"] and "finite" in status["last_error"]


def test_a_stage_that_works_clears_the_failure_of_the_stage_before_it(inplace_replica: Replica,
                                                                        tmp_path: Path) -> None:
    """Before, /status kept saying the last stage failed after a later one worked, until the next flip."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    failed = inplace_replica.stage(str(broken), 1)
    assert failed.state == "failed" and inplace_replica.last_error == failed.error
    assert inplace_replica.stage("builtin:tiny-s1", 2).state == "staged"
    assert inplace_replica.last_error is None
    inplace_replica.refuse_commit(3, None, "the cluster committed v3, which this replica cannot load")
    assert inplace_replica.stage("builtin:tiny-s2", 4).state == "staged"
    assert inplace_replica.last_error == "the cluster committed v3, which this replica cannot load"  # still true
