"""A staged model must generate finite logits before it reports staged: corrupt weights fail the stage, in
both update modes, and the replica keeps serving what it served."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lockstep.core.settings import Settings
from tests.inference.conftest import (
    PROMPTS,
    builtin_seed,
    generate,
    replica_settings,
    served,
    wait_stage_failed,
)


def _with_weight(src: Path, dest: Path, value: float) -> Path:
    """A copy of ``src`` where one element of one layer weight is ``value`` (NaN, inf, or too big for fp16)."""
    shutil.copytree(src, dest)
    weights = load_file(dest / "model.safetensors")
    name = next(n for n in sorted(weights) if n.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = value
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("mode", ["swap", "inplace"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_fail_the_stage_and_the_replica_keeps_serving(
        builtin_dir: Path, tiny_dirs: dict[int, Path], tmp_path: Path, expected: dict[int, dict[str, str]],
        mode: str, value: float) -> None:
    corrupt = _with_weight(tiny_dirs[1], tmp_path / "corrupt", value)
    with served(replica_settings(builtin_dir, update_mode=mode)) as srv:
        before = srv.status()
        r = httpx.post(srv.url + "/update-model", json={"model_repo_id": str(corrupt)})
        assert r.status_code == 202, r.text
        st = wait_stage_failed(srv.url)
        assert "non-finite" in st["staged"]["error"], st["staged"]["error"]
        assert st["serving_version"] == before["serving_version"]
        assert st["weights_digest"] == before["weights_digest"] and st["ready"]
        answer = generate(srv.url, PROMPTS[0])
        assert answer.headers["x-model-version"] == str(before["serving_version"])
        assert answer.json()["text"] == expected[builtin_seed(before["model"])][PROMPTS[0]]


def test_weights_that_overflow_the_serving_dtype_fail_an_inplace_stage(
        builtin_dir: Path, tiny_dirs: dict[int, Path], tmp_path: Path) -> None:
    big = _with_weight(tiny_dirs[1], tmp_path / "big", 1e6)  # finite in float32, inf in float16
    settings: Settings = replica_settings(builtin_dir, update_mode="inplace", dtype="float16")
    with served(settings) as srv:
        assert srv.runtime.replica.serving is not None
        assert next(srv.runtime.replica.serving.loaded.model.parameters()).dtype == torch.float16
        r = httpx.post(srv.url + "/update-model", json={"model_repo_id": str(big)})
        assert r.status_code == 202, r.text
        st = wait_stage_failed(srv.url)
        assert "non-finite" in st["staged"]["error"] and "float16" in st["staged"]["error"], st["staged"]["error"]
        assert st["ready"]
