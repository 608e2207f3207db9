"""Publishing from your own code: a folder or an in-memory model becomes the next version on every replica."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lockstep.core.errors import BadModelRef, BadRequest
from lockstep.store import ModelStore
from lockstep.trainer.client import model_files, publish, wait_until_serving
from tests.support.cluster import LocalCluster


def test_only_model_files_are_taken_from_a_checkpoint_folder(tiny_dirs: dict[int, Path],
                                                              tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-10"
    shutil.copytree(tiny_dirs[1], folder)
    for junk in ("optimizer.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"):
        (folder / junk).write_bytes(b"pickle")
    chosen = set(model_files(folder))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= chosen
    assert chosen.isdisjoint({"optimizer.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"})


def test_folders_without_safetensors_or_tokenizer_are_refused(tiny_dirs: dict[int, Path],
                                                               tmp_path: Path) -> None:
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_dirs[1], no_weights)
    (no_weights / "model.safetensors").rename(no_weights / "pytorch_model.bin")
    with pytest.raises(BadModelRef, match="safetensors"):
        publish(no_weights, shared_dir=tmp_path / "shared")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dirs[1] / name, no_tokenizer / name)
    with pytest.raises(BadRequest, match="tokenizer="):
        publish(no_tokenizer, shared_dir=tmp_path / "shared")
    assert not (tmp_path / "shared" / "versions").exists() or not ModelStore(tmp_path / "shared").list()


@pytest.mark.e2e
def test_a_folder_and_an_in_memory_model_are_published_and_served(cluster: LocalCluster,
                                                                  tiny_dirs: dict[int, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = publish(tiny_dirs[2], shared_dir=cluster.shared, metadata={"step": 5, "loss": 1.25})
    assert result.outcome == "committed", result.summary()
    beats = wait_until_serving(result.version, shared_dir=cluster.shared, timeout_s=60, min_replicas=2)
    assert sorted(b.replica_id for b in beats) == sorted(p.name for p in cluster.replicas)
    folder = cluster.shared / "versions" / f"{result.version:06d}"
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["metadata"]["step"] == 5 and manifest["metadata"]["parent"] == manifest["parent"]

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[1])
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[1])
    second = publish(model, tokenizer, shared_dir=cluster.shared, metadata={"step": 6})
    assert second.outcome == "committed" and second.version > result.version
    wait_until_serving(second.version, shared_dir=cluster.shared, timeout_s=60, min_replicas=2)
    for proc in cluster.replicas:
        assert proc.status()["serving_version"] == second.version
